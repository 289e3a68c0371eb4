"""Intake partitions leased through the database: quotas, rebalancing on join, takeover on expiry.

The lease protocol (fleet_controller/registry/leases.py) against the real schema on SQLite and
PostgreSQL, with explicit clocks so expiry is decided, not waited for.
"""

from __future__ import annotations

import pytest

from fleet_controller.registry import migrations
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.leases import LeaseBook, PartitionCountMismatch, partition_of, quota
from fleet_controller.settings import ControllerSettings


@pytest.fixture
def engine(db_url):
    eng = create_engine(db_url)
    migrations.upgrade(eng)
    yield eng
    eng.dispose()


def test_quota_splits_partitions_over_the_live_replicas():
    assert [quota(r, ["a", "b", "c"], 8) for r in "abc"] == [3, 3, 2]
    assert quota("x", ["a"], 8) == 0
    assert {partition_of(f"shop-{i}", 8) for i in range(100)} == set(range(8))


def test_second_replica_takes_half_and_the_survivor_takes_over_after_expiry(engine):
    a, b = LeaseBook(engine, "a", 8, 5.0), LeaseBook(engine, "b", 8, 5.0)
    a.ensure_partitions(100.0)
    b.ensure_partitions(100.0)
    assert sorted(a.tick(100.0).held) == list(range(8))
    r = b.tick(101.0)  # b joins: quota 4, but everything is held by a
    assert (r.quota, r.held) == (4, {})
    r = a.tick(102.0)  # a sees two members: releases its top four
    assert (sorted(r.held), r.released) == ([0, 1, 2, 3], [4, 5, 6, 7])
    r = b.tick(103.0)
    assert sorted(r.held) == [4, 5, 6, 7] and r.claimed == [4, 5, 6, 7]
    assert all(g == 2 for g in r.held.values())  # a's claim was generation 1
    owners = a.owners(range(8), 103.0)
    assert {p: o for p, (o, _) in owners.items()} == {p: "a" if p < 4 else "b" for p in range(8)}
    assert not any(active for _, active in owners.values())
    assert b.activate(4, 2) and not b.activate(4, 1) and not a.activate(5, 2)
    # a dies: no more ticks. Its member row and leases expire 5 s after its last renewal (102).
    r = b.tick(106.0)
    assert sorted(r.held) == [4, 5, 6, 7] and r.live == ["a", "b"]
    r = b.tick(107.5)
    assert r.live == ["b"] and sorted(r.held) == list(range(8)) and r.claimed == [0, 1, 2, 3]
    # a comes back late: its leases are gone (lost), it rejoins and rebalances again.
    r = a.tick(108.0)
    assert r.lost == [0, 1, 2, 3] and r.held == {} and r.quota == 4
    r = b.tick(108.5)
    assert sorted(r.held) == [0, 1, 2, 3] and r.released == [4, 5, 6, 7]
    assert sorted(a.tick(109.0).held) == [4, 5, 6, 7]


def test_leave_frees_everything_at_once(engine):
    a, b = LeaseBook(engine, "a", 4, 30.0), LeaseBook(engine, "b", 4, 30.0)
    a.ensure_partitions(0.0)
    a.tick(1.0)
    b.tick(1.0)
    a.tick(2.0)
    b.tick(2.0)
    a.leave()
    assert b.tick_live(3.0) == ["b"]
    assert sorted(b.tick(3.0).held) == [0, 1, 2, 3]


def test_renew_extends_only_what_is_held_and_never_rejoins(engine):
    a, b = LeaseBook(engine, "a", 4, 5.0), LeaseBook(engine, "b", 4, 5.0)
    a.ensure_partitions(100.0)
    assert sorted(a.tick(100.0).held) == [0, 1, 2, 3]
    assert a.renew(104.0) == 4  # a's tick is late; its leases now run to 109
    r = b.tick(107.0)  # without the renewal they expired at 105 and b would claim its quota
    assert (r.quota, r.held, r.claimed) == (2, {}, [])
    assert b.renew(107.0) == 0  # renewing claims nothing
    assert {o for o, _ in a.owners(range(4), 108.0).values()} == {"a"}
    a.leave()
    assert a.renew(108.0) == 0 and b.tick_live(108.5) == ["b"]  # no member row recreated after a clean stop


