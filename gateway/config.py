"""Typed configuration, validated once at load; errors name the YAML file, line and path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.yamlsrc import Loc, YamlDocument, YamlSyntaxError, format_loc

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Severity = Literal["low", "medium", "high", "critical"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Model):
    id: Name = "gw01"
    shutdown_timeout_s: PositiveFloat = 4.0
    # One INFO line per source and one for the pipeline this often; 0 turns it off.
    health_log_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 60.0


def read_secret(where: str, env: str | None, file: Path | None, *, key: str = "password") -> str | None:
    """A secret from the environment variable `env` or the file `file`; `where` and `key` name the config keys."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError([f"{where}.{key}_env: environment variable {env} is not set"])
        return value
    if file:
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{where}.{key}_file: cannot read {file}: {exc.strerror}"]) from exc
    return None


class SourceSecurity(_Model):
    """OPC-UA message security and user identity of one source; both parts are optional."""

    policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = "None"
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    # The gateway's application instance certificate (DER or PEM) and its unencrypted RSA key.
    certificate: Path | None = None
    private_key: Path | None = None
    # Defaults to the URI in the certificate's SubjectAltName, which servers require to match.
    application_uri: str | None = None
    # Trusted server certificates (DER or PEM); unknown ones are copied to <trust_dir>/rejected/.
    trust_dir: Path | None = None
    trust_on_first_use: bool = False
    username: str | None = None
    # The password never lives in the YAML: name an environment variable or a file.
    password_env: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SourceSecurity:
        if self.policy == "None":
            given = sorted(
                k for k in ("mode", "certificate", "private_key", "trust_dir", "trust_on_first_use")
                if k in self.model_fields_set
            )
            if given:
                raise ValueError(f"{', '.join(given)} need a security policy other than None")
        else:
            missing = [k for k in ("certificate", "private_key", "trust_dir") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"policy {self.policy} needs {', '.join(missing)}")
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        if self.username is None and (self.password_env or self.password_file):
            raise ValueError("a password needs a username")
        if self.username is not None and not (self.password_env or self.password_file):
            raise ValueError("username needs password_env or password_file")
        return self

    def password(self, source: str) -> str | None:
        """The user's password from the environment or a file, or None when no user is configured."""
        return read_secret(f"source {source}: security", self.password_env, self.password_file)


class CommLossConfig(_Model):
    """The system alarm `comm_loss` raised when a source stays disconnected."""

    enabled: bool = True
    delay_s: PositiveFloat = 10.0  # disconnected this long before the alarm is raised
    severity: Severity = "high"
    # asset: one alarm on each asset the source feeds, on each asset's alarm topic (the operator
    # sees which machines are blind); source: one alarm for the PLC, with the source name in the
    # asset field and topic (a PLC feeding many assets raises one alarm, not one per asset).
    scope: Literal["asset", "source"] = "asset"


class Deadband(_Model):
    """A monitored item's DataChangeFilter deadband: changes within it are not reported."""

    type: Literal["absolute", "percent"]
    # Absolute: in engineering units. Percent: of the node's EURange, which the server must define.
    value: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError(f"a percent deadband must be within 0..100, got {self.value:g}")
        return self


class SourceConfig(_Model):
    name: Name
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    poll_interval_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 100
    timeout_s: PositiveFloat = 4.0
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    # Caps the nodes per Read request below the server's own MaxNodesPerRead; None: the server's alone.
    max_nodes_per_read: Annotated[int, Field(ge=1)] | None = None
    security: SourceSecurity | None = None
    comm_loss: CommLossConfig = CommLossConfig()
    # poll: one Read of every tag per poll_interval_ms; subscribe: monitored items, changes only.
    mode: Literal["poll", "subscribe"] = "poll"
    publishing_interval_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 100
    # None: the publishing interval.
    sampling_interval_ms: Annotated[int, Field(ge=0, le=3_600_000)] | None = None
    queue_size: Annotated[int, Field(ge=1, le=10_000)] = 10
    deadband: Deadband | None = None

    @model_validator(mode="after")
    def _subscription_keys(self) -> SourceConfig:
        if self.mode == "poll":
            given = sorted(
                k for k in ("publishing_interval_ms", "sampling_interval_ms", "queue_size", "deadband")
                if k in self.model_fields_set
            )
            if given:
                raise ValueError(f"{', '.join(given)}: only with mode: subscribe")
        return self

    @property
    def sampling_ms(self) -> int:
        """The monitored items' sampling interval in effect: sampling_interval_ms or the publishing interval."""
        return self.publishing_interval_ms if self.sampling_interval_ms is None else self.sampling_interval_ms


