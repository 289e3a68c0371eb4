"""The registry writer stores the msgspec wire views exactly as it stored the pydantic models.

The writer takes the fast path's validated Structs (``parse_message_view``) instead of building
the models (issue 15: model building was 12 % of the writer). Whatever it stores of a message
must not depend on which form it got: the same payloads are stored once through views (the
writer's path) and once through models (``parse_message``, the path before), for two shops of the
same database, and every row written is compared column for column (the shop aside), JSON text
included, on both engines.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

import fleet_controller.intake.core as core_module
from edge_agent import protocol
from edge_agent.protocol import EvictedRun, NodeFacts, PipelineHealth, Reading, Telemetry, encode
from fleet_controller.intake.core import IntakeCore
from fleet_controller.registry.series import RAW
from fleet_controller.registry.store import EVENTS, HEARTBEATS, NODES, READINGS
from tests.support.controller import alert, event, heartbeat, inbound

pytest.importorskip("msgspec", reason="the wire views are the msgspec fast path's")

FACTS = NodeFacts(hostname="pi", arch="arm64", os="Debian 12", kernel="6.6", node_class="pi", cpu_count=4, cpu_load_1m=0.25,
                  mem_total_bytes=4 << 30, mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
                  cpu_percent=12.5, cpu_temp_c=51.2, onnx_providers=("CPUExecutionProvider",), gpu="none", uptime_s=5,
                  agent_version="0.1.0")
PIPES = {"door": PipelineHealth(kind="vision", state="running", fps=14.5, latency_ms=30.0, dropped_frames=2, detail="ok"),
         "scale": PipelineHealth(kind="hardware", state="backoff", restarts=3, errors=1)}


def messages(shop: str) -> list[Any]:
    msgs = [
        heartbeat(shop=shop, seq=1, facts=FACTS, pipelines=PIPES, metrics={"fps": 14.5, "x": -0.0}, release="r7", outbox_depth=3),
        Telemetry(shop=shop, node="pi-1", epoch="ep1", seq=2, readings=(
            Reading(name="temperature_c", value=4.25, unit="C", source="fridge-1", labels={"zone": "a"}),
            Reading(name="occupancy", value=3, source="cam-1"))),
        event(shop=shop, seq=3),
        alert(shop=shop, seq=4),
        heartbeat(shop=shop, seq=6, facts=FACTS, evicted=(EvictedRun(first=5, last=5, priority="telemetry"),)),
    ]
    return [m.model_copy(update={"ts": 1_699_999_990.0 + m.seq}) for m in msgs]  # the same times for both shops


def rows(conn: Any, table: Any, shop: str) -> list[dict[str, Any]]:
    """The rows of ``shop`` in ``table``, without the columns that differ by construction (shop, ids)."""
    out = []
    for r in conn.execute(select(table).where(table.c.shop_id == shop).order_by(*table.primary_key.columns)).mappings():
        out.append({k: v for k, v in r.items() if k not in ("shop_id", "id")})
    return out


def test_the_writer_stores_views_exactly_as_models(registry, monkeypatch):
    assert isinstance(protocol.parse_message_view(*_raw(messages("x")[0])[:2]), protocol.HEARTBEAT_TYPES)
    assert not isinstance(protocol.parse_message_view(*_raw(messages("x")[0])[:2]), protocol.Heartbeat)  # a view, not a model
    core = IntakeCore(registry)
    now = 1_700_000_000.0
    with monkeypatch.context() as m:
        m.setattr(core_module, "parse_message_view", protocol.parse_message)  # the path before: models
        models = core.process_batch([_raw(msg) for msg in messages("shop-m")], now)
    views = core.process_batch([_raw(msg) for msg in messages("shop-v")], now)
    assert models.stored == views.stored == 5 and models.evicted == views.evicted == (("telemetry", 1),)
    with registry.engine.connect() as conn:
        for table in (NODES, HEARTBEATS, READINGS, EVENTS, RAW):
            got_models, got_views = rows(conn, table, "shop-m"), rows(conn, table, "shop-v")
            assert got_models, table.name
            assert got_views == got_models, table.name
        facts = conn.execute(select(NODES.c.facts).where(NODES.c.shop_id == "shop-v")).scalar_one()
        pipelines = conn.execute(select(HEARTBEATS.c.pipelines).where(HEARTBEATS.c.shop_id == "shop-v", HEARTBEATS.c.seq == 1)).scalar_one()
    # The JSON keeps the models' field order (what a reader of the raw column sees).
    assert list(facts) == list(NodeFacts.model_fields)
    assert list(pipelines) == ["door", "scale"] and list(pipelines["door"]) == list(PipelineHealth.model_fields)


def _raw(msg: Any) -> tuple[str, bytes, float]:
    m = inbound(msg)
    return (m.topic, encode(msg), 1_700_000_000.0)
