"""The typed values fusion takes in and gives out.

Inputs mirror what the two pipelines produce, as plain values (no import of either library):

- from vision: :class:`TrackObservation` (a confirmed track's position on the shop floor, in
  metres, with an optional appearance vector), :class:`TrackLost` (the tracker gave up on an id),
  :class:`DoorCrossing` (``person_entered`` / ``person_exited``) and :class:`ZoneVisit`
  (``zone_enter`` / ``zone_exit`` / ``dwell``, used to check the zone names agree);
- from the shelf boards: :class:`ShelfChange` (``shelf_change``: slot, product, signed quantity,
  weight delta, confidence, time), :class:`DoorContact` (``door_opened`` / ``door_closed``),
  :class:`BoardLink` (a board went offline or came back) and :class:`ShelfUnsettled` (a slot's
  weight has not settled for a long time).

Outputs: :class:`Line`, :class:`Reason` and :class:`CartResult`, whose ``to_event()`` is the
wire shape (a JSON-ready dict) of a receipt or a review request.

Each value checks itself on construction, so a bad value fails where it is made with a message
naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


def _finite(name: str, *values: float) -> None:
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{name}: {v} is not a finite number")


@dataclass(frozen=True)
class TrackObservation:
    """One confirmed track seen in one frame: shop-floor position (m), optional appearance and box.

    ``box`` is the person detection the track matched in this frame, on the floor in metres
    ``(x_min, y_min, x_max, y_max)`` (None when the track was not matched, or the camera does not
    send boxes). Seen from the ceiling, a shopper's box stretches over the slot their hand is in:
    fusion reads that as reach evidence (docs/fusion.md, "Attribution").
    """

    track_id: int
    ts: float
    x: float
    y: float
    appearance: tuple[float, ...] | None = None
    camera: str = "camera"
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        _finite("TrackObservation ts/x/y", self.ts, self.x, self.y)
        if self.appearance is not None and (not self.appearance or not all(math.isfinite(a) for a in self.appearance)):
            raise ValueError("TrackObservation: appearance must be a non-empty vector of finite numbers or None")
        if self.box is not None:
            if len(self.box) != 4:
                raise ValueError(f"TrackObservation: box must be (x_min, y_min, x_max, y_max), got {len(self.box)} numbers")
            _finite("TrackObservation box", *self.box)
            if self.box[0] > self.box[2] or self.box[1] > self.box[3]:
                raise ValueError(f"TrackObservation: box {self.box} has a minimum above its maximum")


@dataclass(frozen=True)
class TrackLost:
    """The tracker ended a track id (it will never be reused)."""

    track_id: int
    ts: float
    camera: str = "camera"


@dataclass(frozen=True)
class DoorCrossing:
    """A track crossed the door line: ``in`` (person_entered) or ``out`` (person_exited)."""

    track_id: int
    ts: float
    direction: Literal["in", "out"]
    camera: str = "camera"

    def __post_init__(self) -> None:
        if self.direction not in ("in", "out"):
            raise ValueError(f"DoorCrossing: direction {self.direction!r} must be 'in' or 'out'")


@dataclass(frozen=True)
class ZoneVisit:
    """A vision zone event for a track; fusion checks the zone is one of the layout's shelves."""

    track_id: int
    ts: float
    zone: str
    kind: Literal["zone_enter", "zone_exit", "dwell"] = "zone_enter"


@dataclass(frozen=True)
class DoorContact:
    """The door contact opened or closed (a board's door channel)."""

    ts: float
    open: bool
    board: str = ""


@dataclass(frozen=True)
class ShelfChange:
    """A settled weight change on a slot: quantity < 0 is a pick, > 0 a put-back.

    ``ts`` is when the weight settled (after the hand left), not when the hand reached in; fusion
    looks back by its ``settle_delay_s`` to find who was there. ``id`` is the evidence id written
    on receipt lines.
    """

    id: str
    board: str
    channel: int
    slot: str
    product: str
    quantity: int
    delta_g: float
    confidence: float
    ts: float

    def __post_init__(self) -> None:
        _finite("ShelfChange ts/delta_g", self.ts, self.delta_g)
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"ShelfChange {self.id}: confidence {self.confidence} outside 0..1")


@dataclass(frozen=True)
class ShelfUnsettled:
    """A slot's weight has not settled since ``since``: a change there cannot be counted."""

    board: str
    channel: int
    since: float
    ts: float


@dataclass(frozen=True)
class BoardLink:
    """A shelf board went offline (``connected=False``) or came back; its slots are blind meanwhile."""

    board: str
    connected: bool
    ts: float


FusionInput = TrackObservation | TrackLost | DoorCrossing | ZoneVisit | DoorContact | ShelfChange | ShelfUnsettled | BoardLink


# -- outputs ---------------------------------------------------------------------------------

REASONS: dict[str, str] = {
    "contested": "two or more shoppers were at the shelf when the weight changed; the line went to the likeliest",
    "wrong-slot": "an item was put back on another product's slot; it was taken off the cart by its weight",
    "nobody-near": "a weight changed while no tracked shopper was near, and this shopper's track was lost then",
    "quantity-uncertain": "the weight change is not a clear whole number of units",
    "unexplained-put-back": "a put-back of something this cart does not hold",
    "low-confidence": "the cart's confidence is below the configured bar",
    "unknown-slot": "a shelf change came from a slot the layout does not know while this shopper was inside",
    "planogram-mismatch": "the board's planogram names another product for this slot than the layout",
    "weight-unsettled": "a slot this shopper was at never settled, so a pick there may be missing",
    "board-offline": "a shelf board this shopper was near was offline, so a pick there may be missing",
    "stale-change": "a shelf change arrived too late to know who was near; a pick may be missing",
    "track-swap": "this shopper's track was found to carry another shopper's appearance (no longer raised: a swap re-attributes the changes since it)",
    "exit-unseen": "the shopper's track was lost near the door and never seen leaving",
    "entry-unseen": "a person nobody saw come in was found walking inside and joined to the cart of the last people in",
    "never-left": "the session was still open when the run ended",
}
"""Every reason a cart can carry, with what it means (also in docs/fusion.md)."""


