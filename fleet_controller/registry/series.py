"""Time series of what an operator charts: camera fps, occupancy, fridge temperatures, shelf weights, node load.

Three tiers, so a fleet that runs for years keeps a bounded table and a 90-day chart still reads
few rows:

* raw samples: the samples of one message in one row, as ``[[name, source, value], ...]`` JSON
  text: a telemetry message's readings in ``series_raw``, kept ``retention.series.raw_max_age_s``
  (24 h by default); a heartbeat's five node values and its cameras' fps in its own heartbeat
  row (``heartbeats.samples``, revision ``0019_heartbeat_samples``), kept as long as the
  heartbeat (``retention.heartbeats_per_node``, ``heartbeat_max_age_s``): one structure written
  per heartbeat besides its node's row, where a ``series_raw`` row of its own, with its per-shop
  index, cost another page at a scattered place (docs/benchmarks.md, Scale). One row per message rather
  than per sample keeps the intake's hot path cheap: storing 10,000 heartbeats through
  ``write_batch`` on SQLite (2 shared cores), a row per sample cut the rate from 20,000-36,000/s
  to ~10,000/s, one packed row per message measured 13,000-19,500/s; folding 10,500 such rows
  into the rollups takes ~0.26 s of the writer's time;
* ``series_rollup`` with ``step`` 60: count, sum, min and max per 1-minute bucket, kept
  ``minute_max_age_s`` (7 days);
* ``series_rollup`` with ``step`` 3600: the same per hour, kept ``hour_max_age_s`` (90 days).

Samples come from the intake's writer, inside the batch's transaction (:func:`store_points`,
called by :meth:`RegistryStore.write_batch`): from every heartbeat the node's CPU, memory, disk
and temperature (``node`` set, ``source`` empty) and each pipeline's fps (``source`` = pipeline,
i.e. camera); from every telemetry reading its own name and source (``occupancy`` per camera,
``temperature_c`` per fridge, ``shelf_weight_g`` per slot...).

The roll-up is made by each writer from the samples it has just stored (:class:`Rollups`): once a
batch commits its samples are folded into minute and hour buckets in memory; the retention run
(every ``retention.interval_s``) merges the minute buckets into ``series_rollup``, and the hour
buckets once the oldest hour held is over. Nothing is read back or parsed again, and at 10 s
heartbeats a minute bucket is written once for six samples, an hour bucket once for 360 (the
earlier roll-up re-read and re-parsed every raw row and upserted both tiers every minute: about a
third of the writer's time at 100,000 nodes, docs/benchmarks.md). What a writer holds in memory
is never lost: each flush records, in ``series_writers``, the highest raw id of that writer the
tier now holds, per table (``series_raw``, ``heartbeats``: :data:`SOURCES`), and raw rows name their writer
(``series_raw.wid``, ``heartbeats.wid``); a writer that stops flushing
for :func:`~fleet_controller.registry.store.series_dead_after` is taken for dead and any other
writer's run folds its rows above those cursors again from ``series_raw``. Per-writer cursors also
make replicas on PostgreSQL exact, where one id cursor could skip a row whose transaction
committed after a higher id of the other replica's. Buckets are merged with an upsert (count and
sum add, min and max combine), so a bucket can receive samples from several flushes and writers,
and a node that replays an hour of outbox still lands in its right (old) buckets. Raw rows are
deleted past their age only below every writer's cursors, and heartbeats by their count and age bounds only below
their own writer's (:func:`deletable_heartbeats`).

Reads (:func:`read_series`) choose the tier from the range asked for (:func:`choose_tier`) and
re-bucket it to at most ``max_points`` points per line, aligned on one time axis (what a chart
library wants), with the bucket's mean, min and max: in SQL for the rollups, in Python for raw
rows (read for short ranges only, a shop's few thousand rows). A node series' raw tier is its
heartbeat rows, so it holds only what their bounds keep (:func:`_heartbeats_hold`); a range
starting earlier reads the minute tier.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    cast,
    delete,
    false,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.dml import Delete
from sqlalchemy.sql.elements import ColumnElement

from edge_agent.protocol import (
    HEARTBEAT_TYPES,
    TELEMETRY_TYPES,
    Alert,
    CommandResult,
    Event,
    Heartbeat,
    ReportedState,
    Telemetry,
)
from fleet_controller.registry.db import Base, table_of
from fleet_controller.registry.models import HeartbeatRecord, LatestReading, Node
from fleet_controller.settings import SeriesSettings

log = logging.getLogger(__name__)

try:
    import orjson

    _HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson comes with the controller extra
    _HAVE_ORJSON = False

MINUTE = 60
HOUR = 3600
ROLLUP_STEPS = (MINUTE, HOUR)

NODE_SERIES: dict[str, tuple[str, str]] = {
    "cpu_percent": ("CPU", "%"),
    "cpu_load_1m": ("Load (1 min)", ""),
    "mem_used_percent": ("Memory used", "%"),
    "disk_used_percent": ("Disk used", "%"),
    "cpu_temp_c": ("CPU temperature", "°C"),
    "fps": ("Frames per second", "fps"),
}
"""Series the writer derives from heartbeats: name -> (label, unit). ``fps`` is per pipeline (source)."""

EDGE_SLACK_S = 300.0
"""A range starting up to this long before a tier's age still reads that tier (its oldest minutes
may be blank): a "last 7 days" chart whose 'now' is a moment older than the server's must not
fall to hourly buckets."""

SERIES_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class SeriesSamples(Base):
    """The raw samples of one message: ``samples`` is JSON text ``[[name, source, value], ...]``; ``wid`` the writer that stored it."""

    __tablename__ = "series_raw"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    ts: Mapped[float] = mapped_column(Float)
    samples: Mapped[str] = mapped_column(Text)
    wid: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    __table_args__ = (Index("ix_series_raw_shop_ts", "shop_id", "ts"), Index("ix_series_raw_writer", "wid", "id"))


class SeriesRollup(Base):
    """One bucket of one series at one step (60 or 3600 s): count, sum, min, max."""

    __tablename__ = "series_rollup"
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[float] = mapped_column(Float, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    source: Mapped[str] = mapped_column(String(128), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    total: Mapped[float] = mapped_column(Float)
    lo: Mapped[float] = mapped_column(Float)
    hi: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_series_rollup_age", "step", "bucket"),)  # 0018_series_writers: retention by age


class SeriesWriterRecord(Base):
    """A writer that stores raw samples: up to which of its raw ids each roll-up tier holds its rows.

    Added by ``0018_series_writers``. Writer 0 stands for the rows stored before it.
    """

    __tablename__ = "series_writers"
    wid: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    instance: Mapped[str] = mapped_column(String(200), default="", server_default="")
    started_at: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float)
    minute_upto: Mapped[int] = mapped_column(BigInteger)
    hour_upto: Mapped[int] = mapped_column(BigInteger)
    pending_upto: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    pending_hours: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    pending_parts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # 0019_heartbeat_samples: the same cursors in the ids of ``heartbeats`` (whose rows carry the heartbeats' samples).
    minute_upto_hb: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    hour_upto_hb: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    pending_upto_hb: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


RAW = table_of(SeriesSamples)
ROLLUP = table_of(SeriesRollup)
WRITERS = table_of(SeriesWriterRecord)
HEARTBEATS = table_of(HeartbeatRecord)
NODES = table_of(Node)


@dataclass(frozen=True)
class _Source:
    """A table of raw samples and the names of a writer's cursors in its ids (``series_writers`` columns)."""

    table: Table
    minute: str
    hour: str
    pending: str


