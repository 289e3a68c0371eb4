"""Typed reads of the fleet registry: the one place outside the writer that queries its tables.

Every part of the controller that needs to know about shops and nodes (the API, the dashboard,
the alert worker, the rollout executor and planner, the demo) asks a :class:`RegistryReader`
and gets frozen pydantic models back, never rows or dicts. The API declares these same models
as its response models, so a node has one shape everywhere (:class:`NodeSummary`), and a column
added to the nodes table is added here once.

The reader is safe to call from any thread; each call is one short read transaction. Writes go
through the single writer (:mod:`fleet_controller.registry.store`, run by
:class:`fleet_controller.intake.core.RegistryWriter`), never through this module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import case, func, or_, select
from sqlalchemy.engine import Engine, Row

from edge_agent.protocol import FREE_FORM, check_free_form
from fleet_controller.registry.db import table_of
from fleet_controller.registry.models import (
    CommandResultRecord,
    EventRecord,
    HeartbeatRecord,
    LatestReading,
    Node,
    QuarantinedMessage,
    ReportedStateRecord,
    Shop,
)

SHOPS = table_of(Shop)
NODES = table_of(Node)
HEARTBEATS = table_of(HeartbeatRecord)
EVENTS = table_of(EventRecord)
READINGS = table_of(LatestReading)
RESULTS = table_of(CommandResultRecord)
REPORTED = table_of(ReportedStateRecord)
QUARANTINE = table_of(QuarantinedMessage)

NodeKey = tuple[str, str]
PRESENCE_STATES = ("online", "stale", "offline", "unknown")


class NotFound(LookupError):
    """A shop or node the registry does not know."""


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


# --------------------------------------------------------------------------------------------
# Read models
# --------------------------------------------------------------------------------------------


class NodeSummary(_View):
    """A node as listed in its shop."""

    shop: str
    node: str
    node_class: str
    arch: str
    agent_version: str
    release: str | None
    presence: str = Field(description="online, stale, offline or unknown.")
    presence_reason: str
    presence_changed_at: float | None
    session: int
    last_seen: float | None = Field(description="Unix seconds of the last message from the node.")
    first_seen: float
    heartbeat_interval_s: float | None
    epoch: str
    watermark: int = Field(description="Highest seq received in the current epoch.")
    open_gaps: int = Field(description="Seqs below the watermark not received (yet).")
    messages_total: int
    duplicates_total: int
    missing_total: int = Field(
        description="Seqs missing now: open gaps plus ones given up (a gap filled later, or reported evicted, no longer counts)."
    )
    evicted_total: int = Field(0, description="Seqs the node reported its outbox evicted unsent (never counted as missing).")


class HeartbeatPoint(_View):
    """One heartbeat in a node's recent history."""

    seq: int
    epoch: str
    ts: float
    received_at: float
    cpu_load_1m: float | None
    cpu_temp_c: float | None
    mem_available_bytes: int | None
    disk_free_bytes: int | None
    outbox_depth: int
    metrics: dict[str, float]


class NodeDetail(NodeSummary):
    """A node with its latest facts and recent heartbeats (newest first)."""

    facts: dict[str, Any] | None
    facts_at: float | None
    pipelines: dict[str, Any]
    metrics: dict[str, Any]
    gaps: list[list[int]] = Field(description="Open gaps as [first, last] seq ranges.")
    history: list[HeartbeatPoint]


class NodeState(_View):
    """What the controller's decisions look at of a node: presence, latest facts, pipelines and metrics."""

    shop: str
    node: str
    node_class: str
    release: str | None
    presence: str
    last_seen: float | None
    facts_at: float | None
    facts: dict[str, Any]
    pipelines: dict[str, Any]
    metrics: dict[str, Any]


class ShopInfo(_View):
    """A shop's registration: name, region, labels and time zone."""

    id: str
    name: str
    region: str
    labels: dict[str, str]
    timezone: str
    created_at: float
    applier: str | None = None
    """The node whose reported state decides the shop's rollouts (None: none declared or reported yet)."""


