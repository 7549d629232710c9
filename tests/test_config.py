"""Config loading: typed models, errors with YAML file, line and path, `check` exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.alarms import COMM_LOSS, FLOOD, INFERENCE_DEGRADED
from gateway.config import SYSTEM_RULES, load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

VALID = """\
sources:
  - name: plc1
    endpoint: opc.tcp://127.0.0.1:4840/
assets:
  - name: pump01
    source: plc1
    window: {length: 32, hop: 5}
    tags:
      - {name: vibration_x, node_id: "ns=2;s=pump01.vibration_x"}
      - {name: temperature, node_id: "ns=2;s=pump01.temperature", scale: 0.1}
mqtt:
  site: plant-a
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, VALID))
    assert cfg.assets[0].tags[1].scale == 0.1
    assert cfg.mqtt.qos == 1 and cfg.mqtt.site == "plant-a"
    assert cfg.storage.path == tmp_path / "gateway.db"  # relative to the config file


def test_wrong_type_names_file_line_and_path(tmp_path: Path) -> None:
    text = VALID.replace('node_id: "ns=2;s=pump01.temperature"', "node_id: 17")
    [msg] = problems(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:10 assets[0].tags[1].node_id: ")
    assert "got 17" in msg


def test_unknown_key_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = VALID.replace("    source: plc1\n", "    source: plc1\n    sampel_rate_hz: 10\n")
    [msg] = problems(tmp_path, text)
    assert ":7 assets[0].sampel_rate_hz: unknown key" in msg


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = VALID.replace("length: 32", "length: -1").replace("site: plant-a", "site: plant-a\n  qos: 7")
    msgs = problems(tmp_path, text)
    assert len(msgs) == 2
    assert any("assets[0].window.length" in m for m in msgs)
    assert any(":13 mqtt.qos" in m for m in msgs)


def test_unknown_reference_names_the_choices(tmp_path: Path) -> None:
    unknown, unused = problems(tmp_path, VALID.replace("source: plc1", "source: plc2"))
    assert ":6 assets[0].source: unknown source 'plc2'; defined: ['plc1']" in unknown
    assert ":2 sources[0].name: source 'plc1' is not used by any asset" in unused


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    [msg] = problems(tmp_path, VALID.replace("window: {length: 32, hop: 5}", "window: {length: 32, hop: 5"))
    assert f"{tmp_path / 'config.yaml'}:" in msg


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    [msg] = problems(tmp_path, VALID.replace("    source: plc1\n", "    source: plc1\n    source: plc1\n"))
    assert "duplicate key 'source'" in msg and ":7" in msg


def test_nan_scale_is_rejected(tmp_path: Path) -> None:
    [msg] = problems(tmp_path, VALID.replace("scale: 0.1", "scale: .nan"))
    assert "assets[0].tags[1].scale" in msg


def test_topic_template_placeholders_checked(tmp_path: Path) -> None:
    [msg] = problems(tmp_path, VALID + '  alarm_topic: "{prefix}/{plant}/{asset}/alarm"\n')
    assert "mqtt.alarm_topic" in msg and "plant" in msg


def test_password_from_env_and_file_never_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write(tmp_path, VALID + "  password_env: GW_TEST_PW\n"))
    monkeypatch.setenv("GW_TEST_PW", "s3cret")
    assert cfg.mqtt.password() == "s3cret"
    monkeypatch.delenv("GW_TEST_PW")
    with pytest.raises(ConfigError, match="GW_TEST_PW is not set"):
        cfg.mqtt.password()
    (tmp_path / "pw").write_text("from-file\n")
    cfg = load_config(write(tmp_path, VALID + "  password_file: pw\n"))
    assert cfg.mqtt.password() == "from-file"  # relative to the config file, stripped
    [msg] = problems(tmp_path, VALID + "  password: s3cret\n")
    assert "mqtt.password: unknown key" in msg


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "deploy" / "example-config.yaml")
    assert cfg.assets[0].tags[3].scale == 0.1
    assert cfg.mqtt.tls is not None and cfg.mqtt.password_file is not None


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(path)], capture_output=True, text=True, timeout=60
    )


def test_check_exits_1_with_one_line_per_problem_and_no_traceback(tmp_path: Path) -> None:
    result = run_check(write(tmp_path, VALID.replace("hop: 5", "hop: five")))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "config.yaml:7 assets[0].window.hop" in result.stderr


def test_check_accepts_the_demo_config(tmp_path: Path) -> None:
    from gateway.demo.run import demo_config, write_config

    path = write_config(demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "x.db"), tmp_path / "c.yaml")
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert "OK: 1 source(s), 4 asset(s), 32 tag(s), 1 model(s), 1 alarm rule(s)" in result.stdout


def test_check_reports_a_corrupt_model(tmp_path: Path) -> None:
    from gateway.demo.run import MODEL_DIR, demo_config, write_config

    bad = tmp_path / "pump_ae.onnx"
    bad.write_bytes(b"not an onnx file")
    (tmp_path / "pump_ae.manifest.json").write_text((MODEL_DIR / "pump_ae.manifest.json").read_text())
    cfg = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "x.db")
    cfg["models"][0]["path"] = str(bad)
    result = run_check(write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(bad) in result.stderr


def test_source_scope_comm_loss_must_not_share_a_name_with_an_asset(tmp_path: Path) -> None:
    text = VALID.replace("name: pump01", "name: plc1").replace(
        "endpoint: opc.tcp://127.0.0.1:4840/", "endpoint: opc.tcp://127.0.0.1:4840/\n    comm_loss: {scope: source}"
    )
    [msg] = problems(tmp_path, text)
    assert ":4 sources[0].comm_loss.scope: scope source publishes under the source name" in msg
    # Per asset (the default), the same names are fine.
    assert load_config(write(tmp_path, VALID.replace("name: pump01", "name: plc1"))).assets[0].name == "plc1"


def test_running_tag_must_be_a_scalar_tag_of_the_asset(tmp_path: Path) -> None:
    text = VALID.replace("    window: {length: 32, hop: 5}\n", "    window: {length: 32, hop: 5}\n    running: {tag: speed}\n")
    [msg] = problems(tmp_path, text)
    assert "assets[0]: Value error, running.tag 'speed' is not a tag of this asset" in msg
    ok = VALID.replace("    window: {length: 32, hop: 5}\n", "    window: {length: 32, hop: 5}\n    running: {tag: temperature, above: 5}\n")
    assert load_config(write(tmp_path, ok)).assets[0].running.above == 5.0  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(SYSTEM_RULES))
def test_a_model_rule_may_not_take_a_system_alarms_name(tmp_path: Path, name: str) -> None:
    text = VALID.replace("mqtt:\n", "models:\n  - {name: ae, path: ae.onnx, assets: [pump01]}\nalarms:\n"
                         f"  - {{name: {name}, model: ae}}\nmqtt:\n")  # fmt: skip
    [msg] = problems(tmp_path, text)
    assert f"alarms[0].name: {name!r} is the name of a system alarm; choose another" in msg
    assert SYSTEM_RULES == {COMM_LOSS, FLOOD, INFERENCE_DEGRADED}  # the names the engine gives its own alarms
