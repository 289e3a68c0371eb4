"""Time series of what an operator charts: camera fps, occupancy, fridge temperatures, shelf weights, node load.

Three tiers, so a fleet that runs for years keeps a bounded table and a 90-day chart still reads
few rows:

* ``series_raw``: the samples of one message in one row (a heartbeat's five node values and
  its cameras' fps; a telemetry message's readings), as ``[[name, source, value], ...]`` JSON
  text, kept ``retention.series.raw_max_age_s`` (24 h by default). One row per message rather
  than per sample keeps the intake's hot path cheap: storing 10,000 heartbeats through
  ``write_batch`` on SQLite (2 shared cores), a row per sample cut the rate from 20,000-36,000/s
  to ~10,000/s, one packed row per message measured 13,000-19,500/s; folding 10,500 such rows
  into the rollups takes ~0.26 s of the writer's time;
* ``series_rollup`` with ``step`` 60: count, sum, min and max per 1-minute bucket, kept
  ``minute_max_age_s`` (7 days);
* ``series_rollup`` with ``step`` 3600: the same per hour, kept ``hour_max_age_s`` (90 days).

Samples come from the intake's single writer, inside the batch's transaction
(:func:`store_points`, called by :meth:`RegistryStore.write_batch`): from every heartbeat the
node's CPU, memory, disk and temperature (``node`` set, ``source`` empty) and each pipeline's fps
(``source`` = pipeline, i.e. camera); from every telemetry reading its own name and source
(``occupancy`` per camera, ``temperature_c`` per fridge, ``shelf_weight_g`` per slot...).

Rollup (in Python, on the writer) is incremental by row id, not by time: each tier remembers the last raw id it has
folded in (``series_cursors``), and folds in every newer row whatever its timestamp. A node that
replays an hour of outbox after an outage therefore still lands in the right (old) buckets,
which a "roll up the last complete minute" scheme would miss. Buckets are merged with an upsert
(count and sum add, min and max combine), so a bucket can receive rows in several runs.
:func:`maintain` runs in the writer's periodic retention, rollup first, then deletion, in one
transaction; the single writer means no raw row can arrive between the two.

Reads (:func:`read_series`) choose the tier from the range asked for (:func:`choose_tier`) and
re-bucket it to at most ``max_points`` points per line, aligned on one time axis (what a chart
library wants), with the bucket's mean, min and max: in SQL for the rollups, in Python for raw
rows (read for short ranges only, a shop's few thousand rows).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import BigInteger, Float, Index, Integer, String, Text, cast, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column
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
from fleet_controller.settings import SeriesSettings

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
    """The raw samples of one message: ``samples`` is JSON text ``[[name, source, value], ...]``."""

    __tablename__ = "series_raw"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    ts: Mapped[float] = mapped_column(Float)
    samples: Mapped[str] = mapped_column(Text)
    __table_args__ = (Index("ix_series_raw_shop_ts", "shop_id", "ts"),)


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


class SeriesCursor(Base):
    """The last raw id folded into the rollups (one row, ``step`` 0: every step is folded together)."""

    __tablename__ = "series_cursors"
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)


RAW = table_of(SeriesSamples)
ROLLUP = table_of(SeriesRollup)
CURSORS = table_of(SeriesCursor)
_RAW_COLUMNS = ("shop_id", "node_id", "ts", "samples")
_ROLLUP_COLUMNS = ("step", "shop_id", "name", "bucket", "node_id", "source", "n", "total", "lo", "hi")
"""A roll-up row's values in the order _fold's keys and accumulators give them."""
ROLLUP_CHUNK = 20_000
"""Raw rows folded per query: bounds the writer's memory when it catches up on a long backlog."""

Uplink = Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState


# --------------------------------------------------------------------------------------------
# Writing (on the single writer)
# --------------------------------------------------------------------------------------------


def _percent_used(available: int, total: int) -> float | None:
    return None if total <= 0 else round(100.0 * (1.0 - available / total), 3)


def points_from(msg: Uplink) -> list[tuple[str, str, float]]:
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


_PG_INSERT_RAW = (
    "INSERT INTO series_raw (shop_id, node_id, ts, samples) "
    "SELECT e->>0, e->>1, (e->>2)::double precision, e->>3 FROM jsonb_array_elements(%s::jsonb) AS e"
)
"""PostgreSQL: every row of a batch in one JSON parameter, unpacked by the server (as the registry's heartbeat insert
does): psycopg's executemany costs a round trip of Python work per row, the largest statement of a batch once the
heartbeat and node statements went this way."""


