"""OPC-UA security: every policy and mode against a real asyncua server, server trust and user login."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.certs import CERT_NAME, KEY_NAME, thumbprint
from gateway.config import SourceSecurity, load_config
from gateway.errors import ConfigError
from gateway.latest import GOOD
from gateway.sources.opcua import OpcUaPollSource
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import running_source
from tests.fixtures_security import (
    CLIENT_URI,
    PASSWORD,
    USER,
    VALUE,
    Certs,
    certs_cli,
    secure_server,
    trusting,
)

POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
MODES = ("Sign", "SignAndEncrypt")


def running(endpoint: str, node_id: str, security: SourceSecurity):  # type: ignore[no-untyped-def]
    """An OpcUaPollSource with `security` polling `node_id`, cancelled on exit."""
    return running_source(endpoint, [node_id], security=security)


def _security(certs: Certs, trust_dir: Path, **options: Any) -> SourceSecurity:
    return SourceSecurity(
        certificate=certs.client / CERT_NAME,
        private_key=certs.client / KEY_NAME,
        trust_dir=trust_dir,
        **options,
    )


async def _failure(source: OpcUaPollSource) -> str:
    await wait_for_condition(lambda: source.stats.last_error is not None, what="a connect failure")
    assert not source.stats.connected
    return str(source.stats.last_error)


def test_certs_create_writes_a_client_certificate(certs: Certs, capsys: pytest.CaptureFixture[str]) -> None:
    der = (certs.client / CERT_NAME).read_bytes()
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT_URI]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", socket.gethostname()]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert stat.S_IMODE((certs.client / KEY_NAME).stat().st_mode) == 0o600
    # A second run must not overwrite the pair a server already trusts.
    capsys.readouterr()
    assert certs_cli(["certs", "create", "--out", str(certs.client), "--application-uri", "urn:x"]) != 0
    assert "already exists" in capsys.readouterr().err
    assert (certs.client / CERT_NAME).read_bytes() == der


def test_certs_create_force_replaces_and_prints_thumbprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "create", "--out", str(tmp_path), "--application-uri", "urn:a", "--days", "3"]
    assert certs_cli(args) == 0
    first = (tmp_path / CERT_NAME).read_bytes()
    assert certs_cli([*args, "--force"]) == 0
    second = (tmp_path / CERT_NAME).read_bytes()
    assert first != second
    assert thumbprint(second) in capsys.readouterr().out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_and_mode_reads_values(certs: Certs, tmp_path: Path, policy: str, mode: str) -> None:
    # The server offers only this policy and mode, so values arriving prove the channel used them.
    offered = getattr(ua.SecurityPolicyType, f"{policy.replace('_', '')}_{mode}")

    async def main_() -> None:
        async with secure_server(certs.server, [offered]) as (endpoint, node):
            security = _security(certs, trusting(tmp_path, certs.server), policy=policy, mode=mode)
            async with running(endpoint, node, security) as source:
                assert await source.wait_connected(10), source.stats.last_error
                assert source.latest.value[0] == VALUE
                assert source.latest.status[0] == GOOD

    asyncio.run(main_())


def test_untrusted_server_certificate_is_refused_and_kept_for_review(certs: Certs, tmp_path: Path) -> None:
    offered = ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt

    async def main_() -> None:
        # The trust directory holds a different server's certificate.
        trust_dir = tmp_path / "trusted"
        trust_dir.mkdir()
        (trust_dir / "other.der").write_bytes((certs.other_server / CERT_NAME).read_bytes())
        async with secure_server(certs.server, [offered]) as (endpoint, node):
            security = _security(certs, trust_dir, policy="Basic256Sha256")
            async with running(endpoint, node, security) as source:
                error = await _failure(source)
                assert source.stats.connects == 0
        server_der = (certs.server / CERT_NAME).read_bytes()
        assert f"thumbprint {thumbprint(server_der)}" in error
        assert f"is not in trust_dir {trust_dir}" in error and "trust_on_first_use" in error
        rejected = list((trust_dir / "rejected").iterdir())
        assert [p.read_bytes() for p in rejected] == [server_der]
        assert sorted(p.name for p in trust_dir.glob("*.der")) == ["other.der"]

    asyncio.run(main_())


def test_trust_on_first_use_saves_the_certificate_and_then_pins_it(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    offered = ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt
    trust_dir = tmp_path / "trusted"
    port = free_port()
    security = _security(certs, trust_dir, policy="Aes256_Sha256_RsaPss", trust_on_first_use=True)

    async def main_() -> str:
        async with secure_server(certs.server, [offered], port=port) as (endpoint, node):
            async with running(endpoint, node, security) as source:
                assert await source.wait_connected(10), source.stats.last_error
                assert source.latest.value[0] == VALUE
        # Another certificate on the same endpoint later is not a first use.
        async with secure_server(certs.other_server, [offered], port=port) as (endpoint, node):
            async with running(endpoint, node, security) as source:
                return await _failure(source)

    with caplog.at_level(logging.WARNING, logger="gateway.sources.security"):
        error = asyncio.run(main_())
    saved = [p for p in trust_dir.iterdir() if p.is_file()]
    assert [p.read_bytes() for p in saved] == [(certs.server / CERT_NAME).read_bytes()]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.sources.security"]
    assert len(lines) == 1 and str(saved[0]) in lines[0] and "on first use" in lines[0]
    assert f"differs from the one trusted on first use ({saved[0]})" in error
    rejected = list((trust_dir / "rejected").iterdir())
    assert [p.read_bytes() for p in rejected] == [(certs.other_server / CERT_NAME).read_bytes()]


def test_wrong_password_is_reported_clearly(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offered = ua.SecurityPolicyType.Basic256Sha256_Sign
    monkeypatch.setenv("GW_TEST_OPCUA_PW", "wrong")
    (tmp_path / "pw").write_text(PASSWORD + "\n", encoding="utf-8")

    async def main_() -> None:
        async with secure_server(certs.server, [offered], with_users=True) as (endpoint, node):
            trust_dir = trusting(tmp_path, certs.server)
            wrong = _security(
                certs,
                trust_dir,
                policy="Basic256Sha256",
                mode="Sign",
                username=USER,
                password_env="GW_TEST_OPCUA_PW",
            )
            async with running(endpoint, node, wrong) as source:
                error = await _failure(source)
            assert f"refused user '{USER}': wrong user name or password (BadUserAccessDenied)" in error
            assert "\n" not in error
            right = _security(
                certs,
                trust_dir,
                policy="Basic256Sha256",
                mode="Sign",
                username=USER,
                password_file=tmp_path / "pw",
            )
            async with running(endpoint, node, right) as source:
                assert await source.wait_connected(10), source.stats.last_error

    asyncio.run(main_())


def test_server_that_does_not_trust_the_gateway_says_so(certs: Certs, tmp_path: Path) -> None:
    offered = ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt
    clients = tmp_path / "server-trusts"
    clients.mkdir()
    (clients / "someone-else.der").write_bytes((certs.other_server / CERT_NAME).read_bytes())

    async def main_() -> None:
        async with secure_server(certs.server, [offered], trusted_clients=clients) as (endpoint, node):
            security = _security(certs, trusting(tmp_path, certs.server), policy="Basic256Sha256")
            async with running(endpoint, node, security) as source:
                error = await _failure(source)
        assert "refused the gateway: it does not trust the gateway's certificate" in error

    asyncio.run(main_())


def test_server_without_the_policy_names_what_it_offers(certs: Certs, tmp_path: Path) -> None:
    offered = ua.SecurityPolicyType.Basic256Sha256_Sign

    async def main_() -> None:
        async with secure_server(certs.server, [offered]) as (endpoint, node):
            security = _security(certs, trusting(tmp_path, certs.server), policy="Aes128_Sha256_RsaOaep")
            async with running(endpoint, node, security) as source:
                error = await _failure(source)
        assert "does not offer security Aes128_Sha256_RsaOaep/SignAndEncrypt" in error
        assert "it offers: Basic256Sha256/Sign" in error

    asyncio.run(main_())


def test_anonymous_login_refused_when_server_wants_a_user(certs: Certs, tmp_path: Path) -> None:
    offered = ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt

    async def main_() -> None:
        async with secure_server(certs.server, [offered], with_users=True) as (endpoint, node):
            security = _security(certs, trusting(tmp_path, certs.server), policy="Basic256Sha256")
            async with running(endpoint, node, security) as source:
                error = await _failure(source)
        assert "does not accept this kind of login (BadIdentityTokenRejected)" in error

    asyncio.run(main_())


CONFIG = """\
sources:
  - name: plc1
    endpoint: opc.tcp://127.0.0.1:4840/
    security:
{security}
assets:
  - name: pump01
    source: plc1
    window: {{length: 32, hop: 5}}
    tags:
      - {{name: speed, node_id: "ns=2;s=pump01.speed"}}