class TagConfig(_Model):
    name: Name
    node_id: str = Field(min_length=3)
    unit: str = ""
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    # A one-dimensional array node (e.g. a vibration waveform block) of exactly this many elements:
    # it fills as many consecutive channels, named name[0] .. name[N-1]; scale and offset apply to each.
    array_length: Annotated[int, Field(ge=1, le=65_536)] | None = None

    @property
    def channels(self) -> list[str]:
        """The channel names this tag fills: its name, or name[i] for each element of an array."""
        if self.array_length is None:
            return [self.name]
        return [f"{self.name}[{i}]" for i in range(self.array_length)]

    @field_validator("node_id")
    @classmethod
    def _node_id_syntax(cls, v: str) -> str:
        # Imported here: the parser lives with the source that resolves these addresses.
        from gateway.sources.nodes import parse_node_ref

        parse_node_ref(v)
        return v


class WindowConfig(_Model):
    length: Annotated[int, Field(ge=2, le=100_000)]
    hop: Annotated[int, Field(ge=1, le=100_000)]


class RunningConfig(_Model):
    """Which tag says the asset runs: while it does not, the asset's alarms are suppressed by design."""

    tag: Name
    # Running while the tag's engineering value is above this (e.g. speed in rpm, or 0.5 for a Boolean).
    above: float = Field(default=0.5, allow_inf_nan=False)


class AssetConfig(_Model):
    name: Name
    source: Name
    sample_rate_hz: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] = 10.0
    window: WindowConfig
    # How long a Bad/NaN tag may hold its last good value before the window is invalid.
    max_gap_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    tags: list[TagConfig] = Field(min_length=1)
    running: RunningConfig | None = None

    @property
    def channels(self) -> list[str]:
        """The asset's channel names in window column order: its tags', arrays expanded."""
        return [c for t in self.tags for c in t.channels]

    @model_validator(mode="after")
    def _unique_tags(self) -> AssetConfig:
        names = [t.name for t in self.tags]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate tag names: {', '.join(dup)}")
        if self.running is not None:
            tag = next((t for t in self.tags if t.name == self.running.tag), None)
            if tag is None:
                raise ValueError(f"running.tag {self.running.tag!r} is not a tag of this asset")
            if tag.array_length is not None:
                raise ValueError(f"running.tag {self.running.tag!r} is an array; it must be a scalar")
        return self


class ModelConfig(_Model):
    name: Name
    path: Path
    manifest: Path | None = None
    assets: list[Name] = Field(min_length=1)
    # Cap on windows per inference call; windows due in the same tick beyond it wait for the next call.
    # Also the TensorRT optimization profile's max batch.
    max_batch: Annotated[int, Field(ge=1, le=4096)] = 256
    # auto: TensorRT, then ONNX Runtime on the GPU, then on the CPU, the first that loads; the others
    # insist on one backend and fall back (with the inference_degraded alarm) only when it fails.
    backend: Literal["auto", "tensorrt", "onnxruntime-gpu", "onnxruntime-cpu"] = "auto"
    # TensorRT engines: fp16 builds from the FP16 ONNX copy (fp16_path) as a strongly typed network.
    precision: Literal["fp16", "fp32"] = "fp16"
    # The FP16 copy of `path` (FP32 inputs and outputs kept); default: <stem>.fp16.onnx beside it.
    fp16_path: Path | None = None
    # ONNX Runtime intra-op threads: 1 or 2 suit small models on a device shared with acquisition.
    threads: Annotated[int, Field(ge=1, le=16)] = 1

    @property
    def fp16_model_path(self) -> Path:
        """Where the FP16 ONNX copy of this model is (configured, or beside the FP32 file)."""
        return self.fp16_path or self.path.with_name(f"{self.path.stem}.fp16.onnx")


class InferenceSection(_Model):
    """Where engines and provider caches live, and what a TensorRT build may use."""

    # TensorRT engines, timing caches, ONNX Runtime TensorRT/CUDA provider caches (the unit's CacheDirectory).
    cache_dir: Path = Path("/var/cache/edge-gateway")
    # TensorRT builder workspace: small, because an out-of-memory build on a small Orin shows up as
    # "Could not find any implementation" rather than as an out-of-memory error.
    workspace_mb: Annotated[int, Field(ge=16, le=65_536)] = 256
    # Raise the system alarm inference_degraded when a model runs on a lesser backend than configured.
    degraded_alarm: bool = True