def store_points(conn: Connection, uplinks: Iterable[tuple[Uplink, float]], defer: list[tuple[str, tuple[Any, ...]]] | None = None) -> int:
    """Insert the samples of a batch's uplinks (in the batch's transaction), a row per message; return how many rows.

    On PostgreSQL with ``defer``, the insert is appended to it as ``(sql, params)`` instead of run:
    the registry sends it with the batch's node update, one round trip for both (see
    :meth:`RegistryStore.write_batch`).
    """
    rows = []
    for msg, _received in uplinks:
        points = points_from(msg)
        if points:
            rows.append((msg.shop, msg.node, msg.ts, _dumps(points)))
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        if defer is not None:
            defer.append((_PG_INSERT_RAW, (_dumps(rows),)))
        else:
            conn.exec_driver_sql(_PG_INSERT_RAW, (_dumps(rows),))
    else:
        conn.exec_driver_sql(f"INSERT INTO series_raw ({', '.join(_RAW_COLUMNS)}) VALUES (?, ?, ?, ?)", rows)
    return len(rows)


def _bucket(dialect: str, ts: Any, step: float) -> ColumnElement[Any]:
    """Return the SQL of ``floor(ts / step) * step`` on this dialect (SQLite has no floor() before 3.35)."""
    if dialect == "sqlite":
        # Timestamps are positive, so truncation is floor.
        return cast(ts / step, Integer) * step
    return func.floor(ts / step) * step


def _insert(dialect: str) -> postgresql.Insert | sqlite.Insert:
    if dialect == "postgresql":
        return postgresql.insert(ROLLUP)
    if dialect == "sqlite":
        return sqlite.insert(ROLLUP)
    raise NotImplementedError(f"database {dialect!r} is not supported: use SQLite or PostgreSQL")


def _fold(rows: Iterable[Any], acc: dict[tuple[int, str, str, float, str, str], list[float]]) -> None:
    """Add raw rows ``(shop, node, ts, samples)`` to per-bucket ``[n, total, lo, hi]`` of every rollup step."""
    for shop, node, ts, samples in rows:
        buckets = [(step, float(math.floor(ts / step) * step)) for step in ROLLUP_STEPS]
        for name, source, value in json.loads(samples):
            for step, bucket in buckets:
                key = (step, shop, name, bucket, node, source)
                a = acc.get(key)
                if a is None:
                    acc[key] = [1, value, value, value]
                else:
                    a[0] += 1
                    a[1] += value
                    if value < a[2]:
                        a[2] = value
                    if value > a[3]:
                        a[3] = value


def rollup(conn: Connection, upto_id: int) -> int:
    """Fold raw rows past the cursor up to ``upto_id`` into the 1-minute and 1-hour buckets; return buckets written.

    Every step shares one cursor (they are always folded together). Buckets merge with what is
    there: count and sum add, min and max combine, so a bucket can be fed over several runs.
    """
    dialect = conn.dialect.name
    start = conn.execute(select(CURSORS.c.last_id).where(CURSORS.c.step == 0)).scalar()
    least, greatest = (func.min, func.max) if dialect == "sqlite" else (func.least, func.greatest)
    stmt = _insert(dialect)
    stmt = stmt.on_conflict_do_update(
        index_elements=["step", "shop_id", "name", "bucket", "node_id", "source"],
        set_={"n": ROLLUP.c.n + stmt.excluded.n, "total": ROLLUP.c.total + stmt.excluded.total,
              "lo": least(ROLLUP.c.lo, stmt.excluded.lo), "hi": greatest(ROLLUP.c.hi, stmt.excluded.hi)},
    )
    # The upsert goes to the driver as compiled SQL with plain tuples: a bucket per node, series and
    # step is about a million rows a minute at 100,000 nodes, and SQLAlchemy's per-row parameter
    # processing was half of the roll-up's time (docs/benchmarks.md, Scale).
    compiled = stmt.compile(dialect=conn.dialect, column_keys=list(_ROLLUP_COLUMNS))
    sql = str(compiled)
    # sqlite3 takes positional parameters, in the column_keys order compiled above; psycopg named ones.
    positional = compiled.positional
    assert not positional or list(compiled.positiontup or ()) == list(_ROLLUP_COLUMNS), compiled.positiontup
    written = 0
    done = int(start or 0)
    while done < upto_id:
        stop = min(done + ROLLUP_CHUNK, upto_id)
        acc: dict[tuple[int, str, str, float, str, str], list[float]] = {}
        _fold(conn.execute(select(RAW.c.shop_id, RAW.c.node_id, RAW.c.ts, RAW.c.samples)
                           .where(RAW.c.id > done, RAW.c.id <= stop)), acc)
        if acc:
            rows = [(*k, int(v[0]), v[1], v[2], v[3]) for k, v in acc.items()]
            conn.exec_driver_sql(sql, rows if positional else [dict(zip(_ROLLUP_COLUMNS, r, strict=True)) for r in rows])
        written += len(acc)
        done = stop
    if start is None:
        conn.execute(CURSORS.insert().values(step=0, last_id=upto_id))
    elif upto_id > start:
        conn.execute(CURSORS.update().where(CURSORS.c.step == 0).values(last_id=upto_id))
    return written


