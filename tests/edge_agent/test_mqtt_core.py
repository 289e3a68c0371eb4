"""The MQTT core against a real Mosquitto: connecting, refusals by reason code, TLS with client certificates."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from edge_agent.mqtt_core import (
    CONNECT_FAILURE_REASONS,
    REFUSAL_REASONS,
    BadTlsFiles,
    BadTopic,
    ConnectFailed,
    ConnectRefused,
    InMessage,
    MqttError,
    MqttSettings,
    OutMessage,
    PolledLink,
    ThreadedLink,
    TlsSettings,
    classify_refusal,
)
from shopfleet.broker import BrokerProcess, free_port, wait_for_port
from shopfleet.errors import PermanentError, TemporaryError
from tests.support.certs import TestCA
from tests.support.wait import wait_for

USER, PASSWORD = "node-1", "right-password"


def settings(port: int, **kw: object) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, client_id=f"core-test-{time.monotonic_ns()}", connect_timeout_s=5, **kw)  # type: ignore[arg-type]


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    tool = shutil.which("mosquitto_passwd")
    if tool is None or shutil.which("mosquitto") is None:
        pytest.skip("Mosquitto not installed: apt-get install mosquitto")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-b", "-c", str(pw), USER, PASSWORD], check=True)
    (tmp_path / "broker").mkdir()
    b = BrokerProcess(workdir=tmp_path / "broker", engine="mosquitto", password_file=pw)
    b.start()
    yield b
    b.cleanup()


@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[tuple[int, TestCA]]:
    """Mosquitto with a second listener that requires a client certificate signed by the test CA."""
    if shutil.which("mosquitto") is None:
        pytest.skip("Mosquitto not installed: apt-get install mosquitto")
    ca = TestCA(tmp_path)
    server = ca.issue("127.0.0.1", server=True)
    port = free_port()
    (tmp_path / "broker").mkdir()
    extra = "\n".join([
        f"listener {port} 127.0.0.1", f"cafile {ca.ca_file}", f"certfile {server.cert_file}",
        f"keyfile {server.key_file}", "require_certificate true",
    ])
    b = BrokerProcess(workdir=tmp_path / "broker", engine="mosquitto", extra_config=extra)
    b.start()
    wait_for_port("127.0.0.1", port, 10)
    yield port, ca
    b.cleanup()


# ----- classification (no broker) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [(0x86, "bad_credentials"), (0x87, "not_authorized"), (0x85, "client_id"), (0x84, "protocol"),
     (0x88, "unavailable"), (0x8A, "banned"), (0x9D, "moved"), (0xFE, "refused")],
)
def test_refusals_are_classified_by_reason_code(code: int, reason: str) -> None:
    exc = classify_refusal(code, settings(1883))
    assert isinstance(exc, ConnectRefused) and isinstance(exc, TemporaryError) and isinstance(exc, MqttError)
    assert (exc.reason, exc.code) == (reason, code)
    assert f"0x{code:02X}" in str(exc) and "127.0.0.1:1883" in str(exc)
    assert exc.reason in REFUSAL_REASONS and exc.reason in CONNECT_FAILURE_REASONS


def test_success_codes_are_not_refusals() -> None:
    assert classify_refusal(0, settings(1883)) is None


def test_settings_reject_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="'3.1.1' or '5'"):
        settings(1883, protocol="3.1")
    with pytest.raises(ValueError, match="key_file without a cert_file"):
        settings(1883, tls=TlsSettings(key_file="k.pem"))


def test_missing_tls_files_are_permanent(tmp_path: Path) -> None:
    with pytest.raises(BadTlsFiles, match="ca.pem") as caught:
        PolledLink(settings(1883, tls=TlsSettings(ca_file=str(tmp_path / "ca.pem"))), on_message=lambda m: None)
    assert isinstance(caught.value, PermanentError) and caught.value.reason == "tls_files"


def test_nothing_listening_is_a_temporary_unreachable() -> None:
    link = PolledLink(settings(free_port()), on_message=lambda m: None)
    with pytest.raises(ConnectFailed) as caught:
        link.connect()
    assert caught.value.reason == "unreachable" and isinstance(caught.value, TemporaryError)
    link.close()


# ----- a real broker ------------------------------------------------------------------------------


def test_polled_link_round_trip_with_frozen_messages_and_acks(broker: BrokerProcess) -> None:
    got: list[InMessage] = []
    acked: list[int] = []
    link = PolledLink(settings(broker.port), on_message=got.append, on_ack=acked.append)
    link.connect(will=OutMessage("core/will", b"gone", retain=True))
    try:
        link.subscribe(["core/#"])
        link.poll(0.2)  # the SUBACK
        mid = link.publish(OutMessage("core/a", b"hello", qos=1, retain=True))
        deadline = time.monotonic() + 5
        while not (got and mid in acked) and time.monotonic() < deadline:
            link.poll(0.1)
        assert mid in acked
        msg = got[0]
        assert (msg.topic, msg.payload, msg.qos) == ("core/a", b"hello", 1)
        assert msg.connection == 1
        with pytest.raises(FrozenInstanceError):
            msg.topic = "other"  # type: ignore[misc]
        with pytest.raises(BadTopic) as caught:
            link.publish(OutMessage("core/#", b"x"))
        assert isinstance(caught.value, PermanentError)
    finally:
        link.close()
    assert not link.connected


def test_interrupt_wakes_a_long_poll_from_another_thread(broker: BrokerProcess) -> None:
    link = PolledLink(settings(broker.port), on_message=lambda m: None)
    link.connect()
    try:
        done = threading.Event()

        def poll_long() -> None:
            link.poll(30)
            done.set()

        t = threading.Thread(target=poll_long, daemon=True)
        started = time.monotonic()
        t.start()
        link.interrupt()
        assert done.wait(5), "interrupt() did not wake poll(30)"
        assert time.monotonic() - started < 5
        t.join(1)
    finally:
        link.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_bad_password_is_refused_as_not_authorised(auth_broker: BrokerProcess, protocol: str) -> None:
    link = PolledLink(settings(auth_broker.port, username=USER, password="wrong", protocol=protocol), on_message=lambda m: None)
    with pytest.raises(ConnectRefused) as caught:
        link.connect()
    link.close()
    # Mosquitto answers a wrong password with "not authorised" (3.1.1 return code 5, MQTT 5 0x87).
    assert caught.value.reason == "not_authorized"
    assert caught.value.code == 0x87
    assert "ACL" in str(caught.value)
    ok = PolledLink(settings(auth_broker.port, username=USER, password=PASSWORD, protocol=protocol), on_message=lambda m: None)
    ok.connect()
    assert ok.connected
    ok.close()


def test_threaded_link_reports_a_refusal_and_connects_with_the_right_password(auth_broker: BrokerProcess) -> None:
    bad = ThreadedLink(settings(auth_broker.port, username=USER, password="wrong", protocol="5"), lambda m: None)
    bad.start()
    try:
        with pytest.raises(ConnectRefused) as caught:
            bad.wait_connected(5)
        assert caught.value.reason == "not_authorized"
    finally:
        bad.stop()
    got: list[InMessage] = []
    good = ThreadedLink(settings(auth_broker.port, username=USER, password=PASSWORD, protocol="5"), got.append, subscriptions=["t/#"])
    good.start()
    try:
        good.wait_connected(5)
        wait_for(lambda: good.publish_sync("t/x", b"1", timeout=5) is None and got, 5, "the message back")
        assert got[0].payload == b"1" and got[0].connection == good.connection == 1
    finally:
        good.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_with_ca_and_client_certificate(mtls_broker: tuple[int, TestCA], protocol: str) -> None:
    port, ca = mtls_broker
    client = ca.issue("node-1", server=False)
    tls = TlsSettings(ca_file=ca.ca_file, cert_file=client.cert_file, key_file=client.key_file)
    got: list[InMessage] = []
    link = PolledLink(settings(port, tls=tls, protocol=protocol), on_message=got.append)
    link.connect()
    try:
        link.subscribe(["secure/#"])
        link.poll(0.2)
        link.publish(OutMessage("secure/x", b"over tls"))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            link.poll(0.1)
        assert got and got[0].payload == b"over tls"
    finally:
        link.close()


def test_tls_without_the_required_client_certificate_fails_as_tls(mtls_broker: tuple[int, TestCA]) -> None:
    port, ca = mtls_broker
    link = PolledLink(settings(port, tls=TlsSettings(ca_file=ca.ca_file)), on_message=lambda m: None)
    with pytest.raises(ConnectFailed) as caught:
        link.connect()
    link.close()
    assert caught.value.reason == "tls" and isinstance(caught.value, TemporaryError)


def test_tls_with_a_foreign_ca_fails_as_tls(tmp_path: Path, mtls_broker: tuple[int, TestCA]) -> None:
    port, _ = mtls_broker
    (tmp_path / "other").mkdir()
    other = TestCA(tmp_path / "other", "someone else")
    client = other.issue("node-1", server=False)
    link = PolledLink(
        settings(port, tls=TlsSettings(ca_file=other.ca_file, cert_file=client.cert_file, key_file=client.key_file)),
        on_message=lambda m: None,
    )
    with pytest.raises(ConnectFailed, match="TLS handshake") as caught:
        link.connect()
    link.close()
    assert caught.value.reason == "tls"
