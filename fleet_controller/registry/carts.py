"""Carts at the controller: receipts and the review queue, with every reviewer action audited.

A shop's fusion pipeline closes each cart exactly once and sends it as a ``cart_receipt`` (sure
of it) or a ``cart_review`` event (a doubt: reasons and the evidence per shelf change) through
its agent's outbox. The intake's writer hands those events to :meth:`CartStore.ingest`, which
stores the cart and its lines keyed on ``cart_id``: an outbox replay or a controller restart that
delivers the same cart again changes nothing (``ON CONFLICT DO NOTHING``), so a cart is counted
once however often it arrives.

A cart sent to review waits in the queue (``status = 'review'``) until a reviewer acts on it:

* **fix a line**: change its product or quantity (0 removes it), or move it to another cart of
  the same shop (the shopper who really took it);
* **reassign**: the whole cart belongs to another shopper session (a track swap);
* **accept**: the cart as it now stands becomes the receipt (``status = 'reviewed'``).

Every action writes one ``cart_actions`` row: who, when, from which address, what it changed
(before and after). Review accuracy is the share of reviewed carts accepted without a change.
Everything here is plain SQLAlchemy Core on the shared engine (SQLite or PostgreSQL); the read
side returns frozen pydantic models, as :mod:`fleet_controller.registry.read` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.bus import BusEvent
from fleet_controller.registry.db import Base, table_of
from shopfleet.errors import PermanentError

log = logging.getLogger(__name__)

CART_EVENT_TYPES = frozenset({"cart_receipt", "cart_review"})
"""Event types that carry a closed cart (``fusion.types.CartResult.to_event``)."""

Status = Literal["accepted", "review", "reviewed"]


# --------------------------------------------------------------------------------------------
# Tables (created by the Alembic revision 0012_carts; a test compares them)
# --------------------------------------------------------------------------------------------


class CartRecord(Base):
    """One closed cart; ``lines`` live in cart_lines and change only through audited actions."""

    __tablename__ = "carts"
    cart_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    origin: Mapped[str] = mapped_column(String(16))  # receipt | review: what fusion decided
    status: Mapped[str] = mapped_column(String(16))  # accepted | review | reviewed
    corrected: Mapped[bool] = mapped_column(Boolean, default=False)
    sessions: Mapped[list[str]] = mapped_column(JSON)
    shopper: Mapped[str] = mapped_column(String(128), default="")  # set by 'reassign'
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    attributions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    original: Mapped[dict[str, Any]] = mapped_column(JSON)  # the event's data as received
    received_at: Mapped[float] = mapped_column(Float)
    reviewed_by: Mapped[str] = mapped_column(String(64), default="")
    reviewed_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_carts_shop_status", "shop_id", "status"), Index("ix_carts_received_at", "received_at"))


class CartLineRecord(Base):
    """One product line of a cart, as it stands now (after any fixes)."""

    __tablename__ = "cart_lines"
    cart_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    product: Mapped[str] = mapped_column(String(128), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_cents: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    evidence: Mapped[list[str]] = mapped_column(JSON)


class CartActionRecord(Base):
    """The audit trail: one row per reviewer action (and one per arrival, by the system)."""

    __tablename__ = "cart_actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cart_id: Mapped[str] = mapped_column(String(128), index=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(32))  # received | fix_line | move_line | reassign | accept
    actor: Mapped[str] = mapped_column(String(64))
    remote: Mapped[str] = mapped_column(String(128), default="")
    at: Mapped[float] = mapped_column(Float)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


CARTS = table_of(CartRecord)
LINES = table_of(CartLineRecord)
ACTIONS = table_of(CartActionRecord)


# --------------------------------------------------------------------------------------------
# The wire shape of a cart event (what fusion's CartResult.to_event() gives, minus 'type')
# --------------------------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WireLine(_Wire):
    product: str = Field(min_length=1, max_length=128)
    quantity: int = Field(ge=0, le=10_000)
    unit_price_cents: int = Field(ge=0)
    confidence: float = Field(ge=0, le=1)
    evidence: list[str] = Field(default_factory=list)


class WireCart(_Wire):
    cart_id: str = Field(min_length=1, max_length=128)
    sessions: list[str] = Field(default_factory=list)
    tracks: list[int] = Field(default_factory=list)
    opened_at: float
    closed_at: float
    lines: list[WireLine] = Field(default_factory=list, max_length=500)
    confidence: float = Field(ge=0, le=1)
    reasons: list[dict[str, Any]] = Field(default_factory=list)
    attributions: list[dict[str, Any]] = Field(default_factory=list)


class CartEventError(PermanentError, ValueError):
    """A cart event whose data is not a cart; the message names the field."""

    default_reason = "bad_cart"


def parse_cart_event(type_: str, data: dict[str, Any]) -> WireCart:
    """Validate one cart event's data; raise :class:`CartEventError` naming the bad field."""
    if type_ not in CART_EVENT_TYPES:
        raise CartEventError(f"event type {type_!r} is not a cart event ({', '.join(sorted(CART_EVENT_TYPES))})")
    try:
        cart = WireCart.model_validate(data)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CartEventError(f"{type_} event: {detail}") from None
    products = [line.product for line in cart.lines]
    if len(products) != len(set(products)):
        raise CartEventError(f"{type_} event {cart.cart_id}: a product appears on two lines; fusion sends one line per product")
    return cart


