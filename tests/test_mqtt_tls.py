"""TLS + password file + ACL on a real mosquitto, certificates generated here (cryptography)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import ssl
from pathlib import Path

import pytest

from _mqtt_helpers import (
    DEVICE_PASSWORD, DEVICE_USER, SUB_PASSWORD, SUB_USER, Collector, mosquitto_passwd_file, wait_until,
    world_readable_dir,
)
from conftest import free_port, need_module
from edged.config import MqttConfig
from edged.mqtt.client import MqttPublisher, MqttSetupError
from edged.mqtt.outbox import Outbox
from edged.mqtt.topics import Topics

x509 = need_module("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

DEVICE = "dev1"
TOPICS = Topics("edged", DEVICE)


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o644)  # test-only: mosquitto runs as user 'mosquitto' after dropping root


def _write_cert(cert, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _issue(ca_cert, ca_key, cn: str, *, san=None, client=False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@pytest.fixture(scope="module")
def pki():
    d = world_readable_dir("edged-tls-")
    ca_cert, ca_key = _ca("edged test CA")
    _write_cert(ca_cert, d / "ca.pem")
    srv, srv_key = _issue(ca_cert, ca_key, "localhost",
                          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    _write_cert(srv, d / "server.pem")
    _write_key(srv_key, d / "server.key")
    # a server certificate valid for another name only: hostname verification must reject it
    other, other_key = _issue(ca_cert, ca_key, "broker.invalid", san=[x509.DNSName("broker.invalid")])
    _write_cert(other, d / "other.pem")
    _write_key(other_key, d / "other.key")
    cli, cli_key = _issue(ca_cert, ca_key, DEVICE_USER, client=True)
    _write_cert(cli, d / "client.pem")
    _write_key(cli_key, d / "client.key")
    rogue_ca, _ = _ca("some other CA")
    _write_cert(rogue_ca, d / "rogue-ca.pem")
    mosquitto_passwd_file(d / "passwd", [(DEVICE_USER, DEVICE_PASSWORD), (SUB_USER, SUB_PASSWORD)])
    (d / "acl").write_text(
        f"user {DEVICE_USER}\ntopic write {TOPICS.base}/#\n\nuser {SUB_USER}\ntopic read edged/#\n"
    )
    os.chmod(d / "acl", 0o644)
    return d


@pytest.fixture
def tls_broker(broker_factory, pki):
    """Three TLS listeners: server-auth, mutual TLS, and a wrong-hostname certificate."""
    ports = {"tls": free_port(), "mtls": free_port(), "badname": free_port()}
    conf = [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {pki / 'passwd'}",
        f"acl_file {pki / 'acl'}",
        f"listener {ports['tls']} 127.0.0.1",
        f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'server.pem'}", f"keyfile {pki / 'server.key'}",
        f"listener {ports['mtls']} 127.0.0.1",
        f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'server.pem'}", f"keyfile {pki / 'server.key'}",
        "require_certificate true",
        f"listener {ports['badname']} 127.0.0.1",
        f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'other.pem'}", f"keyfile {pki / 'other.key'}",
    ]
    b = broker_factory(extra_conf=conf, port=ports["tls"])
    b.ports = ports
    return b


def _cfg(pki: Path, port: int, **tls) -> MqttConfig:
    t = {"enabled": True, "ca_file": str(pki / "ca.pem")}
    t.update(tls)
    return MqttConfig(host="127.0.0.1", port=port, username=DEVICE_USER, reconnect_min_s=0.05,
                      reconnect_max_s=0.3, keepalive=10, tls=t)


def _sub_ctx(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


class Status:
    def __init__(self):
        import threading
        self.cond = threading.Condition()
        self.events = []

    def __call__(self, ev, info):
        with self.cond:
            self.events.append((ev, info))
            self.cond.notify_all()

    def wait_for(self, ev, n=1, timeout=10.0):
        with self.cond:
            return self.cond.wait_for(lambda: sum(e == ev for e, _ in self.events) >= n, timeout)


def _run_roundtrip(cfg, password, port_sub, pki, tmp_path, n=20):
    sub = Collector(port_sub, TOPICS.events, tls_ctx=_sub_ctx(pki))
    ob = Outbox(tmp_path / "ob.sqlite")
    pub = MqttPublisher(cfg, device_id=DEVICE, outbox=ob, password=password)
    try:
        assert sub.wait_subscribed()
        pub.start()
        assert pub.wait_connected(10), pub.stats()
        for i in range(n):
            ob.put(TOPICS.events, json.dumps({"seq": i}).encode(), qos=1)
        assert sub.wait(lambda: len(sub.messages) >= n, 10)
        assert sub.seqs() == list(range(n))
        assert wait_until(lambda: ob.depth() == 0, 10)
    finally:
        pub.stop(timeout=3)
        sub.close()
        ob.close()


def test_tls_with_password_publishes(tls_broker, pki, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    port = tls_broker.ports["tls"]
    _run_roundtrip(_cfg(pki, port), DEVICE_PASSWORD, port, pki, tmp_path)
    assert DEVICE_PASSWORD not in caplog.text


def test_mutual_tls_with_client_certificate(tls_broker, pki, tmp_path):
    port = tls_broker.ports["mtls"]
    cfg = _cfg(pki, port, cert_file=str(pki / "client.pem"), key_file=str(pki / "client.key"))
    _run_roundtrip(cfg, DEVICE_PASSWORD, tls_broker.ports["tls"], pki, tmp_path)


def test_mutual_tls_without_client_certificate_fails(tls_broker, pki, tmp_path):
    st = Status()
    ob = Outbox(tmp_path / "ob.sqlite")
    pub = MqttPublisher(_cfg(pki, tls_broker.ports["mtls"]), device_id=DEVICE, outbox=ob,
                        password=DEVICE_PASSWORD, on_status=st)
    pub.start()
    try:
        # Refused in the handshake or dropped right after it (TLS 1.3 checks the client certificate
        # late): both are a failed connect, before any CONNACK; it keeps trying and is never online.
        assert st.wait_for("connect_failed", 2, 10), st.events
        assert [ev for ev, _ in st.events if ev in ("connected", "disconnected")] == []
        assert not pub.connected
    finally:
        pub.stop(timeout=2)
        ob.close()


def test_wrong_password_refused_and_reported(tls_broker, pki, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    st = Status()
    ob = Outbox(tmp_path / "ob.sqlite")
    ob.put(TOPICS.events, b'{"seq": 0}')
    pub = MqttPublisher(_cfg(pki, tls_broker.ports["tls"]), device_id=DEVICE, outbox=ob,
                        password="definitely-wrong", on_status=st)
    pub.start()
    try:
        assert st.wait_for("connect_refused", 2, 10)
        s = pub.stats()
        assert s["connect_refused"] >= 2 and not s["connected"] and s["published"] == 0
        assert "refused" in s["last_error"]
        assert ob.depth() == 1  # kept for when the credentials are fixed
        assert "definitely-wrong" not in caplog.text
        assert any("refused the connection" in r.getMessage() for r in caplog.records)
    finally:
        pub.stop(timeout=2)
        ob.close()


def test_untrusted_ca_is_not_accepted(tls_broker, pki, tmp_path):
    st = Status()
    ob = Outbox(tmp_path / "ob.sqlite")
    pub = MqttPublisher(_cfg(pki, tls_broker.ports["tls"], ca_file=str(pki / "rogue-ca.pem")), device_id=DEVICE,
                        outbox=ob, password=DEVICE_PASSWORD, on_status=st)
    pub.start()
    try:
        assert st.wait_for("connect_failed", 2, 10)
        assert not pub.connected
    finally:
        pub.stop(timeout=2)
        ob.close()


def test_verify_hostname(tls_broker, pki, tmp_path):
    port = tls_broker.ports["badname"]
    st = Status()
    ob = Outbox(tmp_path / "ob.sqlite")
    pub = MqttPublisher(_cfg(pki, port), device_id=DEVICE, outbox=ob, password=DEVICE_PASSWORD, on_status=st)
    pub.start()
    try:
        assert st.wait_for("connect_failed", 2, 10), "a certificate for another host name was accepted"
        assert not pub.connected
    finally:
        pub.stop(timeout=2)
        ob.close()
    # verify_hostname: false trusts the CA but not the name
    _run_roundtrip(_cfg(pki, port, verify_hostname=False), DEVICE_PASSWORD, tls_broker.ports["tls"], pki,
                   tmp_path / "second")


def test_acl_denied_publish_reported_and_dropped(tls_broker, pki, tmp_path, caplog):
    port = tls_broker.ports["tls"]
    st = Status()
    sub = Collector(port, "edged/#", tls_ctx=_sub_ctx(pki))
    ob = Outbox(tmp_path / "ob.sqlite")
    pub = MqttPublisher(_cfg(pki, port), device_id=DEVICE, outbox=ob, password=DEVICE_PASSWORD, on_status=st)
    try:
        assert sub.wait_subscribed()
        pub.start()
        assert pub.wait_connected(10)
        forbidden = "edged/another-device/events"  # outside edged/dev1/#
        ob.put(TOPICS.events, b'{"seq": 0}', qos=1)
        ob.put(forbidden, b'{"seq": 1}', qos=1)
        ob.put(TOPICS.events, b'{"seq": 2}', qos=1)  # the queue is not blocked by the denied row
        assert st.wait_for("denied", 1, 10), f"denial not reported: {pub.stats()}"
        assert sub.wait(lambda: sum(m.topic == TOPICS.events for m in sub.messages) >= 2, 10)
        assert wait_until(lambda: ob.depth() == 0, 10)
        s = pub.stats()
        assert s["denied"] == 1 and s["published"] == 2
        assert forbidden in s["last_error"]
        denied = [info for ev, info in st.events if ev == "denied"]
        assert denied[0]["topic"] == forbidden and denied[0]["code"] == 0x87
        assert any("denied" in r.getMessage() and forbidden in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
        assert not any(m.topic == forbidden for m in sub.messages)
    finally:
        pub.stop(timeout=3)
        sub.close()
        ob.close()


def test_unreadable_tls_file_is_a_clear_error(tmp_path):
    cfg = MqttConfig(tls={"enabled": True, "ca_file": str(tmp_path / "missing-ca.pem")})
    ob = Outbox(tmp_path / "ob.sqlite")
    with pytest.raises(MqttSetupError, match="mqtt.tls.ca_file"):
        MqttPublisher(cfg, device_id=DEVICE, outbox=ob)
    ob.close()