def maintain(conn: Connection, settings: SeriesSettings, now: float | None = None) -> dict[str, int]:
    """Roll up new raw rows, then delete what is past each tier's age; return rows deleted per table.

    Runs in the writer's periodic retention (one transaction with it). Deleting only raw rows the
    rollups already hold (``id <= upto``) means a sample is never lost between the tiers.
    """
    now = time.time() if now is None else now
    upto = conn.execute(select(func.max(RAW.c.id))).scalar()
    deleted = {"series_raw": 0, "series_rollup": 0}
    if upto is not None:
        rollup(conn, int(upto))
        deleted["series_raw"] = conn.execute(
            delete(RAW).where(RAW.c.id <= upto, RAW.c.ts < now - settings.raw_max_age_s)
        ).rowcount
    for step, max_age in ((MINUTE, settings.minute_max_age_s), (HOUR, settings.hour_max_age_s)):
        deleted["series_rollup"] += conn.execute(
            delete(ROLLUP).where(ROLLUP.c.step == step, ROLLUP.c.bucket < now - max_age)
        ).rowcount
    return deleted


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


def choose_tier(start: float, end: float, now: float, settings: SeriesSettings, step: float | None = None) -> tuple[str, int, float]:
    """Return ``(resolution, tier step, answer step)`` for a range.

    The tier is the coarsest one whose step is at most the wanted bucket width and that still
    holds ``start`` (fewest rows to read); when none does, the finest tier that holds ``start``;
    when none holds it, the hourly one. A tier holds ``start`` up to ``EDGE_SLACK_S`` past its age. The answer's bucket width is a multiple of the tier's
    step giving at most ``settings.max_points`` buckets, and at least ``step`` when asked.
    """
    if end <= start:
        raise SeriesRangeError(f"the range ends ({end}) before it starts ({start}): pass from < to")
    wanted = max(step or 0.0, (end - start) / settings.max_points, 1.0)
    tiers = (("raw", 0, settings.raw_max_age_s), ("1m", MINUTE, settings.minute_max_age_s), ("1h", HOUR, settings.hour_max_age_s))
    holding = [t for t in tiers if start >= now - t[2] - EDGE_SLACK_S]
    fitting = [t for t in holding if t[1] <= wanted]
    name, tier_step, _ = fitting[-1] if fitting else holding[0] if holding else tiers[-1]
    answer = float(math.ceil(wanted / tier_step) * tier_step) if tier_step else float(math.ceil(wanted))
    return name, tier_step, answer


def _unit(conn: Connection, shop: str, name: str) -> str:
    if name in NODE_SERIES:
        return NODE_SERIES[name][1]
    from fleet_controller.registry.models import LatestReading

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
        if tier_step == 0:
            rows = _raw_buckets(conn, shop, name, start, end, answer, node, source)
        else:
            rows = _rollup_buckets(conn, shop, name, start, end, answer, tier_step, node, source)
        unit = _unit(conn, shop, name)
    return _shape(shop, name, unit, start, end, answer, resolution, rows, total)


def _raw_buckets(conn: Connection, shop: str, name: str, start: float, end: float, step: float,
                 node: str | None, source: str | None) -> list[tuple[str, str, float, float, float, float]]:
    """Return ``(node, source, bucket, mean, min, max)`` of raw samples, bucketed from ``start`` in Python."""
    where = [RAW.c.shop_id == shop, RAW.c.ts >= start, RAW.c.ts <= end]
    if node is not None:
        where.append(RAW.c.node_id == node)
    acc: dict[tuple[str, str, float], list[float]] = {}
    for node_id, ts, samples in conn.execute(select(RAW.c.node_id, RAW.c.ts, RAW.c.samples).where(*where)):
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
    return [(k[0], k[1], k[2], v[1] / v[0], v[2], v[3]) for k, v in acc.items()]


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
