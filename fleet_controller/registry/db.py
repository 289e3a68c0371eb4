"""The controller's SQL store: one declarative Base for every table, and the engine factory.

SQLite by default (one process, zero setup), PostgreSQL when the fleet outgrows one machine.
Each area of the controller (registry, releases and rollouts,
accounts and alerts) declares its tables in its own module on this Base, and its schema changes
as Alembic revisions under ``fleet_controller/registry/migrations/versions``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, event
from sqlalchemy import create_engine as _create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase

log = logging.getLogger(__name__)

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


DB_FILE_MODE = 0o600
"""Mode of the SQLite database and its ``-wal``/``-shm`` files: they hold password hashes, session
and token hashes and the whole fleet's data, so only the controller's user may read them."""


def private_sqlite_files(path: str | os.PathLike[str]) -> None:
    """Create the SQLite file ``path`` 0600 if missing and make it and its -wal/-shm/-journal 0600.

    SQLite creates the -wal and -shm files with the main file's mode, so a main file made 0600
    before SQLite first opens it keeps all three private; files an older version left 0644 are
    tightened here (on every new connection, one ``stat`` each).
    """
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, DB_FILE_MODE))
    for f in (p, *(p.with_name(p.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        try:
            if stat.S_IMODE(f.stat().st_mode) != DB_FILE_MODE:
                f.chmod(DB_FILE_MODE)
        except FileNotFoundError:
            continue


SQLITE_CACHE_KIB = 64 * 1024
"""Upper bound of SQLite's page cache per connection, in KiB (``PRAGMA cache_size=-N``).

SQLite's default is 2 MiB. A fleet's ``nodes`` table is ~600 bytes of page per node plus its
indexes (100,000 nodes: ~60 MB of rows, ~15,000 pages), and every heartbeat updates its node's row
at a random place in it: with 2 MiB nearly every update re-read its page from the OS by a system
call (bench/scale_writer.py at 100,000 nodes: 9.5 read calls and 38 KB read per message; 4.1-4.8
and 17-19 KB with this bound, in runs that also raised the checkpoint bound; 3.5 and 14 KB with
256 MiB alone). It is a bound, not an allocation: a small fleet's cache stays small."""


SQLITE_PAGE_SIZE = 4096
"""The page size of a new SQLite database (``PRAGMA page_size``, before anything is written; an existing database keeps
its own). Every heartbeat dirties a few pages at scattered places (its node's row, its history's index entries), and a
commit writes each dirty page whole into the WAL, which the checkpointer then copies into the file."""


def create_engine(url: str, **kwargs: Any) -> Engine:
    """Return an engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys, 0600 files and a page
    cache sized for a large fleet (:data:`SQLITE_CACHE_KIB`).

    The WAL checkpoint stays at SQLite's default (every 1,000 pages): a 10,000-page bound cut the
    checkpoints' writes by 11-17 % at 100,000 nodes, but each checkpoint then stalls the commit that
    runs it ten times longer, and the ramps of docs/benchmarks.md (Scale, 2026-11-30) did not show it
    helping the p99. Taking checkpoints off the writer's commits (a checkpointer thread) is the next step."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        db_file = u.database if u.database and u.database != ":memory:" and not u.database.startswith("file:") else None
        if db_file:
            private_sqlite_files(db_file)
        engine = _create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
            if db_file:
                private_sqlite_files(db_file)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA page_size={int(SQLITE_PAGE_SIZE)}")  # a no-op once the database has pages
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cur.close()
            if db_file:  # the -wal and -shm files exist only now
                private_sqlite_files(db_file)

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return _create_engine(url, **kwargs)


CHECKPOINT_PERIOD_S = 0.5
"""How often the writer's checkpointer thread copies the WAL into the database file."""
WRITER_AUTOCHECKPOINT_PAGES = 16_384
"""The writer connections' own checkpoint bound once a checkpointer runs (64 MB of WAL): what bounds the WAL (see
:class:`Checkpointer`)."""


class Checkpointer:
    """SQLite WAL checkpoints on a thread and connection of their own, off the writer's commits.

    By default SQLite checkpoints inside the commit that takes the WAL past 1,000 pages: at
    100,000 nodes every batch's commit copied a few thousand scattered pages into the database file
    and synced it, on the writer's path (docs/benchmarks.md, Scale). With a checkpointer this thread
    runs a ``PASSIVE`` checkpoint every :data:`CHECKPOINT_PERIOD_S` (it never waits for the writer;
    SQLite releases the GIL while it copies, so it runs beside the writer on the second core), and
    the writer's connections checkpoint themselves only past :data:`WRITER_AUTOCHECKPOINT_PAGES`.
    That bound is what keeps the WAL finite: SQLite starts the WAL over only after a checkpoint that
    copied every frame with no commit in between, which a thread beside a writer that commits all
    the time rarely sees, and a writer whose WAL grows faster than the thread copies must slow down.
    Past the bound the writer's commit copies what the thread has not (its own checkpoint sees no
    concurrent commit, so the WAL starts over), so the WAL stays near that size.
    """

    def __init__(self, engine: Engine, period_s: float = CHECKPOINT_PERIOD_S) -> None:
        self.path = engine.url.database or ""
        self.period_s = period_s
        self.checkpoints = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        @event.listens_for(engine, "connect")
        def _bound(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
            cur.close()

    def start(self) -> Checkpointer:
        """Start the thread; return self."""
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        try:
            while not self._stop.wait(self.period_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # a busy database now and then; the next period tries again
                    self.failures += 1
                    if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                        log.warning("WAL checkpoint of %s failed (%s; %d failures so far); the writer's own bound of %d "
                                    "pages still checkpoints", self.path, exc, self.failures, WRITER_AUTOCHECKPOINT_PAGES)
        finally:
            conn.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after its current checkpoint)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def start_checkpointer(engine: Engine) -> Checkpointer | None:
    """Start a :class:`Checkpointer` for a SQLite file engine the single writer uses (before it connects); None for other engines."""
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Checkpointer(engine).start()
