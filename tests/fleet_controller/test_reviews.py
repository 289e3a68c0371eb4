"""The cart review queue: intake of cart events (idempotent), reviewer actions with audit, roles, metrics, the alert rule."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import inspect

from edge_agent.protocol import Event, encode
from fleet_controller.alerts.evaluator import FleetSnapshot, ShopCarts, evaluate
from fleet_controller.alerts.rules import parse_rules
from fleet_controller.intake.core import IntakeCore
from fleet_controller.registry.carts import (
    CartActionError,
    CartMetrics,
    CartStore,
    parse_cart_event,
)
from fleet_controller.registry.db import Base
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.app import create_app
from fleet_controller.web.reviews import reviews_router

T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def fusion_carts() -> list[dict]:
    """Cart events made by the real fusion engine from a 3 fps camera scenario (some receipts, some reviews, contested lines)."""
    from fusion.generate import generate
    from fusion.sim import run

    events = [c.to_event() for c in run(generate("slow-camera", seed=0)).carts]
    assert {e["type"] for e in events} == {"cart_receipt", "cart_review"}, "the scenario must give both kinds"
    return events


def wire(ev: dict, seq: int, shop: str = "shop-a", node: str = "gpu-1", epoch: str = "ep1") -> tuple[str, bytes, float]:
    data = {k: v for k, v in ev.items() if k != "type"}
    msg = Event(shop=shop, node=node, epoch=epoch, seq=seq, type=ev["type"], source="fusion", data=data)
    return (f"fleet/v1/{shop}/{node}/events", encode(msg), T0)


@pytest.fixture
def store(registry) -> CartStore:
    return CartStore(registry.engine, clock=lambda: T0 + 100)


def ingest(registry, events: list[dict], start_seq: int = 1, epoch: str = "ep1"):
    core = IntakeCore(registry)
    return core.process_batch([wire(e, start_seq + i, epoch=epoch) for i, e in enumerate(events)], now=T0)


def test_migration_matches_the_cart_models(registry):
    insp = inspect(registry.engine)
    for table in ("carts", "cart_lines", "cart_actions"):
        assert {c["name"] for c in insp.get_columns(table)} == {c.name for c in Base.metadata.tables[table].columns}, table


def test_intake_stores_each_cart_once_even_when_replayed(registry, store, fusion_carts):
    out = ingest(registry, fusion_carts)
    assert out.stored == len(fusion_carts) and {e.topic for e in out.events} >= {"cart", "event"}
    # The agent's outbox replays everything under a new epoch (a new database): same carts, new seqs.
    again = ingest(registry, fusion_carts, epoch="ep2")
    assert not [e for e in again.events if e.topic == "cart"], "a replayed cart is not stored twice"
    all_carts = store.list_carts(status=None)
    assert len(all_carts) == len(fusion_carts)
    queue = store.list_carts()
    assert {c.cart_id for c in queue} == {e["cart_id"] for e in fusion_carts if e["type"] == "cart_review"}
    stats = {s.shop: s for s in store.stats()}["shop-a"]
    assert stats.reviews == len(queue) and stats.receipts == len(fusion_carts) - len(queue) and stats.in_queue == len(queue)


def test_a_bad_cart_is_counted_and_the_good_ones_kept(registry, store, fusion_carts):
    bad = {"type": "cart_review", "cart_id": "x-1", "opened_at": 1.0, "closed_at": 2.0, "confidence": 7.0}
    out = ingest(registry, [bad, fusion_carts[0]])
    assert dict(out.reasons) == {"bad_cart": 1}
    assert [c.cart_id for c in store.list_carts(status=None)] == [fusion_carts[0]["cart_id"]]
    with pytest.raises(ValueError, match="confidence"):
        parse_cart_event("cart_review", {k: v for k, v in bad.items() if k != "type"})


def test_the_evidence_of_each_doubtful_line_is_kept(registry, store, fusion_carts):
    ingest(registry, fusion_carts)
    review = next(e for e in fusion_carts if e["type"] == "cart_review")
    cart = store.get(review["cart_id"])
    assert cart.reasons == review["reasons"] and cart.attributions == review["attributions"]
    assert all({"change_id", "probability", "candidates"} <= set(a) for a in cart.attributions)
    assert [a.action for a in cart.actions] == ["received"]


def _review_cart(registry, store) -> str:
    """Store two hand-made carts in review in one shop; return the first id."""
    def cart(cid: str, lines: list[tuple[str, int, int]]) -> dict:
        return {"type": "cart_review", "cart_id": cid, "sessions": ["s1"], "tracks": [1], "opened_at": 1.0, "closed_at": 9.0,
                "lines": [{"product": p, "quantity": q, "unit_price_cents": c, "amount_cents": q * c, "confidence": 0.6, "evidence": [f"b/0@{q}"]}
                          for p, q, c in lines],
                "total_cents": sum(q * c for _, q, c in lines), "confidence": 0.6,
                "reasons": [{"code": "contested", "detail": "two at shelf-1"}], "attributions": []}
    ingest(registry, [cart("shop-a-c1", [("cola-330", 2, 150), ("chips", 1, 220)]), cart("shop-a-c2", [("water", 1, 90)])])
    return "shop-a-c1"


def test_fix_move_reassign_accept_are_audited_and_the_fix_is_the_receipt(registry, store):
    cid = _review_cart(registry, store)
    store.fix_line(cid, "cola-330", quantity=1, actor="rita", remote="10.0.0.7", comment="one went back")
    store.fix_line(cid, "chips", new_product="water", actor="rita", remote="10.0.0.7")  # the price comes from the shop's carts
    store.fix_line(cid, "water", to_cart="shop-a-c2", actor="rita", remote="10.0.0.7")
    store.reassign(cid, "s7", actor="rita", remote="10.0.0.7")
    done = store.accept(cid, actor="rita", remote="10.0.0.7")
    assert done.status == "reviewed" and done.corrected and done.shopper == "s7" and done.reviewed_by == "rita"
    assert [(ln.product, ln.quantity) for ln in done.lines] == [("cola-330", 1)] and done.total_cents == 150
    actions = [(a.action, a.actor, a.remote) for a in done.actions]
    assert actions == [("received", "node:gpu-1", "")] + [(a, "rita", "10.0.0.7") for a in ("fix_line", "fix_line", "move_line", "reassign", "accept")]
    assert done.actions[1].detail["before"] == {"product": "cola-330", "quantity": 2} and done.actions[1].detail["after"]["quantity"] == 1
    other = store.get("shop-a-c2")
    assert [(ln.product, ln.quantity) for ln in other.lines] == [("water", 2)] and other.corrected
    with pytest.raises(CartActionError, match="not waiting for review"):
        store.accept(cid, actor="rita")
    with pytest.raises(CartActionError, match="no line"):
        store.fix_line("shop-a-c2", "caviar", new_product="cola-330", actor="rita")
    with pytest.raises(CartActionError, match="no known price"):
        store.fix_line("shop-a-c2", "water", new_product="caviar", actor="rita")


def test_review_accuracy_and_metrics(registry, store):
    _review_cart(registry, store)
    store.accept("shop-a-c2", actor="rita")  # unchanged
    store.fix_line("shop-a-c1", "chips", quantity=0, actor="rita")
    store.accept("shop-a-c1", actor="rita")  # corrected
    reg = CollectorRegistry()
    reg.register(CartMetrics(store))
    text = generate_latest(reg).decode()
    assert 'shopfleet_controller_carts_total{outcome="review",shop="shop-a"} 2.0' in text
    assert 'shopfleet_controller_cart_review_queue{shop="shop-a"} 0.0' in text
    assert 'shopfleet_controller_cart_reviews_total{result="corrected",shop="shop-a"} 1.0' in text
    assert 'shopfleet_controller_cart_review_accuracy{shop="shop-a"} 0.5' in text


@pytest.fixture
def app_client(registry, store):
    from argon2 import PasswordHasher

    accounts = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    reg = CollectorRegistry()
    auth = build_auth(accounts, reg)
    from fleet_controller.registry.read import RegistryReader

    app = create_app(RegistryReader(registry.engine), reg, routers=[auth.router, reviews_router(store)], dependencies=[auth.dependency])
    tokens = {}
    for user, role in (("rita", "reviewer"), ("vic", "viewer"), ("ada", "admin")):
        accounts.add_user(user, f"{user}-password-123", role)
        tokens[user] = {"Authorization": f"Bearer {accounts.create_token(user, 't')}"}
    with TestClient(app) as client:
        yield client, tokens


def test_api_roles_and_actions(registry, store, app_client):
    client, tok = app_client
    cid = _review_cart(registry, store)
    assert client.get("/api/v1/carts", headers=tok["vic"]).status_code == 403, "a viewer does not see receipts"
    assert client.post(f"/api/v1/carts/{cid}/accept", json={}, headers=tok["vic"]).status_code == 403
    queue = client.get("/api/v1/carts?shop=shop-a", headers=tok["rita"]).json()
    assert {c["cart_id"] for c in queue} == {"shop-a-c1", "shop-a-c2"}
    r = client.post(f"/api/v1/carts/{cid}/fix", json={"product": "cola-330", "quantity": 3}, headers=tok["rita"])
    assert r.status_code == 200 and {ln["product"]: ln["quantity"] for ln in r.json()["lines"]}["cola-330"] == 3
    assert client.post(f"/api/v1/carts/{cid}/fix", json={"product": "cola-330"}, headers=tok["rita"]).status_code == 409
    assert client.post(f"/api/v1/carts/{cid}/reassign", json={"shopper": "s9"}, headers=tok["ada"]).status_code == 200
    r = client.post(f"/api/v1/carts/{cid}/accept", json={"comment": "ok"}, headers=tok["rita"])
    assert r.status_code == 200 and r.json()["status"] == "reviewed"
    assert [a["actor"] for a in r.json()["actions"]][-3:] == ["rita", "ada", "rita"]
    assert client.post(f"/api/v1/carts/{cid}/accept", json={}, headers=tok["rita"]).status_code == 409
    assert client.get("/api/v1/carts/nope", headers=tok["rita"]).status_code == 404
    page = client.get(f"/reviews/{cid}", headers={**tok["rita"], "Accept": "text/html"})
    assert page.status_code == 200 and "reassigned to s9" in page.text and "/static/reviews.js" in page.text
    listing = client.get("/reviews?shop=shop-a&status=all", headers={**tok["rita"], "Accept": "text/html"})
    assert listing.status_code == 200 and "shop-a-c2" in listing.text
    stats = client.get("/api/v1/carts/stats", headers=tok["rita"]).json()
    assert stats == [{"shop": "shop-a", "receipts": 0, "reviews": 2, "in_queue": 1, "reviewed_unchanged": 0,
                      "reviewed_corrected": 1, "accuracy": 0.0}]


@pytest.mark.parametrize(("carts", "rate", "fires"), [(30, 0.5, True), (30, 0.05, False), (5, 0.9, False)])
def test_the_review_rate_alert(carts, rate, fires):
    rules = parse_rules("cart_review_rate_high: {max_rate: 0.2, min_carts: 20}")
    snap = FleetSnapshot(carts=(ShopCarts("shop-a", carts, rate),))
    firing = evaluate(snap, rules, T0).firing
    assert bool([f for f in firing if f.rule == "cart_review_rate_high"]) is fires