# --------------------------------------------------------------------------------------------
# Read models
# --------------------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class CartLine(_View):
    """A line as it stands now."""

    product: str
    quantity: int
    unit_price_cents: int
    amount_cents: int
    confidence: float
    evidence: list[str]


class CartAction(_View):
    """One audited action."""

    id: int
    action: str
    actor: str
    remote: str
    at: float
    detail: dict[str, Any]


class CartSummary(_View):
    """A cart in a list (the queue, a shop's receipts)."""

    cart_id: str
    shop: str
    node: str
    origin: str
    status: str
    corrected: bool
    shopper: str
    sessions: list[str]
    opened_at: float
    closed_at: float
    confidence: float
    reasons: list[dict[str, Any]]
    total_cents: int
    items: int
    received_at: float
    reviewed_by: str
    reviewed_at: float | None


class CartDetail(CartSummary):
    """One cart with its lines, the evidence behind each doubtful line, and its audit trail."""

    lines: list[CartLine]
    attributions: list[dict[str, Any]]
    actions: list[CartAction]
    original_lines: list[dict[str, Any]]


class ShopCartStats(_View):
    """Per-shop figures: carts by origin and status, reviews unchanged/corrected."""

    shop: str
    receipts: int = 0
    reviews: int = 0
    in_queue: int = 0
    reviewed_unchanged: int = 0
    reviewed_corrected: int = 0

    @property
    def accuracy(self) -> float | None:
        """Return the share of reviewed carts accepted unchanged (None before the first review)."""
        done = self.reviewed_unchanged + self.reviewed_corrected
        return self.reviewed_unchanged / done if done else None


class CartNotFound(LookupError):
    """No cart with that id (in that shop)."""


