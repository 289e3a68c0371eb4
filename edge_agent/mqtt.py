"""The agent's MQTT link: the core's polled connection with the agent's policy.

Everything about talking to a broker (settings, TLS with client certificates, CONNACK refusal
classification, the error classes, frozen message values) lives in :mod:`edge_agent.mqtt_core`
and is re-exported here for the agent's modules. What is the agent's own:

* **A clean session, MQTT 3.1.1 or 5** (``broker.protocol``). The agent needs no broker-side
  session: its durability is the outbox, and its downlink state (desired state, controller
  presence) is retained. Only MQTT 5 tells a publisher that the broker refused its publish
  (PUBACK reason code 0x87): with 3.1.1 the broker acknowledges it like any other, so the
  uplink can count and drop refused messages (:class:`Refusal`) only on MQTT 5.
* **One thread.** The uplink thread calls :meth:`MqttLink.connect` and :meth:`MqttLink.poll`, so
  paho's callbacks never race the outbox cursor; :meth:`MqttLink.interrupt` wakes an idle poll
  when the outbox has news.
* **No automatic reconnect.** The uplink retries with its own backoff and counts each failure
  by reason (``shopfleet_agent_connect_failures_total{reason}``).

paho keeps unacknowledged QoS 1 messages across ``connect`` calls and re-sends them after a
reconnect, so the uplink hands each outbox message to paho once per process; after a restart the
outbox replays them.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.mqtt_core import (
    BadTlsFiles,
    BadTopic,
    ConnectFailed,
    ConnectionLost,
    ConnectRefused,
    InMessage,
    MqttError,
    MqttSettings,
    NotConnected,
    OutMessage,
    PolledLink,
    QueueFull,
    Refusal,
    TlsSettings,
)
from shopfleet.errors import PermanentError, TemporaryError

__all__ = [
    "BadTlsFiles",
    "BadTopic",
    "ConnectFailed",
    "ConnectRefused",
    "ConnectionLost",
    "InMessage",
    "MqttError",
    "MqttLink",
    "MqttSettings",
    "NotConnected",
    "OutMessage",
    "PermanentError",
    "QueueFull",
    "Refusal",
    "TemporaryError",
    "TlsSettings",
]


class MqttLink(PolledLink):
    """One agent connection: clean session (3.1.1) or clean start (5), driven by the thread that calls ``poll``."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_message: Callable[[InMessage], None],
        on_ack: Callable[[int], None],
        on_refused: Callable[[Refusal], None] | None = None,
        max_inflight: int = 50,
    ) -> None:
        super().__init__(settings, on_message=on_message, on_ack=on_ack, on_refused=on_refused, max_inflight=max_inflight, clean=True)
