"""Mutual TLS on the generated broker: certificates from ``shopfleet pki``, ACL by CN, revocation by CRL."""

from __future__ import annotations

import ssl

import pytest

from edge_agent.protocol import Topics
from fleet_controller.pki import Pki
from tests.support.security import Client, tls_of


def _tls_refused(port: int, tls) -> bool:
    """Return whether the broker refuses this TLS client (handshake failure or an immediate drop)."""
    try:
        c = Client(port, tls=tls)
    except (ssl.SSLError, OSError):
        return True
    refused = not c.accepted
    c.c.loop_stop()
    return refused


def test_node_certificate_connects_and_gets_its_acl_by_cn(deploy):
    dep = deploy()
    dep.central()
    port = dep.options.tls_port
    ctl = Client(port, tls=tls_of(dep, dep.creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/#")
    node = Client(port, tls=tls_of(dep, "shop-a.pi-1"))
    assert node.accepted
    node.subscribe(Topics.desired("shop-a"))
    node.subscribe(Topics.desired("shop-b"))  # not its shop: the ACL delivers nothing
    for forbidden in (Topics.node("shop-b", "pi-1", "telemetry"), Topics.node("shop-a", "pi-2", "telemetry"), Topics.desired("shop-a")):
        node.publish(forbidden, b"forged")
    own = Topics.node("shop-a", "pi-1", "telemetry")
    node.publish(own, b"own")
    assert ctl.received_until(own) == [(own, b"own")]
    ctl.publish(Topics.desired("shop-b"), b"desired-b")
    ctl.publish(Topics.desired("shop-a"), b"desired-a")
    assert node.received_until(Topics.desired("shop-a")) == [(Topics.desired("shop-a"), b"desired-a")]
    node.close()
    ctl.close()


def test_tls_listener_refuses_no_certificate_and_a_foreign_ca(deploy, deploy_dir):
    dep = deploy()
    dep.central()
    port = dep.options.tls_port
    assert _tls_refused(port, (dep.pki.ca_cert_path, None, None))
    other = Pki.init(deploy_dir / "other-ca")
    other.issue("node", "shop-a/pi-1")  # same CN, wrong CA
    assert _tls_refused(port, (dep.pki.ca_cert_path, other.cert_path("shop-a.pi-1"), other.key_path("shop-a.pi-1")))
    assert not _tls_refused(port, tls_of(dep, "shop-a.pi-1"))


def test_revoked_certificate_is_refused_after_the_broker_restarts(deploy):
    dep = deploy()
    central = dep.central()
    port = dep.options.tls_port
    assert not _tls_refused(port, tls_of(dep, "shop-a.pi-2"))
    revoked = dep.pki.revoke("shop-a.pi-2")
    assert [r.cn for r in revoked] == ["shop-a.pi-2"]
    central.restart()
    assert _tls_refused(port, tls_of(dep, "shop-a.pi-2"))
    assert not _tls_refused(port, tls_of(dep, "shop-a.pi-1"))  # the CRL revokes one node only
    # Rotation brings the node back: a new key and certificate under the same CN.
    dep.pki.issue("node", "shop-a/pi-2")
    assert not _tls_refused(port, tls_of(dep, "shop-a.pi-2"))


def test_revocation_takes_effect_on_a_reload_too(deploy):
    """``systemctl reload mosquitto`` (SIGHUP) re-reads the CRL: new handshakes of the revoked cert fail."""
    import signal

    from tests.support.wait import wait_for

    dep = deploy()
    central = dep.central()
    port = dep.options.tls_port
    dep.pki.revoke("shop-a.pi-1")
    central.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _tls_refused(port, tls_of(dep, "shop-a.pi-1")), what="the reloaded broker to refuse the revoked certificate")
    assert not _tls_refused(port, tls_of(dep, "shop-b.pi-1"))


def test_rotation_with_revoke_previous_refuses_the_old_key(deploy, deploy_dir):
    dep = deploy()
    central = dep.central()
    port = dep.options.tls_port
    old = deploy_dir / "old"
    old.mkdir()
    for suffix in ("crt", "key"):
        (old / f"n.{suffix}").write_bytes(getattr(dep.pki, f"{'cert' if suffix == 'crt' else 'key'}_path")("shop-b.pi-1").read_bytes())
    dep.pki.issue("node", "shop-b/pi-1", revoke_previous=True)
    central.restart()
    assert _tls_refused(port, (dep.pki.ca_cert_path, old / "n.crt", old / "n.key"))
    assert not _tls_refused(port, tls_of(dep, "shop-b.pi-1"))


@pytest.mark.parametrize("listener", ["password", "tls"])
def test_max_packet_size_refuses_an_oversize_publish(deploy, listener):
    from edge_agent.protocol import MAX_PAYLOAD_BYTES

    dep = deploy()
    dep.central()
    creds = dep.creds
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/#")
    a = creds["nodes"]["shop-a/pi-1"]
    if listener == "tls":
        node = Client(dep.options.tls_port, tls=tls_of(dep, "shop-a.pi-1"))
    else:
        node = Client(dep.options.port, username=a["username"], password=a["password"])
    topic = Topics.node("shop-a", "pi-1", "events")
    node.publish(topic, b"x" * MAX_PAYLOAD_BYTES)  # the largest payload the protocol allows passes
    assert ctl.received_until(topic) == [(topic, b"x" * MAX_PAYLOAD_BYTES)]
    node.c.publish(topic, b"y" * (dep.options.max_packet_size + 1), qos=1)
    from tests.support.wait import wait_for

    wait_for(lambda: node.disconnects, what="the broker to drop the client that sent an oversize packet")
    node.c.loop_stop()
    marker = Topics.node("shop-a", "pi-2", "events")
    b = creds["nodes"]["shop-a/pi-2"]
    other = Client(dep.options.port, username=b["username"], password=b["password"])
    other.publish(marker, b"after")
    assert ctl.received_until(marker) == [(marker, b"after")]  # the oversize one never arrived
    other.close()
    ctl.close()
