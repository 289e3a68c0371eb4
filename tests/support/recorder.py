"""Helpers for the agent tests: a plain paho subscriber that records what the broker delivers,
and polling with a deadline (tests await conditions, they never sleep for a fixed time)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.wait import wait_for


class Recorder:
    """A plain paho client (QoS 1) that records every message it receives.

    ``persistent=True`` uses clean_session=False with a fixed client id, so messages published
    while the recorder or the broker was away are delivered after it reconnects.
    """

    def __init__(self, port: int, topics: tuple[str, ...] = ("fleet/#",), *, persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"recorder-{uuid.uuid4().hex[:8]}",
            clean_session=not persistent,
            protocol=paho.MQTTv311,
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.topics = topics
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, "the recorder to connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self, suffix: str = "", *, live_only: bool = False) -> list[dict[str, Any]]:
        """Return the decoded payloads of messages whose topic ends with ``suffix``.

        ``live_only`` leaves out retained copies the broker hands out on (re)subscribe.
        """
        with self._lock:
            msgs = list(self.messages)
        return [json.loads(p) for t, p, r in msgs if t.endswith(suffix) and p and not (live_only and r)]

    def seqs(self) -> set[tuple[str, int]]:
        """Return the (epoch, seq) pairs received."""
        return {(m["epoch"], m["seq"]) for m in self.payloads() if "seq" in m}

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish one QoS 1 message and wait until the broker acknowledged it."""
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
