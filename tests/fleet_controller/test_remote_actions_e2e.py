"""A remote action end to end: the whole controller (build_service, with a signing key), a real
Mosquitto and a real agent. An operator logs in over HTTP, restarts a pipeline from the API the shop
page uses, and sees the agent's answer; the audit log has the request."""

from __future__ import annotations

from pathlib import Path

import httpx

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.supervisor import PipelineConfigBase
from fleet_controller.registry.audit import AuditLog, AuditQuery
from fleet_controller.rollout.signing import generate_keypair
from fleet_controller.service import build_service
from fleet_controller.web.accounts.store import AccountStore
from tests.support.controller import FAST, controller_settings, csrf_of, login
from tests.support.loop import LoopThread
from tests.support.pipelines import Counting
from tests.support.wait import wait_for


def test_operator_restarts_a_pipeline_and_sees_the_agents_answer(broker, tmp_path: Path):
    generate_keypair(tmp_path / "signing.key")
    settings = controller_settings(broker, tmp_path, rollout={"signing_key": str(tmp_path / "signing.key"), "tick_interval_s": 0.5})
    ctl = LoopThread(build_service(settings))
    service = ctl.service
    pipeline = Counting()
    agent = Agent(validate_config({
        "shop": "shop-a", "node": "pi-1", "heartbeat_interval_s": 0.5, "shutdown_timeout_s": 2,
        "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "commands": {"public_keys": [str(tmp_path / "signing.pub")]},
    }), facts_provider=SystemFacts(probe=False, disk_path=tmp_path), extra_pipelines=[(pipeline, PipelineConfigBase(name="cam-1"))])
    agent.start()
    try:
        AccountStore(service.engine, FAST).put_user("olga", "olga-test-password", "operator")
        client = httpx.Client(base_url=service.api_url, timeout=10)
        assert login(client, "olga", "olga-test-password").status_code == 303
        csrf = csrf_of(client)
        wait_for(lambda: client.get("/api/v1/shops/shop-a").status_code == 200, 20, "the node registered")
        page = client.get("/shops/shop-a").text
        assert "Restart pipeline" in page and 'value="pi-1/cam-1"' in page  # the button offers the pipeline from heartbeats
        r = client.post("/api/v1/actions", json={"shop": "shop-a", "action": "restart_pipeline", "node": "pi-1", "pipeline": "cam-1"},
                        headers={"X-CSRF-Token": csrf})
        assert r.status_code == 202 and r.json()["status"] == "pending", r.text

        def settled():
            a = client.get("/api/v1/actions", params={"shop": "shop-a"}).json()["actions"][0]
            return a if a["status"] != "pending" else None

        done = wait_for(settled, 20, "the agent's answer through the intake")
        assert done["status"] == "ok" and "pipeline=cam-1" in done["message"] and "state=running" in done["message"], done
        assert pipeline.starts == 2
        (row,) = AuditLog(service.engine).query(AuditQuery(action="command.restart_pipeline"))
        assert row.actor == "olga" and row.shop == "shop-a" and row.source_address == "127.0.0.1"
        client.close()
    finally:
        agent.stop(timeout=2)
        ctl.stop(timeout=30)
