"""deploy/install.sh into a temporary root: idempotent, never overwrites the config, uninstalls what it made."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
KEPT_ON_UNINSTALL = {"/etc/edge-gateway", "/etc/edge-gateway/config.yaml", "/var/lib/edge-gateway"}


def run_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run install.sh with no terminal on stdin (so --purge cannot prompt)."""
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _can_build_offline() -> bool:
    """True when this interpreter's own setuptools can make a wheel: it has bdist_wheel built in (70.1+)
    or the `wheel` package beside it. Python 3.10's venv ships setuptools 65 without `wheel`."""
    spec = importlib.util.find_spec("setuptools")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "command" / "bdist_wheel.py").is_file() or (
        importlib.util.find_spec("wheel") is not None
    )


def build_wheel(src: Path, out: Path) -> Path:
    """`pip wheel --no-deps` of a source tree: offline when this interpreter can, else with an isolated build."""
    isolation = ["--no-build-isolation", "--no-index"] if _can_build_offline() else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (wheel,) = out.glob("edge_gateway-*.whl")
    return wheel


@pytest.fixture(scope="session")
def gateway_wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A wheel of this checkout, and one of the same version whose gateway/__init__.py differs."""
    base = tmp_path_factory.mktemp("wheels")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("gateway", "edge_models"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    first = build_wheel(src, base / "first")
    init = src / "gateway" / "__init__.py"
    init.write_text(init.read_text() + "# changed source, same version\n")
    shutil.rmtree(src / "build", ignore_errors=True)
    return first, build_wheel(src, base / "second")


def statuses(stdout: str) -> list[str]:
    """The status of every `step: NAME: STATUS` line, in order."""
    return [line.rpartition(": ")[2] for line in stdout.splitlines() if line.startswith("step: ")]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root: type, mode, size, mtime and content hash (or link target)."""
    snap: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                detail = os.readlink(path)
            elif path.is_file():
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                detail = ""
            key = str(path.relative_to(root))
            snap[key] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                detail,
            )
    return snap


def under(root: Path, path: str) -> Path:
    """A service-layout path inside the prefix root."""
    return root / path.lstrip("/")


def test_install_twice_changes_nothing_an_upgrade_reinstalls_and_uninstall_removes_what_it_made(
    tmp_path: Path, gateway_wheels: tuple[Path, Path]
) -> None:
    wheel, changed_wheel = gateway_wheels
    root = tmp_path / "root"
    common = ("--prefix-root", str(root), "--no-deps", "--python", sys.executable)
    args = (*common, "--source", str(wheel), "--wheels", str(wheel.parent))

    first = run_install(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert statuses(first.stdout)
    assert all(s.startswith(("created", "skipped")) for s in statuses(first.stdout)), first.stdout
    assert os.access(under(root, "/opt/edge-gateway/venv/bin/edge-gateway"), os.X_OK)
    config = under(root, "/etc/edge-gateway/config.yaml")
    assert config.read_bytes() == (REPO / "deploy/example-config.yaml").read_bytes()
    assert stat.S_IMODE(under(root, "/etc/edge-gateway").stat().st_mode) == 0o750
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    unit = under(root, "/etc/systemd/system/edge-gateway.service")
    assert unit.read_bytes() == (REPO / "systemd/edge-gateway.service").read_bytes()
    # The --no-deps venv cannot import the gateway's dependencies: the check fails, reported but not fatal.
    assert "check: FAILED" in first.stdout

    # The site edits its config and the gateway writes its database; a rerun keeps both and touches nothing.
    config.write_text(config.read_text() + "# edited by the site\n")
    under(root, "/var/lib/edge-gateway/gateway.db").write_bytes(b"site data")
    before = snapshot(root)
    second = run_install(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(statuses(second.stdout)) == len(statuses(first.stdout))
    assert all(s.startswith(("unchanged", "skipped")) for s in statuses(second.stdout)), second.stdout
    assert snapshot(root) == before

    # Same version, different source: pip runs again and the new file lands; nothing else changes.
    upgrade = run_install(*common, "--source", str(changed_wheel), "--wheels", str(changed_wheel.parent))
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    changed = [
        line for line in upgrade.stdout.splitlines() if line.startswith("step: ") and "unchanged" not in line
    ]
    assert [line.split(" (")[0] for line in changed if "skipped" not in line] == ["step: python packages"]
    (init,) = under(root, "/opt/edge-gateway/venv/lib").glob("python3*/site-packages/gateway/__init__.py")
    assert init.read_text().endswith("# changed source, same version\n")

    manifest = [
        line.split(" ", 1)
        for line in under(root, "/opt/edge-gateway/.install-manifest").read_text().splitlines()
    ]
    assert {"venv /opt/edge-gateway/venv", "unit /etc/systemd/system/edge-gateway.service"} <= {
        " ".join(entry) for entry in manifest
    }
    removed = run_install("--prefix-root", str(root), "--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    for _kind, path in manifest:
        assert under(root, path).exists() == (path in KEPT_ON_UNINSTALL), path
    assert not under(root, "/opt/edge-gateway").exists()
    assert config.read_text().endswith("# edited by the site\n")
    assert under(root, "/var/lib/edge-gateway/gateway.db").read_bytes() == b"site data"

    refused = run_install("--prefix-root", str(root), "--uninstall", "--purge")
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    assert config.exists()
    purged = run_install("--prefix-root", str(root), "--uninstall", "--purge", "--yes")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert [p for p in root.rglob("*") if not p.is_dir()] == []
    assert not any(p.name == "edge-gateway" for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("release_line", "expected"),
    [
        (
            "# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: Mon Jun 16 2025",
            [
                "L4T R36.4.4 -> JetPack 6.1/6.2",
                "jp6/cu126",
                "with system site packages",
                "cuda-python==12.6.*",
            ],
        ),
        (
            "# R38 (release), REVISION: 4.0, GCID: 43443517, BOARD: generic, EABI: aarch64, DATE: Wed Dec 31 2025",
            ["L4T R38.4.0 -> JetPack 7", "sbsa/cu130", "with system site packages", "cuda-python==13.0.*"],
        ),
        (
            "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May 6 2024",
            ["L4T R36.3.0 -> JetPack 6.0", "CPU onnxruntime from PyPI (Jetson AI Lab GPU builds"],
        ),
        (
            None,
            ["not a Jetson -> CPU path", "isolated (no system site packages)", "CPU onnxruntime from PyPI"],
        ),
    ],
)
def test_detect_maps_the_l4t_release_to_jetpack_and_onnxruntime_build(
    tmp_path: Path, release_line: str | None, expected: list[str]
) -> None:
    release = tmp_path / "nv_tegra_release"
    if release_line is not None:
        release.write_text(release_line + "\n")
    result = run_install("--detect", env={**os.environ, "EDGE_GATEWAY_NV_TEGRA_RELEASE": str(release)})
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_option_errors_exit_2() -> None:
    assert run_install("--purge").returncode == 2
    assert run_install("--no-such-option").returncode == 2


def test_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
