"""The fleet as deployed with certificates: the generated TLS listener, a real agent and the real controller.

Both ends use the one MQTT core with a client certificate from ``shopfleet pki``; the broker takes
each identity from the certificate (``use_identity_as_username``), so the controller's ACL and the
node's own topics come from the CN, not from anything the client claims.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from fleet_controller.registry.read import NotFound
from fleet_controller.settings import load_settings
from tests.support.controller import RunningController
from tests.support.security import tls_of
from tests.support.wait import wait_for


def _agent(tmp_path: Path, port: int, ca: Path, cert: Path, key: Path) -> Agent:
    config = validate_config({
        "shop": "shop-a", "node": "pi-1",
        "broker": {"host": "localhost", "port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
                   "tls": {"ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "heartbeat_interval_s": 1, "shutdown_timeout_s": 1,
    })
    return Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))


def test_agent_and_controller_speak_over_the_generated_tls_listener_with_certificates(deploy, tmp_path):
    dep = deploy()
    dep.central()
    user = dep.creds["controller"]["username"]
    ca, cert, key = tls_of(dep, user)
    settings = load_settings(None, {
        "data_dir": str(tmp_path / "ctl"), "api": {"port": 0},
        "broker": {"host": "localhost", "port": dep.options.tls_port, "tls": True, "tls_ca_file": str(ca),
                   "tls_cert_file": str(cert), "tls_key_file": str(key), "client_id": user},
    }, environ={})
    ctl = RunningController(settings)
    agent = _agent(tmp_path, dep.options.tls_port, *tls_of(dep, "shop-a.pi-1"))
    agent.start()
    try:
        def online_with_heartbeats() -> bool:
            try:
                n = ctl.service.reader.get_node("shop-a", "pi-1")
            except NotFound:
                return False
            return n.presence == "online" and n.messages_total >= 2

        wait_for(online_with_heartbeats, 30, "the node online at the controller, heartbeats stored")
    finally:
        agent.stop()
        ctl.stop()


def test_a_client_certificate_without_tls_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="tls_cert_file is set but tls is false"):
        load_settings(None, {"broker": {"tls_cert_file": str(tmp_path / "c.pem"), "tls_key_file": str(tmp_path / "k.pem")}}, environ={})
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        load_settings(None, {"broker": {"tls": True, "tls_cert_file": str(tmp_path / "c.pem")}}, environ={})
