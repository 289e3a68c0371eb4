"""The agent's HTTP endpoint: /metrics from its registry, /healthz 200 while its threads live and
503 with the reasons in JSON once the uplink thread or a pipeline's supervision is gone."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

from edge_agent.supervisor import EventSink, PipelineConfigBase
from shopfleet.broker import free_port
from tests.support.recorder import wait_for


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


class Idle:
    kind = "test"
    name = "idle"

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        stop.wait()

    def health(self) -> dict[str, Any]:
        return {}


class Crashing:
    kind = "test"
    name = "crashing"

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        raise RuntimeError("the board is unplugged")

    def health(self) -> dict[str, Any]:
        return {}


def test_healthz_ok_then_503_naming_the_dead_uplink(make_agent) -> None:
    port = free_port()
    agent = make_agent(config={"metrics": {"port": port, "host": "127.0.0.1"}}, extra_pipelines=[(Idle(), PipelineConfigBase(name="idle"))])
    status, ctype, body = _get(port, "/healthz")
    assert (status, ctype, json.loads(body)) == (200, "application/json", {"status": "ok"})
    status, ctype, body = _get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and "shopfleet_agent_connected 1.0" in body
    assert _get(port, "/nope")[0] == 404

    agent.uplink.stop(drain_timeout=0.5)  # the uplink thread ends: the agent can no longer report
    status, _, body = _get(port, "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "unhealthy", "problems": ["uplink thread is not running"]}
    assert _get(port, "/metrics")[0] == 200  # a scrape still answers: why probes must not use it


def test_healthz_503_when_a_pipeline_spent_its_restart_budget(make_agent) -> None:
    port = free_port()
    policy = PipelineConfigBase(name="crashing", restart_budget=0, restart_backoff_s=0.01, restart_backoff_max_s=0.01)
    agent = make_agent(config={"metrics": {"port": port, "host": "127.0.0.1"}}, extra_pipelines=[(Crashing(), policy)])
    wait_for(lambda: agent.supervisor.runners["crashing"].state == "failed", 10, "the pipeline to fail")
    status, _, body = _get(port, "/healthz")
    assert status == 503
    assert json.loads(body)["problems"] == ["pipeline crashing failed (its restart budget is spent)"]
