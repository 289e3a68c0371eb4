"""The one MQTT core under the agent, the controller and the simulators: paho in, typed values out.

paho reports failures as return codes, reason-code objects and callbacks in whatever thread runs
its loop. Nothing above this module should see any of that. Here:

* :class:`MqttSettings` says everything needed to connect: host, port, client id, credentials,
  TLS (a CA file, optionally a client certificate and key), keepalive, protocol 3.1.1 or 5;
* :func:`new_client` builds a paho client from them, failing with :class:`BadTlsFiles` when the
  TLS files cannot be loaded (a configuration problem, so permanent);
* :func:`classify_refusal` turns a CONNACK reason code (its number, never its text) into a
  :class:`ConnectRefused` whose ``reason`` is a short metric label and whose message says what
  to fix; :func:`classify_connect_error` does the same for socket and TLS exceptions
  (:class:`ConnectFailed`);
* received messages become frozen :class:`InMessage` values;
* two drivers sit on top: :class:`PolledLink`, driven by one thread that calls ``poll`` (the
  agent's uplink, which must never race its outbox cursor), and :class:`ThreadedLink`, driven by
  paho's own network thread with automatic reconnects (the controller, the simulated fleet).

Every error is an :class:`MqttError` and, at the same time, one of the shared retry classes of
:mod:`shopfleet.errors`: callers decide "retry" or "stop and report" by class.

This module imports nothing of the project but :mod:`shopfleet.errors` (an import-linter contract
says so), so the controller may use it without depending on the rest of the agent.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shopfleet.errors import PermanentError, ShopfleetError, TemporaryError

log = logging.getLogger(__name__)

Protocol = Literal["3.1.1", "5"]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MqttError(ShopfleetError):
    """Base of every broker error; ``reason`` is a short code and a metric label value."""

    default_reason = "mqtt"


class ConnectFailed(MqttError, TemporaryError):
    """No MQTT connection could be made; ``reason`` is ``unreachable``, ``tls`` or ``timeout``."""

    default_reason = "unreachable"


class ConnectRefused(MqttError, TemporaryError):
    """The broker answered CONNACK with a refusal; ``reason`` is one of :data:`REFUSAL_REASONS`.

    Temporary on purpose: credentials and ACLs are often provisioned after a node boots, so the
    caller retries with backoff, while the message says what to fix. ``code`` is the raw MQTT 5
    reason code (paho reports MQTT 3.1.1 refusals in the same numbering).
    """

    def __init__(self, message: str, *, reason: str, code: int) -> None:
        super().__init__(message, reason=reason)
        self.code = code


class ConnectionLost(MqttError, TemporaryError):
    """An established connection dropped."""

    default_reason = "connection_lost"


class NotConnected(MqttError, TemporaryError):
    """A publish or subscribe was attempted without a connection."""

    default_reason = "not_connected"


class QueueFull(MqttError, TemporaryError):
    """paho's outgoing queue is full; publish again after acknowledgements."""

    default_reason = "queue_full"


class PublishFailed(MqttError, TemporaryError):
    """A publish was not acknowledged in time or the connection went away under it."""

    default_reason = "publish_failed"


class BadTlsFiles(MqttError, PermanentError):
    """The CA file, client certificate or key cannot be loaded; fix the configuration."""

    default_reason = "tls_files"


class BadTopic(MqttError, PermanentError):
    """A topic paho refuses to publish on (a wildcard, an empty or over-long name)."""

    default_reason = "bad_topic"


