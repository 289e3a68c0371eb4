"""The fleet table: one row per shop with health, state, nodes, cameras, rollout, alerts, occupancy, release, last seen.

Two steps. :func:`load_summaries` reads one summary per shop with a few fleet-wide reads
(shops, nodes by presence, node pipelines, occupancy and fridge readings, and reported release
from the registry's read models, firing alerts from the alert store, each shop's place in the
newest rollout from the rollout store); :func:`shop_health` turns what a shop reports into one
health level with the reasons (a shop running at 2 fps is not "online and fine"); :func:`select_page`
filters, sorts and paginates them in Python, as a pure function. Measured at 5,000 shops this is
several times faster than one SQL statement joining the aggregates (SQLite cannot index the
joined subqueries, and the state counts and facets need the whole filtered set anyway), and it
keeps the rules for "state" and "needs someone first" in one readable place.
:class:`FleetQuery` is the parsed, validated query string shared by the page and the JSON API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet_controller.alerts import store as alert_store
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.registry.read import NodeState, RegistryReader
from fleet_controller.rollout.store import latest_rollout_shops

SHOP_STATES = ("online", "stale", "offline", "unknown")
HEALTH_LEVELS = ("bad", "warn", "unknown", "ok")
"""Worst first: ``bad`` (red) needs someone now, ``warn`` (amber) soon, ``unknown`` has no node yet."""
SORT_KEYS = ("health", "id", "name", "region", "state", "alerts", "occupancy", "release", "last_seen")


class FleetQuery(BaseModel):
    """Filters, sort and page of the fleet table (from the query string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    q: str = Field("", max_length=100, description="Substring of shop id or name.")
    region: str = Field("", max_length=100, description="Only shops of this region.")
    state: Literal["", "online", "stale", "offline", "unknown"] = Field("", description="Only shops in this state.")
    release: str = Field("", max_length=128, description="Only shops running this release.")
    alerting: bool = Field(False, description="Only shops with firing alerts.")
    health: Literal["", "bad", "warn", "unknown", "ok"] = Field("", description="Only shops at this health level.")
    sort: Literal["health", "id", "name", "region", "state", "alerts", "occupancy", "release", "last_seen"] = Field(
        "health", description="Column to sort by; 'health' (and 'state') put shops that need someone first.")
    group: Literal["", "region"] = Field("", description="Group the rows by region (each group sorted by 'sort').")
    desc: bool = Field(False, description="Sort descending.")
    page: int = Field(1, ge=1, le=100_000, description="Page number, from 1.")
    per_page: int = Field(50, ge=1, le=500, description="Rows per page.")


@dataclass(frozen=True)
class FleetPage:
    """One page of the fleet table plus what the filter controls need."""

    rows: list[dict[str, Any]]
    total: int
    query: FleetQuery
    state_counts: dict[str, int]
    regions: list[str]
    releases: list[str]
    health_counts: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    nodes_online: int = 0

    @property
    def pages(self) -> int:
        """Return the number of pages."""
        return max(1, -(-self.total // self.query.per_page))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"rows": self.rows, "total": self.total, "page": self.query.page, "per_page": self.query.per_page,
                "pages": self.pages, "state_counts": self.state_counts, "regions": self.regions, "releases": self.releases,
                "health_counts": self.health_counts, "nodes": self.nodes, "nodes_online": self.nodes_online}


def shop_state(nodes: int, online: int, stale: int) -> str:
    """Return a shop's state from its node counts: online (all), offline (none up), stale (some), unknown (no nodes)."""
    if nodes == 0:
        return "unknown"
    if online == nodes:
        return "online"
    if online == 0 and stale == 0:
        return "offline"
    return "stale"


_RANK = {"offline": 0, "stale": 1, "unknown": 2, "online": 3}
_HEALTH_RANK = {h: i for i, h in enumerate(HEALTH_LEVELS)}


def camera_summary(nodes: list[NodeState], rules: AlertRules) -> dict[str, Any]:
    """Return a shop's cameras (vision pipelines): how many, and each degraded one with why (pure)."""
    kind, min_fps = rules.camera_fps_low.pipeline_kind, rules.camera_fps_low.min_fps
    total, degraded, sensors_down = 0, [], []
    for n in nodes:
        if n.presence != "online":
            continue  # an offline node's last heartbeat is history; the node's state says enough
        for name, p in sorted(n.pipelines.items()):
            state, fps = p.get("state"), p.get("fps")
            if p.get("kind") == kind:
                total += 1
                if state != "running":
                    degraded.append({"camera": f"{n.node}/{name}", "why": f"{state or 'not running'}", "bad": True})
                elif fps is not None and fps < min_fps:
                    degraded.append({"camera": f"{n.node}/{name}", "why": f"{fps:.1f} fps < {min_fps:g}", "bad": False})
            elif state is not None and state != "running":
                sensors_down.append(f"{n.node}/{name} {state}")
    return {"total": total, "degraded": degraded, "sensors_down": sensors_down}


def shop_health(state: str, cameras: dict[str, Any], fridges_warm: list[str], alerts: dict[str, int],
                rollout: dict[str, Any] | None) -> tuple[str, list[str]]:
    """Return a shop's health level (bad, warn, unknown, ok) and the reasons, worst first (pure).

    Red (bad): every node offline, a camera not running, a warm fridge, a critical alert, or the
    shop failed its last rollout. Amber (warn): some nodes down, a camera below its fps, a sensor
    pipeline not running, any other firing alert. The state alone is never the whole story.
    """
    bad: list[str] = []
    warn: list[str] = []
    if state == "offline":
        bad.append("all nodes offline")
    elif state == "stale":
        warn.append("some nodes not reporting")
    for c in cameras.get("degraded", []):
        (bad if c["bad"] else warn).append(f"camera {c['camera']}: {c['why']}")
    warn += [f"sensor {s}" for s in cameras.get("sensors_down", [])]
    bad += [f"fridge {f} warm" for f in fridges_warm]
    if alerts.get("critical"):
        bad.append(f"{alerts['critical']} critical alert{'s' if alerts['critical'] > 1 else ''}")
    others = sum(v for k, v in alerts.items() if k != "critical")
    if others:
        warn.append(f"{others} alert{'s' if others > 1 else ''}")
    if rollout and rollout.get("failure"):
        f = rollout["failure"]
        bad.append(f"rollout #{rollout['rollout']} failed: gate {f['gate']}")
    if bad:
        return "bad", bad + warn
    if warn:
        return "warn", warn
    return ("unknown", ["no node has reported"]) if state == "unknown" else ("ok", [])


def load_summaries(reader: RegistryReader, rules: AlertRules | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """Read one summary row per shop with a handful of fleet-wide reads (each one index or table scan)."""
    rules = rules or AlertRules()
    now = time.time() if now is None else now
    shops = reader.shops()
    nodes = reader.shop_node_counts()
    occupancy = reader.max_reading_by_shop("occupancy")
    alerts = alert_store.firing_counts(reader.engine)
    severities: dict[str, dict[str, int]] = {}
    for a in alert_store.list_alerts(reader.engine, now, state="firing", limit=100_000):
        sev = severities.setdefault(a.shop, {})
        sev[a.severity] = sev.get(a.severity, 0) + 1
    reported = reader.reported_releases()
    states: dict[str, list[NodeState]] = {}
    for ns in reader.node_states():
        states.setdefault(ns.shop, []).append(ns)
    fr = rules.fridge_warm
    warm: dict[str, list[str]] = {}
    for r in reader.readings(names=[fr.reading]):
        is_fridge = fr.source_contains in r.source or any(fr.source_contains in v for v in (r.labels or {}).values())
        if is_fridge and r.value > fr.max_c:
            # Named as the shop page names it: its fridge label, the thermometer's wiring only when it has none.
            name = (r.labels or {}).get("fridge") or r.source
            warm.setdefault(r.shop, []).append(f"{name} {r.value:.1f} °C")
    rollouts = latest_rollout_shops(reader.engine)
    rows = []
    for shop in shops:
        n = nodes.get(shop.id)
        total, online, stale = (n.nodes, n.online, n.stale) if n else (0, 0, 0)
        state = shop_state(total, online, stale)
        cams = camera_summary(states.get(shop.id, []), rules)
        rollout = rollouts.get(shop.id)
        health, reasons = shop_health(state, cams, warm.get(shop.id, []), severities.get(shop.id, {}), rollout)
        rows.append({
            "id": shop.id, "name": shop.name, "region": shop.region, "state": state,
            "nodes": total, "online": online, "stale": stale, "alerts": alerts.get(shop.id, 0),
            "occupancy": occupancy.get(shop.id), "release": reported.get(shop.id) or (n.release if n else None) or "",
            "last_seen": n.last_seen if n else None, "health": health, "health_reasons": reasons,
            "cameras": cams["total"], "cameras_degraded": len(cams["degraded"]),
            "rollout": ({"id": rollout["rollout"], "state": rollout["state"], "release": rollout["release"],
                         "failure": rollout["failure"]} if rollout else None),
        })
    return rows


def select_page(rows: list[dict[str, Any]], query: FleetQuery) -> FleetPage:
    """Filter, sort and cut one page out of the shop summaries (pure)."""
    q = query.q.lower()
    base = [
        r for r in rows
        if (not q or q in r["id"].lower() or q in (r["name"] or "").lower())
        and (not query.region or r["region"] == query.region)
        and (not query.release or r["release"] == query.release)
        and (not query.alerting or r["alerts"] > 0)
    ]
    counts = {s: 0 for s in SHOP_STATES}
    health_counts = {h: 0 for h in HEALTH_LEVELS}
    for r in base:
        counts[r["state"]] += 1
        health_counts[r.get("health", "unknown")] += 1
    matched = [r for r in base if r["state"] == query.state] if query.state else base
    if query.health:
        matched = [r for r in matched if r.get("health") == query.health]
    matched.sort(key=lambda r: r["id"])  # final tie-break; sorts below are stable
    if query.sort == "health":
        matched.sort(key=lambda r: (_HEALTH_RANK[r.get("health", "unknown")], -len(r.get("health_reasons", ())),
                                    _RANK[r["state"]], -r["alerts"]), reverse=query.desc)
    elif query.sort == "state":
        matched.sort(key=lambda r: (_RANK[r["state"]], -r["alerts"]), reverse=query.desc)
    elif query.sort in ("last_seen", "occupancy"):
        present = [r for r in matched if r[query.sort] is not None]
        present.sort(key=lambda r: r[query.sort], reverse=query.desc)
        matched = present + [r for r in matched if r[query.sort] is None]  # unknown last, either way
    elif query.sort != "id" or query.desc:
        matched.sort(key=lambda r: r[query.sort] or "" if query.sort != "alerts" else r["alerts"], reverse=query.desc)
    if query.group == "region":
        matched.sort(key=lambda r: r["region"] or "\uffff")  # stable: each region keeps the order above; no region last
    start = (query.page - 1) * query.per_page
    return FleetPage(
        [dict(r) for r in matched[start:start + query.per_page]], len(matched), query, counts,
        sorted({r["region"] for r in rows if r["region"]}), sorted({r["release"] for r in rows if r["release"]}),
        health_counts, sum(r["nodes"] for r in base), sum(r["online"] for r in base),
    )


def fleet_page(reader: RegistryReader, query: FleetQuery, rules: AlertRules | None = None) -> FleetPage:
    """Return the page of the fleet table that ``query`` asks for, read fresh from the database."""
    return select_page(load_summaries(reader, rules), query)


class SummaryCache:
    """The shop summaries, re-read at most every ``max_age_s`` or when told they changed.

    At 5,000 shops reading the summaries costs ~100 ms on a busy 2-core machine while cutting a
    page out of them costs a few; operators paging, sorting and filtering (and every open tab
    refreshing on a live event) share one read. Raising ``max_age_s`` lowers database load but
    shows ``last seen`` and occupancy that much older; presence and alert changes invalidate it
    at once (the live feed calls :meth:`invalidate`), so states are never stale.
    """

    def __init__(self, reader: RegistryReader, max_age_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 rules: AlertRules | None = None) -> None:
        self.reader = reader
        self.rules = rules
        self.max_age_s = max_age_s
        self.clock = clock
        self._rows: list[dict[str, Any]] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget the cached summaries; the next request reads them again."""
        self._rows = None

    def rows(self) -> list[dict[str, Any]]:
        """Return the summaries, reading them if the cache is empty or older than ``max_age_s``."""
        with self._lock:  # one reader refreshes, concurrent requests wait for its result
            if self._rows is None or self.clock() - self._at > self.max_age_s:
                self._at = self.clock()
                self._rows = load_summaries(self.reader, self.rules)
            return self._rows

    def page(self, query: FleetQuery) -> FleetPage:
        """Return the page ``query`` asks for."""
        return select_page(self.rows(), query)
