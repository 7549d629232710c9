"""`edge-models` console script: build models for the gateway."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sub-command, and turn expected failures into one line and exit code 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    from gateway.errors import ModelError

    try:
        return demo_model.run(args)
    except (demo_model.ModelQualityError, ExportError, ModelError) as exc:
        print(f"edge-models: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