SOURCES = (_Source(RAW, "minute_upto", "hour_upto", "pending_upto"),
           _Source(HEARTBEATS, "minute_upto_hb", "hour_upto_hb", "pending_upto_hb"))
"""Where raw samples are stored: ``series_raw`` (telemetry; heartbeats of before 0019) and ``heartbeats.samples``."""
_RAW_COLUMNS = ("shop_id", "node_id", "ts", "samples", "wid")
_ROLLUP_COLUMNS = ("step", "shop_id", "name", "bucket", "node_id", "source", "n", "total", "lo", "hi")
"""A roll-up row's values in the order :meth:`Rollups._rows` gives them."""
RECOVERY_CHUNK = 20_000
"""Raw rows of a dead writer folded again per transaction: bounds the memory and the stall of catching up."""
HOUR_FLUSH_SLACK_S = 120.0
"""The hour tier is flushed this long after the oldest hour it holds ends, so samples a little late still join their hour in memory."""
HOUR_FLUSH_MIN_INTERVAL_S = 600.0
"""Least time between two flushes of the hour tier."""

Uplink = Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState
Points = list[tuple[str, str, float]]
StoredRow = tuple[str, str, float, Points]
"""A message's samples as stored: shop, node, ts, samples."""
_Key = tuple[str, str, float, str, str]
"""A roll-up bucket in memory: shop, node, bucket start, name, source."""


# --------------------------------------------------------------------------------------------
# Writing (on the single writer)
# --------------------------------------------------------------------------------------------


def _percent_used(available: int, total: int) -> float | None:
    return None if total <= 0 else round(100.0 * (1.0 - available / total), 3)


def points_from(msg: Uplink) -> Points:
    """Return the series samples ``(name, source, value)`` one message carries."""
    if isinstance(msg, HEARTBEAT_TYPES):
        f = msg.facts
        # One tuple per value, no dict in between (every heartbeat of the fleet comes through here).
        node_values = (
            ("cpu_percent", f.cpu_percent),
            ("cpu_load_1m", f.cpu_load_1m),
            ("mem_used_percent", _percent_used(f.mem_available_bytes, f.mem_total_bytes)),
            ("disk_used_percent", _percent_used(f.disk_free_bytes, f.disk_total_bytes)),
            ("cpu_temp_c", f.cpu_temp_c),
        )
        out = [(k, "", float(v)) for k, v in node_values if v is not None]
        if msg.pipelines:
            out += [("fps", name, float(p.fps)) for name, p in msg.pipelines.items() if p.fps is not None]
        return out
    if isinstance(msg, TELEMETRY_TYPES):
        # NaN and infinities cannot be charted or averaged; the latest-readings table still shows them.
        return [(r.name, r.source, r.value) for r in msg.readings if math.isfinite(r.value)]
    return []


def _dumps(value: Any) -> str:
    """Return ``value`` as compact JSON text: orjson (~10x the stdlib) on the writer's hot path.

    Only for samples of validated messages (the protocol refuses non-finite numbers, telemetry
    samples are filtered), where both libraries write JSON that reads back the same.
    """
    if _HAVE_ORJSON:
        text: str = orjson.dumps(value).decode()
        return text
    return json.dumps(value, separators=(",", ":"))


def _loads(text: str) -> Any:
    return orjson.loads(text) if _HAVE_ORJSON else json.loads(text)


_PG_INSERT_RAW = (
    "INSERT INTO series_raw (shop_id, node_id, ts, samples, wid) "
    "SELECT e->>0, e->>1, (e->>2)::double precision, e->>3, (e->>4)::bigint FROM jsonb_array_elements(%s::jsonb) AS e"
)
"""PostgreSQL: every row of a batch in one JSON parameter, unpacked by the server (as the registry's heartbeat insert
does): psycopg's executemany costs a round trip of Python work per row, the largest statement of a batch once the
heartbeat and node statements went this way."""


def store_points(conn: Connection, uplinks: Iterable[tuple[Uplink, float]], defer: list[tuple[str, tuple[Any, ...]]] | None = None,
                 wid: int = 0, heartbeat_samples: dict[int, str | None] | None = None) -> list[StoredRow]:
    """Insert the samples of a batch's uplinks (in the batch's transaction), a row per message written by writer ``wid``;
    return the rows' samples, for :meth:`Rollups.add` once the transaction commits.

    With ``heartbeat_samples``, a heartbeat's samples are not inserted here: their JSON text (or None, no sample) is put
    in it by ``id()`` of the message, for the heartbeat's own row (``heartbeats.samples``, see
    :meth:`RegistryStore.write_batch`), and only telemetry goes to ``series_raw``.

    On PostgreSQL with ``defer``, the insert is appended to it as ``(sql, params)`` instead of run:
    the registry sends it with the batch's node update, one round trip for both (see
    :meth:`RegistryStore.write_batch`).
    """
    stored: list[StoredRow] = []
    rows = []
    for msg, _received in uplinks:
        points = points_from(msg)
        if heartbeat_samples is not None and isinstance(msg, HEARTBEAT_TYPES):
            heartbeat_samples[id(msg)] = _dumps(points) if points else None
            if points:
                stored.append((msg.shop, msg.node, msg.ts, points))
            continue
        if points:
            stored.append((msg.shop, msg.node, msg.ts, points))
            rows.append((msg.shop, msg.node, msg.ts, _dumps(points), wid))
    if not rows:
        return stored
    if conn.dialect.name == "postgresql":
        if defer is not None:
            defer.append((_PG_INSERT_RAW, (_dumps(rows),)))
        else:
            conn.exec_driver_sql(_PG_INSERT_RAW, (_dumps(rows),))
    else:
        conn.exec_driver_sql(f"INSERT INTO series_raw ({', '.join(_RAW_COLUMNS)}) VALUES (?, ?, ?, ?, ?)", rows)
    return stored