# CONNACK reason codes (MQTT 5 numbering; paho converts 3.1.1 return codes to these) ->
# (metric label, what to do). Classified by number: the text is paho's and may change.
_REFUSALS: dict[int, tuple[str, str]] = {
    0x80: ("refused", "the broker gave no reason; check the broker's log"),
    0x81: ("protocol", "the broker could not parse the CONNECT packet; check the MQTT protocol setting"),
    0x82: ("protocol", "protocol error; check the MQTT protocol setting"),
    0x83: ("refused", "the broker refused for an implementation-specific reason; check the broker's log"),
    0x84: ("protocol", "the broker does not speak this MQTT protocol version; check the protocol setting"),
    0x85: ("client_id", "the broker refuses the client id; check the node or instance id"),
    0x86: ("bad_credentials", "check the MQTT username and password against 'shopfleet broker-config'"),
    0x87: ("not_authorized", "this user is not allowed to connect; check the broker's password and ACL files"),
    0x88: ("unavailable", "the broker is up but not accepting connections; it will be retried"),
    0x89: ("unavailable", "the broker is busy; it will be retried"),
    0x8A: ("banned", "the broker has banned this client; ask its operator"),
    0x8C: ("bad_credentials", "the broker does not support this authentication method; check the credentials"),
    0x90: ("protocol", "the broker refuses the Last Will topic; check the topic root"),
    0x95: ("protocol", "the CONNECT packet is too large for the broker"),
    0x97: ("unavailable", "a broker quota is exceeded; it will be retried"),
    0x99: ("protocol", "the broker refuses the Last Will payload format"),
    0x9A: ("protocol", "the broker does not support retained messages, which the Last Will needs"),
    0x9B: ("protocol", "the broker does not support the Last Will's QoS"),
    0x9C: ("moved", "the broker asks the client to use another server; update the broker host"),
    0x9D: ("moved", "the broker has moved; update the broker host"),
    0x9F: ("unavailable", "the broker limits the connection rate; it will be retried"),
}

REFUSAL_REASONS: tuple[str, ...] = tuple(sorted({label for label, _ in _REFUSALS.values()}))
"""Every ``reason`` a :class:`ConnectRefused` can carry (metric label values)."""

CONNECT_FAILURE_REASONS: tuple[str, ...] = ("unreachable", "tls", "timeout", *REFUSAL_REASONS)
"""Every ``reason`` of a failed connection attempt: :class:`ConnectFailed` and :class:`ConnectRefused`."""


# PUBACK and SUBACK refusals (MQTT 5 reason codes; a 3.1.1 SUBACK failure, 0x80, arrives as
# "unspecified") -> metric label. A 3.1.1 broker acknowledges a publish its ACL refuses with a
# plain PUBACK, so only an MQTT 5 connection can see a refused publish.
_ACK_REFUSALS: dict[int, str] = {
    0x80: "unspecified",
    0x83: "implementation_specific",
    0x87: "not_authorized",
    0x8F: "topic_filter_invalid",
    0x90: "topic_name_invalid",
    0x91: "packet_id_in_use",
    0x97: "quota_exceeded",
    0x99: "payload_format_invalid",
    0x9E: "shared_subscriptions_unsupported",
    0xA1: "subscription_ids_unsupported",
    0xA2: "wildcards_unsupported",
}
ACK_REFUSAL_REASONS = frozenset(_ACK_REFUSALS.values()) | {"other"}
"""Every ``reason`` :func:`classify_ack_refusal` returns (metric label values)."""


def classify_ack_refusal(reason_code: ReasonCode | int) -> str | None:
    """Return the label of a refusing PUBACK/SUBACK reason code (``not_authorized``...), or None when it is a success.

    Codes below 0x80 are successes (0x10 "no matching subscribers" included: the broker took the message).
    """
    code = reason_code.value if isinstance(reason_code, ReasonCode) else int(reason_code)
    if code < 0x80:
        return None
    return _ACK_REFUSALS.get(code, "other")


@dataclass(frozen=True)
class Refusal:
    """A publish or subscription the broker refused: ``kind`` is ``publish`` or ``subscribe``.

    ``mid`` is the publish's message id (0 for a subscription), ``topic`` the subscription's filter
    (empty for a publish: the caller knows what it sent under ``mid``), ``reason`` a metric label of
    :data:`ACK_REFUSAL_REASONS`, ``code`` the raw reason code.
    """

    kind: Literal["publish", "subscribe"]
    mid: int
    topic: str
    reason: str
    code: int


def classify_refusal(reason_code: ReasonCode | int, settings: MqttSettings) -> ConnectRefused | None:
    """Return the :class:`ConnectRefused` a CONNACK reason code means, or ``None`` for success.

    ``reason_code`` is paho's :class:`ReasonCode` (MQTT 5 numbering for both protocols) or its
    integer value.
    """
    code = reason_code.value if isinstance(reason_code, ReasonCode) else int(reason_code)
    if code < 0x80:
        return None
    label, fix = _REFUSALS.get(code, ("refused", "check the broker's log"))
    return ConnectRefused(
        f"broker {settings.host}:{settings.port} refused the connection of {settings.client_id!r} "
        f"(reason code 0x{code:02X}, {label}); {fix}",
        reason=label,
        code=code,
    )


