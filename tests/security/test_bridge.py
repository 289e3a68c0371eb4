"""A generated shop broker bridged over TLS to a generated central broker."""

from __future__ import annotations

from edge_agent.protocol import Topics
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for


def test_shop_broker_bridges_its_nodes_and_nothing_of_another_shop(deploy):
    dep = deploy(shop_brokers=("shop-a",))
    dep.central()
    dep.shop("shop-a")
    creds = dep.creds
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/#")
    a = creds["nodes"]["shop-a/pi-1"]
    # The node uses the same credentials at the shop broker as it would at the central one.
    node = Client(dep.options.shop_port, client_id="agent-shop-a-pi-1", username=a["username"], password=a["password"])
    assert node.accepted
    node.subscribe(Topics.desired("shop-a"))
    node.subscribe(Topics.node("shop-a", "pi-1", "commands"))
    own = Topics.node("shop-a", "pi-1", "telemetry")
    # The bridge connects by itself shortly after start: wait until a message crosses it.
    wait_for(lambda: node.publish(own, b"ping") or _drain_has(ctl, own), timeout=20, what="the bridge to carry a node's message")
    # Another shop's topic (and a sibling's) is refused at the edge, so never reaches the centre.
    node.publish(Topics.node("shop-b", "pi-1", "telemetry"), b"forged")
    node.publish(Topics.node("shop-a", "pi-2", "telemetry"), b"forged")
    node.publish(own, b"marker")
    got = []
    while not got or got[-1] != (own, b"marker"):
        got += [m for m in ctl.received_until(own) if m[1] != b"ping"]
    assert got == [(own, b"marker")]

    # Downlink: the shop's desired state and its node's commands cross; shop-b's do not.
    ctl.publish(Topics.desired("shop-b"), b"desired-b", retain=True)
    ctl.publish(Topics.node("shop-a", "pi-1", "commands"), b"cmd-a")
    ctl.publish(Topics.desired("shop-a"), b"desired-a", retain=True)
    got = node.received_until(Topics.desired("shop-a"))
    assert got == [(Topics.node("shop-a", "pi-1", "commands"), b"cmd-a"), (Topics.desired("shop-a"), b"desired-a")]

    # An anonymous client is refused at the edge.
    anon = Client(dep.options.shop_port)
    assert not anon.accepted
    anon.c.loop_stop()
    node.close()
    ctl.close()


def test_central_acl_confines_the_bridge_credentials_to_its_shop(deploy):
    """Even the bridge's own certificate, used directly, cannot write another shop's topics."""
    dep = deploy(shop_brokers=("shop-a",))
    dep.central()
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, dep.creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/#")
    bridge = Client(dep.options.tls_port, tls=tls_of(dep, "shop-a._bridge"))
    assert bridge.accepted
    for forbidden in (Topics.node("shop-b", "pi-1", "telemetry"), Topics.reported("shop-b", "pi-1"), Topics.desired("shop-a"), Topics.controller_clock):
        bridge.publish(forbidden, b"forged")
    own = Topics.node("shop-a", "pi-2", "events")
    bridge.publish(own, b"ok")
    assert ctl.received_until(own) == [(own, b"ok")]
    bridge.close()
    ctl.close()


def _drain_has(client: Client, topic: str) -> bool:
    while not client.got.empty():
        if client.got.get_nowait()[0] == topic:
            return True
    return False
