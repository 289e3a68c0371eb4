"""The controller's SQL store: one declarative Base for every table, and the engine factory.

SQLite by default (one process, zero setup), PostgreSQL when the fleet outgrows one machine.
Each area of the controller (registry, releases and rollouts,
accounts and alerts) declares its tables in its own module on this Base, and its schema changes
as Alembic revisions under ``fleet_controller/registry/migrations/versions``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, Table, event
from sqlalchemy import create_engine as _create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names, so migrations can refer to them on every engine.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every controller table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def table_of(model: type[Base]) -> Table:
    """Return the ``Table`` of a mapped class (typed as such, for Core inserts, updates and deletes)."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not mapped to a single table")
    return table


def create_engine(url: str, **kwargs: Any) -> Engine:
    """Return an engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        engine = _create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return _create_engine(url, **kwargs)
