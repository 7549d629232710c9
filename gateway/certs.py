"""Application instance certificates for OPC-UA: `edge-gateway certs create` and the file helpers behind it.

OPC-UA security policies sign and encrypt with RSA, and servers check that the client certificate's
SubjectAltName carries the same application URI the client announces in CreateSession; asyncua's
cert_gen builds exactly such a certificate (key usages and extended key usage per OPC 10000-6 6.2.2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import EXIT_OK, EXIT_RUNTIME

CERT_NAME = "client_cert.der"
KEY_NAME = "client_key.pem"


@dataclass(frozen=True)
class CertPair:
    """Where `create_certificate` wrote the certificate and key, and the certificate's thumbprint."""

    certificate: Path
    private_key: Path
    thumbprint: str


def thumbprint(der: bytes) -> str:
    """The OPC-UA thumbprint of a DER certificate: SHA-1 of its bytes, as lower-case hex."""
    return hashlib.sha1(der).hexdigest()


def load_certificate_der(data: bytes) -> bytes:
    """DER bytes of a certificate given as DER or PEM (ValueError if it is neither)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    # Parsing checks it is a certificate at all, not some other file left in a trust directory.
    x509.load_der_x509_certificate(data)
    return data


def certificate_uri(cert: x509.Certificate) -> str | None:
    """The first URI in the certificate's SubjectAltName (an OPC-UA application URI), if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def create_certificate(
    out_dir: Path,
    application_uri: str,
    hostnames: list[str],
    *,
    days: int = 365,
    force: bool = False,
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> CertPair:
    """Write a self-signed RSA-2048 key (PEM, mode 0600) and DER certificate into `out_dir`; client use by default.

    Raises FileExistsError when either file exists and `force` is false.
    """
    cert_path, key_path = out_dir / CERT_NAME, out_dir / KEY_NAME
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} already exists (use --force to replace it)")
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    names += [x509.DNSName(h) for h in hostnames]
    cert = cert_gen.generate_self_signed_app_certificate(
        key, application_uri, {}, names, extended=list(extended_key_usage), days=days
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, cert_gen.dump_private_key_as_pem(key))
    cert_path.write_bytes(der)
    return CertPair(cert_path, key_path, thumbprint(der))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for a moment."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cmd_certs_create(args: argparse.Namespace) -> int:
    """Create the gateway's OPC-UA client certificate and key; print where they went."""
    hostnames = args.hostname or [socket.gethostname()]
    try:
        pair = create_certificate(args.out, args.application_uri, hostnames, days=args.days, force=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"certificate: {pair.certificate}")
    print(f"private key: {pair.private_key} (mode 0600)")
    print(
        f"application URI: {args.application_uri}; DNS names: {', '.join(hostnames)}; valid {args.days} days"
    )
    print(f"thumbprint (SHA-1): {pair.thumbprint}")
    print("copy the certificate into each server's trusted client certificates")
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_certs_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `certs create` on the edge-gateway command line."""
    certs = subparsers.add_parser("certs", help="OPC-UA application certificates")
    sub = certs.add_subparsers(dest="certs_command", required=True)
    c = sub.add_parser("create", help="create a self-signed client certificate and key for OPC-UA security")
    c.add_argument("--out", type=Path, required=True, help=f"folder for {CERT_NAME} and {KEY_NAME}")
    c.add_argument(
        "--application-uri", required=True, help="the gateway's OPC-UA application URI, e.g. urn:site:gw01"
    )
    c.add_argument(
        "--hostname",
        action="append",
        help="DNS name in the certificate (repeatable; default: this machine's host name)",
    )
    c.add_argument("--days", type=_positive_int, default=730, help="validity in days (default 730)")
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(func=cmd_certs_create)