def _bucket(dialect: str, ts: Any, step: float) -> ColumnElement[Any]:
    """Return the SQL of ``floor(ts / step) * step`` on this dialect (SQLite has no floor() before 3.35)."""
    if dialect == "sqlite":
        # Timestamps are positive, so truncation is floor.
        return cast(ts / step, Integer) * step
    return func.floor(ts / step) * step


class Buckets:
    """Count, sum, min and max per bucket key, the values of every bucket in one flat array of doubles.

    One object the garbage collector tracks, however many buckets: ``array`` objects are
    containers it tracks, and an array per bucket (what the writer held before, 2026-12-01) made
    800,000 of them at 100,000 nodes, so each full collection of the writer's heap was a pause of
    about half a second (docs/benchmarks.md, Scale). The keys are tuples of strings and floats,
    which the collector stops tracking once it has seen them.
    """

    __slots__ = ("index", "values")

    def __init__(self) -> None:
        self.index: dict[_Key, int] = {}
        """Key -> offset of its four values (count, sum, min, max) in :attr:`values`."""
        self.values = array("d")

    def __len__(self) -> int:
        return len(self.index)

    def copy(self) -> Buckets:
        other = Buckets()
        other.index, other.values = dict(self.index), array("d", self.values)
        return other

    def merge(self, key: _Key, n: float, total: float, lo: float, hi: float) -> None:
        """Add a bucket's values to ``key``'s (count and sum add, min and max combine)."""
        v = self.values
        i = self.index.get(key)
        if i is None:
            self.index[key] = len(v)
            v.extend((n, total, lo, hi))
            return
        v[i] += n
        v[i + 1] += total
        if lo < v[i + 2]:
            v[i + 2] = lo
        if hi > v[i + 3]:
            v[i + 3] = hi

    def rows(self, step: int) -> list[tuple[Any, ...]]:
        """The buckets as rows ``(step, shop, name, bucket, node, source, n, total, lo, hi)``."""
        v = self.values
        return [(step, shop, name, bucket, node, source, int(v[i]), v[i + 1], v[i + 2], v[i + 3])
                for (shop, node, bucket, name, source), i in self.index.items()]


def _fold(acc: Buckets, shop: str, node: str, bucket: float, points: Points) -> None:
    """Add one message's samples to the buckets ``acc`` holds (count, sum, min, max per series).

    :meth:`Buckets.merge` of one sample each, inlined: this runs for every sample of every stored message.
    """
    index, v = acc.index, acc.values
    for name, source, value in points:
        key = (shop, node, bucket, name, source)
        i = index.get(key)
        if i is None:
            index[key] = len(v)
            v.extend((1.0, value, value, value))
        else:
            v[i] += 1.0
            v[i + 1] += value
            if value < v[i + 2]:
                v[i + 2] = value
            if value > v[i + 3]:
                v[i + 3] = value


_UPSERT_SQL: dict[str, tuple[str, bool]] = {}
"""The compiled bucket upsert per dialect (see :func:`_upsert_sql`)."""


def _upsert_sql(conn: Connection) -> tuple[str, bool]:
    """Return the bucket upsert as driver SQL (count and sum add, min and max combine) and whether it takes positional
    parameters; compiled once per dialect (a part of a flush is written with every batch)."""
    dialect = conn.dialect.name
    cached = _UPSERT_SQL.get(dialect)
    if cached is not None:
        return cached
    least, greatest = (func.min, func.max) if dialect == "sqlite" else (func.least, func.greatest)
    if dialect == "postgresql":
        stmt: postgresql.Insert | sqlite.Insert = postgresql.insert(ROLLUP)
    elif dialect == "sqlite":
        stmt = sqlite.insert(ROLLUP)
    else:
        raise NotImplementedError(f"database {dialect!r} is not supported: use SQLite or PostgreSQL")
    stmt = stmt.on_conflict_do_update(
        index_elements=["step", "shop_id", "name", "bucket", "node_id", "source"],
        set_={"n": ROLLUP.c.n + stmt.excluded.n, "total": ROLLUP.c.total + stmt.excluded.total,
              "lo": least(ROLLUP.c.lo, stmt.excluded.lo), "hi": greatest(ROLLUP.c.hi, stmt.excluded.hi)},
    )
    # The upsert goes to the driver as compiled SQL with plain tuples: SQLAlchemy's per-row parameter
    # processing was half of the roll-up's time at 100,000 nodes (docs/benchmarks.md, Scale).
    compiled = stmt.compile(dialect=conn.dialect, column_keys=list(_ROLLUP_COLUMNS))
    positional = bool(compiled.positional)
    # sqlite3 takes positional parameters, in the column_keys order compiled above; psycopg named ones.
    assert not positional or list(compiled.positiontup or ()) == list(_ROLLUP_COLUMNS), compiled.positiontup
    _UPSERT_SQL[dialect] = (str(compiled), positional)
    return _UPSERT_SQL[dialect]


_PG_UPSERT_JSON = (
    "INSERT INTO series_rollup (step, shop_id, name, bucket, node_id, source, n, total, lo, hi) "
    "SELECT (e->>0)::int, e->>1, e->>2, (e->>3)::double precision, e->>4, e->>5, (e->>6)::int, (e->>7)::double precision, "
    "(e->>8)::double precision, (e->>9)::double precision FROM jsonb_array_elements(%s::jsonb) AS e "
    "ON CONFLICT (step, shop_id, name, bucket, node_id, source) DO UPDATE SET n = series_rollup.n + excluded.n, "
    "total = series_rollup.total + excluded.total, lo = least(series_rollup.lo, excluded.lo), hi = greatest(series_rollup.hi, excluded.hi)"
)
"""PostgreSQL: a part's buckets in one statement of one JSON parameter (psycopg's executemany is a round of Python work per row)."""


