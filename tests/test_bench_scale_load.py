"""bench/scale.py's load generator: its bare-socket QoS 1 publishes are real MQTT, each delivered once, each acknowledged.

The scale benchmark's figures count what this generator says the broker took (PUBACKs), so the
count must be exact and the packets must be what a subscriber receives byte for byte.
"""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as paho

from tests.support.scripts import load_script
from tests.support.wait import wait_for


def test_raw_publishes_arrive_once_each_and_every_puback_is_counted(shared_broker):
    scale = load_script("bench/scale.py", "bench_scale")
    got: list[tuple[str, bytes, int]] = []
    lock = threading.Lock()
    root = f"bench-load-{uuid.uuid4().hex[:6]}"

    def on_message(client, userdata, msg):
        with lock:
            got.append((msg.topic, msg.payload, msg.qos))

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{root}-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", shared_broker.port)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.loop_start()
    try:
        sub.subscribe(f"{root}/#", qos=1)
        assert subscribed.wait(10)
        pub = scale.RawPublisher(shared_broker.port, f"{root}-pub")
        # Payload sizes around the one-byte/two-byte remaining-length boundary, and packet ids past 65535 (they wrap, never 0).
        sent = [(f"{root}/n{i % 7}", bytes([i % 251]) * (i % 300)) for i in range(70_000)]
        topics = {t: scale.RawPublisher.topic(t) for t, _ in sent}
        for k in range(0, len(sent), 500):
            pub.send([pub.packet(topics[t], payload) for t, payload in sent[k:k + 500]])
        pub.ping()  # a PINGRESP among the PUBACKs is not counted as one
        wait_for(lambda: pub.acked == len(sent), timeout=60, what="a PUBACK for every publish")
        wait_for(lambda: len(got) >= len(sent), timeout=60, what="every publish delivered")
        pub.close()
        assert pub.acked == len(sent)
        with lock:
            assert sorted(got) == sorted((t, p, 1) for t, p in sent)
    finally:
        sub.disconnect()
        sub.loop_stop()
