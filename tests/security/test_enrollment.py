"""Enrollment end to end on real Mosquitto (the generated config) with real certificates.

A node gets its certificate from the controller's HTTPS API with a one-time token and connects
to the broker's mutual-TLS listener with it; an admin revokes or rotates its credentials through
the API and the broker, reloaded by the controller (SIGHUP to the pid in
``enrollment.reload_pid_file``), refuses the old ones.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import httpx
import pytest

from edge_agent.enroll import enroll
from edge_agent.protocol import Topics
from fleet_controller.registry.audit import AuditQuery
from fleet_controller.settings import EnrollmentSettings
from tests.support.enrollment import enrollment_app, https_api, serve
from tests.support.metrics import metric
from tests.support.security import Client, Deployment, GeneratedBroker, tls_of
from tests.support.wait import wait_for


def _refused(port: int, tls) -> bool:
    """Return whether the broker refuses a new TLS connection with these files."""
    try:
        c = Client(port, tls=tls)
    except (ssl.SSLError, OSError):
        return True
    refused = not c.accepted
    c.c.loop_stop()
    if not refused:
        c.close()
    return refused


def _reloads(broker: GeneratedBroker) -> int:
    """How many reloads (SIGHUP) the broker has logged."""
    return broker.log().count("Reloading config.")


def _password_refused(port: int, user: str, password: str) -> bool:
    c = Client(port, username=user, password=password)
    refused = not c.accepted
    c.c.loop_stop()
    if not refused:
        c.close()
    return refused


def _copy_tls(dep: Deployment, cn: str, to: Path) -> tuple[Path, Path, Path]:
    """Copy a CN's broker-config-issued files away (enrollment replaces them in the PKI directory)."""
    to.mkdir(parents=True, exist_ok=True)
    ca, cert, key = tls_of(dep, cn)
    return ca, Path(shutil.copy(cert, to / "old.crt")), Path(shutil.copy(key, to / "old.key"))


class Controller:
    """The enrollment API over HTTPS on the deployment's PKI, reloading the deployment's broker by its pid file."""

    def __init__(self, dep: Deployment, broker: GeneratedBroker, tmp_path: Path) -> None:
        self.pid_file = dep.root / "mosquitto.pid"
        self.broker = broker
        self.write_pid()
        settings = EnrollmentSettings(pki_dir=dep.pki.root, broker_address=f"127.0.0.1:{dep.options.tls_port}",
                                      password_file=dep.files.password_file, acl_file=dep.files.acl_file,
                                      reload_pid_file=self.pid_file)
        self.ea = enrollment_app(tmp_path, settings)
        self.dep = dep

    def write_pid(self) -> None:
        assert self.broker.proc is not None
        self.pid_file.write_text(f"{self.broker.proc.pid}\n")

    def token(self, http: httpx.Client, shop: str, node: str) -> str:
        r = http.post("/api/v1/enrollment-tokens", json={"shop": shop, "node": node}, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ea.admin_token}"}


@pytest.fixture
def setup(deploy, tmp_path):
    dep = deploy()
    broker = dep.central()
    ctl = Controller(dep, broker, tmp_path)
    with serve(ctl.ea.app, https_api(dep.pki)) as port:
        url = f"https://127.0.0.1:{port}"
        http = httpx.Client(verify=ssl.create_default_context(cafile=str(dep.pki.ca_cert_path)), base_url=url)
        yield dep, broker, ctl, http, url


