"""The REST API through HTTP against a real registry on both engines (all via the ``api_client`` fixture)."""

from __future__ import annotations

import pytest

from fleet_controller.registry.store import NodeUpdate, SeqCursor, WriteBatch
from fleet_controller.settings import PresenceSettings
from tests.support.controller import alert, event, heartbeat

T0 = 1_800_000_000.0


@pytest.fixture
def fleet(registry):
    """Three shops, shop-a with two nodes and some history."""
    for _i, (shop, node) in enumerate([("shop-a", "pi-1"), ("shop-a", "gpu-1"), ("shop-b", "pi-1"), ("shop-c", "pi-1")]):
        wb = WriteBatch()
        for seq in range(1, 4):
            wb.uplinks.append((heartbeat(shop=shop, node=node, seq=seq), T0 + seq))
        wb.uplinks.append((event(shop=shop, node=node, seq=4), T0 + 4))
        wb.uplinks.append((alert(shop=shop, node=node, seq=5), T0 + 5))
        wb.nodes[(shop, node)] = NodeUpdate(SeqCursor("ep1", 5), messages=5)
        wb.seen[(shop, node)] = T0 + 5
        registry.write_batch(wb, T0 + 5)
    registry.register_shop("shop-a", name="Alex", region="eu", labels={"tier": "pilot"})
    registry.register_shop("shop-b", region="eu")
    registry.sweep_presence(PresenceSettings(), T0 + 1000)
    return registry


@pytest.mark.parametrize(
    ("query", "ids", "total"),
    [
        pytest.param("", ["shop-a", "shop-b", "shop-c"], 3, id="all"),
        pytest.param("?region=eu", ["shop-a", "shop-b"], 2, id="region"),
        pytest.param("?label=tier=pilot", ["shop-a"], 1, id="label"),
        pytest.param("?q=alex", ["shop-a"], 1, id="search-name"),
        pytest.param("?limit=1&offset=1", ["shop-b"], 3, id="page"),
        pytest.param("?presence=offline", ["shop-a", "shop-b", "shop-c"], 3, id="presence"),
        pytest.param("?presence=online", [], 0, id="presence-none"),
    ],
)
def test_list_shops(api_client, fleet, query, ids, total):
    r = api_client.get(f"/api/v1/shops{query}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["id"] for i in body["items"]] == ids and body["total"] == total


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/api/v1/shops?limit=0", 422, id="limit-too-small"),
        pytest.param("/api/v1/shops?presence=asleep", 422, id="bad-presence"),
        pytest.param("/api/v1/shops?label=novalue", 422, id="bad-label"),
        pytest.param("/api/v1/shops/nope", 404, id="unknown-shop"),
        pytest.param("/api/v1/shops/shop-a/nodes/nope", 404, id="unknown-node"),
        pytest.param("/api/v1/shops/nope/events", 404, id="events-unknown-shop"),
    ],
)
def test_bad_requests(api_client, fleet, path, status):
    r = api_client.get(path)
    assert r.status_code == status
    assert r.json()["detail"]


def test_shop_with_nodes(api_client, fleet):
    body = api_client.get("/api/v1/shops/shop-a").json()
    assert body["name"] == "Alex" and body["labels"] == {"tier": "pilot"}
    assert [(n["node"], n["presence"], n["watermark"]) for n in body["nodes"]] == [("gpu-1", "offline", 5), ("pi-1", "offline", 5)]


def test_node_with_facts_and_history(api_client, fleet):
    body = api_client.get("/api/v1/shops/shop-a/nodes/pi-1?history=2").json()
    assert body["facts"]["arch"] == "arm64" and body["heartbeat_interval_s"] == 10
    assert [h["seq"] for h in body["history"]] == [3, 2]


def test_events_of_a_shop(api_client, fleet):
    body = api_client.get("/api/v1/shops/shop-b/events?kind=alert").json()
    assert [(e["type"], e["severity"], e["node"]) for e in body] == [("fridge_warm", "critical", "pi-1")]
    kinds = {e["kind"] for e in api_client.get("/api/v1/shops/shop-b/events").json()}
    assert kinds == {"event", "alert", "presence"}


