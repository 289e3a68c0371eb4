"""The controller's MQTT adapter: the shared core's threaded link with the controller's policy.

Connecting, TLS, CONNACK refusal classification, the error classes and the frozen message
values live in :mod:`edge_agent.mqtt_core` (the one MQTT core; the controller may import it, an
import-linter contract says so). Everything else in the controller sees frozen
:class:`InboundMessage` values and the core's exceptions (:class:`ConnectRefused`,
:class:`ConnectFailed`, :class:`PublishFailed`, all :class:`MqttError`), never paho objects or
integer return codes.

What this adapter adds, and why:

* **Persistent session.** ``clean_session=False`` (MQTT 5: ``clean_start=False`` and an unlimited
  session expiry) under a stable client id, with QoS 1 subscriptions: while the controller is down
  the broker queues everything for it.
* **Acknowledge after storing.** paho runs with ``manual_ack``; :meth:`MqttAdapter.ack` sends the
  PUBACK once the intake has committed the message. A crash before that makes the broker deliver it
  again, and the intake's dedupe drops what was already stored. An ack for a message of an earlier
  connection is skipped (packet ids are per connection; the broker redelivers those anyway).
  The acks of a batch (the intake acknowledges a whole batch in one go on the event loop) go out
  as one write: each PUBACK given to paho alone cost a wake-up of its network thread and a
  ``send`` per message, in both this process and the broker.
* **Scale-out.** With ``shared_group`` (MQTT 5) the subscriptions become
  ``$share/<group>/<filter>``, so several controller replicas split one stream; their sessions
  expire ``SHARED_SESSION_EXPIRY_S`` after a replica dies, so the broker stops parking a share of
  the stream for it.
* **Partitions** (``intake.partitions``, :mod:`fleet_controller.intake.partitions`): no static
  subscriptions; the partition router subscribes per shop (:meth:`MqttAdapter.subscribe_topics`,
  waiting for the SUBACK) with MQTT 5 subscription identifiers, and a ``gate`` sees each message
  with the identifiers of the subscriptions it matched before the intake does (it may acknowledge
  and drop a discovery copy of a message another subscription also delivers).

paho runs its network loop on its own thread; ``on_message`` hands each message to the callback
given at construction (the intake's thread-safe ``submit``).
"""

from __future__ import annotations

import asyncio
import functools
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.mqtt_core import (
    ConnectFailed,
    ConnectRefused,
    InMessage,
    MqttError,
    MqttSettings,
    OutMessage,
    PublishFailed,
    ThreadedLink,
    TlsSettings,
    to_message,
)

__all__ = [
    "ConnectFailed",
    "ConnectRefused",
    "InboundMessage",
    "MqttAdapter",
    "MqttConfig",
    "MqttError",
    "PublishFailed",
    "Will",
    "subscription_filters",
]

InboundMessage = InMessage
"""One message from the broker, as the rest of the controller sees it (the core's frozen value)."""

SESSION_EXPIRY_NEVER = 0xFFFFFFFF
"""MQTT 5 session expiry meaning "keep the session until the client comes back"."""

SHARED_SESSION_EXPIRY_S = 30
"""Session expiry of a replica in a shared group: a dead replica's session (and the share of the
stream the broker parks in it) is dropped this long after its connection died, and the broker
sends the stream to the live replicas. What the dropped session held unacknowledged is re-sent by
agents whose ``uplink.ack`` is ``controller`` (they keep it until it is stored); with
``uplink.ack: broker`` it is lost, so replicas need the stored-ack."""


@dataclass(frozen=True)
class Will:
    """Last Will the broker publishes if the controller's connection dies."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttConfig:
    """Connection parameters; built from :class:`fleet_controller.settings.BrokerSettings`."""

    host: str
    port: int
    client_id: str
    subscriptions: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    protocol: str = "3.1.1"
    shared_group: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    will: Will | None = None
    clean_session: bool = False
    session_expiry_s: int | None = None  # MQTT 5; None: never for one controller, SHARED_SESSION_EXPIRY_S in a shared group

    def effective_session_expiry(self) -> int:
        """Return the session expiry interval to connect with."""
        if self.session_expiry_s is not None:
            return self.session_expiry_s
        return SHARED_SESSION_EXPIRY_S if self.shared_group else SESSION_EXPIRY_NEVER

    def settings(self) -> MqttSettings:
        """Return the core's connection settings for this config."""
        tls = TlsSettings(ca_file=self.tls_ca_file, cert_file=self.tls_cert_file, key_file=self.tls_key_file) if self.tls else None
        return MqttSettings(
            host=self.host, port=self.port, client_id=self.client_id, username=self.username, password=self.password,
            tls=tls, keepalive_s=self.keepalive_s, protocol="5" if self.protocol == "5" else "3.1.1",
        )