class CartActionError(PermanentError, ValueError):
    """A reviewer action that cannot be done; the message says why and what to do instead."""

    default_reason = "cart_action"


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class CartStore:
    """Write and read carts on one engine. Ingest runs on the intake's writer; actions on the API."""

    def __init__(self, engine: Engine, clock: Any = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._dialect = engine.dialect.name

    def _insert(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        if self._dialect == "sqlite":
            return sqlite.insert(table)
        raise NotImplementedError(f"database {self._dialect!r} is not supported: use SQLite or PostgreSQL")

    # ----- ingest (the intake's writer) ---------------------------------------------------------

    def ingest(self, events: Sequence[tuple[str, str, str, dict[str, Any]]], now: float | None = None) -> tuple[list[BusEvent], list[str]]:
        """Store cart events ``(shop, node, type, data)`` idempotently, in one transaction.

        Return the bus events of carts stored for the first time and the error of every event that
        is not a valid cart (the caller counts those; the raw event stays in the events table).
        Database errors propagate, so the intake keeps the batch and retries it; a retry inserts
        nothing twice.
        """
        now = self.clock() if now is None else now
        rows: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        audit: list[dict[str, Any]] = []
        errors: list[str] = []
        seen: set[str] = set()
        for shop, node, type_, data in events:
            try:
                cart = parse_cart_event(type_, data)
            except CartEventError as exc:
                errors.append(f"{shop}/{node}: {exc}")
                continue
            if cart.cart_id in seen:
                continue
            seen.add(cart.cart_id)
            origin = "receipt" if type_ == "cart_receipt" else "review"
            rows.append({
                "cart_id": cart.cart_id, "shop_id": shop, "node_id": node, "origin": origin,
                "status": "accepted" if origin == "receipt" else "review", "corrected": False,
                "sessions": cart.sessions, "shopper": "", "opened_at": cart.opened_at, "closed_at": cart.closed_at,
                "confidence": cart.confidence, "reasons": cart.reasons, "attributions": cart.attributions,
                "original": dict(data), "received_at": now, "reviewed_by": "", "reviewed_at": None,
            })
            lines += [{"cart_id": cart.cart_id, **line.model_dump()} for line in cart.lines if line.quantity > 0]
            audit.append({"cart_id": cart.cart_id, "shop_id": shop, "action": "received", "actor": f"node:{node}",
                          "remote": "", "at": now, "detail": {"origin": origin, "reasons": [r.get("code") for r in cart.reasons]}})
        if not rows:
            return [], errors
        with self.engine.begin() as conn:
            existing = set(conn.scalars(select(CARTS.c.cart_id).where(CARTS.c.cart_id.in_([r["cart_id"] for r in rows]))))
            new = [r for r in rows if r["cart_id"] not in existing]
            if new:
                ids = {r["cart_id"] for r in new}
                conn.execute(self._insert(CARTS).on_conflict_do_nothing(), new)
                new_lines = [ln for ln in lines if ln["cart_id"] in ids]
                if new_lines:
                    conn.execute(self._insert(LINES).on_conflict_do_nothing(), new_lines)
                conn.execute(ACTIONS.insert(), [a for a in audit if a["cart_id"] in ids])
        bus = [
            BusEvent("cart", r["shop_id"], r["node_id"], {"cart_id": r["cart_id"], "status": r["status"], "origin": r["origin"]}, now)
            for r in new
        ]
        return bus, errors

    # ----- reads -----------------------------------------------------------------------------

    def _totals(self, conn: Connection, ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        q = (select(LINES.c.cart_id, func.sum(LINES.c.quantity * LINES.c.unit_price_cents), func.sum(LINES.c.quantity))
             .where(LINES.c.cart_id.in_(list(ids))).group_by(LINES.c.cart_id))
        return {cid: (int(total or 0), int(n or 0)) for cid, total, n in conn.execute(q)}

    @staticmethod
    def _summary(r: Any, totals: dict[str, tuple[int, int]]) -> dict[str, Any]:
        total, items = totals.get(r.cart_id, (0, 0))
        return {
            "cart_id": r.cart_id, "shop": r.shop_id, "node": r.node_id, "origin": r.origin, "status": r.status,
            "corrected": bool(r.corrected), "shopper": r.shopper, "sessions": list(r.sessions or []),
            "opened_at": r.opened_at, "closed_at": r.closed_at, "confidence": r.confidence,
            "reasons": list(r.reasons or []), "total_cents": total, "items": items, "received_at": r.received_at,
            "reviewed_by": r.reviewed_by, "reviewed_at": r.reviewed_at,
        }

    def list_carts(self, shop: str | None = None, status: Status | None = "review", limit: int = 200) -> list[CartSummary]:
        """Return carts, newest first: the review queue by default, optionally of one shop."""
        q = select(CARTS).order_by(CARTS.c.received_at.desc(), CARTS.c.cart_id).limit(max(1, min(limit, 5000)))
        if shop is not None:
            q = q.where(CARTS.c.shop_id == shop)
        if status is not None:
            q = q.where(CARTS.c.status == status)
        with self.engine.connect() as conn:
            rows = list(conn.execute(q))
            totals = self._totals(conn, [r.cart_id for r in rows])
        return [CartSummary(**self._summary(r, totals)) for r in rows]

    def get(self, cart_id: str) -> CartDetail:
        """Return one cart with lines, evidence and audit trail; raise :class:`CartNotFound`."""
        with self.engine.connect() as conn:
            r = conn.execute(select(CARTS).where(CARTS.c.cart_id == cart_id)).first()
            if r is None:
                raise CartNotFound(f"no cart {cart_id!r}: pick one from the review queue")
            lines = list(conn.execute(select(LINES).where(LINES.c.cart_id == cart_id).order_by(LINES.c.product)))
            actions = list(conn.execute(select(ACTIONS).where(ACTIONS.c.cart_id == cart_id).order_by(ACTIONS.c.id)))
            totals = self._totals(conn, [cart_id])
        return CartDetail(
            **self._summary(r, totals),
            lines=[CartLine(product=ln.product, quantity=ln.quantity, unit_price_cents=ln.unit_price_cents,
                            amount_cents=ln.quantity * ln.unit_price_cents, confidence=ln.confidence, evidence=list(ln.evidence or []))
                   for ln in lines],
            attributions=list(r.attributions or []),
            actions=[CartAction(id=a.id, action=a.action, actor=a.actor, remote=a.remote, at=a.at, detail=dict(a.detail or {}))
                     for a in actions],
            original_lines=list((r.original or {}).get("lines", [])),
        )

    def stats(self, since: float | None = None) -> list[ShopCartStats]:
        """Return per-shop counts (of carts received since ``since``, or all)."""
        q = select(CARTS.c.shop_id, CARTS.c.origin, CARTS.c.status, CARTS.c.corrected, func.count()).group_by(
            CARTS.c.shop_id, CARTS.c.origin, CARTS.c.status, CARTS.c.corrected)
        if since is not None:
            q = q.where(CARTS.c.received_at >= since)
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for shop, origin, status, corrected, n in conn.execute(q):
                s = out.setdefault(shop, {"receipts": 0, "reviews": 0, "in_queue": 0, "reviewed_unchanged": 0, "reviewed_corrected": 0})
                s["receipts" if origin == "receipt" else "reviews"] += n
                if status == "review":
                    s["in_queue"] += n
                elif status == "reviewed":
                    s["reviewed_corrected" if corrected else "reviewed_unchanged"] += n
        return [ShopCartStats(shop=shop, **v) for shop, v in sorted(out.items())]

    # ----- reviewer actions (the API) ----------------------------------------------------------

    def _open_for_review(self, conn: Connection, cart_id: str) -> Any:
        r = conn.execute(select(CARTS).where(CARTS.c.cart_id == cart_id)).first()
        if r is None:
            raise CartNotFound(f"no cart {cart_id!r}: pick one from the review queue")
        if r.status != "review":
            raise CartActionError(f"cart {cart_id} is {r.status}, not waiting for review: reload the queue")
        return r

    def _audit(self, conn: Connection, r: Any, action: str, actor: str, remote: str, detail: dict[str, Any]) -> None:
        conn.execute(ACTIONS.insert().values(cart_id=r.cart_id, shop_id=r.shop_id, action=action, actor=actor,
                                             remote=remote[:128], at=self.clock(), detail=detail))

    def _price(self, conn: Connection, shop: str, product: str) -> int | None:
        """Return the unit price of ``product`` on this shop's newest line that has it."""
        q = (select(LINES.c.unit_price_cents).join(CARTS, CARTS.c.cart_id == LINES.c.cart_id)
             .where(CARTS.c.shop_id == shop, LINES.c.product == product).order_by(CARTS.c.received_at.desc()).limit(1))
        return conn.scalar(q)

    def fix_line(self, cart_id: str, product: str, *, actor: str, remote: str = "", new_product: str | None = None,
                 quantity: int | None = None, to_cart: str | None = None, unit_price_cents: int | None = None,
                 comment: str = "") -> CartDetail:
        """Change one line of a cart in review: product, quantity (0 removes it), or move it to ``to_cart``.

        A new product takes ``unit_price_cents`` or, when omitted, the price the shop's carts
        last had for it; moving a line adds its units to the other cart (of the same shop), whose
        receipt changes too and is marked corrected. Audited as ``fix_line`` / ``move_line``.
        """
        if new_product is None and quantity is None and to_cart is None:
            raise CartActionError("nothing to fix: give a new product, a quantity or a cart to move the line to")
        if quantity is not None and not 0 <= quantity <= 10_000:
            raise CartActionError(f"quantity {quantity} is out of range: use 0 (remove the line) to 10000")
        with self.engine.begin() as conn:
            r = self._open_for_review(conn, cart_id)
            line = conn.execute(select(LINES).where(LINES.c.cart_id == cart_id, LINES.c.product == product)).first()
            if line is None and (new_product is not None or to_cart is not None):
                raise CartActionError(f"cart {cart_id} has no line {product!r}: pick one of its lines")
            before = {"product": product, "quantity": line.quantity if line else 0}
            if to_cart is not None:
                if to_cart == cart_id:
                    raise CartActionError("the line is already on this cart: pick another cart")
                target = conn.execute(select(CARTS).where(CARTS.c.cart_id == to_cart)).first()
                if target is None or target.shop_id != r.shop_id:
                    raise CartActionError(f"no cart {to_cart!r} in shop {r.shop_id}: a line can move only to a cart of the same shop")
                assert line is not None
                units = line.quantity if quantity is None else quantity
                conn.execute(LINES.delete().where(LINES.c.cart_id == cart_id, LINES.c.product == product))
                self._add_units(conn, to_cart, product, units, line.unit_price_cents, list(line.evidence or []))
                conn.execute(update(CARTS).where(CARTS.c.cart_id.in_([cart_id, to_cart])).values(corrected=True))
                detail = {"before": before, "after": {"cart_id": to_cart, "product": product, "quantity": units}, "comment": comment}
                self._audit(conn, r, "move_line", actor, remote, detail)
                self._audit(conn, target, "move_line", actor, remote, {**detail, "from_cart": cart_id})
            else:
                target_product = new_product or product
                units = quantity if quantity is not None else (line.quantity if line else 0)
                price = unit_price_cents if unit_price_cents is not None else (
                    line.unit_price_cents if line is not None and target_product == product else self._price(conn, r.shop_id, target_product))
                if price is None:
                    raise CartActionError(f"no known price for {target_product!r} in shop {r.shop_id}: give unit_price_cents")
                evidence = list(line.evidence or []) if line else []
                conn.execute(LINES.delete().where(LINES.c.cart_id == cart_id, LINES.c.product == product))
                if units > 0:
                    self._add_units(conn, cart_id, target_product, units, price, evidence)
                conn.execute(update(CARTS).where(CARTS.c.cart_id == cart_id).values(corrected=True))
                self._audit(conn, r, "fix_line", actor, remote,
                            {"before": before, "after": {"product": target_product, "quantity": units, "unit_price_cents": price}, "comment": comment})
        return self.get(cart_id)

    def _add_units(self, conn: Connection, cart_id: str, product: str, units: int, price: int, evidence: list[str]) -> None:
        if units <= 0:
            return
        cur = conn.execute(select(LINES).where(LINES.c.cart_id == cart_id, LINES.c.product == product)).first()
        if cur is None:
            conn.execute(LINES.insert().values(cart_id=cart_id, product=product, quantity=units, unit_price_cents=price,
                                               confidence=1.0, evidence=evidence))
        else:
            conn.execute(update(LINES).where(LINES.c.cart_id == cart_id, LINES.c.product == product).values(
                quantity=cur.quantity + units, evidence=list(dict.fromkeys([*(cur.evidence or []), *evidence]))))

    def reassign(self, cart_id: str, shopper: str, *, actor: str, remote: str = "", comment: str = "") -> CartDetail:
        """Say the whole cart belongs to another shopper session (e.g. after a track swap)."""
        shopper = shopper.strip()
        if not shopper or len(shopper) > 128:
            raise CartActionError("give the shopper session the cart belongs to (1-128 characters)")
        with self.engine.begin() as conn:
            r = self._open_for_review(conn, cart_id)
            conn.execute(update(CARTS).where(CARTS.c.cart_id == cart_id).values(shopper=shopper, corrected=True))
            self._audit(conn, r, "reassign", actor, remote,
                        {"before": {"shopper": r.shopper, "sessions": list(r.sessions or [])}, "after": {"shopper": shopper}, "comment": comment})
        return self.get(cart_id)

    def accept(self, cart_id: str, *, actor: str, remote: str = "", comment: str = "") -> CartDetail:
        """Make the cart as it now stands the receipt; it leaves the queue."""
        now = self.clock()
        with self.engine.begin() as conn:
            r = self._open_for_review(conn, cart_id)
            totals = self._totals(conn, [cart_id]).get(cart_id, (0, 0))
            conn.execute(update(CARTS).where(CARTS.c.cart_id == cart_id).values(status="reviewed", reviewed_by=actor, reviewed_at=now))
            self._audit(conn, r, "accept", actor, remote, {"corrected": bool(r.corrected), "total_cents": totals[0], "comment": comment})
        return self.get(cart_id)


# --------------------------------------------------------------------------------------------
# Metrics, read from the database at scrape time (right after a restart, and on every replica)
# --------------------------------------------------------------------------------------------


class CartMetrics(Collector):
    """``shopfleet_controller_carts_total{shop,outcome}``, ``..._cart_review_queue{shop}``,
    ``..._cart_reviews_total{shop,result}`` and ``..._cart_review_accuracy{shop}``."""

    def __init__(self, store: CartStore) -> None:
        self.store = store

    def describe(self) -> list[Any]:
        """Return nothing, so registering does not query the database."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the cart metrics of every shop (one grouped query)."""
        try:
            stats = self.store.stats()
        except Exception as exc:  # a scrape must not fail because the database is briefly away
            log.warning("cart metrics unavailable: %s", exc)
            return
        carts = CounterMetricFamily("shopfleet_controller_carts", "Carts closed by the shops' fusion, by what fusion decided (receipt or review).", labels=["shop", "outcome"])
        queue = GaugeMetricFamily("shopfleet_controller_cart_review_queue", "Carts waiting for a reviewer.", labels=["shop"])
        reviews = CounterMetricFamily("shopfleet_controller_cart_reviews", "Reviewed carts, accepted unchanged or corrected.", labels=["shop", "result"])
        accuracy = GaugeMetricFamily("shopfleet_controller_cart_review_accuracy", "Share of reviewed carts accepted unchanged.", labels=["shop"])
        for s in stats:
            carts.add_metric([s.shop, "receipt"], s.receipts)
            carts.add_metric([s.shop, "review"], s.reviews)
            queue.add_metric([s.shop], s.in_queue)
            reviews.add_metric([s.shop, "unchanged"], s.reviewed_unchanged)
            reviews.add_metric([s.shop, "corrected"], s.reviewed_corrected)
            if s.accuracy is not None:
                accuracy.add_metric([s.shop], s.accuracy)
        yield from (carts, queue, reviews, accuracy)


def review_rates(store: CartStore, now: float, window_s: float) -> list[tuple[str, int, float]]:
    """Return ``(shop, carts, share sent to review)`` for carts received in the last ``window_s``."""
    return [(s.shop, s.receipts + s.reviews, s.reviews / (s.receipts + s.reviews))
            for s in store.stats(since=now - window_s) if s.receipts + s.reviews]
