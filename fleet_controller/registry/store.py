"""The fleet registry: what the controller knows about every shop and node, in SQL.

The write side of the registry, and only that: the intake, the presence sweeper, retention and
shop registration all write through :meth:`RegistryStore.write_batch`,
:meth:`RegistryStore.sweep_presence`, :meth:`RegistryStore.enforce_retention` and
:meth:`RegistryStore.register_shop`, which the service runs in its single registry writer (a
child process, see :class:`fleet_controller.intake.core.RegistryWriter`). One writer means no write
  races on SQLite and no lost updates on presence, lets the writer cache every node's presence,
  and lets a batch of hundreds of messages go into one transaction (what makes 1,000+ msg/s fit
  on SQLite). The hottest statements go through the driver's ``executemany`` directly.
Everything else reads through the typed read models of :mod:`fleet_controller.registry.read`.

Presence is decided by the pure function
:func:`decide_presence`: a birth or Will carries a session number, and a message of an older
session than the one the registry holds is ignored, so a late Will never marks a live node
offline. Silence makes a node ``stale`` and then ``offline`` (reason ``timeout``); any message
from it brings it back.

Every change a writer makes is returned as :class:`BusEvent` values for the service's event bus
(the dashboard's live feed subscribes to it), so readers never need to poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import (
    JSON,
    ColumnElement,
    String,
    Table,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from edge_agent.protocol import (
    ALERT_TYPES,
    EVENT_TYPES,
    HEARTBEAT_TYPES,
    TELEMETRY_TYPES,
    Alert,
    CommandResult,
    Event,
    Heartbeat,
    Presence,
    ReportedState,
    Telemetry,
    validate_id,
    wire_fields,
    wire_json,
)
from fleet_controller.registry import series
from fleet_controller.registry.bus import BusEvent
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
from fleet_controller.settings import PresenceSettings, RetentionSettings

log = logging.getLogger(__name__)

SHOPS = table_of(Shop)
NODES = table_of(Node)
HEARTBEATS = table_of(HeartbeatRecord)
EVENTS = table_of(EventRecord)
READINGS = table_of(LatestReading)
RESULTS = table_of(CommandResultRecord)
REPORTED = table_of(ReportedStateRecord)
QUARANTINE = table_of(QuarantinedMessage)

SWEEP_SHOPS_CHUNK = 30_000
"""Shops per query of a partitioned presence sweep: under SQLite's limit on bound parameters per statement (32,766
since 3.32) and PostgreSQL's (65,535). Each query walks every online node once, so fewer is cheaper: a replica of two
in a fleet of 100,000 nodes sweeps its 16,700 shops in one query, where chunks of 2,000 took nine and 14 times the
whole fleet's sweep (bench/sweep.py)."""

SWEEP_SHOPS_ARRAY = True
"""PostgreSQL: pass a partitioned sweep's shops as one array parameter (``shop_id = ANY(:shops)``), which the server
looks rows up in by hash, instead of ``IN`` lists of ``SWEEP_SHOPS_CHUNK`` parameters (bench/sweep.py measures both)."""

QUARANTINE_PAYLOAD_BYTES = 64 * 1024
"""Bytes of a quarantined payload kept (its full size is recorded): enough to see what it was."""
QUARANTINE_KEEP = 10_000
"""Quarantined messages kept; retention deletes the oldest beyond it, so a flood cannot fill the disk."""
QUARANTINE_ERROR_CHARS = 2000

# SQLSTATE classes that mean "the database is unavailable", not "this row is bad": connection
# exceptions, insufficient resources, operator intervention (shutdown), system errors,
# serialization failures and deadlocks (retrying helps).
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58", "40"})
# SQLite has no SQLSTATE: these texts of its OperationalError mean the file, not the row.
_UNAVAILABLE_SQLITE_TEXTS = ("locked", "busy", "unable to open", "disk i/o", "disk is full", "readonly", "no such table")