def test_an_enrolled_node_connects_and_an_api_revocation_locks_it_out(setup, tmp_path):
    dep, broker, ctl, http, url = setup
    port, tls_port = dep.options.port, dep.options.tls_port
    old = _copy_tls(dep, "shop-a.pi-1", tmp_path / "old")
    assert not _refused(tls_port, old)
    watcher = Client(tls_port, tls=tls_of(dep, dep.creds["controller"]["username"]))
    watcher.subscribe("fleet/v1/#")

    # (checked before the node connects: with the client id bound to the username, this login would take its session over)
    password = dep.creds["nodes"]["shop-a/pi-1"]["password"]
    assert not _password_refused(port, "shop-a.pi-1", password)

    reloads = _reloads(broker)
    res = enroll(url, ctl.token(http, "shop-a", "pi-1"), dep.pki.ca_cert_path, tmp_path / "node")
    assert (res.broker_host, res.broker_port) == ("127.0.0.1", tls_port)
    node = Client(tls_port, tls=(res.ca_file, res.cert_file, res.key_file))
    assert node.accepted
    own = Topics.node("shop-a", "pi-1", "telemetry")
    node.publish(own, b"enrolled")
    assert watcher.received_until(own) == [(own, b"enrolled")]  # the ACL knows the enrolled CN
    # the broker-config certificate of the same node was superseded and the broker reloaded.
    # Probe only once the reload is done: a probe with the node's CN accepted before it would take
    # the node's session over (the client id is the username).
    wait_for(lambda: _reloads(broker) > reloads, 15, "the broker's reload")
    wait_for(lambda: _refused(tls_port, old), 15, "the superseded certificate refused")
    assert metric(ctl.ea.registry, "shopfleet_controller_broker_reloads_total", result="ok") == 1

    node.subscribe(Topics.node("shop-a", "pi-1", "commands"))
    cmd = Topics.node("shop-a", "pi-1", "commands")
    watcher.publish(cmd, b"before")
    assert node.received_until(cmd) == [(cmd, b"before")]
    assert watcher.received_until(cmd) == [(cmd, b"before")]  # the watcher reads fleet/v1/# itself
    before = len(node.disconnects)
    reloads = _reloads(broker)
    r = http.post("/api/v1/nodes/shop-a/pi-1/credentials/revoke", headers=ctl.admin)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["broker_reload"] == "ok" and done["password_removed"] and len(done["revoked_serials"]) == 1
    assert done["acl_removed"]
    enrolled = (res.ca_file, res.cert_file, res.key_file)
    wait_for(lambda: _reloads(broker) > reloads, 15, "the broker's reload")
    wait_for(lambda: _refused(tls_port, enrolled), 15, "the revoked certificate refused")
    assert _password_refused(port, "shop-a.pi-1", password)
    assert "shop-a.pi-1:" not in dep.files.password_file.read_text()
    assert "user shop-a.pi-1\n" not in dep.files.acl_file.read_text()
    # other nodes keep working (the password probe first: it would take pi-2's session over)
    assert not _password_refused(port, "shop-a.pi-2", dep.creds["nodes"]["shop-a/pi-2"]["password"])
    pi2 = Client(tls_port, tls=tls_of(dep, "shop-a.pi-2"))
    assert pi2.accepted

    # Measured on Mosquitto 2.0.11: a reload does not end the session the revoked node already
    # had, but without its ACL block that session is inert. Its publish is acknowledged and
    # dropped: pi-2's marker, sent after pi-1's PUBACK, is the first thing the watcher gets.
    node.publish(own, b"still here after the reload")
    marker = Topics.node("shop-a", "pi-2", "telemetry")
    pi2.publish(marker, b"marker")
    assert watcher.received_until(marker) == [(marker, b"marker")]
    # and nothing is delivered to it any more, on the subscription it made before
    watcher.publish(cmd, b"after")
    pi2_cmd = Topics.node("shop-a", "pi-2", "commands")
    pi2.subscribe(pi2_cmd)
    watcher.publish(pi2_cmd, b"marker")
    assert pi2.received_until(pi2_cmd) == [(pi2_cmd, b"marker")]
    assert node.got.empty()
    assert len(node.disconnects) == before and len(node.connacks) == 1  # never dropped, never reconnected
    pi2.close()
    # A restart does: the node is dropped and cannot come back.
    broker.restart()
    wait_for(lambda: node.disconnects, 15, "the revoked node's session ended by the restart")
    node.c.loop_stop()
    assert _refused(tls_port, enrolled)
    audit = [e.action for e in ctl.ea.audit.query(AuditQuery())]
    assert "node.credentials.revoke" in audit and "node.enroll" in audit
    watcher.c.loop_stop()


