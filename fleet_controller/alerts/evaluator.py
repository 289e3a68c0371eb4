"""Decide which alerts fire: a pure function of a registry snapshot, the rules and a little memory.

No I/O and no clock here: the worker builds a :class:`FleetSnapshot` from the database, passes
``now``, the keys that are firing now (for hysteresis) and ``pending`` (since when each
condition has held, for the "for Y minutes" rules), and gets back the alerts that fire and the
new ``pending``. That makes every rule a table test. The worker keeps ``pending`` in the
database, so a "for Y minutes" timer survives a controller restart.

Each :class:`Firing` carries its true start (``since``: when the condition began, e.g. when the
camera first fell below ``min_fps``, not when ``for_s`` ran out), a human summary (what, where in
words, the value), the raw text a node sent (``details``) and what to do (``runbook``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_controller.alerts import messages
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
    since: float | None = None  # when the node saw the condition begin (its first firing message)
    data: Mapping[str, Any] = field(default_factory=dict)


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
    since: float | None = None  # when the condition began; None: now
    details: str = ""  # raw text (a node's message with paths and OS errors), kept for debugging
    runbook: str = ""


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

    def book(rule: str) -> str:
        return messages.runbook(rule, rules.rule(rule).runbook)

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
                                     r.severity, f"node not heard from: {messages.where(n.shop, n.node)} silent for "
                                     f"{age / 60:.0f} min ({n.presence})", age, since=n.last_seen, runbook=book("node_offline")))

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
                # An alert still open (waiting out resolve_after_s) takes the condition back at once: a flap.
                if (key in active and fps < c.min_fps) or _held(key, fps < c.min_fps, now, c.for_s, pending, new_pending):
                    state = p.get("state")
                    what = f"camera pipeline {state}" if state in ("backoff", "failed", "stopped") else "camera slow"
                    firing.append(Firing(key, "camera_fps_low", n.shop, n.node, name, c.severity,
                                         f"{what}: {messages.where(n.shop, n.node, name)} at {fps:.1f} fps (needs {c.min_fps:g})",
                                         float(fps), since=new_pending.get(key), details=str(p.get("detail") or ""),
                                         runbook=book("camera_fps_low")))
        d = rules.disk_low
        total, free = n.facts.get("disk_total_bytes"), n.facts.get("disk_free_bytes")
        if d.enabled and total and free is not None:
            pct = 100.0 * free / total
            if pct < d.min_free_percent:
                key = alert_key("disk_low", n.shop, n.node)
                firing.append(Firing(key, "disk_low", n.shop, n.node, "", d.severity,
                                     f"disk almost full: {messages.where(n.shop, n.node)} has {pct:.1f}% free "
                                     f"(alerts below {d.min_free_percent:g}%)", pct, runbook=book("disk_low")))
        k = rules.clock_skew
        off = n.facts.get("clock_offset_s")
        if k.enabled and off is not None and abs(off) > k.max_abs_s:
            firing.append(Firing(alert_key("clock_skew", n.shop, n.node), "clock_skew", n.shop, n.node, "", k.severity,
                                 f"clock off: {messages.where(n.shop, n.node)} by {off:+.1f} s (limit {k.max_abs_s:g} s)",
                                 float(off), runbook=book("clock_skew")))

    f = rules.fridge_warm
    if f.enabled:
        for rd in snapshot.readings:
            if rd.name != f.reading:
                continue
            if f.source_contains not in rd.source and not any(f.source_contains in v for v in rd.labels.values()):
                continue
            key = alert_key("fridge_warm", rd.shop, rd.node, rd.source)
            since: float | None = None
            if key in active:  # hysteresis: a firing alert clears only below clear_below_c
                held = rd.value > f.clear_below_c
            else:
                held = _held(key, rd.value > f.max_c, now, f.for_s, pending, new_pending)
                since = new_pending.get(key)
            if held:
                firing.append(Firing(key, "fridge_warm", rd.shop, rd.node, rd.source, f.severity,
                                     f"fridge warm: {messages.where(rd.shop, rd.node, rd.source, rd.labels)} at "
                                     f"{rd.value:.1f} °C (limit {f.max_c:g} °C)", rd.value, since=since,
                                     runbook=book("fridge_warm")))

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
                rule = f"node:{a.name}"
                firing.append(Firing(alert_key(rule, a.shop, a.node, a.source), rule, a.shop, a.node, a.source,
                                     a.severity or "warning",
                                     messages.node_alert_summary(a.name, a.shop, a.node, a.source, a.message, a.data),
                                     since=a.since, details=a.message,
                                     runbook=messages.runbook(rule, rules.node_alerts.runbook)))

    return Evaluation(tuple(firing), new_pending)
