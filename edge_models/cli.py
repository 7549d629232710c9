"""`edge-models` console script: build models for the gateway."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.errors import ModelError


def _parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per model recipe."""
    parser = argparse.ArgumentParser(prog="edge-models", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="train, export and check the demo pump anomaly model")
    # Declared here, not imported from demo_model, so `--help` works without PyTorch installed.
    demo.add_argument(
        "--out", type=Path, required=True, help="folder for pump_ae.onnx + pump_ae.manifest.json"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the training data and weights (default 0)")
    fp16 = commands.add_parser(
        "fp16", help="write the FP16 copy of an ONNX model (for TensorRT) and check it against FP32 (needs onnx)"
    )
    fp16.add_argument("model", type=Path, help="the FP32 ONNX file; its manifest is read from beside it")
    fp16.add_argument("--out", type=Path, default=None, help="where to write it (default: <stem>.fp16.onnx beside MODEL)")
    fp16.add_argument("--manifest", type=Path, default=None, help="the model's manifest, if not beside it")
    fp16.add_argument(
        "--recorded", type=Path, default=None, help=".npy of normalized windows [N, L, C] to check on as well"
    )
    fp16.add_argument("--windows", type=int, default=256, help="random normalized windows to check on (default 256)")
    return parser


def _fp16(args: argparse.Namespace) -> int:
    """`edge-models fp16`: only the `onnx` package is needed, not PyTorch."""
    try:
        from edge_models import fp16
    except ModuleNotFoundError as exc:
        if exc.name != "onnx":
            raise
        print("edge-models: the onnx package is not installed: pip install 'edge-gateway[train]'", file=sys.stderr)
        return 1
    try:
        return fp16.run(args)
    except (fp16.Fp16Error, ModelError) as exc:
        print(f"edge-models: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sub-command, and turn expected failures into one line and exit code 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "fp16":
        return _fp16(args)
    try:
        from edge_models import demo_model
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(
            "edge-models: PyTorch is not installed; install the CPU build: pip install torch==2.13.0",
            file=sys.stderr,
        )
        return 1
    from edge_models.export import ExportError

    try:
        return demo_model.run(args)
    except (demo_model.ModelQualityError, ExportError, ModelError) as exc:
        print(f"edge-models: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
