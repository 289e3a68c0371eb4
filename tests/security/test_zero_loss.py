"""Zero loss as deployed: the generated persistence and queue limits hold a long controller outage.

Mosquitto's default queue is 1,000 messages per client; issue 15 lost 2,829 messages in a 30 s
controller outage with it. The generated config sizes the queue from the fleet, persists it, and
this test queues more than 1,000 messages for the controller's offline persistent session,
restarts the broker, and gets every one.
"""

from __future__ import annotations

from edge_agent.protocol import Topics
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for

N = 1500


def _queue_for_offline_controller(dep, n: int) -> tuple[str, list[bytes]]:
    """Subscribe the controller's persistent session, go offline, publish ``n`` messages from a node."""
    user = dep.creds["controller"]["username"]
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, user), clean_session=False)
    ctl.subscribe("fleet/v1/+/+/telemetry")
    ctl.close()
    wait_for(lambda: ctl.disconnects, what="the controller to be offline")
    node = Client(dep.options.tls_port, tls=tls_of(dep, "shop-a.pi-1"))
    topic = Topics.node("shop-a", "pi-1", "telemetry")
    sent = [f"m{i}".encode() for i in range(n)]
    infos = [node.c.publish(topic, p, qos=1) for p in sent]
    for info in infos:
        info.wait_for_publish(30)  # PUBACKed by the broker: an agent would now delete it
    node.close()
    return user, sent


def _collect(dep, user: str) -> list[bytes]:
    """Reconnect the controller's session and return what was queued for it.

    A marker published once the controller is back arrives after everything queued (the broker
    delivers a session's messages in order), so no timeout decides when the queue is empty.
    """
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, user), clean_session=False)
    node = Client(dep.options.tls_port, tls=tls_of(dep, "shop-a.pi-2"))
    marker = Topics.node("shop-a", "pi-2", "telemetry")
    node.publish(marker, b"marker")
    got = [payload for _, payload in ctl.received_until(marker, timeout=30)]
    node.close()
    ctl.close()
    assert got[-1] == b"marker"
    return got[:-1]


def test_more_than_a_thousand_messages_survive_an_outage_and_a_broker_restart(deploy):
    # 3 nodes x 1 msg/s x 700 s = 2,100 messages of queue: enough for N, and above the default.
    dep = deploy(rate_per_node=1.0, outage_s=700)
    assert dep.files.sizing.messages == 2100
    central = dep.central()
    user, sent = _queue_for_offline_controller(dep, N)
    central.restart()  # persistence: the queue is written at shutdown and read back
    got = _collect(dep, user)
    assert got == sent


def test_control_an_outage_longer_than_the_sizing_loses_the_excess(deploy):
    """Control: sized for less than N (the 1,000 floor), the broker drops the rest, as issue 15 saw."""
    dep = deploy(rate_per_node=0.01, outage_s=1)
    assert dep.files.sizing.messages == 1000
    dep.central()
    user, sent = _queue_for_offline_controller(dep, N)
    got = _collect(dep, user)
    assert got == sent[: len(got)]
    assert 1000 <= len(got) < N