@dataclass(frozen=True)
class Reason:
    """Why a cart or a line needs a human: a code from :data:`REASONS` and a detail."""

    code: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.code not in REASONS:
            raise ValueError(f"Reason: unknown code {self.code!r}; known: {sorted(REASONS)}")

    def to_dict(self) -> dict[str, str]:
        """Return the reason as a JSON-ready dict."""
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Line:
    """One product on a cart: units, unit price (cents), confidence and the evidence behind it."""

    product: str
    quantity: int
    unit_price_cents: int
    confidence: float
    evidence: tuple[str, ...] = ()

    @property
    def amount_cents(self) -> int:
        """Return quantity times unit price."""
        return self.quantity * self.unit_price_cents

    def to_dict(self) -> dict[str, Any]:
        """Return the line as a JSON-ready dict."""
        return {
            "product": self.product,
            "quantity": self.quantity,
            "unit_price_cents": self.unit_price_cents,
            "amount_cents": self.amount_cents,
            "confidence": round(self.confidence, 4),
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class Attribution:
    """How one shelf change was attributed: to which cart, with what probability, and who else was near."""

    change_id: str
    slot: str
    product: str
    quantity: int
    ts: float
    cart_id: str | None
    probability: float
    candidates: tuple[tuple[str, float, float], ...] = ()  # (session id, probability, nearest distance m)
    reasons: tuple[Reason, ...] = ()
    margin: float = 0.0  # evidence for the chosen cart over every other cart and nobody: log(score / (others + nobody))
    margin_others: float = 0.0  # evidence against the other shoppers alone: log(score / (others + others_floor))
    margin_nobody: float = 0.0  # evidence against nobody (a hand nobody saw): log(score / nobody_score)
    sparse: float = 0.0  # frames the camera missed per nominal frame at the time (0 at its nominal rate)
    reach: tuple[tuple[str, str, float], ...] = ()  # (session id, 'reached' / 'not-reached' / 'unseen', nearest distance m): its box over the slot around the change

    def to_dict(self) -> dict[str, Any]:
        """Return the attribution as a JSON-ready dict (the evidence a reviewer sees for a line)."""
        return {
            "change_id": self.change_id,
            "slot": self.slot,
            "product": self.product,
            "quantity": self.quantity,
            "ts": round(self.ts, 3),
            "cart_id": self.cart_id,
            "probability": round(self.probability, 4),
            "candidates": [{"session": s, "probability": round(p, 4), "distance_m": round(d, 3)} for s, p, d in self.candidates],
            "reasons": [r.to_dict() for r in self.reasons],
            "margin": round(self.margin, 3),
            "margin_others": round(self.margin_others, 3),
            "margin_nobody": round(self.margin_nobody, 3),
            "sparse": round(self.sparse, 3),
            "reach": {sid: r for sid, r, _ in self.reach},
        }


@dataclass(frozen=True)
class CartResult:
    """A closed cart: accepted (it is the receipt) or sent to review, with why."""

    cart_id: str
    shop: str
    sessions: tuple[str, ...]
    tracks: tuple[int, ...]
    opened_at: float
    closed_at: float
    lines: tuple[Line, ...]
    confidence: float
    reasons: tuple[Reason, ...]
    status: Literal["accepted", "review"]
    attributions: tuple[Attribution, ...] = field(default=())
    # (track id, from, until): when each track followed this cart's shoppers (an id swap splits a
    # track between two carts). Not on the wire; for scoring against ground truth and debugging.
    spans: tuple[tuple[int, float, float], ...] = field(default=())

    @property
    def total_cents(self) -> int:
        """Return the sum of the line amounts."""
        return sum(line.amount_cents for line in self.lines)

    @property
    def evidence(self) -> tuple[str, ...]:
        """Return every shelf-change id the cart's lines rest on."""
        return tuple(dict.fromkeys(e for line in self.lines for e in line.evidence))

    def items(self) -> dict[str, int]:
        """Return product -> quantity (lines with a positive quantity)."""
        return {line.product: line.quantity for line in self.lines if line.quantity > 0}

    def to_event(self) -> dict[str, Any]:
        """Return the wire event: ``cart_receipt`` when accepted, ``cart_review`` otherwise.

        Plain JSON types only, so it goes through the outbox like any other event; ``cart_id`` is
        the idempotency key (a cart is closed exactly once).
        """
        body: dict[str, Any] = {
            "type": "cart_receipt" if self.status == "accepted" else "cart_review",
            "cart_id": self.cart_id,
            "shop": self.shop,
            "sessions": list(self.sessions),
            "tracks": list(self.tracks),
            "opened_at": round(self.opened_at, 3),
            "closed_at": round(self.closed_at, 3),
            "lines": [line.to_dict() for line in self.lines],
            "total_cents": self.total_cents,
            "confidence": round(self.confidence, 4),
            "evidence": list(self.evidence),
        }
        if self.status == "review":
            body["reasons"] = [r.to_dict() for r in self.reasons]
            body["attributions"] = [a.to_dict() for a in self.attributions]
        return body
