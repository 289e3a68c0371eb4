"""The agent's one adapter around paho-mqtt: frozen values in and out, exceptions for failures.

paho reports failures as return codes and callbacks in whatever thread runs its loop. The rest of
the agent should not care: here a connection is driven by one thread calling :meth:`MqttLink.poll`,
callbacks fire in that thread, incoming messages become frozen :class:`InMessage` values, and
every failure becomes an exception that says whether to retry (:class:`TemporaryError`) or that
retrying will not help until someone changes the config (:class:`PermanentError`), in the
spirit of kopf's error classes.

paho keeps unacknowledged QoS 1 messages across ``connect`` calls and re-sends them after a
reconnect, so the uplink hands each outbox message to paho once per process; after a restart the
outbox replays them. MQTT 3.1.1 with a clean session is used: the agent needs no broker-side
session, since its durability is the outbox and its downlink state (desired state, controller
presence) is retained.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

log = logging.getLogger(__name__)


class MqttError(Exception):
    """Something went wrong talking to the broker."""


class TemporaryError(MqttError):
    """Retry after a delay (network down, broker restarting)."""


class PermanentError(MqttError):
    """Retrying will not help until the configuration changes (bad TLS files, bad topic)."""


class ConnectFailed(TemporaryError):
    """No MQTT connection could be made; ``reason`` (``unreachable``, ``tls``, ``timeout``) is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ConnectRefused(TemporaryError):
    """The broker answered CONNACK with a refusal; ``reason`` is a metric label.

    Retried (credentials may be provisioned after the node boots), but the log says what to fix.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ConnectionLost(TemporaryError):
    """An established connection dropped."""


class NotConnected(TemporaryError):
    """A publish or subscribe was attempted without a connection."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker; all files PEM."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MqttSettings:
    """Everything needed to connect."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class OutMessage:
    """A message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class InMessage:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool


_REFUSALS = {
    # MQTT 3.1.1 CONNACK codes as paho names them -> (label, what to do)
    "Unsupported protocol version": ("protocol", "the broker does not speak MQTT 3.1.1"),
    "Client identifier not valid": ("client_id", "the broker refuses the client id; check the node id"),
    "Server unavailable": ("unavailable", "the broker is up but not accepting connections; it will be retried"),
    "Bad user name or password": ("bad_credentials", "check broker.username and broker.password against 'shopfleet broker-config'"),
    "Not authorized": ("not_authorized", "this node's user is not allowed to connect; check the broker's password and ACL files"),
}


class MqttLink:
    """One MQTT client connection, driven by the thread that calls :meth:`poll`."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_message: Callable[[InMessage], None],
        on_ack: Callable[[int], None],
        max_inflight: int = 50,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_ack = on_ack
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.connect_timeout = settings.connect_timeout_s
        if settings.username:
            c.username_pw_set(settings.username, settings.password)
        if settings.tls is not None:
            t = settings.tls
            try:
                c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise PermanentError(f"cannot load the TLS files ({exc}); check broker.tls.ca_file/cert_file/key_file") from None
            c.tls_insecure_set(t.insecure)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        self._client = c
        self._connack: Any = None
        self._connected = False

    # paho callbacks (run inside poll/connect, in the caller's thread) --------------------------

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack = reason_code
        self._connected = not reason_code.is_failure

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected = False

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._on_message(InMessage(topic=msg.topic, payload=bytes(msg.payload), retain=bool(msg.retain)))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._on_ack(mid)

    # API ---------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Return whether the connection is up."""
        return self._connected

    def connect(self, will: OutMessage | None) -> None:
        """Connect and wait for the CONNACK; raise ConnectFailed or ConnectRefused."""
        s = self.settings
        c = self._client
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        else:
            c.will_clear()
        self._connack = None
        self._connected = False
        try:
            c.connect(s.host, s.port, keepalive=s.keepalive_s)
        except ssl.SSLError as exc:
            raise ConnectFailed(
                "tls", f"TLS handshake with {s.host}:{s.port} failed: {exc}; check broker.tls.ca_file and the broker's certificate"
            ) from None
        except OSError as exc:
            raise ConnectFailed("unreachable", f"cannot reach {s.host}:{s.port}: {exc}") from None
        deadline = time.monotonic() + s.connect_timeout_s
        while self._connack is None:
            if time.monotonic() > deadline:
                c.disconnect()
                raise ConnectFailed("timeout", f"no CONNACK from {s.host}:{s.port} within {s.connect_timeout_s:.0f}s")
            rc = c.loop(0.05)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,) and self._connack is None:
                raise ConnectFailed("unreachable", f"connection to {s.host}:{s.port} closed during handshake ({paho.error_string(rc)})")
        if self._connack.is_failure:
            text = str(self._connack)
            label, fix = _REFUSALS.get(text, ("refused", "check the broker's log"))
            raise ConnectRefused(label, f"broker {s.host}:{s.port} refused the connection: {text}; {fix}")

    def subscribe(self, topics: Iterable[str], qos: int = 1) -> None:
        """Subscribe to topics (the SUBACK arrives during later polls)."""
        topics = list(topics)
        if not topics:
            return
        rc, _mid = self._client.subscribe([(t, qos) for t in topics])
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise NotConnected("subscribe without a connection")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"subscribe failed: {paho.error_string(rc)}")

    def publish(self, msg: OutMessage) -> int:
        """Hand a message to paho and return its mid; its acknowledgement arrives via on_ack."""
        try:
            info = self._client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        except ValueError as exc:
            raise PermanentError(f"cannot publish on {msg.topic!r}: {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TemporaryError("paho's outgoing queue is full; publish again after acknowledgements")
        # Any other code (even CONN_LOST) leaves a QoS 1 message in paho's queue, re-sent after
        # the reconnect; the next poll reports the lost connection.
        return info.mid

    def poll(self, timeout: float) -> None:
        """Run network I/O for up to ``timeout`` seconds; raise ConnectionLost if the link dropped."""
        rc = self._client.loop(timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._connected:
            self._connected = False
            raise ConnectionLost(f"connection to {self.settings.host}:{self.settings.port} lost ({paho.error_string(rc)})")

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker then discards the Will)."""
        if self._connected:
            self._client.disconnect()
            for _ in range(20):
                if self._client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._connected = False

    def interrupt(self) -> None:
        """Wake a :meth:`poll` blocked in ``select`` from another thread (thread-safe).

        paho wakes its own loop this way when ``publish`` is called from another thread; the
        uplink uses it so new outbox messages leave at once while an idle poll sleeps long.
        """
        pair = getattr(self._client, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                pair.send(b"0")
