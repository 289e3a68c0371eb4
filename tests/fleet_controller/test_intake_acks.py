"""The controller's PUBACKs of a batch go to the broker as one write, and still acknowledge exactly what was acked.

On a real Mosquitto with a persistent session: 50 QoS 1 messages arrive, 40 are acknowledged on an
event loop (as the intake does after a commit), the adapter leaves and a new one takes the
session over. The broker must redeliver exactly the 10 unacknowledged ones, and the 40 acks must
have reached paho's queue as one buffer (one wake-up of the network thread, one ``send``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import paho.mqtt.client as paho

from fleet_controller.intake.mqtt import InboundMessage, MqttAdapter, MqttConfig
from tests.support.wait import wait_for

TOPIC = "fleet/v1/shop-a/pi-1/telemetry"


def adapter(port: int, got: list[InboundMessage]) -> MqttAdapter:
    return MqttAdapter(MqttConfig(host="127.0.0.1", port=port, client_id="ack-test", subscriptions=("fleet/v1/+/+/telemetry",)),
                       got.append)


def spy_queue(mqtt: MqttAdapter) -> list[tuple[int, bytes]]:
    """Record what reaches paho's packet queue (command, bytes), passing it on."""
    calls: list[tuple[int, bytes]] = []
    client: Any = mqtt._client
    real = client._packet_queue

    def queue(command: int, packet: bytes, *args: Any, **kw: Any) -> Any:
        calls.append((command, bytes(packet)))
        return real(command, packet, *args, **kw)

    client._packet_queue = queue
    return calls


def test_a_batch_of_acks_is_one_write_and_acknowledges_exactly_those(broker):
    got: list[InboundMessage] = []
    mqtt = adapter(broker.port, got)
    mqtt.start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="ack-test-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        mqtt.wait_connected(10)
        # Connected is not subscribed yet: a message published before the SUBACK would be dropped. A probe, acked
        # with the batch below, shows the subscription is live.
        def probe_arrived() -> bool:
            pub.publish(TOPIC, b"probe", qos=1).wait_for_publish(5)
            try:
                return bool(wait_for(lambda: got, timeout=0.5, what="this probe", interval=0.01))
            except AssertionError:
                return False

        wait_for(probe_arrived, timeout=20, what="a probe")
        for i in range(50):
            pub.publish(TOPIC, f"m{i}".encode(), qos=1).wait_for_publish(5)
        wait_for(lambda: len(got) >= 50 and got[-1].payload == b"m49", timeout=20, what="the 50 messages")
        # Probes published before the subscription were dropped; those after it all came before m0 (one topic, in order).
        probes, got[:] = [m for m in got if m.payload == b"probe"], [m for m in got if m.payload != b"probe"]
        assert len(got) == 50
        calls = spy_queue(mqtt)

        async def ack_batch() -> None:
            for m in [*probes, *got[:40]]:
                mqtt.ack(m)
            mqtt.ack(replace(got[45], connection=got[45].connection - 1))  # of an earlier connection: skipped
            await asyncio.sleep(0)  # the loop runs its callbacks: the flush
            await asyncio.sleep(0.01)

        asyncio.run(ack_batch())
        pubacks = [packet for command, packet in calls if command == paho.PUBACK]
        assert len(pubacks) == 1 and len(pubacks[0]) == 4 * (len(probes) + 40)
        assert mqtt.settled == len(probes) + 41
        wait_for(lambda: not mqtt._client._out_packet, timeout=10, what="paho to write the acks")
    finally:
        mqtt.stop()
    # A new client on the same session: only the 10 unacknowledged come again, then a marker sent after them.
    again: list[InboundMessage] = []
    mqtt = adapter(broker.port, again)
    mqtt.start()
    try:
        mqtt.wait_connected(10)
        pub.publish(TOPIC, b"marker", qos=1).wait_for_publish(5)
        wait_for(lambda: any(m.payload == b"marker" for m in again), timeout=20, what="the marker")
        assert sorted(m.payload for m in again if m.payload != b"marker") == sorted(f"m{i}".encode() for i in range(40, 50))
    finally:
        mqtt.stop()
        pub.loop_stop()
        pub.disconnect()