class ShopSummary(ShopInfo):
    """A shop in the list, with its node counts."""

    nodes: int
    nodes_by_presence: dict[str, int]


class ReadingView(_View):
    """Latest value of one reading of a node (shelf weight, fridge temperature...)."""

    node: str
    source: str
    name: str
    value: float
    unit: str
    labels: dict[str, str]
    ts: float
    received_at: float


class FleetReading(ReadingView):
    """A latest reading with the shop it belongs to (for fleet-wide reads)."""

    shop: str


class ReportedStateView(_View):
    """The latest state a node reported for its shop's desired state (for a shop: its applier's)."""

    node: str
    release: str | None
    revision: int
    status: str
    error: str
    objects: list[dict[str, Any]]
    ts: float
    received_at: float


class ShopDetail(ShopInfo):
    """A shop with its nodes, latest readings and reported state."""

    nodes: list[NodeSummary]
    readings: list[ReadingView]
    reported_state: ReportedStateView | None
    """The applier's report: the one that decides rollouts."""
    node_reports: list[ReportedStateView] = []
    """Every node's latest report, the applier's included (others are shown, never trusted)."""


class EventView(_View):
    """A shop event, node alert or presence change."""

    id: int
    shop: str
    node: str
    kind: str = Field(description="event, alert or presence.")
    type: str = Field(description="Event type, alert name or new presence state.")
    state: str
    severity: str
    source: str
    message: str
    data: dict[str, Any]
    at: float
    received_at: float
    seq: int


class CommandResultView(_View):
    """A node's answer to a command."""

    correlation_id: str
    shop: str
    node: str
    ok: bool
    result: dict[str, Any]
    error: str
    ts: float
    received_at: float


class ShopNodeCounts(_View):
    """How many of a shop's nodes are up, and what the freshest of them said last."""

    shop: str
    nodes: int
    online: int
    stale: int
    last_seen: float | None
    release: str | None


class FleetTotals(_View):
    """Message counters summed over every node."""

    messages: int
    duplicates: int
    missing: int


# --------------------------------------------------------------------------------------------
# Row -> model
# --------------------------------------------------------------------------------------------


def _shop_info(r: Row[Any]) -> ShopInfo:
    return ShopInfo(id=r.id, name=r.name, region=r.region, labels=r.labels or {}, timezone=r.timezone, created_at=r.created_at,
                    applier=r.applier)


def _node_fields(r: Row[Any]) -> dict[str, Any]:
    return {
        "shop": r.shop_id, "node": r.node_id, "node_class": r.node_class, "arch": r.arch,
        "agent_version": r.agent_version, "release": r.release, "presence": r.presence,
        "presence_reason": r.presence_reason, "presence_changed_at": r.presence_changed_at,
        "session": r.session, "last_seen": r.last_seen, "first_seen": r.first_seen,
        "heartbeat_interval_s": r.heartbeat_interval_s, "epoch": r.epoch, "watermark": r.watermark,
        "open_gaps": sum(b - a + 1 for a, b in (r.gaps or [])), "messages_total": r.messages_total,
        "duplicates_total": r.duplicates_total, "missing_total": r.missing_total, "evicted_total": r.evicted_total,
    }


def _reading(x: Row[Any]) -> FleetReading:
    return FleetReading(shop=x.shop_id, node=x.node_id, source=x.source, name=x.name, value=x.value, unit=x.unit,
                        labels=x.labels or {}, ts=x.ts, received_at=x.received_at)


def _reported(rep: Row[Any]) -> ReportedStateView:
    return ReportedStateView(node=rep.node_id, release=rep.release, revision=rep.revision, status=rep.status,
                             error=rep.error, objects=rep.objects or [], ts=rep.ts, received_at=rep.received_at)


