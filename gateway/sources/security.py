"""Client side of OPC-UA security for a source: policy, certificates, server trust and user identity.

asyncua trusts whatever certificate the server's endpoint list carries. Here the server certificate is
pinned instead: it must be a file in the source's trust_dir (or is saved there on first use when the
config says so), and an unknown one is copied to trust_dir/rejected/ for an engineer to move, as most
OPC-UA stacks do. Errors become one human line each, since the source's reconnect loop logs every new
reason once and shows it in the health output. new_client holds the session settings every gateway
client shares, so `edge-gateway browse` opens a session exactly as a source does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.certs import certificate_uri, load_certificate_der, thumbprint
from gateway.config import SourceConfig, SourceSecurity
from gateway.errors import ConfigError, SourceError

logger = logging.getLogger(__name__)

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_CERT_SUFFIXES = {".der", ".pem", ".crt", ".cer"}
_SESSION_TIMEOUT_MS = 60_000

# Status codes a server answers with when it refuses the gateway, and what they mean for an engineer.
_REFUSALS: dict[int, str] = {
    ua.StatusCodes.BadUserAccessDenied: "wrong user name or password",
    ua.StatusCodes.BadIdentityTokenInvalid: "wrong user name or password",
    ua.StatusCodes.BadIdentityTokenRejected: "the server does not accept this kind of login",
    ua.StatusCodes.BadCertificateUntrusted: "it does not trust the gateway's certificate "
    "(add it to the server's trusted clients)",
    ua.StatusCodes.BadSecurityChecksFailed: "security checks failed "
    "(often: the server does not trust the gateway's certificate yet)",
    ua.StatusCodes.BadCertificateUriInvalid: "the application URI does not match the gateway's certificate",
    ua.StatusCodes.BadCertificateTimeInvalid: "the gateway's certificate is expired or not yet valid",
    ua.StatusCodes.BadCertificateUseNotAllowed: "the gateway's certificate lacks the client key usages",
    ua.StatusCodes.BadCertificateInvalid: "the gateway's certificate is invalid",
    ua.StatusCodes.BadCertificateRevoked: "the gateway's certificate is revoked",
    ua.StatusCodes.BadSecurityPolicyRejected: "it does not accept this security policy",
    ua.StatusCodes.BadSecurityModeRejected: "it does not accept this security mode",
}


class SecurityError(SourceError):
    """A server and the gateway could not agree on security or identity; the message says why and what to do."""


@dataclass(frozen=True)
class _ClientIdentity:
    certificate_der: bytes
    private_key_der: bytes
    application_uri: str


def new_client(cfg: SourceConfig) -> Client:
    """A fresh, unconnected client for the source's endpoint with the gateway's session settings."""
    # The watchdog reads the server state every timeout_s s and gives it timeout_s s to answer:
    # asyncua's default (1 s) would reconnect a slow PLC on a congested link over and over.
    # The library's auto-reconnect would race the source's own reconnect loop.
    client = Client(
        cfg.endpoint,
        timeout=cfg.timeout_s,
        auto_reconnect=False,
        watchdog_intervall=cfg.timeout_s,
    )
    # asyncua asks for an hour and warns when servers grant less; the watchdog keeps a minute alive.
    client.session_timeout = _SESSION_TIMEOUT_MS
    return client


async def configure_client(client: Client, cfg: SourceConfig) -> None:
    """Apply the source's security section to a fresh client: call after new_client() and before connect()."""
    sec = cfg.security
    if sec is None:
        return
    try:
        password = await asyncio.to_thread(sec.password, cfg.name)
    except ConfigError as exc:
        # Reported like any other source failure instead of ending the source's task.
        raise SecurityError(str(exc)) from exc
    if sec.username is not None and password is not None:
        client.set_user(sec.username)
        client.set_password(password)
    if sec.policy == "None":
        return
    identity = await asyncio.to_thread(_load_identity, cfg.name, sec)
    client.application_uri = identity.application_uri
    policy = _POLICIES[sec.policy]
    mode = getattr(ua.MessageSecurityMode, sec.mode)
    # A fresh client speaks SecurityPolicy None, which is what GetEndpoints needs.
    endpoints = await client.connect_and_get_server_endpoints()
    endpoint = _find_endpoint(cfg, endpoints, policy.URI, mode)
    server_der = _first_certificate(endpoint.ServerCertificate)
    await asyncio.to_thread(_check_trust, cfg, sec, server_der)
    await client.set_security(
        policy,
        identity.certificate_der,
        identity.private_key_der,
        server_certificate=server_der,
        mode=mode,
    )


async def connect_client(client: Client, cfg: SourceConfig) -> None:
    """configure_client, then connect; a server's refusal becomes one SecurityError line."""
    await configure_client(client, cfg)
    try:
        await client.connect()
    except ua.UaStatusCodeError as exc:
        raise refusal_error(cfg, exc) from exc


