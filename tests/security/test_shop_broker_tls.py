"""The shop broker's node-facing mutual-TLS listener, run from the generated files with real certificates."""

from __future__ import annotations

import shutil

import pytest

from edge_agent.protocol import Topics
from fleet_controller.broker_config import BrokerConfigError, write_broker_config
from fleet_controller.broker_denials import DenialMetrics, DenialWatcher
from fleet_controller.pki import Pki
from tests.support.certs import TestCA
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for


def _drain_has(client: Client, topic: str) -> bool:
    found = False
    while not client.got.empty():
        found = client.got.get_nowait()[0] == topic or found
    return found


def test_node_with_its_certificate_reaches_the_controller_through_the_shop_broker_and_only_with_its_own_topics(deploy):
    dep = deploy(shop_brokers=("shop-a",))
    conf = (dep.files.shop_dirs["shop-a"] / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "allow_anonymous false" in conf
    dep.central()
    dep.shop("shop-a")
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, dep.creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/#")
    # The node sends a client id of another shop's node: the broker uses its certificate's CN instead.
    node = Client(dep.options.shop_tls_port, client_id="agent-shop-b-pi-1", tls=tls_of(dep, "shop-a.pi-1"))
    assert node.accepted
    own = Topics.node("shop-a", "pi-1", "telemetry")
    wait_for(lambda: node.publish(own, b"ping") or _drain_has(ctl, own), timeout=20, what="the bridge to carry a TLS node's message")
    node.publish(Topics.node("shop-b", "pi-1", "telemetry"), b"forged")
    node.publish(Topics.node("shop-a", "pi-2", "events"), b"forged")
    node.publish(own, b"marker")
    got: list[tuple[str, bytes]] = []
    while not got or got[-1] != (own, b"marker"):
        got += [m for m in ctl.received_until(own) if m[1] != b"ping"]
    assert got == [(own, b"marker")]

    # A sibling on the same listener is not disconnected by pi-1 (no client-id takeover) and
    # receives pi-1's shop events (the shop-local read) but none forged in its name.
    sibling = Client(dep.options.shop_tls_port, client_id="shop-a.pi-1", tls=tls_of(dep, "shop-a.pi-2"))
    assert sibling.accepted
    sibling.subscribe("fleet/v1/shop-a/+/events")
    node.publish(Topics.node("shop-a", "pi-2", "events"), b"forged")
    node.publish(Topics.node("shop-a", "pi-1", "events"), b"real")
    assert sibling.received_until(Topics.node("shop-a", "pi-1", "events")) == [(Topics.node("shop-a", "pi-1", "events"), b"real")]
    assert node.accepted and not node.disconnects
    node.close()
    sibling.close()
    ctl.close()


def test_shop_tls_listener_refuses_no_certificate_a_foreign_ca_and_a_revoked_certificate(deploy, deploy_dir):
    dep = deploy(shop_brokers=("shop-a",))
    shop = dep.shop("shop-a")
    ca = dep.pki.ca_cert_path
    creds = dep.creds["nodes"]["shop-a/pi-1"]
    # No certificate, not even with the node's valid password.
    bare = Client(dep.options.shop_tls_port, username=creds["username"], password=creds["password"], tls=(ca, None, None), connect=False)
    _refused(bare)
    # A certificate with the right CN from another CA.
    (deploy_dir / "foreign").mkdir()
    foreign = TestCA(deploy_dir / "foreign").issue("shop-a.pi-1", server=False)
    _refused(Client(dep.options.shop_tls_port, tls=(ca, foreign.cert_file, foreign.key_file), connect=False))
    # The same node with its own certificate is accepted...
    assert Client(dep.options.shop_tls_port, tls=tls_of(dep, "shop-a.pi-1")).accepted
    # ...until it is revoked: re-running broker-config copies the new CRL, the broker restarts.
    old = [deploy_dir / "old.crt", deploy_dir / "old.key"]
    for src, dst in zip(tls_of(dep, "shop-a.pi-1")[1:], old, strict=True):
        shutil.copyfile(src, dst)
    Pki(dep.options.pki_dir).revoke("shop-a.pi-1")
    # A routine re-run that still lists the node must not undo the revocation: it is refused.
    with pytest.raises(BrokerConfigError, match=r"shop-a.pi-1\) was revoked"):
        write_broker_config([("shop-a", "pi-1"), ("shop-a", "pi-2"), ("shop-b", "pi-1")], dep.files.conf_file.parent, options=dep.options)
    write_broker_config([("shop-a", "pi-2"), ("shop-b", "pi-1")], dep.files.conf_file.parent, options=dep.options)
    shop.restart()
    _refused(Client(dep.options.shop_tls_port, tls=(ca, *old), connect=False))
    assert Client(dep.options.shop_tls_port, tls=tls_of(dep, "shop-a.pi-2")).accepted
    # Each refusal is in the broker's log (polled: the broker writes it as it goes), which
    # 'shopfleet broker-denials' counts.
    def tls_refusals() -> float:
        watcher = DenialWatcher(DenialMetrics())
        for line in shop.log().splitlines():
            watcher.feed(line)
        return watcher.metrics.registry.get_sample_value("shopfleet_broker_refused_connections_total", {"reason": "tls"}) or 0.0

    try:
        wait_for(lambda: tls_refusals() >= 3, what="the three TLS refusals in the broker's log")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the broker's log:\n{shop.log()}") from None
    text = shop.log()
    assert "peer did not return a certificate" in text and "certificate verify failed" in text


def test_shop_broker_without_password_listener_has_only_tls(deploy):
    dep = deploy(shop_brokers=("shop-a",), shop_port=0)
    conf = (dep.files.shop_dirs["shop-a"] / "mosquitto.conf").read_text()
    assert f"listener {dep.options.shop_tls_port}" in conf
    assert conf.count("\nlistener ") == 1
    dep.shop("shop-a")
    assert Client(dep.options.shop_tls_port, tls=tls_of(dep, "shop-a.pi-2")).accepted


def _refused(client: Client) -> None:
    """Connect ``client`` and assert the broker never let it in (TLS handshake refused or CONNACK refusal)."""
    try:
        client.c.connect("127.0.0.1", client.port, keepalive=30)
    except OSError:
        return  # the handshake itself failed: refused
    client.c.loop_start()
    try:
        wait_for(lambda: client.connacks or client.disconnects, what="the broker's answer")
        assert not client.accepted, "the broker accepted a client it must refuse"
    finally:
        client.c.loop_stop()
