"""The fleet table: one row per shop with state, alerts, occupancy, release and last seen.

Filtering, sorting and pagination happen in one SQL statement over aggregates of nodes,
readings and alerts, so a page of 50 out of 5,000 shops costs one scan of the nodes table and
no Python loop over the fleet. :class:`FleetQuery` is the parsed, validated query string;
parsing is pure and shared by the page and the JSON API, so both accept the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, case, func, literal, or_, select
from sqlalchemy.engine import Engine

from fleet_controller.alerts.models import AlertRecord
from fleet_controller.models import LatestReading, Node, ReportedStateRecord, Shop

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


def _base():
    """Return the per-shop aggregate as a subquery with one row per shop."""
    n = (
        select(
            Node.shop_id.label("shop_id"),
            func.count().label("nodes"),
            func.sum(case((Node.presence == "online", 1), else_=0)).label("online"),
            func.sum(case((Node.presence == "stale", 1), else_=0)).label("stale"),
            func.max(Node.last_seen).label("last_seen"),
            func.max(Node.release).label("node_release"),
        ).group_by(Node.shop_id).subquery("n")
    )
    o = (
        select(LatestReading.shop_id.label("shop_id"), func.max(LatestReading.value).label("occupancy"))
        .where(LatestReading.name == "occupancy").group_by(LatestReading.shop_id).subquery("o")
    )
    a = (
        select(AlertRecord.shop_id.label("shop_id"), func.count().label("alerts"))
        .where(AlertRecord.state == "firing").group_by(AlertRecord.shop_id).subquery("a")
    )
    nodes = func.coalesce(n.c.nodes, 0)
    online = func.coalesce(n.c.online, 0)
    stale = func.coalesce(n.c.stale, 0)
    state = case(
        (nodes == 0, literal("unknown")),
        (online == nodes, literal("online")),
        (and_(online == 0, stale == 0), literal("offline")),
        else_=literal("stale"),
    )
    # Sort rank: shops that need someone first.
    rank = case((state == "offline", 0), (state == "stale", 1), (state == "unknown", 2), else_=3)
    release = func.coalesce(ReportedStateRecord.release, n.c.node_release, literal(""))
    return (
        select(
            Shop.id.label("id"), Shop.name.label("name"), Shop.region.label("region"),
            state.label("state"), rank.label("rank"), nodes.label("nodes"), online.label("online"), stale.label("stale"),
            func.coalesce(a.c.alerts, 0).label("alerts"), o.c.occupancy.label("occupancy"),
            release.label("release"), n.c.last_seen.label("last_seen"),
        )
        .select_from(Shop)
        .outerjoin(n, n.c.shop_id == Shop.id)
        .outerjoin(o, o.c.shop_id == Shop.id)
        .outerjoin(a, a.c.shop_id == Shop.id)
        .outerjoin(ReportedStateRecord, ReportedStateRecord.shop_id == Shop.id)
    ).subquery("fleet")


def fleet_page(engine: Engine, query: FleetQuery) -> FleetPage:
    """Return the page of the fleet table that ``query`` asks for."""
    f = _base()
    conds = []
    if query.q:
        like = f"%{query.q.lower()}%"
        conds.append(or_(func.lower(f.c.id).like(like), func.lower(f.c.name).like(like)))
    if query.region:
        conds.append(f.c.region == query.region)
    if query.release:
        conds.append(f.c.release == query.release)
    if query.alerting:
        conds.append(f.c.alerts > 0)
    unfiltered_state = list(conds)
    if query.state:
        conds.append(f.c.state == query.state)
    col = {"state": f.c.rank, "last_seen": f.c.last_seen, "occupancy": f.c.occupancy}.get(query.sort, f.c[query.sort])
    primary = col.desc() if query.desc else col.asc()
    order = [primary.nulls_last() if query.sort in ("last_seen", "occupancy") else primary]
    if query.sort == "state":
        order.append(f.c.alerts.desc())
    order.append(f.c.id.asc())
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(f).where(*conds)).scalar_one()
        rows = [dict(r._mapping) for r in conn.execute(
            select(f).where(*conds).order_by(*order).limit(query.per_page).offset((query.page - 1) * query.per_page)
        )]
        counts = {s: 0 for s in SHOP_STATES}
        for state, cnt in conn.execute(select(f.c.state, func.count()).where(*unfiltered_state).group_by(f.c.state)):
            counts[state] = cnt
        regions = [r for (r,) in conn.execute(select(Shop.region).distinct().where(Shop.region != "").order_by(Shop.region))]
        releases = [r for (r,) in conn.execute(select(f.c.release).distinct().where(f.c.release != "").order_by(f.c.release))]
    for r in rows:
        r.pop("rank", None)
        r["alerts"] = int(r["alerts"])
        r["nodes"], r["online"], r["stale"] = int(r["nodes"]), int(r["online"]), int(r["stale"])
    return FleetPage(rows, int(total), query, counts, regions, releases)