def subscription_filters(config: MqttConfig) -> list[str]:
    """Return the topic filters to subscribe to, prefixed ``$share/<group>/`` when sharing."""
    if config.shared_group:
        return [f"$share/{config.shared_group}/{t}" for t in config.subscriptions]
    return list(config.subscriptions)


_PUBACK = struct.Struct("!BBH")
_PUBACK_HEADER = paho.PUBACK  # fixed header of a PUBACK (QoS 1 ack), then remaining length 2 and the packet id
_BULK_ACKS = hasattr(paho.Client, "_packet_queue")
"""Whether this paho has the queue its own ack() writes to (2.x); without it every ack goes alone."""


class MqttAdapter(ThreadedLink):
    """A persistent-session, manual-ack MQTT client that delivers :class:`InboundMessage` values.

    :meth:`wait_connected` raises :class:`ConnectRefused` (its ``reason`` says why, from the
    CONNACK reason code: ``bad_credentials``, ``not_authorized``, ...) or :class:`ConnectFailed`.
    """

    def __init__(
        self,
        config: MqttConfig,
        on_message: Callable[[InboundMessage], None],
        *,
        on_connect: Sequence[Callable[[bool], None]] = (),
        on_state: Callable[[bool], None] = lambda connected: None,
        static_subscriptions: bool = True,
    ) -> None:
        self.config = config
        self.gate: Callable[[InboundMessage, tuple[int, ...]], bool] | None = None
        """Partitions: called on the network thread with each message and its subscription identifiers;
        False acknowledges and drops it (see :mod:`fleet_controller.intake.partitions`)."""
        self.delivered = 0
        """Messages handed to the intake (network thread)."""
        self.settled = 0
        """Calls of :meth:`ack` (acknowledged, or skipped as of an earlier connection): equal to
        ``delivered`` when the intake holds nothing unanswered."""
        self._pending: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._pending_lock = threading.Lock()
        self._acks = bytearray()  # PUBACKs of the current connection waiting for _flush_acks (event loop thread)
        self._acks_connection = 0
        self._acks_lock = threading.Lock()
        w = config.will
        super().__init__(
            config.settings(),
            on_message,
            subscriptions=subscription_filters(config) if static_subscriptions else (),
            qos=1,
            clean=config.clean_session,
            session_expiry_s=config.effective_session_expiry(),
            manual_ack=True,
            will=OutMessage(w.topic, w.payload, qos=w.qos, retain=w.retain) if w is not None else None,
            on_connect=on_connect,
            on_state=on_state,
        )
        self._client.on_unsubscribe = self._handle_unsubscribe

    # ----- dynamic subscriptions (partitions) ---------------------------------------------------

    def subscribe_topics(self, topics: Sequence[str], *, sub_id: int | None = None, retain_handling: int = 1,
                         timeout: float = 10.0, wait: bool = True, chunk: int = 200) -> None:
        """Subscribe QoS 1 to ``topics`` (MQTT 5 ``sub_id``, ``retain_handling`` 0/1/2) in chunks.

        Every chunk is sent before any SUBACK is awaited, so a thousand chunks cost one round trip,
        not a thousand. With ``wait`` block until every SUBACK arrived, ``timeout`` after the last
        chunk went out (never call that on the network thread), and raise :class:`MqttError` on a
        refusal, a timeout or a lost connection.
        """
        opts = SubscribeOptions(qos=1, retainHandling=retain_handling)
        props = None
        if sub_id is not None and self.settings.protocol == "5":
            props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.SubscriptionIdentifier = sub_id
        parts = [list(topics[i:i + chunk]) for i in range(0, len(topics), chunk)]
        self._requests([(functools.partial(self._client.subscribe, [(t, opts) for t in part], properties=props),
                         f"subscribe to {len(part)} topics ({part[0]!r}, ...)") for part in parts], timeout, wait)

    def unsubscribe_topics(self, topics: Sequence[str], *, timeout: float = 10.0, wait: bool = True, chunk: int = 200) -> None:
        """Unsubscribe from ``topics`` in chunks, all sent first; with ``wait`` block until the UNSUBACKs arrived."""
        parts = [list(topics[i:i + chunk]) for i in range(0, len(topics), chunk)]
        self._requests([(functools.partial(self._client.unsubscribe, part), f"unsubscribe from {len(part)} topics") for part in parts],
                       timeout, wait)

    def _requests(self, sends: Sequence[tuple[Callable[[], tuple[Any, int | None]], str]], timeout: float, wait: bool) -> None:
        waiting: list[tuple[int, threading.Event, list[bool], str]] = []
        try:
            for send, what in sends:
                with self._pending_lock:  # the ack may arrive before send() returns: register under the lock
                    rc, mid = send()
                    if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                        raise MqttError(f"cannot {what}: {paho.error_string(rc)} (not connected?)")
                    if wait:
                        done, result = threading.Event(), list[bool]()
                        self._pending[mid] = (done, result)
                        waiting.append((mid, done, result, what))
            deadline = time.monotonic() + timeout
            for _mid, done, result, what in waiting:
                if not done.wait(max(0.0, deadline - time.monotonic())):
                    raise MqttError(f"cannot {what}: no answer from the broker within {timeout:.0f}s")
                if not result or not result[0]:
                    raise MqttError(f"cannot {what}: the broker refused (check the controller user's ACL)")
        finally:
            with self._pending_lock:
                for mid, *_ in waiting:
                    self._pending.pop(mid, None)

    def _settle(self, mid: int, reason_codes: Sequence[ReasonCode]) -> bool:
        with self._pending_lock:
            entry = self._pending.pop(mid, None)
        if entry is None:
            return False
        done, result = entry
        result.append(not any(rc.is_failure for rc in reason_codes))
        done.set()
        return True

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if not self._settle(mid, reason_codes):
            super()._handle_subscribe(client, userdata, mid, reason_codes, properties)

    def _handle_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        self._settle(mid, reason_codes if isinstance(reason_codes, list) else [])

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        message = to_message(msg, self.connection)
        gate = self.gate
        if gate is not None:
            ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties is not None else None
            if not gate(message, tuple(ids) if ids else ()):
                if msg.qos > 0:
                    client.ack(msg.mid, msg.qos)
                return
        self.delivered += 1
        self._on_message(message)

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a message (after it is stored); skip one that came on an earlier connection.

        Called on an event loop (the intake's), a QoS 1 ack joins the others of the same loop
        iteration and all go to paho as one packet buffer when the loop next runs its callbacks
        (:meth:`_flush_acks`); called elsewhere, it goes at once.
        """
        self.settled += 1
        if message.qos != 1 or not _BULK_ACKS:
            super().ack(message)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().ack(message)
            return
        if message.connection != self._connection or not self.connected:
            return  # as the core's ack: the broker redelivers it on the new connection
        with self._acks_lock:
            if self._acks and self._acks_connection != message.connection:
                self._acks.clear()  # of a connection that is gone (its packet ids mean nothing now)
            first = not self._acks
            self._acks_connection = message.connection
            self._acks += _PUBACK.pack(_PUBACK_HEADER, 2, message.mid)
        if first:
            loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        """Hand the waiting PUBACKs to paho as one buffer: one wake-up of the network thread and one ``send``."""
        with self._acks_lock:
            acks, connection = bytes(self._acks), self._acks_connection
            self._acks.clear()
        # Never on another connection than theirs: a packet id of the old one could name a message of the new one.
        if not acks or connection != self._connection or not self.connected:
            return
        # paho's own queue, as its ack() uses it (PUBACK packets are plain bytes it writes in order).
        self._client._packet_queue(paho.PUBACK, acks, 0, 0)

    async def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish and wait (without blocking the loop) until the broker acknowledged it."""
        await asyncio.to_thread(self.publish_sync, topic, payload, retain=retain, qos=qos, timeout=timeout)