def displayable(data: Any) -> dict[str, Any]:
    """Return stored free-form ``data`` if it is within the protocol's free-form limits, else a note saying why not.

    Rows stored before the protocol bounded free-form values may nest hundreds of levels deep,
    which the API's serialiser cannot render (every page holding one answered 500); such a value
    is replaced, the row itself is still listed.
    """
    if not isinstance(data, dict):
        return {}
    try:
        return check_free_form(data, FREE_FORM, "data")  # type: ignore[no-any-return]
    except (ValueError, RecursionError) as exc:
        return {"_unreadable": f"stored data exceeds the free-form limits and is not shown: {str(exc)[:200]}"}


def _event(e: Row[Any]) -> EventView:
    return EventView(id=e.id, shop=e.shop_id, node=e.node_id, kind=e.kind, type=e.type, state=e.state,
                     severity=e.severity, source=e.source, message=e.message, data=displayable(e.data), at=e.at,
                     received_at=e.received_at, seq=e.seq)


class QuarantineView(_View):
    """A quarantined message: what arrived, when, and why it could not be stored."""

    id: int
    received_at: float
    quarantined_at: float
    topic: str
    shop: str | None
    node: str | None
    reason: str = Field(description="store, writer, unexpected (see docs/controller.md).")
    error: str
    payload: str = Field(description="The payload as text (UTF-8, undecodable bytes replaced), at most 64 KiB.")
    payload_bytes: int = Field(description="Size of the payload as received.")
    truncated: bool = Field(description="Whether the stored payload was cut to 64 KiB.")


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


