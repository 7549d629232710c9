"""`edge-gateway` command line: the only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gateway import __version__
from gateway.browse_cli import add_browse_command
from gateway.certs import add_certs_command
from gateway.errors import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, ConfigError, GatewayError, ModelError
from gateway.history import add_history_commands
from gateway.inference.build_cli import add_build_engines_command
from gateway.logs import setup_logging
from gateway.verify import add_verify_command

logger = logging.getLogger("gateway")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and the model files without connecting to anything."""
    from gateway.service import validate_config

    _, summary = validate_config(args.config)
    print(f"{args.config}: OK: {summary}")
    return EXIT_OK


async def _run_until_signalled(cfg_path: Path) -> int:
    from gateway.config import load_config
    from gateway.sdnotify import Notifier
    from gateway.service import Service
    from gateway.watchdog import ServiceNotifier

    cfg = load_config(cfg_path)
    # READY=1, STATUS= and watchdog pings for systemd (Type=notify); does nothing when run by hand.
    notify = ServiceNotifier(Notifier(), cfg)
    service = Service(cfg_path, cfg, on_started=notify.started)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info("%s received: stopping (send again to force)", signal.Signals(signum).name)
            notify.stopping()
            service.request_stop()
        else:
            logger.error("second signal: exiting without a clean shutdown")
            logging.shutdown()
            # sys.exit would still wait for the loop's tasks and worker threads, which may be what hangs.
            os._exit(EXIT_RUNTIME)

    def on_reload() -> None:
        logger.info("SIGHUP received: reloading %s", cfg_path)
        notify.reloading()
        service.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    async with notify.running():
        return await service.run()


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT; SIGHUP validates the config file again and, if valid, applies it."""
    return asyncio.run(_run_until_signalled(args.config))


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulated PLC + broker + gateway + live alarm view."""
    from gateway.demo.run import run_demo

    return asyncio.run(run_demo(seconds=args.seconds, workdir=args.workdir))


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput and latency figures for this device."""
    if args.inference:
        from gateway.bench_inference import run_inference_bench

        return run_inference_bench(args.config, as_json=args.json, per_batch_s=args.per_batch_s)
    if args.delivery:
        from gateway.bench_delivery import run_delivery_bench

        return asyncio.run(
            run_delivery_bench(
                events=args.events, backlog=args.backlog, as_json=args.json, broker_down_s=args.broker_down_s
            )
        )
    from gateway.bench import run_bench

    return asyncio.run(
        run_bench(
            tags=args.tags,
            hz=args.hz,
            seconds=args.seconds,
            as_json=args.json,
            mode=args.mode,
            naive_seconds=args.naive_seconds,
        )
    )


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running daemon's metrics as tables (exit 3 when it cannot be reached)."""
    from gateway.status_cli import run_status

    return run_status(args.config, args.url, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="edge-gateway", description="OPC-UA to ML machine-health alarms over MQTT."
    )
    p.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a config file and its models; exit 0 if valid, 1 if not")
    c.add_argument("config", type=Path)
    c.set_defaults(func=cmd_check)
    r = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT; SIGHUP reloads the config (validated first)")
    r.add_argument("config", type=Path)
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="simulated PLC, broker and gateway; shows alarms arriving over MQTT")
    d.add_argument(
        "--seconds", type=float, default=None, help="stop by itself after this long (default: Ctrl-C)"
    )
    d.add_argument("--workdir", type=Path, default=None, help="keep the demo's config and database here")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="measure acquisition, inference and publish figures on this device")
    b.add_argument("--tags", type=int, default=1000)
    b.add_argument("--hz", type=float, default=10.0)
    b.add_argument("--seconds", type=float, default=30.0)
    b.add_argument("--mode", choices=["poll", "subscribe"], default="poll", help="how the gateway acquires")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--naive-seconds",
        type=float,
        default=5.0,
        help="afterwards, time a one-Read-per-node reader for comparison (0: skip)",
    )
    b.add_argument(
        "--delivery",
        action="store_true",
        help="instead: alarm events through the SQLite outbox to a subscriber, backlog after a broker restart",
    )
    b.add_argument(
        "--inference",
        action="store_true",
        help="instead: µs per window per model and backend at batch 1, 8, 64 vs bare ONNX Runtime and a NumPy reference",
    )
    b.add_argument(
        "--config", type=Path, default=None, help="with --inference: this config's models (default: the demo's)"
    )
    b.add_argument(
        "--per-batch-s", type=float, default=2.0, help="with --inference: timed seconds per model and batch size"
    )
    b.add_argument("--events", type=int, default=10_000, help="with --delivery: events in the sustained run")
    b.add_argument("--backlog", type=int, default=10_000, help="with --delivery: events stored while the broker is down")
    b.add_argument(
        "--broker-down-s",
        type=float,
        default=0.0,
        help="with --delivery: keep the broker down at least this long (default: while the backlog is stored)",
    )
    b.set_defaults(func=cmd_bench)
    add_browse_command(sub)
    add_certs_command(sub)
    add_history_commands(sub)
    add_verify_command(sub)
    add_build_engines_command(sub)
    st = sub.add_parser("status", help="the running gateway's figures from its metrics endpoint; exit 3 if unreachable")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=None, help="its config (default /etc/edge-gateway/config.yaml)")
    where.add_argument("--url", default=None, help="its metrics URL, e.g. http://127.0.0.1:9108/metrics")
    st.add_argument("--json", action="store_true", help="print every sample as one JSON object")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edge-gateway` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
