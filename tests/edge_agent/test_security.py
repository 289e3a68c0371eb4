"""Per-node credentials and TLS against a real Mosquitto configured for them."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from shopfleet.broker import BrokerProcess, free_port, wait_for_port
from tests.support.recorder import wait_for


def make_agent(tmp_path: Path, broker: dict[str, Any]) -> Agent:
    config = validate_config(
        {
            "shop": "sec-1",
            "node": "pi-1",
            "broker": {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **broker},
            "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
            "heartbeat_interval_s": 30,
            "shutdown_timeout_s": 1,
        }
    )
    return Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))


def failures(agent: Agent, reason: str) -> float:
    return agent.registry.get_sample_value("shopfleet_agent_connect_failures_total", {"reason": reason}) or 0.0


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed: apt-get install mosquitto")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-b", "-c", str(pw), "sec-1-pi-1", "right-password"], check=True)
    (tmp_path / "broker").mkdir()
    b = BrokerProcess(workdir=tmp_path / "broker", password_file=pw, extra_config="")
    b.start()
    yield b
    b.cleanup()


def test_node_credentials_accepted(tmp_path: Path, auth_broker: BrokerProcess) -> None:
    agent = make_agent(tmp_path, {"port": auth_broker.port, "username": "sec-1-pi-1", "password": "right-password"})
    agent.start()
    try:
        assert agent.wait_connected(10)
        wait_for(lambda: agent.outbox.depth() == 0 and agent.heartbeats_sent, 10, "the heartbeat acknowledged")
    finally:
        agent.stop(timeout=2)


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"username": "sec-1-pi-1", "password": "wrong"}, id="wrong-password"),
        pytest.param({}, id="anonymous"),
    ],
)
def test_refused_credentials_are_counted_and_retried(tmp_path: Path, auth_broker: BrokerProcess, credentials: dict, caplog) -> None:
    agent = make_agent(tmp_path, {"port": auth_broker.port, **credentials})
    agent.start()
    try:
        wait_for(lambda: failures(agent, "not_authorized") + failures(agent, "bad_credentials") >= 3, 10, "repeated refusals")
        assert not agent.uplink.connected.is_set()
        assert agent.uplink._thread.is_alive()
        assert any("refused the connection" in r.getMessage() and "broker" in r.getMessage() for r in caplog.records)
        assert agent.outbox.depth() >= 1, "the heartbeat waits in the outbox"
    finally:
        agent.stop(timeout=0.5)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey, issuer: str, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, obj: Any) -> str:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[BrokerProcess, int, str, str]]:
    ca_key, srv_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _write_pem(tmp_path / "ca.pem", _cert("shopfleet test CA", ca_key, ca_key, "shopfleet test CA", ca=True))
    other_ca = _write_pem(tmp_path / "other-ca.pem", _cert("someone else", other_key, other_key, "someone else", ca=True))
    cert = _write_pem(tmp_path / "server.pem", _cert("127.0.0.1", srv_key, ca_key, "shopfleet test CA", ca=False))
    key = _write_pem(tmp_path / "server.key", srv_key)
    os.chmod(key, 0o644)
    tls_port = free_port()
    (tmp_path / "broker").mkdir()
    extra = "\n".join(filter(None, [f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]))
    b = BrokerProcess(workdir=tmp_path / "broker", extra_config=extra)
    b.start()
    wait_for_port("127.0.0.1", tls_port, 10)
    yield b, tls_port, ca, other_ca
    b.cleanup()


def test_tls_with_the_right_ca_connects(tmp_path: Path, tls_broker) -> None:
    _, port, ca, _ = tls_broker
    agent = make_agent(tmp_path, {"port": port, "tls": {"ca_file": ca}})
    agent.start()
    try:
        assert agent.wait_connected(10)
        wait_for(lambda: agent.outbox.depth() == 0 and agent.heartbeats_sent, 10, "the heartbeat acknowledged over TLS")
    finally:
        agent.stop(timeout=2)


def test_tls_with_a_foreign_ca_never_connects_and_keeps_trying(tmp_path: Path, tls_broker) -> None:
    _, port, _, other_ca = tls_broker
    agent = make_agent(tmp_path, {"port": port, "tls": {"ca_file": other_ca}})
    agent.start()
    try:
        wait_for(lambda: failures(agent, "tls") >= 3, 10, "repeated TLS failures")
        assert not agent.uplink.connected.is_set() and agent.uplink._thread.is_alive()
    finally:
        agent.stop(timeout=0.5)