class RegistryReader:
    """Typed reads of the registry on one SQLAlchemy engine (SQLite or PostgreSQL), from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ----- shops --------------------------------------------------------------------------------

    def list_shops(
        self, *, region: str | None = None, labels: dict[str, str] | None = None, presence: str | None = None,
        q: str | None = None, limit: int = 100, offset: int = 0,
    ) -> tuple[list[ShopSummary], int]:
        """Return one page of shops (with node counts by presence) matching the filters, and the total."""
        conds = []
        if region:
            conds.append(SHOPS.c.region == region)
        if q:
            like = f"%{q.lower()}%"
            conds.append(or_(func.lower(SHOPS.c.id).like(like), func.lower(SHOPS.c.name).like(like)))
        if presence:
            conds.append(SHOPS.c.id.in_(select(NODES.c.shop_id).where(NODES.c.presence == presence)))
        with self.engine.connect() as conn:
            shops = [_shop_info(r) for r in conn.execute(select(SHOPS).where(*conds).order_by(SHOPS.c.id))]
            if labels:
                shops = [s for s in shops if all(s.labels.get(k) == v for k, v in labels.items())]
            total = len(shops)
            page = shops[offset: offset + limit]
            counts: dict[str, dict[str, int]] = {s.id: {} for s in page}
            if counts:
                for shop, pres, n in conn.execute(
                    select(NODES.c.shop_id, NODES.c.presence, func.count())
                    .where(NODES.c.shop_id.in_(list(counts))).group_by(NODES.c.shop_id, NODES.c.presence)
                ):
                    counts[shop][pres] = n
        items = [
            ShopSummary(**s.model_dump(), nodes=sum(counts[s.id].values()), nodes_by_presence=counts[s.id]) for s in page
        ]
        return items, total

    def shop(self, shop: str) -> ShopInfo:
        """Return a shop's registration; raise ``NotFound``."""
        with self.engine.connect() as conn:
            r = conn.execute(select(SHOPS).where(SHOPS.c.id == shop)).first()
        if r is None:
            raise NotFound(f"shop {shop!r} is not in the registry")
        return _shop_info(r)

    def shops(self) -> list[ShopInfo]:
        """Return every shop's registration, ordered by id."""
        with self.engine.connect() as conn:
            return [_shop_info(r) for r in conn.execute(select(SHOPS).order_by(SHOPS.c.id))]

    def get_shop(self, shop: str) -> ShopDetail:
        """Return a shop with its nodes, latest readings and reported state; raise ``NotFound``."""
        with self.engine.connect() as conn:
            r = conn.execute(select(SHOPS).where(SHOPS.c.id == shop)).first()
            if r is None:
                raise NotFound(f"shop {shop!r} is not in the registry")
            nodes = [
                NodeSummary(**_node_fields(n))
                for n in conn.execute(select(NODES).where(NODES.c.shop_id == shop).order_by(NODES.c.node_id))
            ]
            readings = [
                ReadingView(**_reading(x).model_dump(exclude={"shop"}))
                for x in conn.execute(
                    select(READINGS).where(READINGS.c.shop_id == shop).order_by(READINGS.c.node_id, READINGS.c.source, READINGS.c.name)
                )
            ]
            reports = [_reported(x) for x in conn.execute(select(REPORTED).where(REPORTED.c.shop_id == shop).order_by(REPORTED.c.node_id))]
        applied = next((x for x in reports if r.applier is not None and x.node == r.applier), None)
        return ShopDetail(**_shop_info(r).model_dump(), nodes=nodes, readings=readings, reported_state=applied, node_reports=reports)

    # ----- nodes --------------------------------------------------------------------------------

    def get_node(self, shop: str, node: str, *, history: int = 60) -> NodeDetail:
        """Return a node with its latest facts and its most recent heartbeats; raise ``NotFound``."""
        with self.engine.connect() as conn:
            r = conn.execute(select(NODES).where(NODES.c.shop_id == shop, NODES.c.node_id == node)).first()
            if r is None:
                raise NotFound(f"node {shop}/{node} is not in the registry")
            hb = conn.execute(
                select(HEARTBEATS).where(HEARTBEATS.c.shop_id == shop, HEARTBEATS.c.node_id == node)
                .order_by(HEARTBEATS.c.id.desc()).limit(history)
            )
            points = [
                HeartbeatPoint(seq=h.seq, epoch=h.epoch, ts=h.ts, received_at=h.received_at, cpu_load_1m=h.cpu_load_1m,
                               cpu_temp_c=h.cpu_temp_c, mem_available_bytes=h.mem_available_bytes,
                               disk_free_bytes=h.disk_free_bytes, outbox_depth=h.outbox_depth, metrics=h.metrics or {})
                for h in hb
            ]
        return NodeDetail(**_node_fields(r), facts=r.facts, facts_at=r.facts_at, pipelines=r.pipelines or {},
                          metrics=r.metrics or {}, gaps=[list(g) for g in (r.gaps or [])], history=points)

    def node_states(self, shops: Collection[str] | None = None) -> list[NodeState]:
        """Return the presence, facts, pipelines and metrics of every node (of ``shops`` when given)."""
        if shops is not None and not shops:
            return []
        stmt = select(NODES.c.shop_id, NODES.c.node_id, NODES.c.node_class, NODES.c.release, NODES.c.presence,
                      NODES.c.last_seen, NODES.c.facts_at, NODES.c.facts, NODES.c.pipelines, NODES.c.metrics)
        if shops is not None:
            stmt = stmt.where(NODES.c.shop_id.in_(list(shops)))
        with self.engine.connect() as conn:
            return [
                NodeState(shop=n.shop_id, node=n.node_id, node_class=n.node_class, release=n.release, presence=n.presence,
                          last_seen=n.last_seen, facts_at=n.facts_at, facts=n.facts or {}, pipelines=n.pipelines or {},
                          metrics=n.metrics or {})
                for n in conn.execute(stmt.order_by(NODES.c.shop_id, NODES.c.node_id))
            ]

    def node_classes(self) -> dict[str, frozenset[str]]:
        """Return the node classes present in each shop (shops without classified nodes are absent)."""
        classes: dict[str, set[str]] = defaultdict(set)
        with self.engine.connect() as conn:
            for shop, cls in conn.execute(select(NODES.c.shop_id, NODES.c.node_class).distinct()):
                if cls:
                    classes[shop].add(cls)
        return {shop: frozenset(c) for shop, c in classes.items()}

    def shop_node_counts(self) -> dict[str, ShopNodeCounts]:
        """Return, per shop with nodes, how many nodes it has, how many are online and stale, and its last sign of life."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(NODES.c.shop_id, func.count().label("nodes"),
                       func.sum(case((NODES.c.presence == "online", 1), else_=0)).label("online"),
                       func.sum(case((NODES.c.presence == "stale", 1), else_=0)).label("stale"),
                       func.max(NODES.c.last_seen).label("last_seen"), func.max(NODES.c.release).label("release"))
                .group_by(NODES.c.shop_id)
            ).all()
        return {
            r.shop_id: ShopNodeCounts(shop=r.shop_id, nodes=int(r.nodes), online=int(r.online), stale=int(r.stale),
                                      last_seen=r.last_seen, release=r.release)
            for r in rows
        }

    def presence_counts(self) -> dict[str, int]:
        """Return the number of nodes in each presence state (every state present, zero if none)."""
        counts = dict.fromkeys(PRESENCE_STATES, 0)
        with self.engine.connect() as conn:
            for pres, n in conn.execute(select(NODES.c.presence, func.count()).group_by(NODES.c.presence)):
                counts[pres] = n
        return counts

    def node_keys(self) -> list[NodeKey]:
        """Return every (shop, node) the registry knows."""
        with self.engine.connect() as conn:
            return [
                (r.shop_id, r.node_id)
                for r in conn.execute(select(NODES.c.shop_id, NODES.c.node_id).order_by(NODES.c.shop_id, NODES.c.node_id))
            ]

    def totals(self) -> FleetTotals:
        """Return the message, duplicate and missing counters summed over every node."""
        with self.engine.connect() as conn:
            r = conn.execute(
                select(func.coalesce(func.sum(NODES.c.messages_total), 0), func.coalesce(func.sum(NODES.c.duplicates_total), 0),
                       func.coalesce(func.sum(NODES.c.missing_total), 0))
            ).one()
        return FleetTotals(messages=int(r[0]), duplicates=int(r[1]), missing=int(r[2]))

    # ----- readings and reported state -----------------------------------------------------------

    def readings(self, *, shops: Collection[str] | None = None, names: Collection[str] | None = None) -> list[FleetReading]:
        """Return the latest readings, of ``shops`` and with ``names`` when given."""
        if (shops is not None and not shops) or (names is not None and not names):
            return []
        stmt = select(READINGS)
        if shops is not None:
            stmt = stmt.where(READINGS.c.shop_id.in_(list(shops)))
        if names is not None:
            stmt = stmt.where(READINGS.c.name.in_(list(names)))
        with self.engine.connect() as conn:
            return [_reading(x) for x in conn.execute(stmt)]

    def max_reading_by_shop(self, name: str) -> dict[str, float]:
        """Return the highest latest value of reading ``name`` in each shop that has one (e.g. occupancy)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(READINGS.c.shop_id, func.max(READINGS.c.value)).where(READINGS.c.name == name).group_by(READINGS.c.shop_id)
            ).all()
        return {shop: float(v) for shop, v in rows}

    def _applier_reports(self) -> Any:
        """Return a select of the reports of each shop's applier only: what decides rollouts."""
        return select(REPORTED).join(SHOPS, (SHOPS.c.id == REPORTED.c.shop_id) & (SHOPS.c.applier == REPORTED.c.node_id))

    def reported_states(self, shops: Collection[str] | None = None) -> dict[str, ReportedStateView]:
        """Return each shop's latest reported state (of ``shops`` when given): its applier node's report, no other node's."""
        if shops is not None and not shops:
            return {}
        stmt = self._applier_reports()
        if shops is not None:
            stmt = stmt.where(REPORTED.c.shop_id.in_(list(shops)))
        with self.engine.connect() as conn:
            return {r.shop_id: _reported(r) for r in conn.execute(stmt)}

    def reported_releases(self, *, applied_only: bool = False) -> dict[str, str]:
        """Return the release each shop's applier last reported (only reports of an applied state with ``applied_only``)."""
        stmt = (select(REPORTED.c.shop_id, REPORTED.c.release)
                .join(SHOPS, (SHOPS.c.id == REPORTED.c.shop_id) & (SHOPS.c.applier == REPORTED.c.node_id))
                .where(REPORTED.c.release.is_not(None)))
        if applied_only:
            stmt = stmt.where(REPORTED.c.status == "applied")
        with self.engine.connect() as conn:
            return {shop: release for shop, release in conn.execute(stmt)}

    # ----- events and command results ----------------------------------------------------------

    def list_events(
        self, shop: str | None = None, *, kind: str | None = None, after_id: int = 0, limit: int = 100
    ) -> list[EventView]:
        """Return events (newest first; or oldest first after ``after_id`` for a live feed)."""
        conds = []
        if shop:
            conds.append(EVENTS.c.shop_id == shop)
        if kind:
            conds.append(EVENTS.c.kind == kind)
        order = EVENTS.c.id.desc()
        if after_id:
            conds.append(EVENTS.c.id > after_id)
            order = EVENTS.c.id.asc()
        with self.engine.connect() as conn:
            return [_event(e) for e in conn.execute(select(EVENTS).where(*conds).order_by(order).limit(limit))]

    def node_alerts_after(self, after_id: int) -> list[EventView]:
        """Return every alert nodes raised after event ``after_id``, oldest first (read by primary key)."""
        with self.engine.connect() as conn:
            return [
                _event(e) for e in conn.execute(
                    select(EVENTS).where(EVENTS.c.id > after_id, EVENTS.c.kind == "alert").order_by(EVENTS.c.id)
                )
            ]

    def event_counts(self, kind: str = "event") -> dict[str, int]:
        """Return how many stored events of ``kind`` there are of each type."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(EVENTS.c.type, func.count()).where(EVENTS.c.kind == kind).group_by(EVENTS.c.type)).all()
        return {t: int(n) for t, n in rows}

    def list_quarantine(
        self, *, reason: str | None = None, shop: str | None = None, limit: int = 50, offset: int = 0,
    ) -> tuple[list[QuarantineView], int]:
        """Return one page of quarantined messages (newest first) and how many match in all."""
        conds = []
        if reason:
            conds.append(QUARANTINE.c.reason == reason)
        if shop:
            conds.append(QUARANTINE.c.shop_id == shop)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(QUARANTINE).where(*conds)).scalar_one()
            rows = conn.execute(select(QUARANTINE).where(*conds).order_by(QUARANTINE.c.id.desc()).limit(limit).offset(offset))
            items = [
                QuarantineView(
                    id=r.id, received_at=r.received_at, quarantined_at=r.quarantined_at, topic=r.topic, shop=r.shop_id,
                    node=r.node_id, reason=r.reason, error=r.error, payload=bytes(r.payload).decode("utf-8", "replace"),
                    payload_bytes=r.payload_bytes, truncated=len(r.payload) < r.payload_bytes,
                )
                for r in rows
            ]
        return items, int(total)

    def command_result(self, correlation_id: str) -> CommandResultView | None:
        """Return the stored answer to a command, or None while there is none."""
        with self.engine.connect() as conn:
            r = conn.execute(select(RESULTS).where(RESULTS.c.correlation_id == correlation_id)).first()
        if r is None:
            return None
        return CommandResultView(correlation_id=r.correlation_id, shop=r.shop_id, node=r.node_id, ok=r.ok,
                                 result=r.result or {}, error=r.error, ts=r.ts, received_at=r.received_at)
