"""The audit log: who did what, to what, when, and from where; append-only, in the registry.

Every action anyone takes through the controller's HTTP API or pages (logins and failed logins,
user and token changes, acknowledgements and silences, releases and rollout actions, shop
registration, remote actions) is one row. The one-line API is :meth:`AuditLog.record`::

    AuditLog(engine).record(actor, "rollout.pause", "rollout 7", {"reason": "..."}, source_address, shop=None)

Inside a request the caller rarely knows the actor and address by itself (a rollout endpoint has
no login code): the guard puts both into a context variable (:func:`set_request_actor`), and
:meth:`AuditLog.record_here` fills them in from it. Sync endpoints run in a thread pool that
copies the context, so the same call works in both kinds of endpoint.

Recording never raises into the action it describes: the action already happened, and failing it
afterwards would tell the user it did not. A failed write is logged at ERROR and counted
(``failures``), so a broken audit log is visible. Times are Unix seconds like everywhere else in
the registry; the table has indexes for the page's filters (time, actor, action, shop).
"""

from __future__ import annotations

import contextvars
import csv
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base, table_of

log = logging.getLogger(__name__)

ACTOR_MAX = 64
ACTION_MAX = 64
TARGET_MAX = 200
ADDRESS_MAX = 64
DETAILS_MAX_CHARS = 4000
"""A details mapping larger than this (as JSON) is cut to its keys: the log keeps what was done,
not arbitrary payloads (a release body with dozens of images stays in the releases table)."""


class AuditRecord(Base):
    """One action: who, what, on what, when, from where, with a few details."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_MAX), nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(ACTION_MAX), nullable=False, index=True)
    target: Mapped[str] = mapped_column(String(TARGET_MAX), nullable=False, default="")
    shop_id: Mapped[str | None] = mapped_column(String(63), nullable=True, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    source_address: Mapped[str] = mapped_column(String(ADDRESS_MAX), nullable=False, default="")
    via: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    outcome: Mapped[str] = mapped_column(Text, nullable=False, default="ok")


AUDIT = table_of(AuditRecord)


@dataclass(frozen=True)
class RequestActor:
    """Who makes the current request, as the guard authenticated it."""

    actor: str
    source_address: str
    via: str = ""  # session, token, cli, system


_REQUEST_ACTOR: contextvars.ContextVar[RequestActor | None] = contextvars.ContextVar("shopfleet_request_actor", default=None)


def set_request_actor(actor: RequestActor | None) -> None:
    """Say who makes the current request (the guard calls this; tests and the CLI may too)."""
    _REQUEST_ACTOR.set(actor)


def request_actor() -> RequestActor | None:
    """Return who makes the current request, if the guard said so."""
    return _REQUEST_ACTOR.get()


@dataclass(frozen=True)
class AuditEntry:
    """A row of the audit log as the page, the API and the CSV show it."""

    id: int
    at: float
    actor: str
    action: str
    target: str
    shop: str | None
    details: dict[str, Any]
    source_address: str
    via: str
    outcome: str

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the audit page and API; empty values mean 'any'."""

    actor: str = ""
    action: str = ""  # exact, or a prefix ending in '.' or '*' ("rollout." matches every rollout action)
    shop: str = ""
    since: float | None = None
    until: float | None = None
    limit: int = 200
    before_id: int | None = None  # for paging: only rows older than this id


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _bounded_details(details: dict[str, Any] | None) -> dict[str, Any]:
    if not details:
        return {}
    import json

    try:
        text = json.dumps(details, default=str)
    except (TypeError, ValueError):
        return {"keys": sorted(str(k) for k in details)}
    if len(text) <= DETAILS_MAX_CHARS:
        plain: dict[str, Any] = json.loads(text)  # plain JSON types only (default=str turned anything else into text)
        return plain
    return {"keys": sorted(str(k) for k in details), "truncated": True}


class AuditLog:
    """Append to and read the audit log of one database."""

    failures = 0
    """Writes that failed in this process (all instances), for tests and the log."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def record(self, actor: str, action: str, target: str = "", details: dict[str, Any] | None = None,
               source_address: str = "", *, shop: str | None = None, via: str = "", outcome: str = "ok") -> bool:
        """Append one row; return whether it was stored (a failure is logged and counted, never raised)."""
        row = {
            "at": self.clock(), "actor": _cut(actor or "?", ACTOR_MAX), "action": _cut(action, ACTION_MAX),
            "target": _cut(target or "", TARGET_MAX), "shop_id": shop, "details": _bounded_details(details),
            "source_address": _cut(source_address or "", ADDRESS_MAX), "via": via[:16], "outcome": _cut(outcome, 500),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(AUDIT).values(**row))
        except SQLAlchemyError as exc:
            AuditLog.failures += 1
            log.error("audit log: could not record %s by %s on %s: %s", action, actor, target, exc)
            return False
        return True

    def record_here(self, action: str, target: str = "", details: dict[str, Any] | None = None, *,
                    shop: str | None = None, outcome: str = "ok") -> bool:
        """Record an action of the current request's caller (see :func:`set_request_actor`)."""
        who = request_actor() or RequestActor("system", "", "system")
        return self.record(who.actor, action, target, details, who.source_address, shop=shop, via=who.via, outcome=outcome)

    # ----- reading ----------------------------------------------------------------------------

    def query(self, q: AuditQuery) -> list[AuditEntry]:
        """Return rows matching ``q``, newest first."""
        stmt = select(AUDIT)
        if q.actor:
            stmt = stmt.where(AUDIT.c.actor == q.actor)
        if q.action:
            if q.action.endswith(("*", ".")):
                stmt = stmt.where(AUDIT.c.action.startswith(q.action.rstrip("*"), autoescape=True))
            else:
                stmt = stmt.where(AUDIT.c.action == q.action)
        if q.shop:
            stmt = stmt.where(AUDIT.c.shop_id == q.shop)
        if q.since is not None:
            stmt = stmt.where(AUDIT.c.at >= q.since)
        if q.until is not None:
            stmt = stmt.where(AUDIT.c.at < q.until)
        if q.before_id is not None:
            stmt = stmt.where(AUDIT.c.id < q.before_id)
        stmt = stmt.order_by(AUDIT.c.id.desc()).limit(max(1, min(q.limit, 100_000)))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [AuditEntry(r.id, r.at, r.actor, r.action, r.target, r.shop_id, r.details or {}, r.source_address, r.via, r.outcome)
                for r in rows]

    def actions(self) -> list[str]:
        """Return every action name recorded so far (for the page's filter)."""
        with self.engine.connect() as conn:
            return [a for (a,) in conn.execute(select(AUDIT.c.action).group_by(AUDIT.c.action).order_by(AUDIT.c.action))]

    def count(self) -> int:
        """Return how many rows the log holds."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(AUDIT)).scalar() or 0)


CSV_COLUMNS = ("id", "time_utc", "at", "actor", "action", "target", "shop", "source_address", "via", "outcome", "details")


def _safe_cell(value: str) -> str:
    """Defuse spreadsheet formulas: a cell starting with = + - @ is prefixed with a quote (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def csv_lines(entries: list[AuditEntry]) -> Iterator[str]:
    """Yield the CSV export of ``entries``, header first (one string per line)."""
    import json
    from datetime import UTC, datetime

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    for e in entries:
        buf.seek(0)
        buf.truncate()
        writer.writerow([
            e.id, datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), f"{e.at:.3f}",
            *(_safe_cell(v) for v in (e.actor, e.action, e.target, e.shop or "", e.source_address, e.via, e.outcome,
                                      json.dumps(e.details, sort_keys=True))),
        ])
        yield buf.getvalue()
