"""MQTT over TLS with a password, against a real mosquitto: what a site broker usually demands."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import MqttConfig, TlsConfig
from gateway.demo.broker import MosquittoBroker, find_mosquitto
from gateway.errors import PublishError
from gateway.sinks.mqtt import MqttPublisher
from tests.conftest import free_port, wait_for_condition

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key, *, ca: bool, san=None):  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, san: list[x509.GeneralName]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `san`; returns (ca, cert, key) PEM paths."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-gateway test CA")])
    ca = _cert("edge-gateway test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("broker", key, ca_name, ca_key, ca=False, san=san)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def secure_broker(tmp_path: Path, port: int, san: list[x509.GeneralName]) -> tuple[MosquittoBroker, Path]:
    ca, cert, key = make_pki(tmp_path, san)
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "gw01", "right-password"], check=True)
    passwords.chmod(0o600)
    broker = MosquittoBroker(
        port,
        workdir=tmp_path / "broker",
        allow_anonymous=False,
        extra_config=[f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", f"password_file {passwords}"],
    )
    return broker, ca


def publisher(port: int, ca: Path, tmp_path: Path, password: str, **tls: bool) -> MqttPublisher:
    (tmp_path / "mqtt-password").write_text(password + "\n")
    cfg = MqttConfig(
        host="127.0.0.1",
        port=port,
        username="gw01",
        password_file=tmp_path / "mqtt-password",
        tls=TlsConfig(ca_file=ca, **tls),
    )
    return MqttPublisher(cfg, gateway_id="gw01", version="test", started_at="now")


def test_tls_with_password_from_file_publishes_and_is_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    broker, ca = secure_broker(tmp_path, port, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])

    async def scenario() -> MqttPublisher:
        pub = publisher(port, ca, tmp_path, "right-password")
        await pub.start()
        try:
            assert await pub.wait_connected(10), pub.stats.last_error
            await pub.publish("edge/site/pump01/alarm", b"{}", qos=1)  # returns only after PUBACK
        finally:
            await pub.stop()
        return pub

    with broker:
        pub = asyncio.run(scenario())
    assert pub.stats.published >= 2  # the alarm and the retained online/offline status
    assert pub.stats.last_error is None


def test_wrong_password_is_reported_not_crashed(tmp_path: Path) -> None:
    port = free_port()
    broker, ca = secure_broker(tmp_path, port, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])

    async def scenario() -> tuple[str | None, bool]:
        pub = publisher(port, ca, tmp_path, "wrong-password")
        await pub.start()
        try:
            await wait_for_condition(lambda: pub.stats.last_error is not None, 10, "a refusal")
            with pytest.raises(PublishError):
                await pub.publish("edge/x", b"{}", timeout=1)
            return pub.stats.last_error, pub.connected
        finally:
            await pub.stop()

    with broker:
        error, connected = asyncio.run(scenario())
    assert error is not None and "not authorized" in error.lower()
    assert not connected


# paho-mqtt 2.2 does not close the socket whose TLS handshake failed; it is closed when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_certificate_for_another_host_is_rejected_unless_verification_is_skipped(tmp_path: Path) -> None:
    port = free_port()
    broker, ca = secure_broker(tmp_path, port, [x509.DNSName("broker.plant.example")])

    async def scenario(**tls: bool) -> tuple[bool, str | None]:
        pub = publisher(port, ca, tmp_path, "right-password", **tls)
        await pub.start()
        try:
            ok = await pub.wait_connected(3)
            if not ok:
                await wait_for_condition(lambda: pub.stats.last_error is not None, 10, "a TLS error")
            return ok, pub.stats.last_error
        finally:
            await pub.stop()

    with broker:
        verified, error = asyncio.run(scenario())
        skipped, _ = asyncio.run(scenario(insecure_skip_verify=True))
    assert not verified
    assert error is not None and "certificate" in error.lower()
    assert skipped