def test_another_partition_count_is_refused_while_replicas_use_the_old_one(engine):
    a = LeaseBook(engine, "a", 8, 30.0)
    a.ensure_partitions(0.0)
    a.tick(1.0)
    with pytest.raises(PartitionCountMismatch, match="give every replica the same intake.partitions"):
        LeaseBook(engine, "b", 4, 30.0).ensure_partitions(2.0)
    # once nobody live uses them, the count may change
    c = LeaseBook(engine, "c", 4, 30.0)
    c.ensure_partitions(100.0)
    assert [p for p, *_ in c.all_leases()] == [0, 1, 2, 3]


def test_partitions_need_a_shared_group():
    with pytest.raises(ValueError, match="intake.partitions needs broker.shared_group"):
        ControllerSettings(intake={"partitions": 8})
    s = ControllerSettings(intake={"partitions": 8}, broker={"protocol": "5", "shared_group": "ctl"})
    assert (s.intake.partitions, s.intake.lease_ttl_s) == (8, 6.0)


def test_router_subscribes_its_shops_and_drops_discovery_copies_of_known_ones(engine, broker):
    """On a real Mosquitto: a known shop's presence arrives once (its own subscription), a new shop's through discovery."""
    import paho.mqtt.client as paho
    from sqlalchemy import insert, select

    from fleet_controller.intake.mqtt import MqttAdapter, MqttConfig
    from fleet_controller.intake.partitions import SUB_DISCOVERY, SUB_SHOPS, PartitionRouter
    from fleet_controller.registry.leases import LEASES
    from fleet_controller.registry.store import SHOPS
    from tests.support.wait import wait_for

    with engine.begin() as c:
        c.execute(insert(SHOPS).values(id="known", name="known", region="", labels={}, timezone="UTC", created_at=0.0))
    got: list[tuple[str, bytes]] = []
    mqtt = MqttAdapter(MqttConfig(host="127.0.0.1", port=broker.port, client_id="router-test", subscriptions=(), protocol="5",
                                  shared_group="ctl"), lambda m: got.append((m.topic, m.payload)), static_subscriptions=False)
    router = PartitionRouter(engine, mqtt, replica="r1", partitions=4, ttl_s=5.0, group="ctl")
    router.start()
    mqtt.start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="router-test-pub")
    try:
        mqtt.wait_connected(10)
        status = router.tick()
        assert (status.held, status.shops) == ([0, 1, 2, 3], 1)
        assert list(router.subscribed_shops()) == ["known"]
        with engine.connect() as c:
            assert sum(c.scalars(select(LEASES.c.shops))) == 1
            assert all(c.scalars(select(LEASES.c.active)))
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish("fleet/v1/known/pi-1/presence", b"k1", qos=1).wait_for_publish(5)
        pub.publish("fleet/v1/new/pi-1/presence", b"n1", qos=1).wait_for_publish(5)
        pub.publish("fleet/v1/new/pi-1/telemetry", b"t1", qos=1).wait_for_publish(5)  # nobody subscribes to it yet
        pub.publish("fleet/v1/known/pi-1/telemetry", b"t2", qos=1).wait_for_publish(5)
        wait_for(lambda: len(got) >= 3 and router.m_dropped._value.get() >= 1, timeout=10, what="the three deliveries")
        assert sorted(got) == [("fleet/v1/known/pi-1/presence", b"k1"), ("fleet/v1/known/pi-1/telemetry", b"t2"),
                               ("fleet/v1/new/pi-1/presence", b"n1")]
        assert (SUB_DISCOVERY, SUB_SHOPS) == (1, 2)
        # The new shop is in the registry now (the intake would have created it): the next tick subscribes it.
        with engine.begin() as c:
            c.execute(insert(SHOPS).values(id="new", name="new", region="", labels={}, timezone="UTC", created_at=0.0))
        assert router.tick().shops == 2
        pub.publish("fleet/v1/new/pi-1/telemetry", b"t3", qos=1).wait_for_publish(5)
        wait_for(lambda: ("fleet/v1/new/pi-1/telemetry", b"t3") in got, timeout=10, what="the new shop's telemetry")
        # the retained-free presence of the now known shop arrives once more only through its own subscription
        before = len(got)
        pub.publish("fleet/v1/new/pi-1/presence", b"n2", qos=1).wait_for_publish(5)
        wait_for(lambda: router.m_dropped._value.get() >= 2, timeout=10, what="the discovery copy dropped")
        wait_for(lambda: len(got) > before, timeout=10, what="the presence delivered")
        assert got[before:] == [("fleet/v1/new/pi-1/presence", b"n2")]
    finally:
        pub.loop_stop()
        mqtt.stop()