def classify_connect_error(exc: BaseException, settings: MqttSettings) -> ConnectFailed:
    """Return the :class:`ConnectFailed` for an exception raised while opening the connection."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return ConnectFailed(
            f"TLS handshake with {where} failed: {exc}; check the CA file, the client certificate and the broker's certificate",
            reason="tls",
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return ConnectFailed(f"no answer from {where} within {settings.connect_timeout_s:.0f}s", reason="timeout")
    return ConnectFailed(f"cannot reach {where}: {exc}; is the broker running there?", reason="unreachable")


# --------------------------------------------------------------------------------------------
# Settings and values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker; all files PEM.

    ``ca_file`` verifies the broker (``None``: the system's CA store). ``cert_file`` and
    ``key_file`` present a client certificate to a broker that requires one (``key_file`` may be
    left out when the certificate file also holds the key). ``insecure`` skips the host name
    check, for test brokers whose certificate names another host; never in production.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MqttSettings:
    """Everything needed to connect to a broker."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    protocol: Protocol = "3.1.1"
    max_inflight: int = 20
    """QoS 1 messages in flight (sent, not yet acknowledged) per connection: paho's default. Raising
    it lets a busy publisher keep the link full; the broker has its own cap (Mosquitto's
    ``max_inflight_messages``)."""

    def __post_init__(self) -> None:
        if self.protocol not in ("3.1.1", "5"):
            raise ValueError(f"MQTT protocol {self.protocol!r} is not supported: use '3.1.1' or '5'")
        if self.tls is not None and self.tls.key_file and not self.tls.cert_file:
            raise ValueError("a TLS key_file without a cert_file: set both, or neither")

    @property
    def where(self) -> str:
        """Return ``host:port`` for messages."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class OutMessage:
    """A message to publish (also a Last Will)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class InMessage:
    """One received message, as everything above the core sees it.

    ``mid`` and ``connection`` (a counter of the link's connections) let a manual-ack consumer
    acknowledge it later, and skip acknowledging a message of an earlier connection.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0
    connection: int = 0
    received_at: float = field(default_factory=time.time)


def to_message(msg: paho.MQTTMessage, connection: int = 0) -> InMessage:
    """Return the frozen value of a paho message."""
    return InMessage(
        topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
        mid=msg.mid, connection=connection, received_at=time.time(),
    )


def new_client(
    settings: MqttSettings,
    *,
    clean: bool = True,
    manual_ack: bool = False,
    reconnect_on_failure: bool = True,
) -> paho.Client:
    """Return a paho client for ``settings``: protocol, credentials and TLS set, not connected.

    ``clean=False`` keeps a broker-side session (3.1.1: ``clean_session=False``; 5: the caller
    passes ``clean_start`` and a session expiry when connecting). Raises :class:`BadTlsFiles`.
    """
    v5 = settings.protocol == "5"
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=settings.client_id,
        clean_session=None if v5 else clean,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        manual_ack=manual_ack,
        reconnect_on_failure=reconnect_on_failure,
    )
    c.connect_timeout = settings.connect_timeout_s
    c.max_inflight_messages_set(settings.max_inflight)
    if settings.username:
        c.username_pw_set(settings.username, settings.password)
    if settings.tls is not None:
        t = settings.tls
        try:
            c.tls_set(
                ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BadTlsFiles(
                f"cannot load the TLS files (ca_file={t.ca_file}, cert_file={t.cert_file}, key_file={t.key_file}): {exc}; "
                "check that they exist, are PEM and that the key matches the certificate"
            ) from None
        c.tls_insecure_set(t.insecure)
    return c


def _publish_error(topic: str, exc: ValueError) -> BadTopic:
    return BadTopic(f"cannot publish on {topic!r}: {exc}; topics must be non-empty, without + or #")


# --------------------------------------------------------------------------------------------
# One thread drives the connection
# --------------------------------------------------------------------------------------------


class PolledLink:
    """One connection, driven by the thread that calls :meth:`connect` and :meth:`poll`.

    Callbacks (``on_message``, ``on_ack``) fire inside those calls, in that thread. The network
    I/O runs through paho's documented external-loop API (``socket``, ``loop_read``,
    ``loop_write``, ``loop_misc``) in a ``select`` that also watches a wake-up socket pair of
    this class, so :meth:`interrupt` can cut an idle poll short from any thread. No automatic
    reconnect: the owner decides when to retry (with its own backoff and metrics).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_message: Callable[[InMessage], None],
        on_ack: Callable[[int], None] = lambda mid: None,
        on_refused: Callable[[Refusal], None] | None = None,
        max_inflight: int = 50,
        clean: bool = True,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_ack = on_ack
        self._on_refused = on_refused
        self.refusals: dict[tuple[str, str], int] = {}
        """Refusals seen on this link: (``publish``|``subscribe``, reason) -> count."""
        self._pending_subs: dict[int, list[str]] = {}
        c = new_client(settings, clean=clean, reconnect_on_failure=False)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_subscribe = self._cb_subscribe
        self._client = c
        self._connack: ReasonCode | None = None
        self._connected = False
        self._connection = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # paho callbacks (run inside connect/poll, in the caller's thread) ---------------------------

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connack = reason_code
        self._connected = not reason_code.is_failure
        if self._connected:
            self._connection += 1

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connected = False

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._on_message(to_message(msg, self._connection))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties | None) -> None:
        reason = classify_ack_refusal(reason_code)
        if reason is None or self._on_refused is None:
            # Without an on_refused handler a refusal is still an acknowledgement (the broker will
            # never take the message), but it is counted in ``refusals`` and logged.
            if reason is not None:
                self._count_refusal(Refusal("publish", mid, "", reason, int(reason_code.value)))
            self._on_ack(mid)
            return
        self._count_refusal(Refusal("publish", mid, "", reason, int(reason_code.value)))

    def _cb_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        topics = self._pending_subs.pop(mid, [])
        for i, rc in enumerate(reason_codes):
            reason = classify_ack_refusal(rc)
            if reason is not None:
                self._count_refusal(Refusal("subscribe", 0, topics[i] if i < len(topics) else "", reason, int(rc.value)))

    def _count_refusal(self, refusal: Refusal) -> None:
        key = (refusal.kind, refusal.reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if self._on_refused is not None:
            self._on_refused(refusal)
        else:
            log.error("broker %s refused a %s%s: %s (reason code 0x%02X); check this user's ACL",
                      self.settings.where, refusal.kind, f" to {refusal.topic!r}" if refusal.topic else "", refusal.reason, refusal.code)

    # API ---------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Return whether the connection is up."""
        return self._connected

    def connect(self, will: OutMessage | None = None, *, properties: Properties | None = None, clean_start: bool = True) -> None:
        """Connect and wait for the CONNACK; raise :class:`ConnectFailed` or :class:`ConnectRefused`."""
        s = self.settings
        c = self._client
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        else:
            c.will_clear()
        self._connack = None
        self._connected = False
        self._pending_subs.clear()
        try:
            if s.protocol == "5":
                c.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=clean_start, properties=properties)
            else:
                c.connect(s.host, s.port, keepalive=s.keepalive_s)
        except OSError as exc:  # ssl.SSLError and socket.timeout are OSErrors too
            raise classify_connect_error(exc, s) from None
        deadline = time.monotonic() + s.connect_timeout_s
        connack: ReasonCode | None = None
        while connack is None:
            left = deadline - time.monotonic()
            if left <= 0:
                c.disconnect()
                raise ConnectFailed(f"no CONNACK from {s.where} within {s.connect_timeout_s:.0f}s", reason="timeout")
            rc = self._io(min(left, 0.05))
            connack = self._received_connack()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and connack is None:
                hint = "; the broker may require a client certificate" if s.tls is not None else ""
                raise ConnectFailed(
                    f"connection to {s.where} closed during the handshake ({paho.error_string(rc)}){hint}",
                    reason="tls" if s.tls is not None else "unreachable",
                )
        refused = classify_refusal(connack, s)
        if refused is not None:
            c.disconnect()
            raise refused

    def _received_connack(self) -> ReasonCode | None:
        # A method, not the attribute, so the type checker sees the callback may have set it.
        return self._connack

    def subscribe(self, topics: Iterable[str], qos: int = 1) -> None:
        """Subscribe to topic filters (the SUBACK arrives during later polls)."""
        topics = list(topics)
        if not topics:
            return
        try:
            rc, mid = self._client.subscribe([(t, qos) for t in topics])
        except ValueError as exc:
            raise BadTopic(f"cannot subscribe to {topics!r}: {exc}") from None
        if mid is not None:
            self._pending_subs[mid] = topics
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise NotConnected("subscribe without a connection")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"subscribe failed: {paho.error_string(rc)}")

    def publish(self, msg: OutMessage) -> int:
        """Hand a message to paho and return its mid; its acknowledgement arrives via ``on_ack``."""
        try:
            info = self._client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        except ValueError as exc:
            raise _publish_error(msg.topic, exc) from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise QueueFull("paho's outgoing queue is full; publish again after acknowledgements")
        # Any other code (even CONN_LOST) leaves a QoS 1 message in paho's queue, re-sent after
        # the reconnect; the next poll reports the lost connection.
        return info.mid

    def poll(self, timeout: float) -> None:
        """Run network I/O for up to ``timeout`` seconds; raise :class:`ConnectionLost` if the link dropped."""
        rc = self._io(timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._connected:
            self._connected = False
            raise ConnectionLost(f"connection to {self.settings.where} lost ({paho.error_string(rc)})")

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker then discards the Will)."""
        if self._connected:
            self._client.disconnect()
            for _ in range(20):
                if self._io(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS or self._client.socket() is None:
                    break
        self._connected = False

    def interrupt(self) -> None:
        """Wake a :meth:`poll` blocked in ``select`` from another thread (thread-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Disconnect and release the wake-up sockets."""
        self.disconnect()
        self._wake_r.close()
        self._wake_w.close()

    def _io(self, timeout: float) -> MQTTErrorCode:
        """One round of paho's external loop: select, read, write, keepalive."""
        c = self._client
        sock = c.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        # An SSL socket may hold decrypted bytes select() cannot see: read them without waiting.
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        wlist = [sock] if c.want_write() else []
        try:
            readable, writable, _ = select.select([sock, self._wake_r], wlist, [], 0 if pending else max(timeout, 0))
        except (OSError, ValueError):
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.recv(4096)
        if sock in readable or pending:
            rc = c.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c.socket() is None:
                return rc if rc != MQTTErrorCode.MQTT_ERR_SUCCESS else MQTTErrorCode.MQTT_ERR_CONN_LOST
        if c.want_write() or sock in writable:
            rc = c.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return c.loop_misc()


# --------------------------------------------------------------------------------------------
# paho's thread drives the connection
# --------------------------------------------------------------------------------------------


class ThreadedLink:
    """A connection run by paho's network thread, reconnecting by itself after a drop.

    ``subscriptions`` are (re)subscribed after every connection, so a broker that lost the
    session still delivers. Callbacks (``on_message``, the connect hooks, ``on_state``) run on
    the network thread and must hand work off quickly. A refused CONNACK is kept and raised by
    :meth:`wait_connected`; paho goes on retrying in the background.
    """

    def __init__(
        self,
        settings: MqttSettings,
        on_message: Callable[[InMessage], None],
        *,
        subscriptions: Sequence[str] = (),
        qos: int = 1,
        clean: bool = True,
        session_expiry_s: int | None = None,
        manual_ack: bool = False,
        will: OutMessage | None = None,
        on_connect: Sequence[Callable[[bool], None]] = (),
        on_state: Callable[[bool], None] = lambda connected: None,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
    ) -> None:
        self.settings = settings
        self.subscriptions = tuple(subscriptions)
        self.qos = qos
        self.clean = clean
        self.session_expiry_s = session_expiry_s
        self._on_message = on_message
        self._on_connect_hooks = list(on_connect)
        self._on_state = on_state
        self._connected = threading.Event()
        self._connection = 0
        self._refused: ConnectRefused | None = None
        self._failed: ConnectFailed | None = None
        self._stopping = False
        c = new_client(settings, clean=clean, manual_ack=manual_ack)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
        c.max_queued_messages_set(0)
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        self._client = c

    # ----- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Return whether the client is connected right now."""
        return self._connected.is_set()

    @property
    def connection(self) -> int:
        """Return the number of connections made so far (1 after the first)."""
        return self._connection

    def add_connect_hook(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(session_present)`` on the network thread after every (re)connection."""
        self._on_connect_hooks.append(hook)

    def start(self) -> None:
        """Start connecting in the background; paho reconnects by itself after a drop."""
        s = self.settings
        if s.protocol == "5":
            props = None
            if self.session_expiry_s is not None:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
                props.SessionExpiryInterval = self.session_expiry_s
            self._client.connect_async(s.host, s.port, s.keepalive_s, clean_start=self.clean, properties=props)
        else:
            self._client.connect_async(s.host, s.port, s.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise :class:`ConnectRefused` or :class:`ConnectFailed`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._refused is not None:
                raise self._refused
            if self._connected.wait(0.05):
                return
        if self._failed is not None:
            raise ConnectFailed(f"not connected after {timeout:.0f}s: {self._failed}", reason=self._failed.reason)
        raise ConnectFailed(
            f"not connected to {self.settings.where} after {timeout:.0f}s: is the broker running there?", reason="timeout"
        )

    def stop(self, *, graceful: bool = True) -> None:
        """Disconnect (a persistent session stays on the broker) and stop the network thread.

        ``graceful=False`` drops the TCP connection without DISCONNECT, as a crash would, so the
        broker publishes the Will (for tests and for a supervisor that must fail fast).
        """
        self._stopping = True
        if graceful:
            self._client.disconnect()
            self._client.loop_stop()
        else:
            self._client.loop_stop()
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        self._connected.clear()

    # ----- outgoing ----------------------------------------------------------------------------

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> paho.MQTTMessageInfo:
        """Queue a publish and return paho's handle; raise :class:`BadTopic` or :class:`PublishFailed`.

        Without a connection a QoS 1 message stays queued and leaves after the reconnect.
        """
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise _publish_error(topic, exc) from None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishFailed(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        return info

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish and block until the broker acknowledged it (QoS 1); raise :class:`PublishFailed`."""
        info = self.publish_nowait(topic, payload, retain=retain, qos=qos)
        if qos == 0:
            return
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishFailed(f"publish to {topic!r} failed: {exc}") from None
        if not info.is_published():
            raise PublishFailed(f"broker did not acknowledge the publish to {topic!r} within {timeout:.0f}s", reason="timeout")

    def ack(self, message: InMessage) -> None:
        """Acknowledge a message (``manual_ack``); skip one that came on an earlier connection."""
        if message.qos == 0 or message.connection != self._connection or not self.connected:
            return
        self._client.ack(message.mid, message.qos)

    # ----- paho callbacks (network thread) --------------------------------------------------------

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode, properties: Properties | None) -> None:
        refused = classify_refusal(reason_code, self.settings)
        if refused is not None:
            self._refused = refused
            log.error("%s", refused)
            return
        self._refused = None
        self._failed = None
        self._connection += 1
        if self._connection > 1:
            log.info("reconnected to %s (session present: %s)", self.settings.where, flags.session_present)
        if self.subscriptions:
            client.subscribe([(t, self.qos) for t in self.subscriptions])
        self._connected.set()
        self._on_state(True)
        for hook in self._on_connect_hooks:
            try:
                hook(bool(flags.session_present))
            except Exception:  # a hook must not break the network loop
                log.exception("connect hook %r failed", hook)

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._failed = ConnectFailed(f"cannot reach {self.settings.where}: is the broker running there?", reason="unreachable")

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason_code: ReasonCode, properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("disconnected from %s: %s; paho reconnects", self.settings.where, reason_code)
        if was:
            self._on_state(False)

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        for topic, rc in zip(self.subscriptions, reason_codes, strict=False):
            if rc.is_failure:
                log.error("broker refused the subscription to %r: %s (check this user's ACL)", topic, rc)

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._on_message(to_message(msg, self._connection))
