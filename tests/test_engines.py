"""TensorRT engine bookkeeping without TensorRT (keys, files, profiles, buffers), and what happens here."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.config import InferenceSection, ModelConfig
from gateway.demo.run import MODEL_DIR, demo_config, write_config
from gateway.inference import BackendUnavailable
from gateway.inference.build_cli import run_build_engines
from gateway.inference.engines import (
    EngineKey,
    Platform,
    Profile,
    TensorSpec,
    atomic_write,
    buffer_sizes,
    engine_path,
    engine_source,
    load_cached,
    parse_l4t_release,
    profile_shapes,
    read_l4t_release,
    sidecar_path,
    timing_cache_path,
    write_engine,
)
from gateway.inference.tensorrt import load_tensorrt
from gateway.manifest import load_manifest, manifest_path_for

DEMO_MODEL = MODEL_DIR / "pump_ae.onnx"
ORIN = Platform(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", l4t_release="R36.4.3")
PROFILE = Profile(min_batch=1, opt_batch=4, max_batch=256, window_length=32, channels=8)
BASE = EngineKey(model="pump_ae", onnx_sha256="a" * 64, precision="fp16", profile=PROFILE, platform=ORIN)
no_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)


def _variants() -> dict[str, EngineKey]:
    """BASE with exactly one input of the key changed, per input."""
    replace = dataclasses.replace
    out = {
        "onnx_sha256": replace(BASE, onnx_sha256="b" * 64),
        "precision": replace(BASE, precision="fp32"),
        "tensorrt_version": replace(BASE, platform=replace(ORIN, tensorrt_version="10.13.0")),
        "gpu_name": replace(BASE, platform=replace(ORIN, gpu_name="NVIDIA Jetson Orin Nano")),
        "compute_capability": replace(BASE, platform=replace(ORIN, compute_capability="8.6")),
        "l4t_release": replace(BASE, platform=replace(ORIN, l4t_release="R36.3.0")),
        "no_l4t": replace(BASE, platform=replace(ORIN, l4t_release=None)),
    }
    for field in ("min_batch", "opt_batch", "max_batch", "window_length", "channels"):
        out[field] = replace(BASE, profile=replace(PROFILE, **{field: getattr(PROFILE, field) + 1}))
    return out


def test_the_key_changes_with_each_of_its_inputs_and_with_nothing_else() -> None:
    variants = _variants()
    digests = {name: key.digest for name, key in variants.items()}
    assert BASE.digest not in digests.values()
    assert len(set(digests.values())) == len(digests)  # every input moves the key on its own
    # Equal inputs, a fresh object: the same key. The model's name only names the file.
    same = EngineKey("pump_ae", "a" * 64, "fp16", dataclasses.replace(PROFILE), dataclasses.replace(ORIN))
    assert same.digest == BASE.digest
    renamed = dataclasses.replace(BASE, model="pump_ae_v2")
    assert renamed.digest == BASE.digest and renamed.file_name != BASE.file_name


def test_engine_sidecar_and_timing_cache_file_names(tmp_path: Path) -> None:
    path = engine_path(BASE, tmp_path)
    assert path == tmp_path / "engines" / f"pump_ae-{BASE.digest[:16]}.engine"
    assert sidecar_path(path) == tmp_path / "engines" / f"pump_ae-{BASE.digest[:16]}.json"
    # One timing cache per TensorRT version and GPU, shared by models and precisions built there.
    timing = timing_cache_path(ORIN, tmp_path)
    assert timing.parent == tmp_path / "engines" and timing.name.startswith("timing-")
    assert timing == timing_cache_path(dataclasses.replace(ORIN), tmp_path)
    for key in _variants().values():
        moved = key.platform != ORIN
        assert (timing_cache_path(key.platform, tmp_path) != timing) == moved


def test_profile_opt_is_the_number_of_assets_sharing_the_model_clamped_to_max_batch() -> None:
    manifest = load_manifest(manifest_path_for(DEMO_MODEL))
    assert profile_shapes(manifest, 256, 4) == PROFILE
    assert profile_shapes(manifest, 16, 40).opt_batch == 16
    assert profile_shapes(manifest, 1, 4) == Profile(1, 1, 1, 32, 8)
    assert (PROFILE.shape(1), PROFILE.shape(4), PROFILE.shape(256)) == ((1, 32, 8), (4, 32, 8), (256, 32, 8))
    assert str(PROFILE) == "batch 1..256 (opt 4)"


def test_buffer_sizes_at_the_profile_max_batch() -> None:
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    specs = [
        TensorSpec("window", (-1, 32, 8), f32, True),
        TensorSpec("score", (-1,), f32, False),
        TensorSpec("channel_error", (-1, 8), f32, False),
        TensorSpec("half", (-1, 8), f16, False),
    ]
    assert buffer_sizes(specs, 256) == {
        "window": 256 * 32 * 8 * 4,
        "score": 256 * 4,
        "channel_error": 256 * 8 * 4,
        "half": 256 * 8 * 2,
    }
    assert specs[0].row_bytes == 32 * 8 * 4 and specs[1].row_shape == ()
    with pytest.raises(BackendUnavailable, match="only the batch may be dynamic"):
        buffer_sizes([TensorSpec("window", (-1, -1, 8), f32, True)], 256)


@pytest.mark.parametrize(
    ("text", "release"),
    [
        (
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 "
            "01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n",
            "R36.4.3",
        ),
        (
            "# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64, DATE: Tue Feb 20 "
            "04:46:31 UTC 2024\n",
            "R35.5.0",
        ),
        (
            "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 "
            "17:05:08 UTC 2022\n",
            "R32.7.1",
        ),
        ("not a release file\n", None),
        ("", None),
    ],
)
def test_l4t_release_parsing(text: str, release: str | None, tmp_path: Path) -> None:
    assert parse_l4t_release(text) == release
    path = tmp_path / "nv_tegra_release"
    path.write_text(text, encoding="utf-8")
    assert read_l4t_release(path) == release


def test_no_l4t_release_file_means_not_a_jetson(tmp_path: Path) -> None:
    assert read_l4t_release(tmp_path / "absent") is None


def test_atomic_write_replaces_the_file_whole_and_never_writes_into_it(tmp_path: Path) -> None:
    path = tmp_path / "engines" / "m.engine"
    atomic_write(path, b"old engine")
    with path.open("rb") as reader:  # a reader of the old file (a loading gateway) keeps it whole
        atomic_write(path, b"new engine, longer")
        assert reader.read() == b"old engine"
    assert path.read_bytes() == b"new engine, longer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.engine"]  # no temporary files left
    # A failure before the rename (here the rename itself: the target is a directory) leaves nothing behind.
    blocked = tmp_path / "engines" / "blocked"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_write(blocked, b"x")
    assert sorted(p.name for p in path.parent.iterdir()) == ["blocked", "m.engine"]


def test_a_cached_engine_is_used_only_when_whole_and_built_for_the_same_key(tmp_path: Path) -> None:
    path = engine_path(BASE, tmp_path)
    assert load_cached(path, BASE) is None  # nothing cached yet
    write_engine(path, b"engine bytes" * 100, BASE, source=DEMO_MODEL, build_s=1.5)
    assert load_cached(path, BASE) == b"engine bytes" * 100
    assert load_cached(path, _variants()["max_batch"]) is None  # this file was built for another key
    # A truncated file (a copy cut short, a bad disk) never reaches TensorRT.
    path.write_bytes(b"engine bytes" * 50)
    assert load_cached(path, BASE) is None
    write_engine(path, b"engine bytes" * 100, BASE, source=DEMO_MODEL, build_s=1.5)
    sidecar_path(path).unlink()
    assert load_cached(path, BASE) is None  # no sidecar: not known to be complete


def test_engine_source_is_the_fp16_copy_for_fp16_and_its_absence_says_how_to_make_it(tmp_path: Path) -> None:
    fp32 = ModelConfig(name="pump_ae", path=DEMO_MODEL, assets=["pump01"], precision="fp32")
    assert engine_source(fp32) == DEMO_MODEL
    model = tmp_path / "pump_ae.onnx"
    model.write_bytes(DEMO_MODEL.read_bytes())
    fp16 = ModelConfig(name="pump_ae", path=model, assets=["pump01"])
    with pytest.raises(
        BackendUnavailable, match=rf"pump_ae\.fp16\.onnx not found .*edge-models fp16 {model}"
    ):
        engine_source(fp16)
    (tmp_path / "pump_ae.fp16.onnx").write_bytes(b"stand-in")
    assert engine_source(fp16) == tmp_path / "pump_ae.fp16.onnx"


@no_tensorrt
def test_load_tensorrt_says_tensorrt_is_not_installed_here(tmp_path: Path) -> None:
    cfg = ModelConfig(name="pump_ae", path=DEMO_MODEL, assets=["pump01"])
    manifest = load_manifest(manifest_path_for(DEMO_MODEL))
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        load_tensorrt(cfg, manifest, InferenceSection(cache_dir=tmp_path))
    assert not (tmp_path / "engines").exists()


def _config(tmp_path: Path, **model: object) -> Path:
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db", pumps=2)
    raw["models"][0].update(model)
    raw["inference"] = {"cache_dir": str(tmp_path / "cache")}
    return write_config(raw, tmp_path / "config.yaml")


@no_tensorrt
def test_build_engines_without_tensorrt_exits_0_and_says_onnx_runtime_runs_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_build_engines(_config(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "TensorRT is not available here" in out and "models run on ONNX Runtime" in out
    assert not (tmp_path / "cache").exists()
    # The installer runs the command line on every machine, x86 included.
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "build-engines", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "tensorrt is not installed" in done.stdout


def test_build_engines_skips_models_pinned_to_onnx_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_build_engines(_config(tmp_path, backend="onnxruntime-cpu")) == 0
    assert "no model has backend auto or tensorrt" in capsys.readouterr().out
