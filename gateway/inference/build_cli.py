"""`edge-gateway build-engines CONFIG [--force]`: build TensorRT engines ahead of time (the install step).

Without it the gateway builds a missing engine when it starts, which on a small Orin takes minutes
before the first window is scored. On a machine without TensorRT there is nothing to build: it says
so and exits 0, because the installer runs it everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.config import load_config
from gateway.errors import EXIT_OK, EXIT_RUNTIME, ModelError
from gateway.inference import BackendUnavailable
from gateway.inference.engines import EngineKey, engine_dir
from gateway.inference.tensorrt import open_tensorrt, prepare_engine
from gateway.models import load_manifests

TENSORRT_BACKENDS = ("auto", "tensorrt")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def run_build_engines(config_path: Path, *, force: bool = False) -> int:
    """Build (or find cached) the engine of each model that may use TensorRT; 0 all ready, 3 if not."""
    cfg = load_config(config_path)
    models = [m for m in cfg.models if m.backend in TENSORRT_BACKENDS]
    if not models:
        print("no model has backend auto or tensorrt: no engine to build")
        return EXIT_OK
    try:
        here = open_tensorrt()
    except BackendUnavailable as exc:
        print(f"TensorRT is not available here ({exc}): models run on ONNX Runtime, no engine to build")
        return EXIT_OK
    manifests = load_manifests(cfg)
    p = here.platform
    l4t = f", L4T {p.l4t_release}" if p.l4t_release else ""
    print(f"TensorRT {p.tensorrt_version} on {p.gpu_name} (compute {p.compute_capability}{l4t})")
    print(f"engines in {engine_dir(cfg.inference.cache_dir)}")
    failed = 0
    for m in models:
        started_line = False

        def on_build(key: EngineKey, name: str = m.name) -> None:
            nonlocal started_line
            print(f"{name}: building {key.precision} engine for {key.profile} ...", end=" ", flush=True)
            started_line = True

        try:
            prepared = prepare_engine(
                here, m, manifests[m.name], cfg.inference, force=force, on_build=on_build
            )
        except (ModelError, OSError) as exc:
            failed += 1
            print(f"FAILED: {exc}" if started_line else f"{m.name}: FAILED: {exc}", flush=True)
            continue
        if prepared.built:
            print(f"done in {prepared.build_s or 0.0:.1f} s, {_size(prepared.size)}", flush=True)
        else:
            size = _size(prepared.size)
            print(f"{m.name}: cached {prepared.key.precision} engine {prepared.path.name}, {size}")
    if failed:
        print(f"{failed} of {len(models)} engine(s) failed: those models will run on ONNX Runtime")
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_build_engines(args: argparse.Namespace) -> int:
    """Build TensorRT engines for CONFIG's models."""
    return run_build_engines(args.config, force=args.force)


def add_build_engines_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `build-engines CONFIG [--force]`."""
    b = subparsers.add_parser(
        "build-engines",
        help="build the TensorRT engines of CONFIG's models ahead of time; exit 0 when ready or without "
        "TensorRT, 3 when a build failed",
    )
    b.add_argument("config", type=Path, help="the gateway's YAML config")
    b.add_argument("--force", action="store_true", help="rebuild engines even when a valid one is cached")
    b.set_defaults(func=cmd_build_engines)
