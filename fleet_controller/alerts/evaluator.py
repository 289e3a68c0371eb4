"""Decide which alerts fire: a pure function of a registry snapshot, the rules and a little memory.

No I/O and no clock here: the worker builds a :class:`FleetSnapshot` from the database, passes
``now``, the keys that are firing now (for hysteresis) and ``pending`` (since when each
condition has held, for the "for Y minutes" rules), and gets back the alerts that fire and the
new ``pending``. That makes every rule a table test, and a restart costs only the pending
timers (a condition waits its ``for_s`` once more).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_controller.alerts.rules import AlertRules


@dataclass(frozen=True)
class NodeSnapshot:
    """What the evaluator needs of a node: presence, facts and pipelines as last reported."""

    shop: str
    node: str
    presence: str  # online | stale | offline | unknown
    last_seen: float | None
    facts: Mapping[str, Any] = field(default_factory=dict)
    pipelines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadingSnapshot:
    """The latest value of one sensor reading."""

    shop: str
    node: str
    source: str
    name: str
    value: float
    ts: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeRaised:
    """The latest state of an alert a node raised itself."""

    shop: str
    node: str
    name: str
    source: str
    state: str  # firing | resolved
    severity: str
    message: str


@dataclass(frozen=True)
class ShopCarts:
    """A shop's carts in the review-rate window: how many, and the share sent to review."""

    shop: str
    carts: int
    review_rate: float


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything the rules look at, read from the registry in one go."""

    nodes: tuple[NodeSnapshot, ...] = ()
    readings: tuple[ReadingSnapshot, ...] = ()
    node_alerts: tuple[NodeRaised, ...] = ()
    carts: tuple[ShopCarts, ...] = ()


@dataclass(frozen=True)
class Firing:
    """An alert whose condition holds now; ``key`` deduplicates it."""

    key: str
    rule: str
    shop: str
    node: str
    source: str
    severity: str
    summary: str
    value: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """Result of one evaluation: what fires, and the pending timers to pass next time."""

    firing: tuple[Firing, ...]
    pending: dict[str, float]


def alert_key(rule: str, shop: str, node: str = "", source: str = "") -> str:
    """Return the dedupe key of an alert."""
    return "/".join((rule, shop, node, source))


def _held(key: str, cond: bool, now: float, for_s: float, pending: Mapping[str, float], out: dict[str, float]) -> bool:
    """Track since when ``cond`` holds under ``key``; return whether it has held ``for_s``."""
    if not cond:
        return False
    since = pending.get(key, now)
    out[key] = since
    return now - since >= for_s


def evaluate(snapshot: FleetSnapshot, rules: AlertRules, now: float, active: frozenset[str] = frozenset(),
             pending: Mapping[str, float] | None = None) -> Evaluation:
    """Return the alerts that fire at ``now`` and the pending timers for the next evaluation."""
    pending = pending or {}
    new_pending: dict[str, float] = {}
    firing: list[Firing] = []

    r = rules.node_offline
    offline_nodes: set[tuple[str, str]] = set()
    for n in snapshot.nodes:
        if n.presence == "online" or n.last_seen is None:
            continue
        age = now - n.last_seen
        if age >= r.after_s:
            offline_nodes.add((n.shop, n.node))
            if r.enabled:
                firing.append(Firing(alert_key("node_offline", n.shop, n.node), "node_offline", n.shop, n.node, "",
                                     r.severity, f"node {n.node} of {n.shop} not seen for {age / 60:.0f} min ({n.presence})", age))

    for n in snapshot.nodes:
        if (n.shop, n.node) in offline_nodes or n.presence == "offline":
            continue  # one alert for a dead node, not one per symptom
        c = rules.camera_fps_low
        if c.enabled:
            for name, p in sorted(n.pipelines.items()):
                if p.get("kind") != c.pipeline_kind:
                    continue
                fps = 0.0 if p.get("state") in ("backoff", "failed", "stopped") else p.get("fps")
                if fps is None:
                    continue
                key = alert_key("camera_fps_low", n.shop, n.node, name)
                if _held(key, fps < c.min_fps, now, c.for_s, pending, new_pending):
                    firing.append(Firing(key, "camera_fps_low", n.shop, n.node, name, c.severity,
                                         f"camera {name} on {n.node} at {fps:.1f} fps (< {c.min_fps:g})", float(fps)))
        d = rules.disk_low
        total, free = n.facts.get("disk_total_bytes"), n.facts.get("disk_free_bytes")
        if d.enabled and total and free is not None:
            pct = 100.0 * free / total
            if pct < d.min_free_percent:
                key = alert_key("disk_low", n.shop, n.node)
                firing.append(Firing(key, "disk_low", n.shop, n.node, "", d.severity,
                                     f"disk on {n.node} {pct:.1f}% free (< {d.min_free_percent:g}%)", pct))
        k = rules.clock_skew
        off = n.facts.get("clock_offset_s")
        if k.enabled and off is not None and abs(off) > k.max_abs_s:
            firing.append(Firing(alert_key("clock_skew", n.shop, n.node), "clock_skew", n.shop, n.node, "", k.severity,
                                 f"clock of {n.node} off by {off:+.1f} s (> {k.max_abs_s:g} s)", float(off)))

    f = rules.fridge_warm
    if f.enabled:
        for rd in snapshot.readings:
            if rd.name != f.reading:
                continue
            if f.source_contains not in rd.source and not any(f.source_contains in v for v in rd.labels.values()):
                continue
            key = alert_key("fridge_warm", rd.shop, rd.node, rd.source)
            if key in active:  # hysteresis: a firing alert clears only below clear_below_c
                held = rd.value > f.clear_below_c
            else:
                held = _held(key, rd.value > f.max_c, now, f.for_s, pending, new_pending)
            if held:
                firing.append(Firing(key, "fridge_warm", rd.shop, rd.node, rd.source, f.severity,
                                     f"{rd.source} at {rd.value:.1f} °C (> {f.max_c:g} °C)", rd.value))

    cr = rules.cart_review_rate_high
    if cr.enabled:
        for sc in snapshot.carts:
            if sc.carts >= cr.min_carts and sc.review_rate > cr.max_rate:
                firing.append(Firing(alert_key("cart_review_rate_high", sc.shop), "cart_review_rate_high", sc.shop, "", "",
                                     cr.severity, f"{sc.review_rate:.0%} of {sc.carts} carts of {sc.shop} went to review "
                                     f"(> {cr.max_rate:.0%})", sc.review_rate))

    if rules.node_alerts.enabled:
        for a in snapshot.node_alerts:
            if a.state == "firing":
                firing.append(Firing(alert_key(f"node:{a.name}", a.shop, a.node, a.source), f"node:{a.name}", a.shop,
                                     a.node, a.source, a.severity or "warning", a.message or a.name))

    return Evaluation(tuple(firing), new_pending)
