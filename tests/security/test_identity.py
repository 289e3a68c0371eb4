"""Identity bound to credentials: one node's credentials can no longer kick another node or the controller.

Issue 10 found that with shop-a pi-1's credentials and client id ``agent-shop-b-pi-1`` the real
shop-b pi-1 was kicked (its Will fired), and with the controller's client id the controller lost
its persistent session. Each victim here is a real paho client on the generated broker; after the
attacker's connection is accepted, the victim must have seen no disconnect and still work.
"""

from __future__ import annotations

from edge_agent.protocol import Topics
from shopfleet.broker import BrokerProcess
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for

AGENT_ID_OF_SHOP_B_PI_1 = "agent-shop-b-pi-1"  # what edge_agent/agent.py sends as its client id


def _still_connected(victim: Client, observer: Client, topic: str) -> None:
    """Prove ``victim`` is connected: no disconnect seen, and a publish of its own arrives at ``observer``."""
    assert victim.disconnects == [], f"the victim was disconnected: {victim.disconnects}"
    victim.publish(topic, b"still here")
    assert observer.received_until(topic)[-1] == (topic, b"still here")
    assert victim.disconnects == []


def test_node_credentials_cannot_take_another_nodes_or_the_controllers_client_id(deploy):
    dep = deploy()
    central = dep.central()
    creds = dep.creds
    ctl_user = creds["controller"]
    port = dep.options.port

    ctl = Client(port, client_id="shopfleet-controller", username=ctl_user["username"], password=ctl_user["password"], clean_session=False)
    ctl.subscribe("fleet/v1/#")
    b = creds["nodes"]["shop-b/pi-1"]
    victim = Client(port, client_id=AGENT_ID_OF_SHOP_B_PI_1, username=b["username"], password=b["password"])
    assert ctl.accepted and victim.accepted

    a = creds["nodes"]["shop-a/pi-1"]
    # The attacker tries the victim node's client id, the controller's configured client id, and
    # the controller's username (which is its client id at this broker).
    for stolen in (AGENT_ID_OF_SHOP_B_PI_1, "shopfleet-controller", ctl_user["username"], b["username"]):
        attacker = Client(port, client_id=stolen, username=a["username"], password=a["password"])
        assert attacker.accepted  # it may connect, but as itself
        marker = Topics.node("shop-a", "pi-1", "telemetry")
        attacker.publish(marker, b"attacker as itself")
        assert ctl.received_until(marker)[-1] == (marker, b"attacker as itself")
        _still_connected(victim, ctl, Topics.node("shop-b", "pi-1", "telemetry"))
        assert ctl.disconnects == []
        attacker.close()
    # Not one Will of the victim, nor a second session of the controller: the broker log names
    # no takeover ("already connected, closing old connection").
    assert "closing old connection" not in central.log()
    for c in (victim, ctl):
        c.close()


def test_the_same_attack_kicks_the_victim_without_the_binding(tmp_path):
    """Control: the attack above does kick on a broker with passwords and ACL but no client-id binding.

    This is the broker of issue 10's report (BrokerProcess writes no use_username_as_clientid);
    it shows the test above would fail if the generated config lost the binding.
    """
    from fleet_controller.broker_config import write_broker_config

    files = write_broker_config([("shop-a", "pi-1"), ("shop-b", "pi-1")], tmp_path / "cfg")
    import json

    creds = json.loads(files.credentials_file.read_text())
    (tmp_path / "b").mkdir()
    with BrokerProcess(workdir=tmp_path / "b", engine="mosquitto", password_file=files.password_file, acl_file=files.acl_file) as broker:
        b, a = creds["nodes"]["shop-b/pi-1"], creds["nodes"]["shop-a/pi-1"]
        victim = Client(broker.port, client_id=AGENT_ID_OF_SHOP_B_PI_1, username=b["username"], password=b["password"])
        victim.c.reconnect_delay_set(60, 60)  # stay kicked long enough to observe it
        attacker = Client(broker.port, client_id=AGENT_ID_OF_SHOP_B_PI_1, username=a["username"], password=a["password"])
        assert attacker.accepted
        wait_for(lambda: victim.disconnects, what="the victim to be kicked")
        victim.c.loop_stop()
        attacker.close()


def test_tls_identity_is_the_certificate_cn_and_binds_the_client_id(deploy):
    """On the TLS listener a node's certificate cannot take the controller's client id either."""
    dep = deploy()
    dep.central()
    creds = dep.creds
    ctl_user = creds["controller"]["username"]
    port = dep.options.tls_port
    ctl = Client(port, client_id="shopfleet-controller", tls=tls_of(dep, ctl_user), clean_session=False)
    ctl.subscribe("fleet/v1/#")
    attacker = Client(port, client_id=ctl_user, tls=tls_of(dep, "shop-a.pi-1"))
    assert attacker.accepted
    marker = Topics.node("shop-a", "pi-1", "events")
    attacker.publish(Topics.node("shop-b", "pi-1", "events"), b"forged")  # another shop: dropped by the ACL
    attacker.publish(marker, b"mine")
    assert ctl.received_until(marker) == [(marker, b"mine")]
    assert ctl.disconnects == []
    attacker.close()
    ctl.close()