def test_register_shop_over_http(api_client, reader):
    r = api_client.put("/api/v1/shops/shop-x", json={"name": "Hbf", "region": "eu", "labels": {"a": "b"}, "timezone": "Europe/Berlin"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["nodes"]) == ("Hbf", 0)
    assert api_client.put("/api/v1/shops/shop-x", json={"colour": "red"}).status_code == 422
    assert api_client.put("/api/v1/shops/Bad_Id", json={}).status_code == 422
    assert reader.shop("shop-x").timezone == "Europe/Berlin"


def test_healthz_metrics_and_docs(api_client, fleet):
    assert api_client.get("/healthz").json() == {"status": "ok"}
    text = api_client.get("/metrics").text
    assert 'shopfleet_controller_nodes{presence="offline"} 4.0' in text
    assert "shopfleet_controller_rejected_total" in text
    spec = api_client.get("/openapi.json").json()
    assert {"/api/v1/shops", "/api/v1/shops/{shop}", "/api/v1/shops/{shop}/nodes/{node}", "/api/v1/shops/{shop}/events", "/healthz"} <= set(spec["paths"])
    assert api_client.get("/docs").status_code == 200


def test_remove_a_retired_node_over_http(api_client, fleet, reader):
    """DELETE takes the node out of the registry (its history stays), is audited, and refuses an applier and an unknown node."""
    from fleet_controller.registry.audit import AuditLog, AuditQuery
    from fleet_controller.web.accounts.roles import Permission, has_permission, required_permission

    r = api_client.delete("/api/v1/shops/shop-a/nodes/gpu-1")
    assert r.status_code == 200, r.text
    assert r.json() == {"shop": "shop-a", "node": "gpu-1", "removed": True, "revoked": None}  # no enrollment configured here
    assert api_client.get("/api/v1/shops/shop-a/nodes/gpu-1").status_code == 404
    assert [n.node for n in reader.get_shop("shop-a").nodes] == ["pi-1"]
    assert api_client.get("/api/v1/shops?presence=offline").json()["total"] == 3  # shop-a keeps its other node
    assert {e["node"] for e in api_client.get("/api/v1/shops/shop-a/events?kind=event").json()} == {"pi-1", "gpu-1"}  # history stays
    (row,) = AuditLog(reader.engine).query(AuditQuery(action="node.remove"))
    assert (row.actor, row.target, row.shop, row.outcome) == ("test-admin", "shop-a/gpu-1", "shop-a", "ok")
    r = api_client.delete("/api/v1/shops/shop-a/nodes/gpu-1")
    assert r.status_code == 404 and "not in the registry" in r.json()["detail"]

    assert api_client.put("/api/v1/shops/shop-a", json={"applier": "pi-1"}).status_code == 200
    r = api_client.delete("/api/v1/shops/shop-a/nodes/pi-1")
    assert r.status_code == 409 and "declare another applier first" in r.json()["detail"], r.text
    assert reader.get_node("shop-a", "pi-1").messages_total == 5
    assert len(AuditLog(reader.engine).query(AuditQuery(action="node.remove"))) == 1  # refusals changed nothing

    # Removing nodes is a fleet admin's: an operator (who restarts pipelines) may not.
    needed = required_permission("DELETE", "/api/v1/shops/shop-a/nodes/pi-1")
    assert needed is Permission.FLEET_ADMIN and not has_permission("operator", needed) and has_permission("admin", needed)


def test_removing_a_node_while_the_database_is_unavailable_answers_503_and_keeps_it(api_client, fleet, reader, monkeypatch):
    from fleet_controller.intake.core import TemporaryStoreError

    async def locked(shop, node):
        raise TemporaryStoreError("OperationalError: database is locked")

    monkeypatch.setattr(api_client.app.state.writer, "remove_node", locked)
    r = api_client.delete("/api/v1/shops/shop-b/nodes/pi-1")
    assert r.status_code == 503 and "database is locked" in r.json()["detail"] and "try again" in r.json()["detail"]
    assert reader.get_node("shop-b", "pi-1").messages_total == 5