def _write_buckets(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """Merge bucket rows ``(step, shop, name, bucket, node, source, n, total, lo, hi)`` into the tiers; return how many."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_PG_UPSERT_JSON, (_dumps(rows),))
        return len(rows)
    sql, positional = _upsert_sql(conn)
    conn.exec_driver_sql(sql, rows if positional else [dict(zip(_ROLLUP_COLUMNS, r, strict=True)) for r in rows])
    return len(rows)


def _merge_hours(hours: Buckets, minutes: Buckets) -> None:
    """Add minute buckets to the hour buckets they fall in (count and sum add, min and max combine)."""
    floor, merge, v = math.floor, hours.merge, minutes.values
    for (shop, node, bucket, name, source), i in minutes.index.items():
        merge((shop, node, float(floor(bucket / HOUR) * HOUR), name, source), v[i], v[i + 1], v[i + 2], v[i + 3])


def _part_rows(minutes: Buckets, hours: Buckets | None) -> list[tuple[Any, ...]]:
    """The rows of a part: its minute buckets, and with ``hours`` those hours plus these minutes (a copy: writing
    the part changes no memory, so a rolled-back write can be written again)."""
    rows = minutes.rows(MINUTE)
    if hours is not None:
        merged = hours.copy()
        _merge_hours(merged, minutes)
        rows += merged.rows(HOUR)
    return rows


def _cursors(upto: tuple[int, ...], hours: bool) -> dict[str, int]:
    """The ``series_writers`` values saying the minute tier (and with ``hours`` the hour tier) holds this writer's rows up to ``upto``."""
    values = {src.minute: u for src, u in zip(SOURCES, upto, strict=True)}
    if hours:
        values.update({src.hour: u for src, u in zip(SOURCES, upto, strict=True)})
    return values


def _part_of(shop: str, node: str, parts: int) -> int:
    """The part of a flush a node's buckets go in: a hash any writer can compute again (recovery skips the parts written)."""
    return zlib.crc32(f"{shop}\0{node}".encode()) % parts


PARTS = 64
"""Parts of a flush: a writer holds its buckets in this many maps by node (:func:`_part_of`), and a large flush writes one
per intake batch (at 100,000 nodes: ~8,000 buckets, some 20 ms, per batch)."""
PART_BUCKETS = 5_000
"""A flush of at most this many buckets is written whole by the retention run (a small fleet's: no parts)."""
FLUSH_SPREAD = 0.5
"""The parts of a flush are written over this share of the retention interval (``retention.interval_s``), at most one
per batch and one per ``spread / parts`` seconds, instead of one per batch: the 64 parts written back to back about
doubled the cost of every batch for seconds each minute, and at 60,000 nodes that burst alone took receive-to-commit
p99 from 0.4-0.6 s to 3.6-3.8 s (docs/benchmarks.md, Scale, round of 2026-11-30 21:59-22:54)."""

@dataclass
class _Flush:
    """A flush under way: the buckets of every raw row of this writer up to ``upto`` (an id per table of :data:`SOURCES`),
    in ``len(parts)`` parts of (minute buckets, hour buckets or None)."""

    upto: tuple[int, ...]
    hours: bool
    parts: list[tuple[Buckets, Buckets | None]]
    done: int = 0
    pace_s: float = 0.0
    """Least time between two parts written by batches (:meth:`Rollups.step` with ``now``); 0: one per batch."""
    next_at: float = -math.inf
    """When a batch may write the next part."""


class Rollups:
    """A writer's running roll-up of the samples it stores, and the recovery of other writers' leftovers.

    Folding happens as batches commit (:meth:`add`), from the samples the writer already holds:
    nothing is read back or parsed again. Samples go into minute buckets; minute buckets go into
    the hour maps when the part of the flush holding them commits (:meth:`committed`), or, when
    the hours are flushed with them, into a copy of the hour maps as the part is written. Each retention run takes what is held (the minute
    buckets; the hour buckets too once the oldest hour held is over) as a *flush* of all this
    writer's raw rows up to the highest id it stored, cut into parts by a hash of the node
    (:func:`_part_of`); each intake batch then writes one part in its own transaction
    (:meth:`step`), so at 100,000 nodes the half a million buckets of a minute go in slices of a
    few milliseconds instead of one stall of seconds. ``series_writers`` records, per writer, the
    highest raw id each tier holds whole (``minute_upto``, ``hour_upto``) and the flush under way
    (``pending_upto``, ``pending_hours``, ``pending_parts``, ``pending_done``), each change in the
    transaction that writes the buckets. Whatever a writer held when it died is therefore known
    exactly: its raw rows (``series_raw.wid``) above its cursors, less the parts already written.
    Any writer's retention run folds those again once the dead writer's ``seen_at`` is older than
    ``dead_after_s`` (:data:`RECOVERY_CHUNK` rows per run and writer), then forgets it.

    Buckets merge with what is stored (count and sum add, min and max combine), so a bucket can be
    fed by several flushes and several writers (replicas on PostgreSQL, a restarted controller), and
    a sample arriving late (a node replaying its outbox) lands in its own, old bucket.
    """

    def __init__(self, instance: str = "") -> None:
        self.instance = instance[:200]
        self.wid: int | None = None
        self.minutes: list[Buckets] = [Buckets() for _ in range(PARTS)]
        self.hours: list[Buckets] = [Buckets() for _ in range(PARTS)]
        self.oldest_hour = math.inf
        """Start of the oldest hour bucket held in memory (the hour tier is flushed once it is over)."""
        self.hours_flushed_at = -math.inf
        self.flush: _Flush | None = None
        self._part: dict[tuple[str, str], int] = {}
        """Memo of :func:`_part_of` by node."""
        self._stepped = 0
        self._taken: _Flush | None = None
        self.lost_flushes = 0
        """Flushes given up because another writer had taken this one for dead (see :meth:`_update_writer`)."""

    def register(self, engine: Engine, now: float) -> int:
        """Return this writer's id, registering it (in its own transaction) on first use."""
        if self.wid is None:
            with engine.begin() as conn:
                # A new writer holds nothing: its cursors start at each table's highest id, so rows stored before it are
                # never taken for its own (SQLite gives a forgotten writer's wid to the next one: its rows, already
                # folded, are neither folded again nor held back should the new writer die).
                upto = tuple(int(conn.scalar(select(func.max(src.table.c.id))) or 0) for src in SOURCES)
                wid = conn.execute(WRITERS.insert().values(instance=self.instance, started_at=now, seen_at=now,
                                                           **_cursors(upto, True))).inserted_primary_key[0]  # type: ignore[index]
            self.wid = int(wid)
        return self.wid

    def add(self, rows: Iterable[StoredRow]) -> None:
        """Fold committed rows into the minute buckets held in memory (the hour buckets are made from those, see :meth:`committed`)."""
        minutes, parts, part_of = self.minutes, len(self.minutes), self._part
        floor = math.floor
        oldest = self.oldest_hour
        if len(part_of) > 1_000_000:  # a bound on the memo, whatever the fleet's churn
            part_of.clear()
        for shop, node, ts, points in rows:
            part = part_of.get((shop, node))
            if part is None:
                part = part_of[(shop, node)] = _part_of(shop, node, parts)
            _fold(minutes[part], shop, node, float(floor(ts / MINUTE) * MINUTE), points)
            hour = float(floor(ts / HOUR) * HOUR)
            if hour < oldest:
                oldest = hour
        self.oldest_hour = oldest

    def hours_due(self, now: float) -> bool:
        """Whether the hour tier is to be flushed: the oldest hour held is over (and its slack), and the last flush is
        :data:`HOUR_FLUSH_MIN_INTERVAL_S` old (a node replaying old samples does not make every run flush every hour bucket)."""
        return now >= self.oldest_hour + HOUR + HOUR_FLUSH_SLACK_S and now >= self.hours_flushed_at + HOUR_FLUSH_MIN_INTERVAL_S

    # --- flushing, in the writer's transactions: each method's effect on memory waits for committed() ---

    def _update_writer(self, conn: Connection, **values: Any) -> bool:
        if conn.execute(WRITERS.update().where(WRITERS.c.wid == self.wid).values(**values)).rowcount == 1:
            return True
        log.error("series writer %s was taken for dead by another writer (a stall of minutes?), which folded its raw rows: "
                  "what it held is dropped and it registers again; samples it stored since are missing from the roll-ups",
                  self.wid)
        self.lost_flushes += 1
        self.wid = None
        self.minutes, self.hours = [Buckets() for _ in range(PARTS)], [Buckets() for _ in range(PARTS)]
        self.oldest_hour, self.flush = math.inf, None
        self._stepped, self._taken = 0, None
        return False

    def step(self, conn: Connection, parts: int = 1, now: float | None = None) -> int:
        """Write the next ``parts`` parts of the flush under way (in the caller's transaction); return buckets written.

        With ``now`` (an intake batch's call) nothing is written before the flush's pace allows
        (:data:`FLUSH_SPREAD`), so a flush costs each batch in a steady trickle instead of a burst.
        """
        f = self.flush
        if f is None or self.wid is None:
            return 0
        if now is not None:
            if now < f.next_at:
                return 0
            # Set before the write: should the transaction roll back, the part waits one pace more, and is written then.
            f.next_at = now + f.pace_s
        first = f.done + self._stepped
        last, filled = first, 0
        while last < len(f.parts) and filled < parts:  # empty parts (a small fleet's) cost nothing: go past them
            filled += bool(f.parts[last][0] or f.parts[last][1])
            last += 1
        while last < len(f.parts) and not (f.parts[last][0] or f.parts[last][1]):
            last += 1
        if last <= first:
            return 0
        values: dict[str, Any] = {"pending_done": last}
        if last == len(f.parts):
            values = {"pending_parts": 0, "pending_done": 0, **_cursors(f.upto, f.hours)}
        if not self._update_writer(conn, **values):
            return 0
        written = sum(_write_buckets(conn, _part_rows(*f.parts[i])) for i in range(first, last))
        self._stepped = last - f.done
        return written

    def _finish(self, conn: Connection) -> bool:
        """Write every part left of the flush under way; return False if this writer was taken for dead meanwhile."""
        self.step(conn, len(self.flush.parts) if self.flush else 0)
        return self.wid is not None

    def take(self, conn: Connection, now: float, *, hours: bool | None = None, whole: bool = False, force_hours: bool = False,
             spread_s: float = 0.0) -> None:
        """Start a flush of what is held (finishing the one under way first), in the caller's transaction.

        A flush of one part (a small fleet), or with ``whole``, is written right away, in this transaction.
        Otherwise the batches that follow write its parts, spread over ``spread_s`` seconds (0: one per batch).
        ``force_hours`` flushes the hours before they are due (not after finishing a flush: they wait for the next run):
        the heartbeat bounds are about to delete rows of this writer the hour tier does not hold yet.
        """
        if self.wid is None:
            return
        unfinished = self.flush is not None
        if unfinished and not self._finish(conn):
            return
        # The hour maps get a flush's minute buckets only once its parts commit: after finishing one here, they
        # lack its last parts until then, so the hours wait for the next run.
        do_hours = ((force_hours or self.hours_due(now)) and not unfinished) if hours is None else hours
        # Every row this writer stored has committed (a writer's batches and runs come one after the other), so its rows
        # up to each table's highest id are what it holds; a row it stores later gets a higher id.
        upto = tuple(int(conn.scalar(select(func.max(src.table.c.id))) or 0) for src in SOURCES)
        parts: list[tuple[Buckets, Buckets | None]] = list(zip(self.minutes, self.hours if do_hours else [None] * len(self.minutes),
                                                          strict=True))
        n = len(parts)
        if whole or sum(len(m) + (len(h) if h else 0) for m, h in parts) <= PART_BUCKETS:
            values: dict[str, Any] = {"seen_at": now, "pending_parts": 0, "pending_done": 0, **_cursors(upto, do_hours)}
            if not self._update_writer(conn, **values):
                return
            _write_buckets(conn, [r for p in parts for r in _part_rows(*p)])
            self._taken = _Flush(upto, do_hours, parts, done=n)
            return
        if not self._update_writer(conn, seen_at=now, pending_hours=do_hours, pending_parts=n, pending_done=0,
                                   **{src.pending: u for src, u in zip(SOURCES, upto, strict=True)}):
            return
        filled = sum(1 for m, h in parts if m or h)
        self._taken = _Flush(upto, do_hours, parts, pace_s=spread_s / max(filled, 1))

    def committed(self, now: float) -> None:
        """Apply to memory what the transaction that just committed wrote (after a rollback, skip this: it is written again).

        The minute buckets of parts written without their hours are added to the hour maps now, not
        when they were written: a rolled-back part must not be counted there twice.
        """
        f = self.flush
        if f is not None and self._stepped:
            if not f.hours:
                for i in range(f.done, f.done + self._stepped):
                    _merge_hours(self.hours[i], f.parts[i][0])
            f.done += self._stepped
            if f.done >= len(f.parts):
                self.flush = None
        self._stepped = 0
        taken, self._taken = self._taken, None
        if taken is not None:
            self.flush = taken if taken.done < len(taken.parts) else None
            self.minutes = [Buckets() for _ in range(PARTS)]
            if taken.hours:
                self.hours, self.oldest_hour, self.hours_flushed_at = [Buckets() for _ in range(PARTS)], math.inf, now
            elif taken.done == len(taken.parts):  # written whole, without the hours: they take its minutes now
                for i, (m, _) in enumerate(taken.parts):
                    _merge_hours(self.hours[i], m)

    def rolled_back(self) -> None:
        """Forget what the transaction that rolled back would have changed."""
        self._stepped, self._taken = 0, None

    def flush_all(self, conn: Connection, now: float) -> None:
        """Write everything held, both tiers (a clean shutdown), in the caller's transaction.

        The flush under way is finished and applied to memory first, so the hours written hold its
        minutes; should this transaction fail, the writer's row is unchanged and another writer
        folds its rows again from ``series_raw``.
        """
        if self.flush is not None:
            if not self._finish(conn):
                return
            self.committed(now)
        self.take(conn, now, hours=True, whole=True)

    # --- recovery of dead writers ---

    def recover(self, conn: Connection, now: float, dead_after_s: float) -> int:
        """Fold one chunk of raw rows (per table of :data:`SOURCES`) of each dead writer that its tiers do not hold yet;
        return rows folded."""
        dead = select(WRITERS).where(WRITERS.c.seen_at < now - dead_after_s, WRITERS.c.wid != (-1 if self.wid is None else self.wid))
        if conn.dialect.name == "postgresql":  # two replicas never fold the same writer's rows
            dead = dead.with_for_update(skip_locked=True)
        folded = 0
        for w in conn.execute(dead.order_by(WRITERS.c.wid)).all():
            minutes, hours = Buckets(), Buckets()
            moved: dict[str, int] = {}
            last_chunk = True
            for src in SOURCES:
                t = src.table
                minute_upto, hour_upto, pending_upto = getattr(w, src.minute), getattr(w, src.hour), getattr(w, src.pending)
                query = (select(t.c.id, t.c.shop_id, t.c.node_id, t.c.ts, t.c.samples)
                         .where(t.c.wid == w.wid, t.c.id > min(minute_upto, hour_upto)).order_by(t.c.id).limit(RECOVERY_CHUNK))
                if t is HEARTBEATS:
                    query = query.where(t.c.samples.is_not(None))
                rows = conn.execute(query).all()
                for rid, shop, node, ts, samples in rows:
                    # A row of the flush that was under way, in a part already written, is in its tiers.
                    written = bool(w.pending_parts) and rid <= pending_upto and _part_of(shop, node, w.pending_parts) < w.pending_done
                    points = _loads(samples)
                    if rid > minute_upto and not written:
                        _fold(minutes, shop, node, float(math.floor(ts / MINUTE) * MINUTE), points)
                    if rid > hour_upto and not (written and w.pending_hours):
                        _fold(hours, shop, node, float(math.floor(ts / HOUR) * HOUR), points)
                folded += len(rows)
                if len(rows) == RECOVERY_CHUNK:
                    last_chunk = False
                    last = rows[-1][0]
                    # Rows up to `last` are now in both tiers; the written parts matter only above it.
                    moved[src.minute], moved[src.hour] = max(minute_upto, last), max(hour_upto, last)
            _write_buckets(conn, minutes.rows(MINUTE) + hours.rows(HOUR))
            if last_chunk:
                conn.execute(WRITERS.delete().where(WRITERS.c.wid == w.wid))
                log.info("series writer %s: folded its last raw rows into the roll-ups and forgot it", w.wid)
            elif moved:
                conn.execute(WRITERS.update().where(WRITERS.c.wid == w.wid).values(**moved))
        return folded

    def hour_cursor(self, conn: Connection) -> int | None:
        """The heartbeat id up to which this writer's hour tier holds its rows (None: no writer row, nothing held back)."""
        if self.wid is None:
            return None
        value = conn.scalar(select(WRITERS.c.hour_upto_hb).where(WRITERS.c.wid == self.wid))
        return None if value is None else int(value)

    def maintain(self, conn: Connection, settings: SeriesSettings, now: float, dead_after_s: float,
                 force_hours: bool = False, interval_s: float = 0.0) -> dict[str, int]:
        """Start a flush (its parts spread over :data:`FLUSH_SPREAD` of the retention interval ``interval_s``), fold dead
        writers' leftovers, then delete what is past each tier's age; return rows deleted per table.

        Raw rows are deleted only below every writer's cursors (so a sample is never lost between the
        tiers), walking the primary key from the oldest (:func:`_delete_old_raw`).
        """
        self.take(conn, now, force_hours=force_hours, spread_s=interval_s * FLUSH_SPREAD)
        self.recover(conn, now, dead_after_s)
        deleted = {"series_raw": _delete_old_raw(conn, now - settings.raw_max_age_s, now), "series_rollup": 0}
        for step, max_age in ((MINUTE, settings.minute_max_age_s), (HOUR, settings.hour_max_age_s)):
            deleted["series_rollup"] += conn.execute(aged_buckets(step, now - max_age)).rowcount
        return deleted


def aged_buckets(step: int, cutoff: float) -> Delete:
    """The delete of a tier's buckets older than ``cutoff``: a range of ``ix_series_rollup_age``, not a scan of the tier."""
    return delete(ROLLUP).where(ROLLUP.c.step == step, ROLLUP.c.bucket < cutoff)


def deletable_heartbeats(dialect: str) -> ColumnElement[bool]:
    """Heartbeat rows the count and age bounds may delete: without samples, or whose samples every tier of their writer
    holds (``heartbeats.id`` up to its cursors); a writer no longer registered (recovered, forgotten) holds nothing back.

    A writer's own rows above its hour cursor are not held back for long: its retention run flushes its hours when the
    bounds reach them (:meth:`RegistryStore.enforce_retention`); a dead writer's until another writer folded them.
    """
    least = func.min if dialect == "sqlite" else func.least
    cursor = (select(least(WRITERS.c.minute_upto_hb, WRITERS.c.hour_upto_hb)).where(WRITERS.c.wid == HEARTBEATS.c.wid)
              .scalar_subquery())
    return HEARTBEATS.c.samples.is_(None) | (HEARTBEATS.c.id <= func.coalesce(cursor, 2**62))


FUTURE_SLACK_S = 3600.0
"""A raw row stamped further than this ahead of the controller's clock (a node with a wrong clock) does not hold retention back."""


def _delete_old_raw(conn: Connection, cutoff: float, now: float) -> int:
    """Delete raw rows older than ``cutoff`` that every writer's tiers hold; return how many.

    ``ts`` has no index of its own, but rows are stored as they arrive, so the oldest are at the
    start of the primary key: find the first row, in id order, that is young enough (a walk over
    the rows to delete) and delete every row before it, below the lowest cursor of any writer. A
    row stamped far in the future is not "young": it would hold every later row back forever.
    """
    safe = conn.scalar(select(func.min(func.min(WRITERS.c.minute_upto, WRITERS.c.hour_upto) if conn.dialect.name == "sqlite"
                                       else func.least(WRITERS.c.minute_upto, WRITERS.c.hour_upto))))
    if not safe:
        return 0
    first_young = conn.scalar(select(RAW.c.id).where(RAW.c.id <= safe, RAW.c.ts >= cutoff, RAW.c.ts <= now + FUTURE_SLACK_S)
                              .order_by(RAW.c.id).limit(1))
    bound = safe + 1 if first_young is None else first_young
    return conn.execute(delete(RAW).where(RAW.c.id < bound, (RAW.c.ts < cutoff) | (RAW.c.ts > now + FUTURE_SLACK_S))).rowcount


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class SeriesLine(_View):
    """One line of a chart: one (node, source) of the series, its values on the shared time axis."""

    node: str = Field(description="Node the samples came from.")
    source: str = Field(description="Camera, fridge, slot... ('' for node-wide series such as CPU; 'total' for the sum line).")
    mean: list[float | None] = Field(description="Mean per bucket; null where the line has no sample.")
    min: list[float | None] = Field(description="Smallest sample per bucket.")
    max: list[float | None] = Field(description="Largest sample per bucket.")


class SeriesData(_View):
    """A series of one shop between two times, bucketed for charting."""

    shop: str
    name: str
    unit: str = Field(description="Unit of the values ('' when unknown).")
    start: float = Field(description="Start of the range, Unix seconds.")
    end: float = Field(description="End of the range, Unix seconds.")
    step: float = Field(description="Seconds per bucket of the answer.")
    resolution: str = Field(description="Tier read: 'raw', '1m' or '1h'.")
    times: list[float] = Field(description="Bucket start times, Unix seconds, ascending; shared by every line.")
    lines: list[SeriesLine]


class SeriesRangeError(ValueError):
    """A range that cannot be read (end before start, or no step possible); the message says the fix."""


def choose_tier(start: float, end: float, now: float, settings: SeriesSettings, step: float | None = None,
                raw: bool = True) -> tuple[str, int, float]:
    """Return ``(resolution, tier step, answer step)`` for a range.

    The tier is the coarsest one whose step is at most the wanted bucket width and that still
    holds ``start`` (fewest rows to read); when none does, the finest tier that holds ``start``;
    when none holds it, the hourly one. A tier holds ``start`` up to ``EDGE_SLACK_S`` past its age. The answer's bucket width is a multiple of the tier's
    step giving at most ``settings.max_points`` buckets, and at least ``step`` when asked. Without ``raw``, the raw tier
    is not a choice (a node series whose heartbeat history no longer holds ``start``, see :func:`read_series`).
    """
    if end <= start:
        raise SeriesRangeError(f"the range ends ({end}) before it starts ({start}): pass from < to")
    wanted = max(step or 0.0, (end - start) / settings.max_points, 1.0)
    tiers: tuple[tuple[str, int, float], ...] = (("raw", 0, settings.raw_max_age_s), ("1m", MINUTE, settings.minute_max_age_s),
                                                  ("1h", HOUR, settings.hour_max_age_s))
    if not raw:
        tiers = tiers[1:]
    holding = [t for t in tiers if start >= now - t[2] - EDGE_SLACK_S]
    fitting = [t for t in holding if t[1] <= wanted]
    name, tier_step, _ = fitting[-1] if fitting else holding[0] if holding else tiers[-1]
    answer = float(math.ceil(wanted / tier_step) * tier_step) if tier_step else float(math.ceil(wanted))
    return name, tier_step, answer


def _unit(conn: Connection, shop: str, name: str) -> str:
    if name in NODE_SERIES:
        return NODE_SERIES[name][1]
    readings = table_of(LatestReading)
    unit = conn.execute(
        select(readings.c.unit).where(readings.c.shop_id == shop, readings.c.name == name, readings.c.unit != "").limit(1)
    ).scalar()
    return unit or ""


def read_series(
    engine: Engine, shop: str, name: str, *, start: float, end: float, node: str | None = None, source: str | None = None,
    step: float | None = None, total: bool = False, settings: SeriesSettings | None = None, now: float | None = None,
) -> SeriesData:
    """Return series ``name`` of ``shop`` between ``start`` and ``end``, one line per (node, source).

    ``node`` and ``source`` narrow it down; ``step`` asks for buckets at least that wide;
    ``total`` adds a line ``source='total'`` summing the lines per bucket (shop occupancy from
    several door cameras). Raises :class:`SeriesRangeError` for an empty range.
    """
    settings = settings or SeriesSettings()
    now = time.time() if now is None else now
    resolution, tier_step, answer = choose_tier(start, end, now, settings, step)
    rows: Sequence[Any]
    with engine.connect() as conn:
        if tier_step == 0 and name in NODE_SERIES and not _heartbeats_hold(conn, shop, node, start):
            resolution, tier_step, answer = choose_tier(start, end, now, settings, step, raw=False)
        if tier_step == 0:
            rows = _raw_buckets(conn, shop, name, start, end, answer, node, source)
        else:
            rows = _rollup_buckets(conn, shop, name, start, end, answer, tier_step, node, source)
        unit = _unit(conn, shop, name)
    return _shape(shop, name, unit, start, end, answer, resolution, rows, total)


HISTORY_EDGE_INTERVALS = 2.0
"""A node's heartbeat history holds a range whose start is up to this many heartbeat intervals before its oldest
heartbeat: the count bound keeps exactly an hour at the defaults (360 at 10 s), so a 1-hour chart's start falls up to an
interval before it (and the sample there is the one the bound just deleted)."""


def _heartbeats_hold(conn: Connection, shop: str, node: str | None, start: float) -> bool:
    """Whether the heartbeat history of every node of ``shop`` (or of ``node``) still holds what it sent since ``start``.

    The raw tier of node series is the heartbeats' own rows, which the count and age bounds trim
    (``retention.heartbeats_per_node``: one hour at the defaults), not ``raw_max_age_s``. One seek
    per node: its oldest row held. That row is from before 0019 (no samples: what came earlier is
    in ``series_raw``), or sent before ``start``, or about when the node was first seen (nothing
    older was ever stored).
    """
    nodes = select(NODES.c.node_id, NODES.c.first_seen, NODES.c.facts_at, NODES.c.heartbeat_interval_s).where(NODES.c.shop_id == shop)
    if node is not None:
        nodes = nodes.where(NODES.c.node_id == node)
    for node_id, first_seen, facts_at, interval in conn.execute(nodes).all():
        oldest = conn.execute(select(HEARTBEATS.c.ts, HEARTBEATS.c.samples.is_(None))
                              .where(HEARTBEATS.c.shop_id == shop, HEARTBEATS.c.node_id == node_id)
                              .order_by(HEARTBEATS.c.id).limit(1)).first()
        if oldest is None:  # never sent a heartbeat, or every one aged out (then none since start, or it is lost)
            if facts_at is not None and facts_at >= start:
                return False
            continue
        ts, before_0019 = oldest
        if not before_0019 and ts > max(start, first_seen) + HISTORY_EDGE_INTERVALS * (interval or 10.0):
            return False
    return True


def _raw_buckets(conn: Connection, shop: str, name: str, start: float, end: float, step: float,
                 node: str | None, source: str | None) -> list[tuple[str, str, float, float, float, float]]:
    """Return ``(node, source, bucket, mean, min, max)`` of raw samples, bucketed from ``start`` in Python.

    Telemetry's samples are in ``series_raw`` (and those of heartbeats stored before 0019); a node
    series' in ``heartbeats.samples`` too, read by the ``(shop_id, node_id, id)`` index (a shop has few nodes).
    """
    acc: dict[tuple[str, str, float], list[float]] = {}
    for t in (RAW, HEARTBEATS) if name in NODE_SERIES else (RAW,):
        where = [t.c.shop_id == shop, t.c.ts >= start, t.c.ts <= end]
        if t is HEARTBEATS:
            where.append(t.c.samples.is_not(None))
        if node is not None:
            where.append(t.c.node_id == node)
        _fold_raw(acc, conn.execute(select(t.c.node_id, t.c.ts, t.c.samples).where(*where)), name, start, step, source)
    return [(k[0], k[1], k[2], v[1] / v[0], v[2], v[3]) for k, v in acc.items()]


def _fold_raw(acc: dict[tuple[str, str, float], list[float]], rows: Iterable[Any], name: str, start: float, step: float,
              source: str | None) -> None:
    for node_id, ts, samples in rows:
        if f'"{name}"' not in samples:  # cheap test before parsing: most messages carry other series
            continue
        bucket = start + math.floor((ts - start) / step) * step
        for n, src, value in json.loads(samples):
            if n != name or (source is not None and src != source):
                continue
            a = acc.get((node_id, src, bucket))
            if a is None:
                acc[(node_id, src, bucket)] = [1, value, value, value]
            else:
                a[0] += 1
                a[1] += value
                a[2] = min(a[2], value)
                a[3] = max(a[3], value)


def _rollup_buckets(conn: Connection, shop: str, name: str, start: float, end: float, step: float, tier_step: int,
                    node: str | None, source: str | None) -> Sequence[Any]:
    """Return ``(node, source, bucket, mean, min, max)`` of a rollup tier, re-bucketed in SQL."""
    first = _aligned(start, tier_step)
    bucket = (_bucket(conn.dialect.name, ROLLUP.c.bucket - first, step) + first).label("b")
    where = [ROLLUP.c.step == tier_step, ROLLUP.c.shop_id == shop, ROLLUP.c.name == name,
             ROLLUP.c.bucket >= first, ROLLUP.c.bucket <= end]
    if node is not None:
        where.append(ROLLUP.c.node_id == node)
    if source is not None:
        where.append(ROLLUP.c.source == source)
    return conn.execute(
        select(ROLLUP.c.node_id, ROLLUP.c.source, bucket, func.sum(ROLLUP.c.total) / func.sum(ROLLUP.c.n),
               func.min(ROLLUP.c.lo), func.max(ROLLUP.c.hi))
        .where(*where).group_by(ROLLUP.c.node_id, ROLLUP.c.source, bucket)
    ).all()


def _aligned(ts: float, step: int) -> float:
    return float(math.floor(ts / step) * step)


def _shape(shop: str, name: str, unit: str, start: float, end: float, step: float, resolution: str,
           rows: Sequence[Any], total: bool) -> SeriesData:
    times = sorted({round(float(r[2]), 3) for r in rows})
    index = {t: i for i, t in enumerate(times)}
    lines: dict[tuple[str, str], tuple[list[float | None], list[float | None], list[float | None]]] = {}
    for node_id, src, b, mean, lo, hi in rows:
        cols = lines.get((node_id, src))
        if cols is None:
            cols = lines[(node_id, src)] = ([None] * len(times), [None] * len(times), [None] * len(times))
        i = index[round(float(b), 3)]
        cols[0][i], cols[1][i], cols[2][i] = _r(mean), _r(lo), _r(hi)
    out = [SeriesLine(node=k[0], source=k[1], mean=v[0], min=v[1], max=v[2]) for k, v in sorted(lines.items())]
    if total and out:
        sums = [_sum(line.mean[i] for line in out) for i in range(len(times))]
        out.append(SeriesLine(node="", source="total", mean=sums, min=sums, max=sums))
    return SeriesData(shop=shop, name=name, unit=unit, start=start, end=end, step=step, resolution=resolution,
                      times=times, lines=out)


def _r(v: Any) -> float | None:
    return None if v is None else round(float(v), 4)


def _sum(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present), 4) if present else None