def refusal_error(cfg: SourceConfig, exc: ua.UaStatusCodeError) -> SourceError:
    """One human line for a status code a server refused the gateway with."""
    code = exc.code
    name = ua.StatusCode(ua.UInt32(code)).name
    meaning = _REFUSALS.get(code)
    if meaning is None:
        return SourceError(f"server {cfg.endpoint} refused the connection ({name})")
    sec = cfg.security
    if code in (ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadIdentityTokenInvalid) and sec:
        return SecurityError(f"server {cfg.endpoint} refused user {sec.username!r}: {meaning} ({name})")
    return SecurityError(f"server {cfg.endpoint} refused the gateway: {meaning} ({name})")


def _load_identity(source: str, sec: SourceSecurity) -> _ClientIdentity:
    """Read the client certificate and key once, as DER, whatever their file names say."""
    assert sec.certificate is not None and sec.private_key is not None
    try:
        cert_der = load_certificate_der(sec.certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"source {source}: cannot load certificate {sec.certificate}: {exc}") from exc
    try:
        data = sec.private_key.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SecurityError(f"source {source}: cannot load private key {sec.private_key}: {exc}") from exc
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    uri = sec.application_uri or certificate_uri(x509.load_der_x509_certificate(cert_der))
    if uri is None:
        raise SecurityError(
            f"source {source}: certificate {sec.certificate} has no application URI in its SubjectAltName; "
            "create one with `edge-gateway certs create` or set security.application_uri"
        )
    return _ClientIdentity(cert_der, key_der, uri)


def _find_endpoint(
    cfg: SourceConfig, endpoints: list[ua.EndpointDescription], policy_uri: str, mode: ua.MessageSecurityMode
) -> ua.EndpointDescription:
    for ep in endpoints:
        if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == mode:
            return ep
    offered = sorted(
        {f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name}" for ep in endpoints}
    )
    assert cfg.security is not None
    raise SecurityError(
        f"server {cfg.endpoint} does not offer security {cfg.security.policy}/{cfg.security.mode}; "
        f"it offers: {', '.join(offered) or 'nothing'}"
    )


def _first_certificate(der: bytes) -> bytes:
    """The leading certificate of a DER chain (some servers send theirs with its issuers appended)."""
    if len(der) < 4 or der[0] != 0x30 or der[1] != 0x82:
        return der
    return der[: int.from_bytes(der[2:4], "big") + 4]


def _check_trust(cfg: SourceConfig, sec: SourceSecurity, server_der: bytes) -> None:
    """Accept the server certificate only if trust_dir holds it (or trust on first use saves it there)."""
    trust_dir = sec.trust_dir
    assert trust_dir is not None
    if _is_trusted(trust_dir, server_der):
        return
    cert = x509.load_der_x509_certificate(server_der)
    thumb = thumbprint(server_der)
    described = (
        f"server certificate of {cfg.endpoint} (thumbprint {thumb}, subject {cert.subject.rfc4514_string()})"
    )
    # One first-use file per endpoint: a later, different certificate is a change to review, not a first use.
    first_use = trust_dir / f"first-use_{_safe_name(cfg.endpoint)}.der"
    if sec.trust_on_first_use and not first_use.exists():
        trust_dir.mkdir(parents=True, exist_ok=True)
        first_use.write_bytes(server_der)
        logger.warning("source %s: trusting %s on first use: saved as %s", cfg.name, described, first_use)
        return
    rejected = trust_dir / "rejected" / f"{_safe_name(cfg.endpoint)}_{thumb[:16]}.der"
    try:
        rejected.parent.mkdir(parents=True, exist_ok=True)
        rejected.write_bytes(server_der)
        saved = f"; saved as {rejected}"
    except OSError as exc:
        saved = f"; could not save it to {rejected.parent}: {exc.strerror}"
    if sec.trust_on_first_use:
        raise SecurityError(
            f"{described} differs from the one trusted on first use ({first_use}); "
            f"if the server's certificate was renewed, replace that file{saved}"
        )
    raise SecurityError(
        f"{described} is not in trust_dir {trust_dir}; copy it there or set trust_on_first_use{saved}"
    )


def _is_trusted(trust_dir: Path, server_der: bytes) -> bool:
    """True when a certificate file directly in trust_dir has the same DER bytes."""
    try:
        files = [p for p in trust_dir.iterdir() if p.is_file() and p.suffix.lower() in _CERT_SUFFIXES]
    except FileNotFoundError:
        return False
    for path in files:
        try:
            if load_certificate_der(path.read_bytes()) == server_der:
                return True
        except (OSError, ValueError) as exc:
            logger.debug("trust_dir: skipping %s: %s", path, exc)
    return False


def _safe_name(text: str) -> str:
    """A file-name-safe form of `text` (an endpoint URL)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text.split("://", 1)[-1]).strip("_")[:80] or "server"
