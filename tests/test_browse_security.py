"""`edge-gateway browse` over OPC-UA message security and user login, against a real secured asyncua server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncua import ua

from gateway.certs import CERT_NAME, KEY_NAME, thumbprint
from gateway.sources.security import SecurityError
from tests.conftest import free_port
from tests.fixtures_opcua import browse, serving
from tests.fixtures_security import PASSWORD, USER, Certs, secure_server, trusting

PASSWORD_ENV = "GW_TEST_BROWSE_PW"


@pytest.fixture(scope="module")
def secured(certs: Certs) -> Iterator[str]:
    """A server offering only Basic256Sha256/SignAndEncrypt and only user logins, in a thread of its own."""
    offered = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
    with serving(
        lambda: secure_server(certs.server, offered, with_users=True), "test-browse-secure"
    ) as served:
        endpoint, _node = served
        yield endpoint


def _client(pki: Certs, trust_dir: Path, policy: str = "Basic256Sha256") -> list[str]:
    """Flags for this client's certificate and key, trusting the certificates in `trust_dir`."""
    return [
        "--policy",
        policy,
        "--certificate",
        str(pki.client / CERT_NAME),
        "--private-key",
        str(pki.client / KEY_NAME),
        "--trust-dir",
        str(trust_dir),
    ]


def test_sign_and_encrypt_with_a_user_prints_the_tree(
    secured: str,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    trust_dir = trusting(tmp_path, certs.server)
    login = ["--username", USER, "--password-env", PASSWORD_ENV]
    argv = [secured, *_client(certs, trust_dir), "--mode", "SignAndEncrypt", *login, "--depth", "1"]
    assert browse(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0:Objects  Object  i=85"
    assert "  0:Temp  Variable  ns=2;s=Temp  Double  scalar" in lines
    # Node forms by namespace URI resolve over the secured session too.
    assert browse([secured, *_client(certs, trust_dir), *login, "--root", "nsu=urn:test;s=Temp"]) == 0
    assert capsys.readouterr().out == "0:Temp  Variable  ns=2;s=Temp  Double  scalar\n"


def test_untrusted_server_certificate_is_refused_then_trusted_on_first_use(
    secured: str,
    certs: Certs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n", encoding="utf-8")
    login = ["--username", USER, "--password-file", str(tmp_path / "pw")]
    trust_dir = trusting(tmp_path, certs.other_server)
    # As the installed command: one line on stderr, exit code 3, nothing on stdout.
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "browse", secured, *_client(certs, trust_dir), *login],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (3, "")
    (line,) = done.stderr.splitlines()
    server_der = (certs.server / CERT_NAME).read_bytes()
    assert line.startswith(f"error: server certificate of {secured} (thumbprint {thumbprint(server_der)}")
    assert f"is not in trust_dir {trust_dir}" in line
    assert [p.read_bytes() for p in (trust_dir / "rejected").iterdir()] == [server_der]

    first_use = tmp_path / "first-use"
    tofu = [*_client(certs, first_use), "--trust-on-first-use", *login, "--depth", "1"]
    assert browse([secured, *tofu]) == 0
    assert "  0:Temp  Variable  ns=2;s=Temp  Double  scalar" in capsys.readouterr().out
    assert [p.read_bytes() for p in first_use.iterdir()] == [server_der]
    # Pinned now: the saved certificate is trusted without saving another.
    assert browse([secured, *_client(certs, first_use), *login, "--depth", "1"]) == 0
    assert [p.read_bytes() for p in first_use.iterdir()] == [server_der]


def test_wrong_password_and_missing_policy_are_one_line_reasons(
    secured: str,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    trust_dir = trusting(tmp_path, certs.server)
    login = ["--username", USER, "--password-env", PASSWORD_ENV]
    with pytest.raises(SecurityError) as err:
        browse([secured, *_client(certs, trust_dir), *login])
    assert str(err.value) == (
        f"server {secured} refused user '{USER}': wrong user name or password (BadUserAccessDenied)"
    )
    with pytest.raises(SecurityError) as err:
        browse([secured, *_client(certs, trust_dir, "Aes128_Sha256_RsaOaep"), *login])
    assert str(err.value) == (
        f"server {secured} does not offer security Aes128_Sha256_RsaOaep/SignAndEncrypt; "
        "it offers: Basic256Sha256/SignAndEncrypt"
    )
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(SecurityError, match=f"environment variable {PASSWORD_ENV} is not set"):
        browse([secured, *_client(certs, trust_dir), *login])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--policy", "Basic256Sha256"],
            "--policy Basic256Sha256 needs --certificate, --private-key, --trust-dir",
        ),
        (
            ["--policy", "Aes256_Sha256_RsaPss", "--certificate", "c.der", "--trust-dir", "t"],
            "--policy Aes256_Sha256_RsaPss needs --private-key",
        ),
        (
            ["--mode", "Sign", "--trust-on-first-use"],
            "--mode, --trust-on-first-use need a security policy other",
        ),
        (["--username", USER], "--username needs --password-env or --password-file"),
        (["--password-env", PASSWORD_ENV], "a password needs --username"),
        (
            ["--username", USER, "--password-env", PASSWORD_ENV, "--password-file", "pw"],
            "give --password-env or --password-file, not both",
        ),
    ],
)
def test_flags_that_do_not_fit_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before connecting: nothing listens on this port.
    assert browse([f"opc.tcp://127.0.0.1:{free_port()}/", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {message}")
    assert captured.err.count("\n") == 1


def test_cli_usage_error_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "browse",
            f"opc.tcp://127.0.0.1:{free_port()}/",
            "--policy",
            "Basic256Sha256",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: --policy Basic256Sha256 needs --certificate, --private-key, --trust-dir\n"