"""


def _load(tmp_path: Path, security: str) -> SourceSecurity:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(security=security), encoding="utf-8")
    sec = load_config(path).sources[0].security
    assert sec is not None
    return sec


def test_config_resolves_security_paths_against_the_config_file(tmp_path: Path) -> None:
    sec = _load(
        tmp_path,
        "      policy: Basic256Sha256\n      mode: Sign\n      certificate: pki/own/cert.der\n"
        "      private_key: /etc/gw/key.pem\n      trust_dir: pki/trusted\n"
        "      username: gw\n      password_file: secrets/opcua\n",
    )
    assert sec.certificate == tmp_path / "pki/own/cert.der"
    assert sec.private_key == Path("/etc/gw/key.pem")
    assert sec.trust_dir == tmp_path / "pki/trusted"
    assert sec.password_file == tmp_path / "secrets/opcua"
    assert (sec.policy, sec.mode, sec.trust_on_first_use) == ("Basic256Sha256", "Sign", False)


def test_config_password_without_encryption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sec = _load(tmp_path, "      username: gw\n      password_env: GW_TEST_OPCUA_PW\n")
    assert sec.policy == "None"
    monkeypatch.setenv("GW_TEST_OPCUA_PW", PASSWORD)
    assert sec.password("plc1") == PASSWORD
    monkeypatch.delenv("GW_TEST_OPCUA_PW")
    with pytest.raises(ConfigError, match="GW_TEST_OPCUA_PW is not set"):
        sec.password("plc1")


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ("      policy: Basic256Sha256\n", "policy Basic256Sha256 needs certificate, private_key, trust_dir"),
        ("      mode: Sign\n", "mode need a security policy other than None"),
        ("      policy: Basic128Rsa15\n", "Input should be 'None', 'Basic256Sha256'"),
        ("      username: gw\n", "username needs password_env or password_file"),
        ("      password_env: X\n", "a password needs a username"),
        ("      username: gw\n      password_env: X\n      password_file: f\n", "not both"),
    ],
)
def test_config_rejects_inconsistent_security(tmp_path: Path, security: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, security)
    assert message in str(info.value)
    assert "config.yaml:" in str(info.value)
