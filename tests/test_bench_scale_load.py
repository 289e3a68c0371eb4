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


def test_the_scale_broker_delivers_as_broker_config_writes_it(tmp_path):
    """``--broker deployed`` runs Mosquitto with the persistence, queue and window lines a written config holds: a
    subscriber that acknowledges nothing gets 300 messages, past the test harness's window of 100."""
    from fleet_controller.broker_config import DEFAULT_MAX_INFLIGHT
    from shopfleet.broker import BrokerProcess

    scale = load_script("bench/scale.py", "bench_scale")
    lines = scale.broker_delivery("deployed", 100_000, 10.0, tmp_path)
    assert f"max_inflight_messages {DEFAULT_MAX_INFLIGHT}" in lines and f"persistence_location {tmp_path}/" in lines
    assert "max_queued_messages 36000000" in lines  # 100,000 nodes x 0.1 msg/s x the default outage of an hour
    assert scale.broker_delivery("harness", 100_000, 10.0, tmp_path) is None
    broker = BrokerProcess(workdir=tmp_path, delivery=lines).start()
    got: list[int] = []
    lock = threading.Lock()

    def on_message(client, userdata, msg):
        with lock:
            got.append(msg.mid)

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="scale-window-sub", clean_session=True, manual_ack=True)
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    try:
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        sub.subscribe("window/#", qos=1)
        assert subscribed.wait(10)
        pub = scale.RawPublisher(broker.port, "scale-window-pub")
        topic = scale.RawPublisher.topic("window/t")
        pub.send([pub.packet(topic, b"x") for _ in range(300)])
        wait_for(lambda: pub.acked == 300, timeout=30, what="the broker took all 300")
        wait_for(lambda: len(got) == 300, timeout=30, what="300 messages in flight to a subscriber that acknowledged none")
        pub.close()
    finally:
        sub.disconnect()
        sub.loop_stop()
        broker.stop()