def test_each_replica_sweeps_only_the_shops_of_the_partitions_it_holds(engine):
    """Two routers on one registry: disjoint sweeps that together cover every known shop, also after one leaves."""
    from sqlalchemy import insert

    from fleet_controller.intake.mqtt import MqttAdapter, MqttConfig
    from fleet_controller.intake.partitions import PartitionRouter
    from fleet_controller.registry.store import SHOPS

    shops = [f"shop-{i}" for i in range(40)]
    with engine.begin() as c:
        c.execute(insert(SHOPS), [dict(id=s, name=s, region="", labels={}, timezone="UTC", created_at=0.0) for s in shops])

    def router(name: str) -> PartitionRouter:  # never connected: ticks take leases and read shops, no subscriptions
        mqtt = MqttAdapter(MqttConfig(host="127.0.0.1", port=1, client_id=name, subscriptions=(), protocol="5",
                                      shared_group="ctl"), lambda m: None, static_subscriptions=False)
        r = PartitionRouter(engine, mqtt, replica=name, partitions=8, ttl_s=30.0, group="ctl")
        r.start()
        return r

    a = router("a")
    assert a.swept_shops() == []  # nothing held before the first tick: sweeps nothing rather than everything
    a.tick()
    assert a.swept_shops() == sorted(shops)
    b = router("b")
    b.tick()
    a.tick()  # a releases its surplus to b's quota
    b.tick()  # b claims it
    held_a, held_b = set(a.status().held), set(b.status().held)
    assert held_a and held_b and not held_a & held_b
    swept_a, swept_b = set(a.swept_shops()), set(b.swept_shops())
    assert swept_a | swept_b == set(shops) and not swept_a & swept_b
    assert all(partition_of(s, 8) in held_b for s in swept_b)
    b.book.leave()  # b stops: a takes everything back on its next ticks
    a.tick()
    assert a.swept_shops() == sorted(shops)