# Alarms the gateway raises itself (gateway.alarms.COMM_LOSS, FLOOD and INFERENCE_DEGRADED); a model
# rule may not take their names.
SYSTEM_RULES = frozenset({"comm_loss", "flood", "inference_degraded"})


class AlarmRuleConfig(_Model):
    name: Name
    model: Name
    # Which model value: "score" (anomaly), "rul", or a class name for classifiers.
    output: str = "score"
    # Raise when value >= high (direction above) or <= high (direction below, e.g. RUL).
    high: float | None = Field(default=None, allow_inf_nan=False)
    low: float | None = Field(default=None, allow_inf_nan=False)
    direction: Literal["above", "below"] = "above"
    on_delay: Annotated[int, Field(ge=1, le=10_000)] = 1
    # Consecutive normal windows before an active alarm clears (chattering values stay one alarm).
    off_delay: Annotated[int, Field(ge=1, le=10_000)] = 1
    severity: Severity = "high"  # the alarm's priority
    assets: list[Name] | None = None


class StorageConfig(_Model):
    path: Path = Path("gateway.db")
    # Scores are for tuning; keep every Nth window's scores only if disk is tight.
    store_scores: bool = True
    # Disk the undelivered outbox may take (MiB; each message counted as topic + payload + 384 bytes).
    # When full: expired data, then the oldest scores and status, and alarm events last.
    outbox_quota_mb: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = 256.0
    # Scores, tag history and closed alarms older than this are deleted (open alarms and undelivered
    # events never are).
    retention_days: Annotated[float, Field(gt=0, le=36_500, allow_inf_nan=False)] = 90.0
    # The whole file with its WAL (MiB); over it, the oldest scores and history go, closed alarms last.
    max_db_mb: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = 2048.0
    # Tag history rows (table `samples`) per asset per second; 0 records none.
    history_hz: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 1.0
    # How often the retention pass runs (also once at start).
    retention_interval_s: Annotated[float, Field(ge=1, le=86_400, allow_inf_nan=False)] = 600.0

    @property
    def outbox_quota_bytes(self) -> int:
        """The outbox quota in bytes."""
        return int(self.outbox_quota_mb * 2**20)

    @property
    def max_db_bytes(self) -> int:
        """The database size bound in bytes."""
        return int(self.max_db_mb * 2**20)


class TlsConfig(_Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Only for test brokers whose certificate does not match the host name.
    insecure_skip_verify: bool = False


class CommandsConfig(_Model):
    """Who may acknowledge, shelve and unshelve alarms over MQTT; without this section no command is read.

    Commands arrive on {prefix}/{site}/cmd/{user}/{command}. A command is authorized when {user} is
    in `users` (the broker's ACL must then let each MQTT user publish only under its own {user}
    level, e.g. mosquitto `pattern write edge/+/cmd/%u/#`), or when the payload's `secret` equals
    the shared secret.
    """

    users: list[Name] = Field(default_factory=list)
    # The shared secret never lives in the YAML: name an environment variable or a file.
    secret_env: str | None = None
    secret_file: Path | None = None
    max_shelve_s: PositiveFloat = 8 * 3600.0

    @model_validator(mode="after")
    def _some_authority(self) -> CommandsConfig:
        if self.secret_env and self.secret_file:
            raise ValueError("give secret_env or secret_file, not both")
        if not self.users and not (self.secret_env or self.secret_file):
            raise ValueError("name the users allowed to command, or a shared secret (secret_env or secret_file)")
        return self

    def secret(self) -> str | None:
        """The shared secret from the environment or a file, or None when commands go by user only."""
        value = read_secret("mqtt.commands", self.secret_env, self.secret_file, key="secret")
        if value == "":
            raise ConfigError(["mqtt.commands: the shared secret is empty"])
        return value


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    site: Name = "site"
    topic_prefix: str = "edge"
    alarm_topic: str = "{prefix}/{site}/{asset}/alarm"
    status_topic: str = "{prefix}/{site}/{gateway_id}/status"
    # Per-window model outputs for trending in SCADA; off by default (high volume, droppable).
    publish_scores: bool = False
    score_topic: str = "{prefix}/{site}/{asset}/score"
    qos: Literal[0, 1, 2] = 1
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    publish_timeout_s: PositiveFloat = 10.0
    # The broker keeps the session this long after a disconnect (MQTT 5 Session Expiry Interval;
    # 3.1.1: any value > 0 is clean_session false); 0: a clean session on every connect.
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 3600
    reconnect_min_s: PositiveFloat = 1.0
    # Short, because the outbox backlog waits on it: a broker back after a long outage is found
    # within this many seconds. A connect attempt to a down broker on the LAN costs next to nothing.
    reconnect_max_s: PositiveFloat = 5.0
    # MQTT 5 Message Expiry Interval of score messages: a stale score is worthless. 0: never expire.
    # Alarms and the retained status never expire.
    score_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 60
    # A retained status with the outbox's depth and drop counts, this often; 0: only online/offline.
    status_interval_s: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)] = 60.0
    tls: TlsConfig | None = None
    username: str | None = None
    # The password never lives in the YAML: name an environment variable or a file.
    password_env: str | None = None
    password_file: Path | None = None
    commands: CommandsConfig | None = None

    @field_validator("alarm_topic")
    @classmethod
    def _alarm_fields(cls, v: str) -> str:
        _check_template(v, {"prefix", "site", "gateway_id", "asset", "rule", "severity"})
        if "{asset}" not in v:
            raise ValueError("must contain {asset} so each asset has its own topic")
        return v

    @field_validator("score_topic")
    @classmethod
    def _score_fields(cls, v: str) -> str:
        _check_template(v, {"prefix", "site", "gateway_id", "asset", "model"})
        return v

    @field_validator("status_topic")
    @classmethod
    def _status_fields(cls, v: str) -> str:
        _check_template(v, {"prefix", "site", "gateway_id"})
        return v

    @model_validator(mode="after")
    def _reconnect_range(self) -> MqttConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s:g}) must not exceed reconnect_max_s ({self.reconnect_max_s:g})"
            )
        return self

    def password(self) -> str | None:
        """The broker password from the environment or a file, or None when not configured."""
        return read_secret("mqtt", self.password_env, self.password_file)


