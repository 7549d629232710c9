"""`edge-gateway status`: the running daemon's metrics endpoint, as tables for a person on the device."""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from gateway.config import MetricsConfig
from gateway.errors import EXIT_OK, ConfigError, GatewayError
from gateway.yamlsrc import YamlDocument, YamlSyntaxError

# The service's config (systemd ConfigurationDirectory); its metrics section says where to ask.
DEFAULT_CONFIG = Path("/etc/edge-gateway/config.yaml")
# Longer than a scrape may take: the exporter waits up to 2 s for the event loop.
FETCH_TIMEOUT_S = 5.0
# A wildcard listen address is reached over loopback from the device itself.
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """The samples of one scrape by sample name (`edge_gateway_source_values_total`, `..._bucket`, ...)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, dict[Labels, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name][tuple(sorted(s.labels.items()))] = s.value

    def value(self, name: str, default: float = math.nan) -> float:
        """The value of an unlabelled sample, or `default` when it was not served."""
        return self.samples.get(name, {}).get((), default)

    def by(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """A labelled sample's values keyed by the given labels' values, in label order."""
        return {
            tuple(dict(key).get(label, "") for label in labels): v
            for key, v in self.samples.get(name, {}).items()
        }

    def as_json(self) -> dict[str, list[dict[str, object]]]:
        """Every sample as {name: [{"labels": {...}, "value": v}, ...]}."""
        return {
            name: [{"labels": dict(key), "value": v} for key, v in values.items()]
            for name, values in sorted(self.samples.items())
        }


def metrics_url(cfg: MetricsConfig) -> str:
    """The URL `edge-gateway run` serves metrics at with this config section."""
    if not cfg.enabled:
        raise GatewayError("metrics are disabled in the config (metrics.enabled: false); nothing to ask")
    if cfg.port == 0:
        raise GatewayError("metrics.port is 0 (any free port) in the config; give the URL with --url")
    host = _WILDCARD.get(cfg.host, cfg.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}/metrics"


def resolve_url(config: Path | None, url: str | None) -> str:
    """--url as given, else the metrics section of --config (default: the service's config if present)."""
    if url is not None:
        return url
    if config is None and not DEFAULT_CONFIG.exists():
        return metrics_url(MetricsConfig())
    return metrics_url(metrics_section(config or DEFAULT_CONFIG))


def metrics_section(path: Path) -> MetricsConfig:
    """The config file's `metrics` section alone: the rest may be mid-edit while the daemon runs on the last valid one."""
    try:
        doc = YamlDocument.from_path(path)
    except YamlSyntaxError as exc:
        raise ConfigError([str(exc)]) from exc
    section = doc.data.get("metrics") if isinstance(doc.data, dict) else None
    try:
        return MetricsConfig.model_validate(section or {})
    except ValidationError as exc:
        raise ConfigError([f"{doc.where(('metrics', *e['loc']))}: {e['msg']}" for e in exc.errors()]) from exc


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> Scrape:
    """Scrape `url`; GatewayError (one line) when nothing answers or it is not an edge-gateway."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise GatewayError(
            f"cannot reach the gateway's metrics at {url}: {reason} (is it running? systemctl status edge-gateway)"
        ) from exc
    try:
        scrape = Scrape(text)
    except ValueError as exc:
        raise GatewayError(f"{url} does not serve Prometheus metrics: {exc}") from exc
    if "edge_gateway_info" not in scrape.samples:
        raise GatewayError(f"{url} answers, but not with edge-gateway metrics")
    return scrape


def _table(headers: list[str] | None, rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; `headers` None for key/value lines."""
    lines = ([headers] if headers else []) + rows
    if not rows:
        return ["  (none)"]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]


def _n(value: float) -> str:
    return "?" if math.isnan(value) else f"{value:,.0f}"


def _bytes(value: float) -> str:
    if math.isnan(value):
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _listed(pairs: dict[tuple[str, ...], float]) -> str:
    """'a b 3, c d 1' for the non-zero values, or 'none'."""
    return ", ".join(f"{' '.join(k)} {_n(v)}" for k, v in sorted(pairs.items()) if v) or "none"


