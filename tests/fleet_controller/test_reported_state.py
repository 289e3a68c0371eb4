"""Per-node reported state: one node never speaks for its shop or creates nodes; only the applier decides."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from edge_agent.protocol import ProtocolError, ReportedState, Topics, encode, parse_message
from tests.support.controller import batch, heartbeat, login, presence

T0 = 1_800_000_000.0


def report(node: str, revision: int, status: str = "applied", shop: str = "shop-a", seq: int = 5, release: str | None = "r1") -> ReportedState:
    return ReportedState(shop=shop, node=node, epoch="ep1", seq=seq, revision=revision, status=status, release=release)


def test_payload_node_must_match_the_topic():
    msg = report("ghost-1", 7)
    with pytest.raises(ProtocolError) as exc:
        parse_message(Topics.reported("shop-a", "pi-1"), encode(msg))
    assert exc.value.reason == "identity_mismatch"
    with pytest.raises(ProtocolError) as exc:  # the old shop-wide topic is gone
        parse_message("fleet/v1/shop-a/state/reported", encode(msg))
    assert exc.value.reason == "bad_topic"
    assert parse_message(Topics.reported("shop-a", "ghost-1"), encode(msg)).node == "ghost-1"


def test_a_report_never_creates_a_node(registry, reader):
    registry.write_batch(batch(presence(node="pi-1"), heartbeat(node="pi-1", seq=1)), T0)
    events = registry.write_batch(batch(report("ghost-1", 7)), T0 + 1)
    assert [n.node for n in reader.get_shop("shop-a").nodes] == ["pi-1"]
    assert registry.reports_refused == 1
    assert [(e.topic, e.node) for e in events if e.topic.startswith("report")] == [("report_refused", "ghost-1")]
    assert reader.reported_states() == {}
    # Nor a shop: a report naming an unknown shop stores nothing at all.
    registry.write_batch(batch(report("pi-1", 1, shop="shop-z")), T0 + 2)
    assert [s.id for s in reader.shops()] == ["shop-a"]


def test_a_report_in_the_same_batch_as_the_birth_is_kept(registry, reader):
    registry.write_batch(batch(presence(node="gpu-1"), report("gpu-1", 3)), T0)
    assert reader.reported_states()["shop-a"].revision == 3


def test_only_the_declared_applier_decides(registry, reader):
    registry.register_shop("shop-a", applier="gpu-1")
    registry.write_batch(batch(presence(node="pi-1"), presence(node="gpu-1"), heartbeat(node="pi-1"), heartbeat(node="gpu-1")), T0)
    registry.write_batch(batch(report("gpu-1", 2, "applying", seq=2)), T0 + 1)
    # A sibling claims the shop applied revision 7: stored for display, never trusted.
    registry.write_batch(batch(report("pi-1", 7, "applied", seq=2, release="evil")), T0 + 2)
    states = reader.reported_states(["shop-a"])
    assert states["shop-a"].node == "gpu-1" and states["shop-a"].revision == 2 and states["shop-a"].status == "applying"
    assert reader.reported_releases(applied_only=True) == {}
    shop = reader.get_shop("shop-a")
    assert shop.applier == "gpu-1" and shop.reported_state is not None and shop.reported_state.node == "gpu-1"
    assert {(r.node, r.revision) for r in shop.node_reports} == {("gpu-1", 2), ("pi-1", 7)}
    # The declared applier is never replaced by a report; an operator changes it.
    registry.register_shop("shop-a", applier="pi-1")
    assert reader.reported_states()["shop-a"].release == "evil"


def test_first_reporter_becomes_applier_when_none_declared(registry, reader):
    registry.write_batch(batch(presence(node="gpu-1"), presence(node="pi-1")), T0)
    registry.write_batch(batch(report("gpu-1", 1)), T0 + 1)
    registry.write_batch(batch(report("pi-1", 9, seq=6)), T0 + 2)
    assert reader.shop("shop-a").applier == "gpu-1"
    assert reader.reported_states()["shop-a"].node == "gpu-1"
    assert reader.reported_states()["shop-a"].revision == 1


def test_register_shop_refuses_a_bad_applier(registry):
    with pytest.raises(ValueError, match="applier node id"):
        registry.register_shop("shop-a", applier="Bad/Node")


def test_shop_page_survives_odd_reports(web, registry):
    registry.register_shop("s1", applier="gpu-1")
    # A node with a birth but no heartbeat (no facts), a sibling's report, and no report from the applier.
    registry.write_batch(batch(presence(shop="s1", node="pi-1"), presence(shop="s1", node="cam-1")), T0)
    registry.write_batch(batch(report("pi-1", 7, shop="s1", release="<script>x</script>")), T0 + 1)
    app, creds, _ = web
    c = TestClient(app)
    login(c, "viewer", creds["viewer"])
    r = c.get("/shops/s1")
    assert r.status_code == 200, r.text[:500]
    assert "<script>x</script>" not in r.text
    assert c.get("/api/v1/shops/s1").json()["reported_state"] is None
