"""Health gates and maintenance windows: pure decisions over what shops reported.

The executor reads the registry (nodes' latest heartbeats, latest readings, reported state) into
the plain values below and asks these functions; they never touch the database or the clock, so
every threshold is tested as a table. A verdict is ``pass``, ``fail`` (with the gate that failed,
a stable label for ``shopfleet_rollout_gate_failures_total``) or ``wait`` (not enough fresh
evidence yet: heartbeats sent before the apply say nothing about the new release).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet_controller.rollout.policy import Gates, Windows

log = logging.getLogger(__name__)

GATE_NAMES = ("nodes_online", "pipeline_state", "fps", "error_rate", "metric")


@dataclass(frozen=True)
class NodeHealth:
    """A node's latest state as the registry holds it."""

    node: str
    presence: str
    facts_at: float | None
    pipelines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadingValue:
    """A latest reading of a shop: name, value, when the controller received it."""

    name: str
    value: float
    received_at: float


@dataclass(frozen=True)
class GateVerdict:
    """Outcome of the gates: ``state`` pass/fail/wait, the failing ``gate`` and a human ``reason``.

    On a failure, ``value`` and ``threshold`` are the measured number and the limit it crossed
    (``None`` for a gate that is not a number, such as a failed pipeline): the rollout keeps them.
    """

    state: Literal["pass", "fail", "wait"]
    gate: str = ""
    reason: str = ""
    baseline: Mapping[str, float] = field(default_factory=dict)
    value: float | None = None
    threshold: float | None = None


def _errors(nodes: Sequence[NodeHealth]) -> float:
    return float(sum(int(p.get("errors") or 0) for n in nodes for p in n.pipelines.values()))


def evaluate_gates(gates: Gates, nodes: Sequence[NodeHealth], applied_at: float, baseline: Mapping[str, float], now: float) -> GateVerdict:
    """Judge a shop's health since ``applied_at``; ``baseline`` carries the error count of its first fresh heartbeat."""
    if not nodes:
        return GateVerdict("wait", reason="no node of this shop is known yet")
    online = [n for n in nodes if n.presence == "online"]
    if len(online) / len(nodes) < gates.min_nodes_online:
        why = f"{len(online)} of {len(nodes)} nodes online, need {gates.min_nodes_online:.0%}"
        since = baseline.get("offline_since", now)
        if now - since >= gates.offline_grace_s:
            return GateVerdict("fail", "nodes_online", f"{why} for {now - since:.0f}s",
                               value=len(online) / len(nodes), threshold=gates.min_nodes_online)
        return GateVerdict("wait", reason=why, baseline={**baseline, "offline_since": since})
    baseline = {k: v for k, v in baseline.items() if k != "offline_since"}
    fresh = [n for n in online if n.facts_at is not None and n.facts_at >= applied_at]
    if len(fresh) < len(online):
        return GateVerdict("wait", reason=f"{len(fresh)} of {len(online)} online nodes sent a heartbeat since the apply", baseline=baseline)
    for n in fresh:
        for name, p in n.pipelines.items():
            if p.get("state") in ("failed", "backoff"):
                return GateVerdict("fail", "pipeline_state", f"{n.node}/{name} is {p.get('state')}: {p.get('detail', '')}".rstrip(": "))
            fps = p.get("fps")
            if gates.min_fps is not None and p.get("kind") == "vision" and p.get("state") == "running" and fps is not None and fps < gates.min_fps:
                return GateVerdict("fail", "fps", f"{n.node}/{name} runs at {fps:.1f} fps, below {gates.min_fps}",
                                   value=float(fps), threshold=gates.min_fps)
        for g in gates.metrics:
            value = n.metrics.get(g.metric)
            if value is None:
                continue
            if g.max is not None and value > g.max:
                return GateVerdict("fail", "metric", f"{n.node} reports {g.metric}={value:g}, above {g.max:g}", value=value, threshold=g.max)
            if g.min is not None and value < g.min:
                return GateVerdict("fail", "metric", f"{n.node} reports {g.metric}={value:g}, below {g.min:g}", value=value, threshold=g.min)
    errors = _errors(fresh)
    if "errors" not in baseline:
        return GateVerdict("pass", baseline={"errors": errors, "at": now})
    if gates.max_errors_per_minute is not None:
        minutes = max((now - baseline["at"]) / 60.0, 1e-9)
        added = errors - baseline["errors"]
        if added > 0 and now > baseline["at"] and added / minutes > gates.max_errors_per_minute:
            return GateVerdict("fail", "error_rate", f"{added:g} pipeline errors in {minutes * 60:.0f}s ({added / minutes:.1f}/min), limit {gates.max_errors_per_minute:g}/min", baseline,
                               value=added / minutes, threshold=gates.max_errors_per_minute)
    return GateVerdict("pass", baseline=baseline)


def local_time(now: float, tz: str) -> datetime:
    """Return ``now`` in time zone ``tz`` (UTC if the zone is unknown, logged)."""
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown time zone %r, using UTC for maintenance windows", tz)
        zone = ZoneInfo("UTC")
    return datetime.fromtimestamp(now, zone)


def window_open(windows: Windows, tz: str, readings: Sequence[ReadingValue], now: float) -> tuple[bool, str]:
    """Return (open, why): inside any local window, or idle by telemetry; no window configured = open."""
    if not windows.local and windows.idle is None:
        return True, "no window configured"
    if windows.local:
        t = local_time(now, tz).time()
        for w in windows.local:
            if w.contains(t):
                return True, f"local time {t:%H:%M} in {w.start}-{w.end}"
    rule = windows.idle
    if rule is not None:
        recent = [r for r in readings if now - r.received_at <= rule.max_age_s]
        occ = [r.value for r in recent if r.name == rule.occupancy_reading]
        door = [r.value for r in recent if r.name == rule.door_reading]
        if occ and door and all(v == 0 for v in occ) and all(v == 0 for v in door):
            return True, "idle: nobody inside, door closed"
        if not occ or not door:
            return False, f"no recent {rule.occupancy_reading}/{rule.door_reading} readings"
        return False, "shop in use"
    return False, f"outside local windows {', '.join(f'{w.start}-{w.end}' for w in windows.local)}"