def test_rotation_keeps_the_old_certificate_until_the_node_re_enrolls_or_revokes_it_at_once(setup, tmp_path):
    dep, _broker, ctl, http, url = setup
    tls_port = dep.options.tls_port
    first = enroll(url, ctl.token(http, "shop-b", "pi-1"), dep.pki.ca_cert_path, tmp_path / "first")
    first_tls = (first.ca_file, first.cert_file, first.key_file)
    # keep the first files: re-enrolling into another directory would be the same, but keep them explicit
    r = http.post("/api/v1/nodes/shop-b/pi-1/credentials/rotate", headers=ctl.admin)
    assert r.status_code == 201 and r.json()["revoked"] is None
    assert not _refused(tls_port, first_tls)  # grace: still valid until the node re-enrolls
    second = enroll(url, r.json()["token"], dep.pki.ca_cert_path, tmp_path / "second")
    wait_for(lambda: _refused(tls_port, first_tls), 15, "the rotated-out certificate refused")
    second_tls = (second.ca_file, second.cert_file, second.key_file)
    assert not _refused(tls_port, second_tls)

    # suspected compromise: revoke_previous cuts the current certificate off before any re-enrollment
    r = http.post("/api/v1/nodes/shop-b/pi-1/credentials/rotate?revoke_previous=true", json={"ttl": "10m"}, headers=ctl.admin)
    assert r.status_code == 201, r.text
    assert r.json()["revoked"]["broker_reload"] == "ok" and r.json()["revoked"]["password_removed"]
    wait_for(lambda: _refused(tls_port, second_tls), 15, "the compromised certificate refused")
    third = enroll(url, r.json()["token"], dep.pki.ca_cert_path, tmp_path / "second")  # same directory: files replaced
    assert not _refused(tls_port, (third.ca_file, third.cert_file, third.key_file))
    assert metric(ctl.ea.registry, "shopfleet_controller_credential_revocations_total") == 1


def test_removing_a_retired_node_revokes_it_on_the_broker_first(setup, tmp_path):
    """``DELETE /api/v1/shops/{shop}/nodes/{node}``: the node's certificate and password stop working on the real broker,
    then the registry forgets it; a viewer may not, and the audit log has both steps."""
    from fleet_controller.intake.core import IntakeCore
    from fleet_controller.registry.store import RegistryStore
    from tests.support.controller import heartbeat, inbound

    dep, broker, ctl, http, url = setup
    port, tls_port = dep.options.port, dep.options.tls_port
    # The node is in the registry (it sent a heartbeat) and holds an enrolled certificate and its broker-config password.
    IntakeCore(RegistryStore(ctl.ea.engine)).process_batch([inbound(heartbeat(node="pi-1", seq=1)), inbound(heartbeat(node="pi-2", seq=1))])
    password = dep.creds["nodes"]["shop-a/pi-1"]["password"]
    res = enroll(url, ctl.token(http, "shop-a", "pi-1"), dep.pki.ca_cert_path, tmp_path / "node")
    enrolled = (res.ca_file, res.cert_file, res.key_file)
    wait_for(lambda: not _refused(tls_port, enrolled), 15, "the enrolled certificate accepted")

    viewer = {"Authorization": f"Bearer {ctl.ea.viewer_token}"}
    assert http.delete("/api/v1/shops/shop-a/nodes/pi-1", headers=viewer).status_code == 403
    assert http.get("/api/v1/shops/shop-a/nodes/pi-1", headers=viewer).status_code == 200

    reloads = _reloads(broker)
    r = http.delete("/api/v1/shops/shop-a/nodes/pi-1", headers=ctl.admin)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["removed"] and done["revoked"]["password_removed"] and done["revoked"]["acl_removed"]
    assert len(done["revoked"]["revoked_serials"]) >= 1 and done["revoked"]["broker_reload"] == "ok"
    wait_for(lambda: _reloads(broker) > reloads, 15, "the broker's reload")
    wait_for(lambda: _refused(tls_port, enrolled), 15, "the removed node's certificate refused")
    assert _password_refused(port, "shop-a.pi-1", password)
    assert http.get("/api/v1/shops/shop-a/nodes/pi-1", headers=viewer).status_code == 404
    assert http.get("/api/v1/shops/shop-a/nodes/pi-2", headers=viewer).status_code == 200
    assert not _password_refused(port, "shop-a.pi-2", dep.creds["nodes"]["shop-a/pi-2"]["password"])
    assert metric(ctl.ea.registry, "shopfleet_controller_credential_revocations_total") == 1
    (row,) = ctl.ea.audit.query(AuditQuery(action="node.remove"))
    assert row.actor == "admin" and row.target == "shop-a/pi-1" and row.details["revoked"]["password_removed"]