def render(s: Scrape, url: str) -> str:
    """The scrape as sections: sources, models, alarms, outbox/mqtt, process."""
    (gateway_id, version), _ = next(iter(s.by("edge_gateway_info", "gateway_id", "version").items()))
    out = [f"edge-gateway {gateway_id} {version}, metrics at {url}"]
    if s.value("edge_gateway_loop_responsive") != 1:
        out.append("WARNING: the gateway's event loop did not answer in time; only process figures are known")
    values = s.by("edge_gateway_source_values_total", "source")
    bad = s.by("edge_gateway_source_bad_tags", "source", "status")
    out += ["", "SOURCES"] + _table(
        ["source", "connected", "values acquired", "reconnects", "connect errors", "Bad tags"],
        [
            [
                name,
                "yes" if s.by("edge_gateway_source_connected", "source").get((name,)) == 1 else "NO",
                _n(n),
                _n(s.by("edge_gateway_source_reconnects_total", "source").get((name,), math.nan)),
                _n(s.by("edge_gateway_source_connect_errors_total", "source").get((name,), math.nan)),
                _listed({(status,): v for (src, status), v in bad.items() if src == name}),
            ]
            for (name,), n in sorted(values.items())
        ],
    )
    calls = s.by("edge_gateway_inference_seconds_count", "model")
    total = s.by("edge_gateway_inference_seconds_sum", "model")
    out += ["", "MODELS"] + _table(
        ["model", "backend", "windows inferred", "calls", "mean latency"],
        [
            [
                model,
                backend,
                _n(n),
                _n(calls.get((model,), math.nan)),
                f"{1000 * total[(model,)] / calls[(model,)]:.2f} ms" if calls.get((model,)) else "-",
            ]
            for (model, backend), n in sorted(
                s.by("edge_gateway_windows_inferred_total", "model", "backend").items()
            )
        ],
    )
    out += _table(
        None,
        [
            ["windows skipped", _listed(s.by("edge_gateway_windows_skipped_total", "asset", "reason"))],
            ["windows dropped", _listed(s.by("edge_gateway_windows_dropped_total", "model"))],
            ["inference errors", _n(s.value("edge_gateway_inference_errors_total"))],
        ],
    )
    states = s.by("edge_gateway_alarms", "state")
    out += ["", "ALARMS"] + _table(
        None,
        [
            ["open", ", ".join(f"{state} {_n(v)}" for (state,), v in states.items()) or "?"],
            ["events since start", _n(s.value("edge_gateway_alarm_events_total"))],
        ],
    )
    waiting = s.by("edge_gateway_outbox_messages", "kind")
    connected = s.value("edge_gateway_mqtt_connected")
    out += ["", "OUTBOX / MQTT"] + _table(
        None,
        [
            ["mqtt", "connected" if connected == 1 else "?" if math.isnan(connected) else "DISCONNECTED"],
            ["published", _n(s.value("edge_gateway_mqtt_published_total"))],
            ["publish failures", _n(s.value("edge_gateway_mqtt_publish_failures_total"))],
            [
                "waiting",
                f"{_n(waiting.get(('alarm_event',), math.nan))} alarm event(s), "
                f"{_n(waiting.get(('data',), math.nan))} other message(s); "
                f"oldest {_duration(s.value('edge_gateway_outbox_oldest_age_seconds'))}",
            ],
            [
                "outbox size",
                f"{_bytes(s.value('edge_gateway_outbox_bytes'))} of {_bytes(s.value('edge_gateway_outbox_quota_bytes'))}",
            ],
            ["dropped", _listed(s.by("edge_gateway_outbox_dropped_total", "kind"))],
            ["expired", _n(s.value("edge_gateway_outbox_expired_total"))],
            ["scores dropped", _listed(s.by("edge_gateway_scores_dropped_total", "stage"))],
        ],
    )
    start = s.value("process_start_time_seconds")
    out += ["", "PROCESS"] + _table(
        None,
        [
            ["uptime", _duration(time.time() - start)],
            ["cpu", f"{s.value('process_cpu_seconds_total'):.1f} s"],
            ["memory", f"{_bytes(s.value('process_resident_memory_bytes'))} resident"],
            ["sqlite", f"{_bytes(s.value('edge_gateway_sqlite_bytes'))} (file + WAL)"],
            ["retention deleted", _listed(s.by("edge_gateway_retention_deleted_total", "table"))],
            [
                "config",
                f"{_n(s.value('edge_gateway_config_reloads_total'))} reload(s), "
                f"{_n(s.value('edge_gateway_config_reload_failures_total'))} refused"
                + ("" if s.value("edge_gateway_config_last_reload_ok") != 0 else "; LAST RELOAD REFUSED: see the log"),
            ],
        ],
    )
    return "\n".join(out)


def run_status(config: Path | None, url: str | None, *, as_json: bool) -> int:
    """Print the running gateway's figures; GatewayError (exit 3) when it cannot be reached."""
    target = resolve_url(config, url)
    scrape = fetch(target)
    print(
        json.dumps({"url": target, "metrics": scrape.as_json()}, indent=2)
        if as_json
        else render(scrape, target)
    )
    return EXIT_OK
