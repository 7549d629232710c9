"""OPC-UA security test helpers: certificates for a client and two servers, and a secured asyncua server.

`certs` is a module-scoped pytest fixture (registered through conftest's pytest_plugins), since RSA
key generation is slow; `secure_server` is an async context manager used inside a test's coroutine.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.certs import CERT_NAME, KEY_NAME, add_certs_command, create_certificate
from tests.conftest import free_port

CLIENT_URI = "urn:test:edge-gateway"
SERVER_URI = "urn:test:plc"
USER, PASSWORD = "gw", "s3cret"
# The value of the secured server's one variable, ns=2;s=Temp in namespace urn:test.
VALUE = 42.5


def certs_cli(argv: list[str]) -> int:
    """Run `edge-gateway <argv>` through the subcommand as registered by add_certs_command."""
    parser = argparse.ArgumentParser(prog="edge-gateway")
    add_certs_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@dataclass(frozen=True)
class Certs:
    """Directories holding a certificate and key each (gateway.certs file names)."""

    client: Path
    server: Path
    other_server: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """RSA key generation is slow: one client and two server pairs for the whole module."""
    root = tmp_path_factory.mktemp("certs")
    args = ["certs", "create", "--out", str(root / "client"), "--application-uri", CLIENT_URI]
    # asyncua warns on every connect when the client certificate lacks this machine's host name.
    assert certs_cli([*args, "--hostname", "localhost", "--hostname", socket.gethostname()]) == 0
    for name in ("server", "other_server"):
        create_certificate(
            root / name, SERVER_URI, ["localhost"], extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)
        )
    return Certs(root / "client", root / "server", root / "other_server")


def trusting(tmp_path: Path, server: Path) -> Path:
    """A new trust directory tmp_path/trusted holding the certificate in the directory `server`."""
    trust_dir = tmp_path / "trusted"
    trust_dir.mkdir()
    (trust_dir / "plc.der").write_bytes((server / CERT_NAME).read_bytes())
    return trust_dir


class _Users(UserManager):
    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        return User(role=UserRole.User) if (username, password) == (USER, PASSWORD) else None


@contextlib.asynccontextmanager
async def secure_server(
    cert_dir: Path,
    policies: list[ua.SecurityPolicyType],
    with_users: bool = False,
    port: int | None = None,
    trusted_clients: Path | None = None,
) -> AsyncIterator[tuple[str, str]]:
    """A started asyncua server (on a free port unless given) offering only `policies`; yields (endpoint, node id)."""
    server = Server(user_manager=_Users() if with_users else None)
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{port or free_port()}/"
    server.set_endpoint(endpoint)
    await server.set_application_uri(SERVER_URI)
    await server.load_certificate(cert_dir / CERT_NAME)
    await server.load_private_key(cert_dir / KEY_NAME)
    server.set_security_policy(policies)
    if with_users:
        server.set_identity_tokens([ua.UserNameIdentityToken])
    if trusted_clients is not None:
        store = TrustStore([trusted_clients], [])
        await store.load()
        options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        server.set_certificate_validator(CertificateValidator(options, store))
    ns = await server.register_namespace("urn:test")
    var = await server.nodes.objects.add_variable(ua.NodeId("Temp", ns), "Temp", VALUE)
    await server.start()
    try:
        yield endpoint, var.nodeid.to_string()
    finally:
        await server.stop()
