"""The fleet table: one row per shop with state, alerts, occupancy, release and last seen.

Two steps. :func:`load_summaries` reads one summary per shop with five small grouped reads
(shops, nodes by presence, occupancy and reported release from the registry's read models, firing
alerts from the alert store); :func:`select_page`
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
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet_controller.alerts import store as alert_store
from fleet_controller.registry.read import RegistryReader

SHOP_STATES = ("online", "stale", "offline", "unknown")
SORT_KEYS = ("id", "name", "region", "state", "alerts", "occupancy", "release", "last_seen")


class FleetQuery(BaseModel):
    """Filters, sort and page of the fleet table (from the query string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    q: str = Field("", max_length=100, description="Substring of shop id or name.")
    region: str = Field("", max_length=100, description="Only shops of this region.")
    state: Literal["", "online", "stale", "offline", "unknown"] = Field("", description="Only shops in this state.")
    release: str = Field("", max_length=128, description="Only shops running this release.")
    alerting: bool = Field(False, description="Only shops with firing alerts.")
    sort: Literal["id", "name", "region", "state", "alerts", "occupancy", "release", "last_seen"] = Field(
        "state", description="Column to sort by; 'state' puts shops that need someone first.")
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

    @property
    def pages(self) -> int:
        """Return the number of pages."""
        return max(1, -(-self.total // self.query.per_page))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"rows": self.rows, "total": self.total, "page": self.query.page, "per_page": self.query.per_page,
                "pages": self.pages, "state_counts": self.state_counts, "regions": self.regions, "releases": self.releases}


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


def load_summaries(reader: RegistryReader) -> list[dict[str, Any]]:
    """Read one summary row per shop with five grouped reads (each one index or table scan)."""
    shops = reader.shops()
    nodes = reader.shop_node_counts()
    occupancy = reader.max_reading_by_shop("occupancy")
    alerts = alert_store.firing_counts(reader.engine)
    reported = reader.reported_releases()
    rows = []
    for shop in shops:
        n = nodes.get(shop.id)
        total, online, stale = (n.nodes, n.online, n.stale) if n else (0, 0, 0)
        rows.append({
            "id": shop.id, "name": shop.name, "region": shop.region, "state": shop_state(total, online, stale),
            "nodes": total, "online": online, "stale": stale, "alerts": alerts.get(shop.id, 0),
            "occupancy": occupancy.get(shop.id), "release": reported.get(shop.id) or (n.release if n else None) or "",
            "last_seen": n.last_seen if n else None,
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
    for r in base:
        counts[r["state"]] += 1
    matched = [r for r in base if r["state"] == query.state] if query.state else base
    matched.sort(key=lambda r: r["id"])  # final tie-break; sorts below are stable
    if query.sort == "state":
        matched.sort(key=lambda r: (_RANK[r["state"]], -r["alerts"]), reverse=query.desc)
    elif query.sort in ("last_seen", "occupancy"):
        present = [r for r in matched if r[query.sort] is not None]
        present.sort(key=lambda r: r[query.sort], reverse=query.desc)
        matched = present + [r for r in matched if r[query.sort] is None]  # unknown last, either way
    elif query.sort != "id" or query.desc:
        matched.sort(key=lambda r: r[query.sort] or "" if query.sort != "alerts" else r["alerts"], reverse=query.desc)
    start = (query.page - 1) * query.per_page
    return FleetPage(
        [dict(r) for r in matched[start:start + query.per_page]], len(matched), query, counts,
        sorted({r["region"] for r in rows if r["region"]}), sorted({r["release"] for r in rows if r["release"]}),
    )


def fleet_page(reader: RegistryReader, query: FleetQuery) -> FleetPage:
    """Return the page of the fleet table that ``query`` asks for, read fresh from the database."""
    return select_page(load_summaries(reader), query)


class SummaryCache:
    """The shop summaries, re-read at most every ``max_age_s`` or when told they changed.

    At 5,000 shops reading the summaries costs ~100 ms on a busy 2-core machine while cutting a
    page out of them costs a few; operators paging, sorting and filtering (and every open tab
    refreshing on a live event) share one read. Raising ``max_age_s`` lowers database load but
    shows ``last seen`` and occupancy that much older; presence and alert changes invalidate it
    at once (the live feed calls :meth:`invalidate`), so states are never stale.
    """

    def __init__(self, reader: RegistryReader, max_age_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.reader = reader
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
                self._rows = load_summaries(self.reader)
            return self._rows

    def page(self, query: FleetQuery) -> FleetPage:
        """Return the page ``query`` asks for."""
        return select_page(self.rows(), query)
