"""All of the controller's paho-mqtt code: one adapter between the broker and typed values.

Everything else in the controller sees frozen :class:`InboundMessage` values and exceptions
(:class:`MqttConnectError`, :class:`MqttPublishError`), never paho objects or integer return
codes (STYLE.md, rule 10; Home Assistant's MQTT integration is shaped the same way).

What the adapter guarantees, and why:

* **Persistent session.** ``clean_session=False`` (MQTT 5: ``clean_start=False`` and an unlimited
  session expiry) under a stable client id, with QoS 1 subscriptions: while the controller is down
  the broker queues everything for it.
* **Acknowledge after storing.** paho runs with ``manual_ack``; :meth:`MqttAdapter.ack` sends the
  PUBACK once the intake has committed the message. A crash before that makes the broker deliver it
  again, and the intake's dedupe drops what was already stored. An ack for a message of an earlier
  connection is skipped (packet ids are per connection; the broker redelivers those anyway).
* **Scale-out.** With ``shared_group`` (MQTT 5) the subscriptions become
  ``$share/<group>/<filter>``, so several controller replicas split one stream.

paho runs its network loop on its own thread; ``on_message`` hands each message to the callback
given at construction (the intake's thread-safe ``submit``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)


class MqttError(RuntimeError):
    """A broker operation failed."""


class MqttConnectError(MqttError):
    """The broker refused or could not be reached; ``permanent`` when retrying cannot help (bad credentials)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class MqttPublishError(MqttError):
    """A publish was not acknowledged by the broker in time, or refused."""


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
    will: Will | None = None
    clean_session: bool = False


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message from the broker, as the rest of the controller sees it."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    mid: int = 0
    connection: int = 0
    received_at: float = field(default_factory=time.time)


def subscription_filters(config: MqttConfig) -> list[str]:
    """Return the topic filters to subscribe to, prefixed ``$share/<group>/`` when sharing."""
    if config.shared_group:
        return [f"$share/{config.shared_group}/{t}" for t in config.subscriptions]
    return list(config.subscriptions)


class MqttAdapter:
    """A persistent-session MQTT client that delivers :class:`InboundMessage` values."""

    def __init__(
        self,
        config: MqttConfig,
        on_message: Callable[[InboundMessage], None],
        *,
        on_connect: Sequence[Callable[[bool], None]] = (),
        on_state: Callable[[bool], None] = lambda connected: None,
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._on_connect_hooks = list(on_connect)
        self._on_state = on_state
        self._connected = threading.Event()
        self._connection = 0
        self._refused: MqttConnectError | None = None
        self._stopping = False
        v5 = config.protocol == "5"
        self._client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=None if v5 else config.clean_session,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        c = self._client
        if config.username is not None:
            c.username_pw_set(config.username, config.password)
        if config.tls:
            c.tls_set(ca_certs=config.tls_ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if config.will is not None:
            c.will_set(config.will.topic, config.will.payload, qos=config.will.qos, retain=config.will.retain)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_queued_messages_set(0)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe

    # ----- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Return whether the client is connected right now."""
        return self._connected.is_set()

    def add_connect_hook(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(session_present)`` on the network thread after every (re)connection."""
        self._on_connect_hooks.append(hook)

    def start(self) -> None:
        """Start connecting in the background; paho reconnects by itself after a drop."""
        cfg = self.config
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0xFFFFFFFF  # keep the session until we come back
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=cfg.clean_session, properties=props)
        else:
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise ``MqttConnectError`` if refused or not connected in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._refused is not None:
                raise self._refused
            if self._connected.wait(0.05):
                return
        raise MqttConnectError(
            f"not connected to {self.config.host}:{self.config.port} after {timeout:.0f}s: is the broker running there?",
            permanent=False,
        )

    def stop(self, *, graceful: bool = True) -> None:
        """Disconnect (the broker keeps the session) and stop the network thread.

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
        """Queue a publish and return paho's handle; raise ``MqttPublishError`` if paho refuses it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttPublishError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        return info

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish and block until the broker acknowledged it (QoS 1); raise ``MqttPublishError``."""
        info = self.publish_nowait(topic, payload, retain=retain, qos=qos)
        if qos == 0:
            return
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttPublishError(f"publish to {topic!r} failed: {exc}") from None
        if not info.is_published():
            raise MqttPublishError(f"broker did not acknowledge the publish to {topic!r} within {timeout:.0f}s")

    async def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish and wait (without blocking the loop) until the broker acknowledged it."""
        await asyncio.to_thread(self.publish_sync, topic, payload, retain=retain, qos=qos, timeout=timeout)

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a stored message to the broker (QoS 1); skip it if it came on an earlier connection."""
        if message.qos == 0 or message.connection != self._connection or not self.connected:
            return
        self._client.ack(message.mid, message.qos)

    # ----- paho callbacks (network thread) --------------------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            permanent = reason_code.value in (0x04, 0x05, 0x86, 0x87, 0x8C)  # bad credentials / not authorized
            self._refused = MqttConnectError(
                f"broker {self.config.host}:{self.config.port} refused the connection: {reason_code}"
                + (" (check the controller's MQTT username and password)" if permanent else ""),
                permanent=permanent,
            )
            log.error("%s", self._refused)
            return
        self._refused = None
        self._connection += 1
        if self._connection > 1:
            log.info("reconnected to %s:%s (session present: %s)", self.config.host, self.config.port, flags.session_present)
        client.subscribe([(t, 1) for t in subscription_filters(self.config)])
        self._connected.set()
        self._on_state(True)
        for hook in self._on_connect_hooks:
            try:
                hook(bool(flags.session_present))
            except Exception:  # a hook must not break the network loop
                log.exception("connect hook %r failed", hook)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("disconnected from %s:%s: %s; paho reconnects", self.config.host, self.config.port, reason_code)
        if was:
            self._on_state(False)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic, rc in zip(subscription_filters(self.config), reason_codes, strict=False):
            if rc.is_failure:
                log.error("broker refused the subscription to %r: %s (check the controller user's ACL)", topic, rc)

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self._on_message(
            InboundMessage(
                topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
                mid=msg.mid, connection=self._connection, received_at=time.time(),
            )
        )