def _check_template(template: str, allowed: set[str]) -> None:
    fields = set(re.findall(r"{([^{}]*)}", template))
    unknown = fields - allowed
    if unknown:
        raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if any(c in template for c in "#+"):
        raise ValueError("MQTT topics to publish to must not contain wildcards '#' or '+'")


class FloodConfig(_Model):
    """Flood control: an asset with more than `max_alarms` alarm onsets within `window_s` is summarized
    by one system alarm `flood`, its other alarms suppressed, until no onset came for `calm_s`."""

    enabled: bool = True
    # ISA-18.2's alarm flood: more than 10 alarms in 10 minutes (for one operator; here per asset).
    max_alarms: Annotated[int, Field(ge=1, le=10_000)] = 10
    window_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 600.0
    calm_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 300.0
    severity: Severity = "high"


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): reachable from this device only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsConfig(_Model):
    """The Prometheus endpoint, also what `edge-gateway status` reads."""

    enabled: bool = True
    host: str = "127.0.0.1"
    # 0: any free port (tests); `edge-gateway status --config` then cannot find it.
    port: Annotated[int, Field(ge=0, le=65535)] = 9108
    # Metrics name the plant's assets, models and PLCs: serving them beyond this device needs saying so.
    allow_remote: bool = False

    @model_validator(mode="after")
    def _loopback_only(self) -> MetricsConfig:
        if not self.allow_remote and not is_loopback_host(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address (127.0.0.1, ::1, localhost); metrics name "
                "plant assets, so serving them on the network needs allow_remote: true"
            )
        return self


class GatewayConfig(_Model):
    """The whole YAML file."""

    gateway: GatewaySection = GatewaySection()
    sources: list[SourceConfig] = Field(min_length=1)
    assets: list[AssetConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)
    alarms: list[AlarmRuleConfig] = Field(default_factory=list)
    inference: InferenceSection = InferenceSection()
    storage: StorageConfig = StorageConfig()
    mqtt: MqttConfig = MqttConfig()
    flood: FloodConfig = FloodConfig()
    metrics: MetricsConfig = MetricsConfig()

    def asset(self, name: str) -> AssetConfig:
        """The asset called `name` (validated to exist)."""
        return next(a for a in self.assets if a.name == name)