def store_unavailable(exc: BaseException) -> bool:
    """Return whether ``exc`` says the database is unavailable (hold the stream and retry) rather than refusing one message.

    Only this kind of failure may hold the intake: anything else is blamed on the messages being
    stored, which are then stored one by one and the failing one quarantined.
    """
    if isinstance(exc, InterfaceError) or getattr(exc, "connection_invalidated", False):
        return True
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code:
        return str(code)[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    text = str(orig).lower()
    return any(t in text for t in _UNAVAILABLE_SQLITE_TEXTS) or not text or "connection" in text


RETENTION_CYCLE_RUNS = 10
"""Retention runs in which the count bound visits every node (and every shop): a chunk is 1/10 of them per run."""
RETENTION_MIN_CHUNK = 1000
"""Fewest owners a retention run visits: a small fleet is trimmed whole on every run."""


def series_dead_after(settings: RetentionSettings) -> float:
    """Seconds without a flush after which a series writer is taken for dead and its raw rows are folded by another.

    Every live writer flushes on each retention run; five missed runs (at least ten minutes) is no hiccup.
    """
    return max(600.0, 5 * settings.interval_s)


def _aged(conn: Connection, table: Table, cutoff: float) -> tuple[ColumnElement[bool], int | None]:
    """Return the rows of ``table`` received before ``cutoff`` (see :func:`_delete_aged`) and the highest id among them (None: none)."""
    first_young = conn.scalar(select(table.c.id).where(table.c.received_at >= cutoff).order_by(table.c.id).limit(1))
    if first_young is None:
        return table.c.received_at < cutoff, conn.scalar(select(func.max(table.c.id)))
    return table.c.id < first_young, conn.scalar(select(func.max(table.c.id)).where(table.c.id < first_young))


def _delete_aged(conn: Connection, table: Table, cutoff: float, aged: ColumnElement[bool] | None = None,
                 *also: ColumnElement[bool]) -> int:
    """Delete the rows of ``table`` received before ``cutoff``, walking its primary key from the oldest; return rows deleted.

    ``received_at`` has no index, but it grows with ``id`` (rows are stored as they arrive), so
    the oldest rows are at the start of the primary key: find the first row, in id order, that
    is young enough (a walk over exactly the rows to delete) and delete every row before it.
    Where the controller's clock stepped back, a row older than the cutoff stored after a
    younger one waits until that younger one ages out too. ``aged`` is :func:`_aged`'s answer when already asked;
    ``also`` narrows the delete.
    """
    if aged is None:
        aged = _aged(conn, table, cutoff)[0]
    return conn.execute(delete(table).where(aged, *also)).rowcount


MAX_RETIRED_EPOCHS = 64
"""Epochs a node has left that the cursor remembers (and refuses); beyond it the oldest are forgotten."""

NodeKey = tuple[str, str]
PresenceChange = tuple[NodeKey, str, "PresenceView", float | None]
"""One presence change to store: the node, its old presence, the new one, when it was last seen (or None)."""

# Node columns a heartbeat updates, in the order _update_nodes binds them; the JSON ones among them.
try:
    import orjson

    _HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson comes with the controller extra
    _HAVE_ORJSON = False


def _dumps(value: Any) -> str:
    """Return ``value`` as compact JSON text; orjson (~10x the stdlib's speed) on the writer's hot path.

    Only for validated wire values (finite numbers, 64-bit integers, string keys), where both
    write the same JSON.
    """
    if _HAVE_ORJSON:
        text: str = orjson.dumps(value).decode()
        return text
    return json.dumps(value, separators=(",", ":"))


def _part_json(part: Any) -> str:
    """Return the JSON text of a flat message part (facts; a dict of pipelines' health): the wire view's own encoder, or orjson of the model's fields."""
    if isinstance(part, dict) and not part:  # a node without pipelines (a sensor-only node; the benches)
        return "{}"
    text = wire_json(part)
    if text is not None:
        return text
    return _dumps({k: wire_fields(p) for k, p in part.items()} if isinstance(part, dict) else wire_fields(part))


_FACT_COLUMNS = ("facts", "arch", "node_class", "agent_version", "release", "pipelines", "metrics", "facts_at", "heartbeat_interval_s")
_NODE_JSON = frozenset({"facts", "pipelines", "metrics"})
# Heartbeat columns in the order _store_uplinks builds its rows; metrics and pipelines are JSON; samples the heartbeat's
# series samples (JSON text, series.store_points) and wid the writer (0019_heartbeat_samples).
_HEARTBEAT_COLUMNS = ("shop_id", "node_id", "epoch", "seq", "ts", "received_at", "cpu_load_1m", "cpu_temp_c",
                      "mem_available_bytes", "disk_free_bytes", "outbox_depth", "metrics", "pipelines", "samples", "wid")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


class SeqCursor(msgspec.Struct, frozen=True, gc=False):
    """Where a node's message stream stands: epoch, highest seq seen, and missing ranges below it.

    ``gaps`` are sorted, disjoint, inclusive ``(first, last)`` ranges of seqs not yet received.
    ``retired`` are the epochs the node has left (oldest first, at most ``MAX_RETIRED_EPOCHS``):
    an epoch only moves forward. ``pending`` is ``(epoch, seq, run)`` of the last refused seq jump
    and how many consecutive seqs followed it (in memory only; see the intake's ``advance``).
    ``rev`` is the revision of the stored cursor row this value was read from (or written as):
    the writer updates the row only while it still holds that revision (see :class:`CursorConflict`).

    The writer holds one per node (100,000 at 100,000 nodes): a struct the garbage collector does
    not track (``gc=False``: it holds only strings, ints and tuples of them, never a cycle), so a
    full collection of the writer's heap does not walk them (docs/benchmarks.md, Scale).
    """

    epoch: str = ""
    watermark: int = 0
    gaps: tuple[tuple[int, int], ...] = ()
    retired: tuple[str, ...] = ()
    pending: tuple[str, int, int] | None = None
    rev: int = 0


class CursorConflict(Exception):
    """Another writer (a second controller replica) moved a node's cursor since this one read it.

    Raised inside the batch's transaction, so nothing of the batch is stored; the intake reloads
    the cursors of ``keys`` from the database and decides the batch again.
    """

    def __init__(self, keys: Sequence[NodeKey]) -> None:
        super().__init__(f"{len(keys)} node cursor(s) moved by another writer")
        self.keys = tuple(keys)


@dataclass(frozen=True)
class NodeUpdate:
    """What one batch changed about one node's stream: the new cursor and counter increments.

    ``missing`` is a net change: seqs that became missing less those filled by late arrivals or
    reported evicted, so ``missing_total`` says how many are missing now (open or given up).
    With ``check_rev`` (what the intake sets), the update applies only while the row still holds
    revision ``rev`` (``cursor.rev`` when None), else :class:`CursorConflict` is raised; without it
    (tests and tools writing a cursor directly) the row is overwritten. Either way the row's
    revision is bumped.
    """

    cursor: SeqCursor
    messages: int = 0
    duplicates: int = 0
    missing: int = 0
    evicted: int = 0
    check_rev: bool = False
    rev: int | None = None  # the revision read (the intake's: no copy of the cursor just to carry it)


class PresenceView(msgspec.Struct, frozen=True, gc=False):
    """The presence fields of a node that :func:`decide_presence` looks at (one per node in the writer's memory:
    untracked by the collector, as :class:`SeqCursor`)."""

    session: int
    presence: str
    reason: str


@dataclass
class WriteBatch:
    """Everything one intake batch stores, in one transaction. ``received`` maps message to arrival time."""

    uplinks: list[tuple[Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState, float]] = field(default_factory=list)
    presences: list[tuple[Presence, float]] = field(default_factory=list)
    nodes: dict[NodeKey, NodeUpdate] = field(default_factory=dict)
    seen: dict[NodeKey, float] = field(default_factory=dict)
    max_session_jump: int | None = None  # a birth or Will further above the held session is refused
    session_jumps: int = 0  # set by write_batch: presences refused by max_session_jump
    refused_nodes: frozenset[NodeKey] = frozenset()  # set by write_batch: unknown nodes only reports named (nothing stored of them)
    quarantine: list[Quarantined] = field(default_factory=list)  # accepted but unstorable here: dead-letter rows of this transaction


def session_jump(current: PresenceView, msg: Presence, max_jump: int | None) -> bool:
    """Return whether ``msg`` claims a session absurdly far above the one the registry holds.

    A node seen for the first time (session 0) may start anywhere: agents of older versions
    counted connection attempts, not connections, and can hold large numbers legitimately.
    """
    return max_jump is not None and current.session > 0 and msg.session > current.session + max_jump


def decide_presence(current: PresenceView, msg: Presence) -> PresenceView | None:
    """Return the node's presence after a birth or Will, or None when the message must be ignored.

    A message of an older session is ignored (a late Will or a stale retained birth); within the
    same session, a birth does not undo that session's Will.
    """
    if msg.session < current.session:
        return None
    if (
        msg.session == current.session
        and msg.state == "online"
        and current.presence == "offline"
        and current.reason != "timeout"
    ):
        return None
    reason = msg.reason or ("birth" if msg.state == "online" else "will")
    new = PresenceView(session=msg.session, presence=msg.state, reason=reason[:200])
    return None if new == current else new


def silence_presence(presence: str, silent_for: float, interval: float, settings: PresenceSettings) -> str:
    """Return what presence silence implies: offline, stale, or the current value unchanged."""
    if presence not in ("online", "stale"):
        return presence
    if silent_for > settings.offline_after_intervals * interval:
        return "offline"
    if silent_for > settings.stale_after_intervals * interval:
        return "stale"
    return presence


def _gaps_json(gaps: tuple[tuple[int, int], ...]) -> list[list[int]]:
    return [[a, b] for a, b in gaps]


def _gaps_text(gaps: tuple[tuple[int, int], ...]) -> str:
    """Return the JSON text of ``gaps`` ("[]" without calling the encoder: nearly every node has none)."""
    return json.dumps(_gaps_json(gaps)) if gaps else "[]"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _json_rows_from(table: Table, cols: Sequence[str], dialect: Dialect) -> str:
    """Return ``(SELECT (e->>0)::T0 AS c0, ... FROM jsonb_array_elements(%s::jsonb) AS e) AS v``: rows of ``table``'s ``cols`` from one JSON parameter.

    PostgreSQL only, for statements over a whole batch of rows (see :func:`_json_rows`): psycopg's
    executemany costs a round trip of Python work per row, and its array parameters cost about as
    much in dumping; one JSON text is encoded in C and unpacked by the server. JSON columns travel
    as their encoded text (``v.cN`` is text; cast it with ``::json``). ``jsonb``, not ``json``: each
    ``->>`` on a ``json`` value parses the row's text again (19 columns made the node update 5x
    slower). The statement's text is the same whatever the number of rows, so it is prepared once.
    """
    parts = []
    for i, c in enumerate(cols):
        t = "text" if isinstance(table.c[c].type, JSON) else table.c[c].type.compile(dialect=dialect)
        parts.append(f"(e->>{i})::{t} AS c{i}")
    return f"(SELECT {', '.join(parts)} FROM jsonb_array_elements(%s::jsonb) AS e) AS v"


def _json_rows(rows: Sequence[tuple[Any, ...]]) -> tuple[str]:
    """Return the parameter of :func:`_json_rows_from`: ``rows`` as one JSON array of arrays."""
    return (_dumps(rows),)


class RegistryStore:
    """Write the fleet registry on one SQLAlchemy engine (SQLite or PostgreSQL); only the single writer holds one."""

    def __init__(self, engine: Engine, instance: str = "") -> None:
        self.engine = engine
        # The writer's running series roll-up (see series.Rollups); registered on the first batch with uplinks.
        self.rollups = series.Rollups(instance or f"{socket.gethostname()}:{os.getpid()}")
        self._dialect = engine.dialect.name
        self._known_nodes: set[NodeKey] = set()
        self._known_shops: set[str] = set()
        # Writer-side cache of every node's presence (only the writer thread changes presence);
        # changes of a transaction are staged in _pending_presence until it commits.
        self._presence: dict[NodeKey, PresenceView] = {}
        self._pending_presence: dict[NodeKey, PresenceView] = {}
        # How far the stream is stored (see stream_horizon): the newest message time committed, and when.
        self._stream_pos: float | None = None
        self._stream_at = 0.0
        # PostgreSQL: inserts of the batch being written that go to the server with its node update
        # (see write_batch); empty outside write_batch.
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []
        # Retention's place in each history table's owners (see _trim_chunk): the last key visited, or None to start over.
        self._retention_cursor: dict[str, tuple[Any, ...] | None] = {}
        self.reports_refused = 0
        """Reported states dropped because their node is not in the registry (never created from a report)."""
        self.presence_storm_sweeps = 0
        """Presence sweeps that hit ``presence.sweep_max_changes`` and left silent nodes to the next sweep."""
        self._storm_logged_at = -1e9

    # ----- helpers ---------------------------------------------------------------------------

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        if self._dialect == "sqlite":
            return sqlite.insert(table)
        raise NotImplementedError(f"database {self._dialect!r} is not supported: use SQLite or PostgreSQL")

    def _upsert(self, conn: Connection, table: Table, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
        if not rows:
            return
        stmt = self._insert(table)
        cols = [c for c in rows[0] if c not in keys]
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
        conn.execute(stmt, rows)

    def _ensure(self, conn: Connection, keys: Iterable[NodeKey], now: float) -> tuple[list[BusEvent], list[NodeKey]]:
        """Create missing shops and nodes; return the changes and the keys to mark known after commit."""
        events: list[BusEvent] = []
        new_nodes = [k for k in keys if k not in self._known_nodes]
        if not new_nodes:
            return events, new_nodes
        new_shops = sorted({s for s, _ in new_nodes if s not in self._known_shops})
        if new_shops:
            existing = set(conn.scalars(select(SHOPS.c.id).where(SHOPS.c.id.in_(new_shops))))
            missing = [s for s in new_shops if s not in existing]
            if missing:
                conn.execute(
                    self._insert(SHOPS).on_conflict_do_nothing(),
                    [{"id": s, "name": s, "region": "", "labels": {}, "timezone": "UTC", "created_at": now} for s in missing],
                )
                events += [BusEvent("shop_added", s, None, {"shop": s}, now) for s in missing]
        existing_nodes = {
            tuple(r) for r in conn.execute(select(NODES.c.shop_id, NODES.c.node_id).where(tuple_(NODES.c.shop_id, NODES.c.node_id).in_(new_nodes)))
        }
        missing_nodes = [k for k in new_nodes if k not in existing_nodes]
        if missing_nodes:
            conn.execute(
                self._insert(NODES).on_conflict_do_nothing(),
                [{"shop_id": s, "node_id": n, "first_seen": now, "gaps": [], "presence": "unknown"} for s, n in missing_nodes],
            )
            events += [BusEvent("node_added", s, n, {"shop": s, "node": n}, now) for s, n in missing_nodes]
        return events, new_nodes

    # ----- writer side -------------------------------------------------------------------------

    def load_cursors(self, keys: Iterable[NodeKey]) -> dict[NodeKey, SeqCursor]:
        """Return the stored sequence cursor of each known node among ``keys``."""
        keys = list(keys)
        out: dict[NodeKey, SeqCursor] = {}
        if not keys:
            return out
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(NODES.c.shop_id, NODES.c.node_id, NODES.c.epoch, NODES.c.watermark, NODES.c.gaps, NODES.c.retired_epochs,
                       NODES.c.cursor_rev).where(
                    tuple_(NODES.c.shop_id, NODES.c.node_id).in_(keys)
                )
            )
            for shop, node, epoch, watermark, gaps, retired, rev in rows:
                out[(shop, node)] = SeqCursor(
                    epoch, int(watermark), tuple((int(a), int(b)) for a, b in (gaps or [])), tuple(str(e) for e in (retired or [])),
                    rev=int(rev or 0),
                )
        return out

    def write_batch(self, batch: WriteBatch, now: float | None = None) -> list[BusEvent]:
        """Store one intake batch in one transaction; return the changes for the event bus."""
        now = time.time() if now is None else now
        events: list[BusEvent] = []
        keys = set(batch.nodes) | set(batch.seen) | {(p.shop, p.node) for p, _ in batch.presences}
        # A reported state never creates a node (a node that has not announced itself cannot
        # speak for its shop): keys only reports name must already be known.
        others = {(m.shop, m.node) for m, _ in batch.uplinks if not isinstance(m, ReportedState)}
        others |= {(p.shop, p.node) for p, _ in batch.presences}
        report_only = {(m.shop, m.node) for m, _ in batch.uplinks if isinstance(m, ReportedState)} - others
        self._pending_presence = {}
        # PostgreSQL: the heartbeat and series inserts are deferred and sent as CTEs of the node
        # update, one statement instead of three. Each round trip waits for the server process to be
        # scheduled, which on a busy machine cost more than the statements' own work (bench/ingest.py).
        self._deferred = []
        defer = self._deferred if self._dialect == "postgresql" else None
        wid = self.rollups.register(self.engine, now) if batch.uplinks else 0
        try:
            with self._rollups_applied(now), self.engine.begin() as conn:
                unknown = self._unknown(conn, report_only)
                batch.refused_nodes = frozenset(unknown)
                created, known = self._ensure(conn, sorted(keys - unknown), now)
                events += created
                # A heartbeat's samples go in its own row (one structure per message besides the node row); telemetry's in series_raw.
                hb_samples: dict[int, str | None] = {}
                samples = series.store_points(conn, batch.uplinks, defer, wid, hb_samples)
                facts = self._store_uplinks(conn, batch, now, events, unknown, hb_samples, wid)
                presence_events, batch.session_jumps = self._store_presences(conn, batch.presences, now, batch.max_session_jump)
                events += presence_events
                self._update_nodes(conn, batch, facts, unknown)
                self._flush_deferred(conn)
                if batch.quarantine:
                    conn.execute(insert(QUARANTINE), [quarantine_row(q, now) for q in batch.quarantine])
                events += self._revive(conn, batch, now)
                self.rollups.step(conn, now=now)  # a part of the series flush under way, if any and if its pace allows
        finally:
            self._deferred = []
        # Only committed rows are known; a rolled-back batch must create them again.
        self.rollups.add(samples)
        self._known_nodes.update(known)
        self._known_shops.update(s for s, _ in known)
        self._presence.update(self._pending_presence)
        self._advance_stream(batch, now)
        return events

    def _advance_stream(self, batch: WriteBatch, now: float) -> None:
        """Move the stream position to the newest message time of a committed batch (see :meth:`stream_horizon`).

        A message's time is its ``ts`` (when the node sent it), but never later than its receipt: a
        node whose clock runs ahead cannot move the position past what has arrived. The position
        only moves forward, so a batch of replayed old messages (an outbox draining after an
        outage) leaves it where the live stream put it.
        """
        newest = max((min(m.ts, r) for m, r in batch.uplinks), default=None)
        if batch.presences:
            p = max(min(m.ts, r) for m, r in batch.presences)
            newest = p if newest is None else max(newest, p)
        if newest is not None and (self._stream_pos is None or newest > self._stream_pos):
            self._stream_pos, self._stream_at = newest, now

    def stream_horizon(self, now: float) -> float:
        """Return the time up to which the message stream is stored: ``now`` when the writer keeps up, earlier when it lags.

        The stream position (the newest message time committed) plus the time since it was
        committed, at most ``now``. When messages wait (in the broker, or in the intake's queue) the
        position trails the clock by that wait, and so does the horizon: the presence sweep judges
        silence up to the horizon, not up to ``now``, so a node whose heartbeat is merely waiting
        in a backlog is not marked stale (and revived when its message is stored, again and again
        while the controller lags). Before the first batch the horizon is ``now``.
        """
        if self._stream_pos is None:
            return now
        return min(now, self._stream_pos + (now - self._stream_at))

    def _unknown(self, conn: Connection, keys: set[NodeKey]) -> set[NodeKey]:
        """Return the keys among ``keys`` that are not in the registry."""
        keys = keys - self._known_nodes
        if not keys:
            return set()
        found = {tuple(r) for r in conn.execute(
            select(NODES.c.shop_id, NODES.c.node_id).where(tuple_(NODES.c.shop_id, NODES.c.node_id).in_(sorted(keys)))
        )}
        return {k for k in keys if k not in found}

    def _store_uplinks(
        self, conn: Connection, batch: WriteBatch, now: float, out: list[BusEvent], unknown: set[NodeKey] = frozenset(),  # type: ignore[assignment]
        hb_samples: dict[int, str | None] | None = None, wid: int = 0,
    ) -> dict[NodeKey, tuple[Heartbeat, str, str]]:
        """Insert history, upsert latest values; append bus events to ``out``.

        Return the latest heartbeat of each node with the JSON text of its metrics and pipelines
        (encoded once, for its history row and for the node's row). ``hb_samples`` holds each heartbeat's series samples
        by ``id()`` (:func:`series.store_points`), stored in its row with the writer's ``wid``.
        """
        hb_samples = {} if hb_samples is None else hb_samples
        heartbeats: list[tuple[Any, ...]] = []
        facts: dict[NodeKey, tuple[Heartbeat, str, str]] = {}
        readings: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        event_rows: list[dict[str, Any]] = []
        results: dict[str, dict[str, Any]] = {}
        reported: dict[NodeKey, dict[str, Any]] = {}
        for msg, received in batch.uplinks:
            key = (msg.shop, msg.node)
            if isinstance(msg, HEARTBEAT_TYPES):
                f = msg.facts
                metrics = _dumps(msg.metrics)
                # The fields of these flat parts are JSON-ready; wire_fields (a model's __dict__) is far cheaper than model_dump().
                pipelines = _part_json(msg.pipelines)
                heartbeats.append((
                    msg.shop, msg.node, msg.epoch, msg.seq, msg.ts, received, f.cpu_load_1m, f.cpu_temp_c,
                    f.mem_available_bytes, f.disk_free_bytes, msg.outbox_depth, metrics, pipelines, hb_samples.get(id(msg)), wid,
                ))
                prev = facts.get(key)
                if prev is None or prev[0].ts <= msg.ts:
                    facts[key] = (msg, metrics, pipelines)
            elif isinstance(msg, TELEMETRY_TYPES):
                for r in msg.readings:
                    rk = (msg.shop, msg.node, r.source, r.name)
                    prev_r = readings.get(rk)
                    if prev_r is None or prev_r["ts"] <= msg.ts:
                        readings[rk] = {
                            "shop_id": msg.shop, "node_id": msg.node, "source": r.source, "name": r.name,
                            "value": r.value, "unit": r.unit, "labels": dict(r.labels), "ts": msg.ts, "received_at": received,
                        }
            elif isinstance(msg, EVENT_TYPES):
                event_rows.append(
                    {
                        "shop_id": msg.shop, "node_id": msg.node, "kind": "event", "type": msg.type, "state": "",
                        "severity": "", "source": msg.source, "message": "", "data": dict(msg.data),
                        "at": msg.at if msg.at is not None else msg.ts, "received_at": received, "epoch": msg.epoch, "seq": msg.seq,
                    }
                )
            elif isinstance(msg, ALERT_TYPES):
                event_rows.append(
                    {
                        "shop_id": msg.shop, "node_id": msg.node, "kind": "alert", "type": msg.name, "state": msg.state,
                        "severity": msg.severity, "source": msg.source, "message": msg.message, "data": dict(msg.data),
                        "at": msg.ts, "received_at": received, "epoch": msg.epoch, "seq": msg.seq,
                    }
                )
            elif isinstance(msg, CommandResult):
                results[msg.correlation_id] = {
                    "correlation_id": msg.correlation_id, "shop_id": msg.shop, "node_id": msg.node, "ok": msg.ok,
                    "result": dict(msg.result), "error": msg.error, "ts": msg.ts, "received_at": received,
                }
            elif isinstance(msg, ReportedState):
                if key in unknown:
                    self.reports_refused += 1
                    log.warning("reported state from unknown node %s/%s dropped: a report never creates a node "
                                "(the node must send its birth or a heartbeat first)", msg.shop, msg.node)
                    out.append(BusEvent("report_refused", msg.shop, msg.node, {"reason": "unknown_node", "revision": msg.revision}, now))
                    continue
                reported[key] = {
                    "shop_id": msg.shop, "node_id": msg.node, "release": msg.release, "revision": msg.revision,
                    "status": msg.status, "error": msg.error, "objects": [o.model_dump(mode="json") for o in msg.objects],
                    "ts": msg.ts, "received_at": received,
                }
        if heartbeats:
            self._insert_many(conn, HEARTBEATS, _HEARTBEAT_COLUMNS, heartbeats, defer=True)
        self._upsert(conn, READINGS, list(readings.values()), ("shop_id", "node_id", "source", "name"))
        self._upsert(conn, RESULTS, list(results.values()), ("correlation_id",))
        self._upsert(conn, REPORTED, list(reported.values()), ("shop_id", "node_id"))
        self._claim_applier(conn, reported)
        if event_rows:
            ids = conn.execute(insert(EVENTS).returning(EVENTS.c.id, sort_by_parameter_order=True), event_rows).scalars().all()
            for row_id, row in zip(ids, event_rows, strict=False):
                out.append(BusEvent(row["kind"], row["shop_id"], row["node_id"], {"id": row_id, **row}, now))
        out += [BusEvent("reported_state", s, n, r, now) for (s, n), r in reported.items()]
        return facts

    def _claim_applier(self, conn: Connection, reported: dict[NodeKey, dict[str, Any]]) -> None:
        """Make the first node to report on a shop without a declared applier its applier (trust on first use).

        Only for shops nobody declared: a declared applier (``register_shop(applier=...)``) is never
        replaced by a report, so a compromised sibling node cannot take the role later.
        """
        shops = sorted({s for s, _ in reported})
        if not shops:
            return
        open_shops = set(conn.scalars(select(SHOPS.c.id).where(SHOPS.c.id.in_(shops), SHOPS.c.applier.is_(None))))
        for shop in sorted(open_shops):
            node = min(n for s, n in reported if s == shop)
            conn.execute(update(SHOPS).where(SHOPS.c.id == shop, SHOPS.c.applier.is_(None)).values(applier=node))
            log.warning("shop %s had no declared applier: %s, the first node to report, is now its applier "
                        "(declare it with PUT /api/v1/shops/%s {\"applier\": ...} to change it)", shop, node, shop)

    def _presence_of(self, conn: Connection, keys: Iterable[NodeKey]) -> dict[NodeKey, PresenceView]:
        """Return the presence of ``keys``, from the writer's cache or the database."""
        out: dict[NodeKey, PresenceView] = {}
        missing = []
        for k in keys:
            v = self._pending_presence.get(k) or self._presence.get(k)
            if v is None:
                missing.append(k)
            else:
                out[k] = v
        for k, r in self._presence_rows(conn, missing).items():
            out[k] = self._presence[k] = PresenceView(r.session, r.presence, r.presence_reason)
        return out

    def _presence_rows(self, conn: Connection, keys: list[NodeKey]) -> dict[NodeKey, Any]:
        if not keys:
            return {}
        rows = conn.execute(
            select(NODES.c.shop_id, NODES.c.node_id, NODES.c.session, NODES.c.presence, NODES.c.presence_reason).where(
                tuple_(NODES.c.shop_id, NODES.c.node_id).in_(keys)
            )
        )
        return {(r.shop_id, r.node_id): r for r in rows}

    def _set_presences(self, conn: Connection, changes: list[PresenceChange], now: float) -> list[BusEvent]:
        """Store presence changes ``(key, old, new, seen)`` with one update per row shape and one event insert."""
        if not changes:
            return []
        final: dict[NodeKey, dict[str, Any]] = {}  # several changes of one node in a batch: the last one counts
        events: list[dict[str, Any]] = []
        out: list[BusEvent] = []
        for key, old, new, seen in changes:
            prev = final.get(key, {})
            row = {**prev, "b_shop": key[0], "b_node": key[1], "b_session": new.session, "b_presence": new.presence,
                   "b_reason": new.reason, "b_changed": now if new.presence != old else prev.get("b_changed")}
            if seen is not None:
                row["b_seen"] = seen
            final[key] = row
            self._pending_presence[key] = new
            data = {"old": old, "new": new.presence, "reason": new.reason, "session": new.session}
            events.append({"shop_id": key[0], "node_id": key[1], "kind": "presence", "type": new.presence, "state": old,
                           "severity": "", "source": "controller", "message": new.reason, "data": data, "at": now, "received_at": now})
            out.append(BusEvent("presence", key[0], key[1], data, now))
        groups: dict[bool, list[dict[str, Any]]] = {}
        for row in final.values():
            groups.setdefault("b_seen" in row, []).append(row)
        for has_seen, rows in groups.items():
            values: dict[str, Any] = {
                "session": bindparam("b_session"), "presence": bindparam("b_presence"), "presence_reason": bindparam("b_reason"),
                "presence_changed_at": func.coalesce(bindparam("b_changed", type_=NODES.c.presence_changed_at.type), NODES.c.presence_changed_at),
            }
            if has_seen:
                values["last_seen"] = bindparam("b_seen")
            conn.execute(
                update(NODES).where(NODES.c.shop_id == bindparam("b_shop"), NODES.c.node_id == bindparam("b_node")).values(values), rows
            )
        conn.execute(insert(EVENTS), events)
        return out

    def _store_presences(
        self, conn: Connection, presences: list[tuple[Presence, float]], now: float, max_session_jump: int | None = None
    ) -> tuple[list[BusEvent], int]:
        """Apply births and Wills; return the changes and how many were refused for a session jump."""
        if not presences:
            return [], 0
        jumps = 0
        state = self._presence_of(conn, sorted({(p.shop, p.node) for p, _ in presences}))
        changes: list[PresenceChange] = []
        for msg, received in presences:
            key = (msg.shop, msg.node)
            current = state[key]
            if session_jump(current, msg, max_session_jump):
                jumps += 1
                log.warning(
                    "refusing %s presence of %s/%s: session %s is more than %s above the held session %s",
                    msg.state, msg.shop, msg.node, msg.session, max_session_jump, current.session,
                )
                continue
            new = decide_presence(current, msg)
            if new is None:
                log.info(
                    "ignoring %s presence of %s/%s session %s: registry holds session %s (%s)",
                    msg.state, msg.shop, msg.node, msg.session, current.session, current.presence,
                )
                continue
            changes.append((key, current.presence, new, received if msg.state == "online" else None))
            state[key] = new
        return self._set_presences(conn, changes, now), jumps

    def _update_nodes(self, conn: Connection, batch: WriteBatch, facts: dict[NodeKey, tuple[Heartbeat, str, str]],
                      unknown: AbstractSet[NodeKey] = frozenset()) -> None:
        """Update facts, sequence cursor, counters and last_seen of every node in the batch, one statement per row shape.

        ``unknown`` nodes (named only by refused reports) have no row: there is nothing to update,
        and a compare-and-set on the missing row would read as another writer's move, again and again.
        """
        groups: dict[tuple[bool, bool, bool], list[tuple[Any, ...]]] = {}
        for key, seen in batch.seen.items():
            if key in unknown:
                continue
            u = batch.nodes.get(key)
            latest = facts.get(key)
            row: tuple[Any, ...] = (seen,)
            if u is not None:
                c = u.cursor
                row += (c.epoch, c.watermark, _gaps_text(c.gaps), json.dumps(c.retired) if c.retired else None,
                        u.messages, u.duplicates, u.missing, u.evicted)
            if latest is not None:  # in _FACT_COLUMNS order
                hb, metrics, pipelines = latest
                f = hb.facts
                row += (_part_json(f), f.arch, f.node_class, f.agent_version, hb.release, pipelines, metrics,
                        hb.ts, hb.interval_s)
            row += key
            cas = u is not None and u.check_rev
            if cas:
                row += (u.cursor.rev if u.rev is None else u.rev,)  # type: ignore[union-attr]
            groups.setdefault((u is not None, cas, latest is not None), []).append(row)
        greatest = "MAX" if self._dialect == "sqlite" else "GREATEST"
        pg = self._dialect == "postgresql"
        json_cols = _NODE_JSON | {"gaps", "retired_epochs"}
        for (has_cursor, cas, has_facts), rows in groups.items():
            # The column each value of a row goes to, in row order (PostgreSQL casts each to its column's type).
            targets = ["last_seen"]
            if has_cursor:
                targets += ["epoch", "watermark", "gaps", "retired_epochs", "messages_total", "duplicates_total", "missing_total",
                            "evicted_total"]
            if has_facts:
                targets += _FACT_COLUMNS
            targets += ["shop_id", "node_id"] + (["cursor_rev"] if cas else [])
            refs = iter([f"v.c{i}::json" if c in json_cols else f"v.c{i}" for i, c in enumerate(targets)] if pg
                        else [self._placeholder(c in json_cols) for c in targets])
            ph = refs.__next__  # the value of the next target, in row order
            sets = [f"last_seen = {greatest}(COALESCE(last_seen, 0), {ph()})"]
            if has_cursor:
                sets += [f"epoch = {ph()}", f"watermark = {ph()}", f"gaps = {ph()}", f"retired_epochs = {ph()}",
                         f"messages_total = messages_total + {ph()}",
                         f"duplicates_total = duplicates_total + {ph()}", f"missing_total = missing_total + {ph()}",
                         f"evicted_total = evicted_total + {ph()}", "cursor_rev = cursor_rev + 1"]
            if has_facts:
                sets += [f'"{c}" = {ph()}' for c in _FACT_COLUMNS]
            t = "nodes." if pg else ""
            where = f"{t}shop_id = {ph()} AND {t}node_id = {ph()}" + (f" AND {t}cursor_rev = {ph()}" if cas else "")
            if cas:
                rows.sort(key=lambda r: r[-3:-1])  # one lock order for every replica: their batches cannot deadlock
            if pg:
                # One statement for all rows (see _json_rows_from): psycopg's executemany of this update,
                # one round trip of Python work per row, was a third of the writer's time. The rows are
                # joined in their (sorted) order: a nested loop over the pk index, the plan PostgreSQL
                # takes for a set-returning function of unknown size against a large table. The deferred
                # inserts ride along as CTEs (they touch other tables; the statement's row count is the update's).
                ctes, params = self._take_deferred()
                result = conn.exec_driver_sql(f"{ctes}UPDATE nodes SET {', '.join(sets)} FROM {_json_rows_from(NODES, targets, conn.dialect)} "
                                              f"WHERE {where}", (*params, *_json_rows(rows)))
            else:
                result = conn.exec_driver_sql(f"UPDATE nodes SET {', '.join(sets)} WHERE {where}", rows)
            # Compare-and-set: a row another writer moved since we read its cursor matches nothing,
            # and the rows matched fall short. (Only the total is reported, so a conflict reloads every
            # node of the group; conflicts are rare, the hot path stays one call.)
            if cas and result.rowcount != len(rows):
                raise CursorConflict([r[-3:-1] for r in rows])

    def _take_deferred(self) -> tuple[str, tuple[Any, ...]]:
        """Return the deferred inserts as a ``WITH`` clause to prefix a statement with, and their parameters (in order); forget them."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return "", ()
        ctes = ", ".join(f"d{i} AS ({sql})" for i, (sql, _) in enumerate(deferred))
        return f"WITH {ctes} ", tuple(p for _, params in deferred for p in params)

    def _flush_deferred(self, conn: Connection) -> None:
        """Run deferred inserts no node update took along (a batch without one)."""
        deferred, self._deferred = self._deferred, []
        for sql, params in deferred:
            conn.exec_driver_sql(sql, params)

    def _placeholder(self, json_value: bool = False) -> str:
        if self._dialect == "sqlite":
            return "?"
        return "%s::json" if json_value else "%s"

    def _insert_many(self, conn: Connection, table: Table, cols: Sequence[str], rows: list[tuple[Any, ...]], defer: bool = False) -> None:
        """Insert ``rows`` (tuples in ``cols`` order, JSON columns already encoded) with the driver's executemany:
        on the hot path SQLAlchemy's per-row parameter processing costs more than the database's own insert.

        With ``defer`` on PostgreSQL the insert waits for the batch's node update and goes with it (see write_batch).
        """
        json_cols = {c.name for c in table.columns if isinstance(c.type, JSON)}
        names = ", ".join(f'"{c}"' for c in cols)
        if self._dialect == "postgresql":
            # One statement for all rows (see _json_rows_from), not psycopg's one per row.
            refs = ", ".join(f"v.c{i}::json" if c in json_cols else f"v.c{i}" for i, c in enumerate(cols))
            sql = f"INSERT INTO {table.name} ({names}) SELECT {refs} FROM {_json_rows_from(table, cols, conn.dialect)}"
            if defer:
                self._deferred.append((sql, _json_rows(rows)))
            else:
                conn.exec_driver_sql(sql, _json_rows(rows))
            return
        values = ", ".join(self._placeholder(c in json_cols) for c in cols)
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({values})", rows)

    def _revive(self, conn: Connection, batch: WriteBatch, now: float) -> list[BusEvent]:
        """Bring back nodes that silence made stale or offline, or never seen online: any message means alive."""
        changes: list[PresenceChange] = [
            (key, p.presence, PresenceView(p.session, "online", "message"), None)
            for key, p in self._presence_of(conn, sorted(batch.seen)).items()
            if p.presence in ("stale", "unknown") or (p.presence == "offline" and p.reason == "timeout")
        ]
        return self._set_presences(conn, changes, now)

    def sweep_presence(self, settings: PresenceSettings, now: float | None = None,
                       shops: Sequence[str] | None = None) -> list[BusEvent]:
        """Mark silent nodes stale, then offline (reason ``timeout``); return the changes.

        ``shops``, when given, limits the sweep to those shops' nodes: a partitioned replica
        (:mod:`fleet_controller.intake.partitions`) judges only the shops whose stream it stores,
        because the horizon below is its own writer's. Another replica's shops may wait in that
        replica's backlog, which this one cannot see; they are its owner's to judge.

        A node is silent for the lesser of two spans: since its last message was *received*
        (``now - last_seen``), and since its last message was *sent*, counted up to the stream's
        horizon (:meth:`stream_horizon` minus the node's latest heartbeat ``ts``, ``facts_at``, or its
        ``last_seen`` if earlier or absent). While the writer keeps up both agree. While it lags,
        the second is what stays true: a node whose next heartbeat waits in a backlog has not been
        silent, however old the commit of its previous one. The lesser of the two also keeps a
        node whose clock runs behind from looking silent while its messages arrive on time.
        """
        now = time.time() if now is None else now
        horizon = self.stream_horizon(now)
        interval = func.coalesce(NODES.c.heartbeat_interval_s, settings.default_interval_s)

        def silent_beyond(intervals: float) -> ColumnElement[bool]:
            after = interval * intervals
            # min(facts_at, last_seen) < horizon - after, with a NULL facts_at ignored:
            return (NODES.c.last_seen < now - after) & ((NODES.c.last_seen < horizon - after) | (NODES.c.facts_at < horizon - after))

        self._pending_presence = {}
        limit = settings.sweep_max_changes
        # Only nodes whose presence changes, the longest silent first, at most ``sweep_max_changes``
        # (a mass outage is marked over several sweeps instead of in one stall of the writer).
        query = select(NODES.c.shop_id, NODES.c.node_id, NODES.c.session, NODES.c.presence, NODES.c.last_seen,
                       NODES.c.facts_at, NODES.c.heartbeat_interval_s).where(
            ((NODES.c.presence == "online") & silent_beyond(settings.stale_after_intervals))
            | ((NODES.c.presence == "stale") & silent_beyond(settings.offline_after_intervals))
        ).order_by(NODES.c.last_seen, NODES.c.shop_id, NODES.c.node_id).limit(limit + 1)
        with self.engine.begin() as conn:
            if shops is None:
                rows = list(conn.execute(query).all())
            elif self._dialect == "postgresql" and SWEEP_SHOPS_ARRAY:  # one array parameter: the server looks each row up in a hash
                # of it, so neither order nor a repeated shop matters; the query's own ORDER BY and LIMIT apply as for the fleet
                rows = list(conn.execute(query.where(NODES.c.shop_id == any_(bindparam("swept_shops", list(shops),
                                                                                        type_=postgresql.ARRAY(String))))).all())
            else:  # in chunks, under SQLite's limit on bound parameters; merged in the same order
                wanted = sorted(set(shops))
                rows = []
                for i in range(0, len(wanted), SWEEP_SHOPS_CHUNK):
                    rows += conn.execute(query.where(NODES.c.shop_id.in_(wanted[i:i + SWEEP_SHOPS_CHUNK]))).all()
                rows.sort(key=lambda r: (r.last_seen, r.shop_id, r.node_id))
                rows = rows[:limit + 1]
            storm = len(rows) > limit
            if storm:
                rows = rows[:limit]
                self.presence_storm_sweeps += 1
                if time.monotonic() - self._storm_logged_at >= 60.0:
                    self._storm_logged_at = time.monotonic()
                    log.warning("presence storm: more than %d nodes fell silent at once; this sweep marks the %d longest silent "
                                "and the rest follow at up to presence.sweep_max_changes per sweep (%d capped sweeps so far)",
                                limit, limit, self.presence_storm_sweeps)
            changes: list[PresenceChange] = []
            for r in rows:
                iv = r.heartbeat_interval_s or settings.default_interval_s
                sent = r.last_seen if r.facts_at is None else min(r.facts_at, r.last_seen)
                new = silence_presence(r.presence, min(now - r.last_seen, horizon - sent), iv, settings)
                if new != r.presence:
                    reason = "timeout" if new == "offline" else "silent"
                    changes.append(((r.shop_id, r.node_id), r.presence, PresenceView(r.session, new, reason), None))
            out = self._set_presences(conn, changes, now)
        self._presence.update(self._pending_presence)
        if storm:  # the service counts it (shopfleet_controller_presence_sweeps_capped_total)
            out.append(BusEvent("presence_storm", "", None, {"marked": limit, "sweep_max_changes": limit}, now))
        return out

    def enforce_retention(self, settings: RetentionSettings, now: float | None = None) -> dict[str, int]:
        """Delete heartbeats and events beyond their count and age bounds; return rows deleted per table.

        Incremental, so a run costs what it deletes rather than a scan of the history tables (issue
        #15: a ``row_number()`` over 36M heartbeats cannot run every minute in the writer). The age
        bound walks the primary key from the oldest row (:func:`_delete_aged`); the count bound
        visits a chunk of nodes (shops for events) per run, cycling through the fleet, and finds
        each one's cut by a seek on its ``(shop_id, node_id, id)`` index (:meth:`_trim_chunk`).
        Every node is visited at least once per :data:`RETENTION_CYCLE_RUNS` runs, so between
        visits it may hold the heartbeats it sent in that many intervals beyond its bound.
        """
        now = time.time() if now is None else now
        deleted: dict[str, int] = {}
        with self._rollups_applied(now), self.engine.begin() as conn:
            # Heartbeat rows carry the raw samples of node series (0019_heartbeat_samples): the bounds delete only rows
            # whose samples are in every tier of their writer (series.deletable_heartbeats). When they reach rows of this
            # writer its hour tier does not hold yet, this run flushes its hours first, so the bounds stay as they were.
            aged, aged_top = _aged(conn, HEARTBEATS, now - settings.heartbeat_max_age_s)
            cuts = self._trim_plan(conn, HEARTBEATS, (NODES.c.shop_id, NODES.c.node_id), (HEARTBEATS.c.shop_id, HEARTBEATS.c.node_id),
                                   settings.heartbeats_per_node)
            top = max([c["cut"] for c in cuts] + ([aged_top] if aged_top is not None else []), default=None)
            hour = self.rollups.hour_cursor(conn)
            force_hours = top is not None and hour is not None and top > hour
            deleted.update(self.rollups.maintain(conn, settings.series, now, series_dead_after(settings), force_hours,
                                                 interval_s=settings.interval_s))
            deletable = series.deletable_heartbeats(self._dialect)
            deleted["heartbeats"] = (_delete_aged(conn, HEARTBEATS, 0.0, aged, deletable)
                                     + self._trim_delete(conn, HEARTBEATS, (HEARTBEATS.c.shop_id, HEARTBEATS.c.node_id), cuts, deletable))
            deleted["events"] = (_delete_aged(conn, EVENTS, now - settings.event_max_age_s)
                                 + self._trim_chunk(conn, EVENTS, (SHOPS.c.id,), (EVENTS.c.shop_id,), settings.events_per_shop))
            newest_kept = select(QUARANTINE.c.id).order_by(QUARANTINE.c.id.desc()).offset(QUARANTINE_KEEP).limit(1).scalar_subquery()
            deleted["quarantine"] = conn.execute(delete(QUARANTINE).where(QUARANTINE.c.id <= newest_kept)).rowcount
        return deleted

    @contextlib.contextmanager
    def _rollups_applied(self, now: float) -> Iterator[None]:
        """Around a transaction that flushes series: apply its effect on the writer's memory once it committed, or forget it."""
        try:
            yield
        except BaseException:
            self.rollups.rolled_back()
            raise
        self.rollups.committed(now)

    def flush_series(self, now: float | None = None) -> None:
        """Write both roll-up tiers of what this writer holds in memory (on a clean shutdown; else another writer recovers it)."""
        now = time.time() if now is None else now
        with self._rollups_applied(now), self.engine.begin() as conn:
            self.rollups.flush_all(conn, now)

    def _trim_chunk(self, conn: Connection, table: Table, parent: Sequence[Any], part: Sequence[Any], keep: int) -> int:
        """Delete all but the ``keep`` newest rows of the next chunk of owners of ``table`` (:meth:`_trim_plan`); return rows deleted."""
        return self._trim_delete(conn, table, part, self._trim_plan(conn, table, parent, part, keep))

    def _trim_delete(self, conn: Connection, table: Table, part: Sequence[Any], cuts: list[dict[str, Any]],
                     *also: ColumnElement[bool]) -> int:
        """Delete the rows of each owner up to its cut (:meth:`_trim_plan`), narrowed by ``also``; return rows deleted."""
        if not cuts:
            return 0
        stmt = delete(table).where(*(col == bindparam(f"k{i}") for i, col in enumerate(part)), table.c.id <= bindparam("cut"), *also)
        return conn.execute(stmt, cuts).rowcount

    def _trim_plan(self, conn: Connection, table: Table, parent: Sequence[Any], part: Sequence[Any], keep: int) -> list[dict[str, Any]]:
        """Delete all but the ``keep`` newest rows of the next chunk of owners (nodes or shops) of ``table``; return rows deleted.

        The owners come from ``parent`` (the nodes or shops table) in key order after the cursor
        this store keeps per table, and the cursor wraps to the start at the end of the table, so
        owners added between runs are visited in their turn. One query finds, per owner, the id
        of its ``keep + 1``-th newest row (an index seek and a walk of ``keep`` entries); one
        executemany deletes that row and every older one of the owner (:meth:`_trim_delete`); this returns its
        parameters, one per owner with rows to delete.
        """
        total = conn.scalar(select(func.count()).select_from(parent[0].table)) or 0
        chunk = max(RETENTION_MIN_CHUNK, -(-total // RETENTION_CYCLE_RUNS))
        owned = [col == parent_col for col, parent_col in zip(part, parent, strict=True)]
        cut = select(table.c.id).where(*owned).order_by(table.c.id.desc()).offset(keep).limit(1).correlate(parent[0].table)
        owners = select(*parent, cut.scalar_subquery().label("cut")).order_by(*parent)
        cursor = self._retention_cursor.get(table.name)
        cuts: list[Any] = []
        if cursor is not None:
            after = tuple_(*parent) > tuple_(*(bindparam(f"c{i}", v) for i, v in enumerate(cursor)))
            cuts = list(conn.execute(owners.where(after).limit(chunk)).all())
        if len(cuts) < chunk:
            # The end of the table: wrap to its start within this run, so a run always visits a full chunk
            # and a fleet of N owners is covered in ceil(N / chunk) runs whatever the cursor's position.
            cuts += conn.execute(owners.limit(chunk - len(cuts))).all()
        self._retention_cursor[table.name] = tuple(cuts[-1][:-1]) if cuts else None
        return [{**{f"k{i}": v for i, v in enumerate(r[:-1])}, "cut": r[-1]} for r in cuts if r[-1] is not None]

    def register_shop(
        self, shop: str, *, name: str | None = None, region: str | None = None,
        labels: dict[str, str] | None = None, timezone: str | None = None, applier: str | None = None,
        now: float | None = None,
    ) -> None:
        """Create a shop or update its name, region, labels, timezone and applier.

        ``applier`` declares the node whose reported state decides the shop's rollouts; reports of
        every other node of the shop are stored but never decide anything.
        """
        validate_id(shop, "shop id")
        if applier is not None:
            validate_id(applier, "applier node id")
        now = time.time() if now is None else now
        values = {k: v for k, v in {"name": name, "region": region, "labels": labels, "timezone": timezone, "applier": applier}.items()
                  if v is not None}
        with self.engine.begin() as conn:
            stmt = self._insert(SHOPS).values(
                id=shop, name=name or shop, region=region or "", labels=labels or {}, timezone=timezone or "UTC", created_at=now,
                applier=applier,
            )
            if values:
                stmt = stmt.on_conflict_do_update(index_elements=["id"], set_=values)
            else:
                stmt = stmt.on_conflict_do_nothing()
            conn.execute(stmt)
        self._known_shops.add(shop)

    def remove_node(self, shop: str, node: str, now: float | None = None) -> BusEvent:
        """Remove a node from the registry (a node retired on purpose); return the change for the event bus.

        Its row goes, and with it its presence, sequence cursor and counters, and its latest
        readings and reported state; its history (heartbeats, events, series) stays until retention
        ages it out, like any other. Raise :class:`NodeNotRemovable` if the registry does not know
        the node, or if it is its shop's applier (its reports decide the shop's rollouts: declare
        another applier first). A node that sends again afterwards comes back as a new node, from
        its next message: revoke its credentials first (the API does) so it cannot.
        """
        now = time.time() if now is None else now
        key = (shop, node)
        with self.engine.begin() as conn:
            if conn.execute(select(NODES.c.node_id).where(NODES.c.shop_id == shop, NODES.c.node_id == node)).first() is None:
                raise NodeNotRemovable("not_found", f"node {shop}/{node} is not in the registry")
            if conn.scalar(select(SHOPS.c.applier).where(SHOPS.c.id == shop)) == node:
                raise NodeNotRemovable("applier", f"node {shop}/{node} is the applier of shop {shop} (its reports decide the "
                                                  f"shop's rollouts): declare another applier first (PUT /api/v1/shops/{shop} "
                                                  '{"applier": "<node>"})')
            for table in (READINGS, REPORTED, NODES):
                conn.execute(delete(table).where(table.c.shop_id == shop, table.c.node_id == node))
        self.forget([key])
        return BusEvent("node_removed", shop, node, {"shop": shop, "node": node}, now)

    def forget(self, keys: Iterable[NodeKey]) -> None:
        """Drop what this writer remembers of ``keys`` (known, presence): read from the database again on their next message.

        After :meth:`remove_node`, and after a compare-and-set found a node's row changed or gone
        under this writer (another replica removed or moved it), so that its next message
        re-creates a removed node instead of updating a row that no longer exists, again and again.
        """
        for key in keys:
            self._known_nodes.discard(key)
            self._presence.pop(key, None)


class NodeNotRemovable(Exception):
    """A node the registry cannot remove: ``reason`` is ``not_found`` or ``applier``; the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Quarantined:
    """One message to keep in the dead-letter table: what arrived, and why it could not be stored."""

    topic: str
    payload: bytes
    received_at: float
    reason: str
    error: str
    shop: str | None = None
    node: str | None = None


def _clean_text(text: str, limit: int) -> str:
    # PostgreSQL refuses NUL in text, and the error text may quote the very payload that held one.
    return text.replace("\x00", "\\0")[:limit]


def quarantine_row(q: Quarantined, now: float) -> dict[str, Any]:
    """Return the ``quarantine`` row for ``q``: topic, error and payload capped, NULs escaped."""
    return {
        "received_at": q.received_at, "quarantined_at": now, "topic": _clean_text(q.topic, 512),
        "shop_id": q.shop, "node_id": q.node, "reason": q.reason[:32],
        "error": _clean_text(q.error, QUARANTINE_ERROR_CHARS),
        "payload": bytes(q.payload[:QUARANTINE_PAYLOAD_BYTES]), "payload_bytes": len(q.payload),
    }


def store_quarantined(engine: Engine, items: Sequence[Quarantined], now: float | None = None) -> None:
    """Insert ``items`` into the dead-letter table in one transaction (raises what the database raises)."""
    if not items:
        return
    now = time.time() if now is None else now
    with engine.begin() as conn:
        conn.execute(insert(QUARANTINE), [quarantine_row(q, now) for q in items])
