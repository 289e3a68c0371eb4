"""Score carts against the ground truth: exact carts, line precision and recall, review, wrong accepts.

Each produced cart is matched to the true cart its tracks followed (by detection votes, see
``fusion.sim``). When several produced carts claim one true cart (a shopper split in two) the one
with the most lines keeps it and the others are compared with an empty cart; a cart of nobody
(a ghost) is compared with an empty cart. A true cart with items that no produced cart claimed is
a *missed* cart: it counts as a cart that is wrong and was not sent to review, because that is
what it costs the shop.

- ``exact_cart_rate``: exact carts among the auto-accepted ones;
- ``line_precision`` / ``line_recall``: units on produced carts that are right / true units found,
  over every cart (reviewed ones as proposed, before a human fixes them);
- ``review_rate``: carts sent to review over all carts;
- ``wrong_accepted_rate``: carts accepted but wrong, plus missed carts, over all carts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fusion.sim import RunResult


@dataclass(frozen=True)
class CartScore:
    """One cart compared with its truth."""

    cart_id: str
    truth_id: str | None
    status: str
    exact: bool
    predicted: dict[str, int]
    true: dict[str, int]
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"cart": self.cart_id, "truth": self.truth_id, "status": self.status, "exact": self.exact, "predicted": self.predicted, "true": self.true, "reasons": list(self.reasons)}


def score_run(result: RunResult) -> list[CartScore]:
    """Return one score per produced cart, plus one per missed true cart (status 'missed')."""
    claimed: dict[str, str] = {}
    for c in sorted(result.carts, key=lambda c: -len(c.lines)):
        t = result.cart_truth.get(c.cart_id)
        if t is not None and t not in claimed:
            claimed[t] = c.cart_id
    out = []
    for c in result.carts:
        t = result.cart_truth.get(c.cart_id)
        true = result.truth.get(t, Counter()) if t is not None and claimed.get(t) == c.cart_id else Counter()
        pred = c.items()
        out.append(CartScore(c.cart_id, t, c.status, Counter(pred) == Counter(true), dict(pred), dict(true), tuple(r.code for r in c.reasons)))
    for t, items in result.truth.items():
        if t not in claimed and items:
            out.append(CartScore(f"missed:{t}", t, "missed", False, {}, dict(items), ()))
    return out


def summarize(scores: list[CartScore]) -> dict[str, Any]:
    """Return the summary figures over any number of scored carts."""
    carts = len(scores)
    accepted = [s for s in scores if s.status == "accepted"]
    review = [s for s in scores if s.status == "review"]
    wrong_accepted = [s for s in scores if (s.status == "accepted" and not s.exact) or s.status == "missed"]
    tp = sum(min(q, s.true.get(p, 0)) for s in scores for p, q in s.predicted.items())
    pred = sum(sum(s.predicted.values()) for s in scores)
    true = sum(sum(s.true.values()) for s in scores)
    reasons: Counter[str] = Counter(r for s in review for r in set(s.reasons))

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None  # nothing to measure: null, not a flattering 1.0

    return {
        "carts": carts,
        "accepted": len(accepted),
        "reviewed": len(review),
        "missed": sum(s.status == "missed" for s in scores),
        "exact_cart_rate": ratio(sum(s.exact for s in accepted), len(accepted)),
        "line_precision": ratio(tp, pred),
        "line_recall": ratio(tp, true),
        "review_rate": ratio(len(review), carts),
        "wrong_accepted": len(wrong_accepted),
        "wrong_accepted_rate": ratio(len(wrong_accepted), carts),
        "reviewed_exact": sum(s.exact for s in review),
        "review_reasons": dict(sorted(reasons.items())),
    }
