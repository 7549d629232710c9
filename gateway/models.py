"""Loading the configured models: manifest, backend, and how each asset's windows feed them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from gateway.config import GatewayConfig, ModelConfig
from gateway.errors import ModelError
from gateway.inference import Fallback, InferenceBackend
from gateway.inference.select import choice_summary, load_backend
from gateway.manifest import ModelManifest, load_manifest, manifest_path_for
from gateway.normalize import Normalizer, channel_permutation

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to serve: its backend plus, per asset, the column order its windows need."""

    cfg: ModelConfig
    manifest: ModelManifest
    backend: InferenceBackend
    normalizer: Normalizer
    columns: dict[str, np.ndarray]  # asset name -> asset tag columns in manifest channel order
    # Backends tried before `backend` and skipped, best first, each with why (the selection's record).
    fallbacks: list[Fallback] = field(default_factory=list)


def load_manifests(cfg: GatewayConfig) -> dict[str, ModelManifest]:
    """Read every model's manifest and check it fits the assets it serves (blocking: file reads)."""
    manifests: dict[str, ModelManifest] = {}
    problems: list[str] = []
    for i, m in enumerate(cfg.models):
        try:
            manifest = load_manifest(m.manifest or manifest_path_for(m.path))
            for asset_name in m.assets:
                asset = cfg.asset(asset_name)
                if asset.window.length != manifest.input.window_length:
                    raise ModelError(
                        f"model {m.name!r} expects windows of {manifest.input.window_length} samples, "
                        f"asset {asset_name!r} has window.length {asset.window.length}"
                    )
                channel_permutation(
                    asset.channels, manifest.input.channels, model=m.name, asset=asset_name
                )
                if manifest.sample_rate_hz and manifest.sample_rate_hz != asset.sample_rate_hz:
                    logger.warning(
                        "model %s was trained at %.3g Hz, asset %s samples at %.3g Hz",
                        m.name,
                        manifest.sample_rate_hz,
                        asset_name,
                        asset.sample_rate_hz,
                    )
            manifests[m.name] = manifest
        except ModelError as exc:
            problems.append(f"models[{i}] ({m.name}): {exc}")
    if problems:
        raise ModelError("\n".join(problems))
    return manifests


def load_models(cfg: GatewayConfig, manifests: dict[str, ModelManifest]) -> dict[str, LoadedModel]:
    """Load each model on the best backend that serves it (blocking: run it on the inference thread)."""
    loaded: dict[str, LoadedModel] = {}
    for m in cfg.models:
        manifest = manifests[m.name]
        backend, fallbacks = load_backend(m, manifest, cfg.inference)
        columns = {
            a: channel_permutation(
                cfg.asset(a).channels, manifest.input.channels, model=m.name, asset=a
            )
            for a in m.assets
        }
        loaded[m.name] = LoadedModel(m, manifest, backend, Normalizer(manifest), columns, fallbacks)
        logger.info(
            "model %s v%s on %s for %d asset(s)",
            m.name,
            manifest.version,
            choice_summary(backend, fallbacks),
            len(columns),
        )
    return loaded