def test_a_tick_stuck_on_the_broker_keeps_its_leases(engine, broker):
    """A tick waiting on SUBACKs longer than the lease TTL: the keeper renews meanwhile, so no lease lapses."""
    import asyncio
    import threading
    import time

    from sqlalchemy import insert

    from fleet_controller.intake.mqtt import MqttAdapter, MqttConfig
    from fleet_controller.intake.partitions import PartitionRouter
    from fleet_controller.registry.store import SHOPS
    from tests.support.wait import wait_for

    with engine.begin() as c:
        c.execute(insert(SHOPS), [dict(id=f"shop-{i}", name="", region="", labels={}, timezone="UTC", created_at=0.0) for i in range(8)])
    mqtt = MqttAdapter(MqttConfig(host="127.0.0.1", port=broker.port, client_id="router-stuck", subscriptions=(), protocol="5",
                                  shared_group="ctl"), lambda m: None, static_subscriptions=False)
    router = PartitionRouter(engine, mqtt, replica="r1", partitions=4, ttl_s=1.5, group="ctl")
    router.start()
    real = mqtt.subscribe_topics
    stuck, release = threading.Event(), threading.Event()

    def slow_subscribe(topics, **kw):  # the broker's answers held up (a paused intake reads none of them)
        stuck.set()
        release.wait(30)
        return real(topics, **kw)

    mqtt.subscribe_topics = slow_subscribe  # type: ignore[method-assign]
    mqtt.start()
    loop = asyncio.new_event_loop()
    task = loop.create_task(router.run())

    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass  # the test's own cancel at the end
        finally:
            loop.close()

    runner = threading.Thread(target=run, daemon=True)
    try:
        mqtt.wait_connected(10)
        runner.start()
        wait_for(stuck.is_set, 10, "the first tick to wait on the broker")
        t0 = time.time()
        wait_for(lambda: time.time() - t0 > 3 * router.ttl_s, 10, "three TTLs of a stuck tick")
        owners = router.book.owners(range(4), time.time())
        assert {o for o, _ in owners.values()} == {"r1"}  # without the keeper every lease had expired
        assert router.m_late_renewals._value.get() >= 3
        release.set()
        wait_for(lambda: router.status().shops == 8, 10, "the subscriptions once the broker answers")
    finally:
        release.set()
        loop.call_soon_threadsafe(task.cancel)
        runner.join(10)
        mqtt.stop()


def test_subscriptions_in_many_chunks_are_all_confirmed_and_delivered(broker):
    """subscribe_topics sends every chunk before awaiting the SUBACKs: all of them still confirmed, each topic live."""
    import paho.mqtt.client as paho

    from fleet_controller.intake.mqtt import MqttAdapter, MqttConfig, MqttError
    from tests.support.wait import wait_for

    got: list[str] = []
    mqtt = MqttAdapter(MqttConfig(host="127.0.0.1", port=broker.port, client_id="chunks", subscriptions=(), protocol="5",
                                  shared_group="ctl"), lambda m: got.append(m.topic), static_subscriptions=False)
    mqtt.start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="chunks-pub")
    try:
        mqtt.wait_connected(10)
        topics = [f"fleet/v1/shop-{i}/+/telemetry" for i in range(2000)]
        mqtt.subscribe_topics(topics, sub_id=2, chunk=10)  # 200 SUBSCRIBE packets in flight at once
        assert not mqtt._pending  # every SUBACK matched and settled
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for shop in ("shop-0", "shop-1017", "shop-1999", "shop-2000"):
            pub.publish(f"fleet/v1/{shop}/pi-1/telemetry", b"x", qos=1).wait_for_publish(5)
        wait_for(lambda: len(got) >= 3, 10, "the subscribed topics' messages")
        assert sorted(got) == ["fleet/v1/shop-0/pi-1/telemetry", "fleet/v1/shop-1017/pi-1/telemetry", "fleet/v1/shop-1999/pi-1/telemetry"]
        mqtt.unsubscribe_topics(topics, chunk=10)
        assert not mqtt._pending
        pub.publish("fleet/v1/shop-5/pi-1/telemetry", b"y", qos=1).wait_for_publish(5)
        pub.publish("fleet/v1/shop-0/pi-1/telemetry", b"z", qos=1).wait_for_publish(5)
        mqtt.subscribe_topics(["fleet/v1/shop-0/+/telemetry"], sub_id=2)  # a marker: once it is live, y and z went nowhere
        pub.publish("fleet/v1/shop-0/pi-1/telemetry", b"m", qos=1).wait_for_publish(5)
        wait_for(lambda: len(got) >= 4, 10, "the marker")
        assert got[3:] == ["fleet/v1/shop-0/pi-1/telemetry"]
    finally:
        pub.loop_stop()
        mqtt.stop()
    with pytest.raises(MqttError, match="not connected"):
        mqtt.subscribe_topics(["fleet/v1/x/+/telemetry"])