def _cross_check(cfg: GatewayConfig) -> list[tuple[Loc, str]]:
    """References between sections: every name used must be defined, once."""
    problems: list[tuple[Loc, str]] = []

    def unique(section: str, items: list[Any]) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(((section, i, "name"), f"duplicate name {item.name!r}"))
            seen.add(item.name)

    unique("sources", cfg.sources)
    unique("assets", cfg.assets)
    unique("models", cfg.models)
    unique("alarms", cfg.alarms)
    sources = {s.name for s in cfg.sources}
    assets = {a.name for a in cfg.assets}
    models = {m.name: m for m in cfg.models}
    for i, a in enumerate(cfg.assets):
        if a.source not in sources:
            problems.append((("assets", i, "source"), f"unknown source {a.source!r}; defined: {sorted(sources)}"))
        if a.window.hop > a.window.length:
            problems.append((("assets", i, "window", "hop"), "hop must not exceed window length"))
    used = {a.source for a in cfg.assets}
    for i, s in enumerate(cfg.sources):
        if s.name not in used:
            problems.append((("sources", i, "name"), f"source {s.name!r} is not used by any asset"))
        if s.comm_loss.enabled and s.comm_loss.scope == "source" and s.name in assets:
            problems.append(
                (
                    ("sources", i, "comm_loss", "scope"),
                    f"scope source publishes under the source name, and {s.name!r} is also an asset: rename one",
                )
            )
    for i, m in enumerate(cfg.models):
        for j, name in enumerate(m.assets):
            if name not in assets:
                problems.append((("models", i, "assets", j), f"unknown asset {name!r}; defined: {sorted(assets)}"))
    for i, r in enumerate(cfg.alarms):
        if r.name in SYSTEM_RULES:
            problems.append(
                (("alarms", i, "name"), f"{r.name!r} is the name of a system alarm; choose another")
            )
        model = models.get(r.model)
        if model is None:
            problems.append((("alarms", i, "model"), f"unknown model {r.model!r}; defined: {sorted(models)}"))
            continue
        for j, name in enumerate(r.assets or []):
            if name not in model.assets:
                problems.append((("alarms", i, "assets", j), f"asset {name!r} is not served by model {r.model!r}"))
        if r.high is not None and r.low is not None:
            wrong = r.low > r.high if r.direction == "above" else r.low < r.high
            if wrong:
                rel = "<=" if r.direction == "above" else ">="
                problems.append((("alarms", i, "low"), f"low must be {rel} high for direction {r.direction}"))
    return problems


def _describe_input(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return f" (got {value})"
    return f" (got {value!r})"


def load_config(path: Path | str) -> GatewayConfig:
    """Load, validate and cross-check a YAML config; relative paths resolve against its folder."""
    path = Path(path)
    try:
        doc = YamlDocument.from_path(path)
    except YamlSyntaxError as exc:
        raise ConfigError([str(exc)]) from exc
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{path}:1 the file must be a YAML mapping with sources, assets, ..."])
    try:
        cfg = GatewayConfig.model_validate(doc.data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{doc.where(loc)}: {msg}{_describe_input(err.get('input'))}")
        raise ConfigError(problems) from exc
    issues = _cross_check(cfg)
    if issues:
        raise ConfigError([f"{doc.where(loc)}: {msg}" for loc, msg in issues])
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: GatewayConfig, base: Path) -> GatewayConfig:
    def rel(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    models = [
        m.model_copy(
            update={
                "path": rel(m.path) or m.path,
                "manifest": rel(m.manifest) or m.manifest,
                "fp16_path": rel(m.fp16_path) or m.fp16_path,
            }
        )
        for m in cfg.models
    ]
    storage = cfg.storage.model_copy(update={"path": rel(cfg.storage.path) or cfg.storage.path})
    inference = cfg.inference.model_copy(update={"cache_dir": rel(cfg.inference.cache_dir) or cfg.inference.cache_dir})
    tls = cfg.mqtt.tls
    if tls is not None:
        tls = tls.model_copy(
            update={k: rel(getattr(tls, k)) or getattr(tls, k) for k in ("ca_file", "cert_file", "key_file")}
        )
    commands = cfg.mqtt.commands
    if commands is not None:
        commands = commands.model_copy(update={"secret_file": rel(commands.secret_file) or commands.secret_file})
    mqtt = cfg.mqtt.model_copy(
        update={"password_file": rel(cfg.mqtt.password_file) or cfg.mqtt.password_file, "tls": tls, "commands": commands}
    )
    sources = []
    for s in cfg.sources:
        sec = s.security
        if sec is not None:
            keys = ("certificate", "private_key", "trust_dir", "password_file")
            sec = sec.model_copy(update={k: rel(getattr(sec, k)) or getattr(sec, k) for k in keys})
        sources.append(s.model_copy(update={"security": sec}))
    return cfg.model_copy(
        update={"models": models, "storage": storage, "inference": inference, "mqtt": mqtt, "sources": sources}
    )


__all__ = ["GatewayConfig", "load_config", "format_loc"]
