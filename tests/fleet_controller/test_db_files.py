"""The controller's SQLite files are private: 0600 for the database, -wal and -shm."""

from __future__ import annotations

import os
import stat

from sqlalchemy import text

from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_database_and_wal_files_are_0600(tmp_path):
    old = os.umask(0o022)  # the usual umask, which would make them 0644
    try:
        db = tmp_path / "sub" / "controller.db"
        engine = create_engine(f"sqlite:///{db}")
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO shops (id, name, region, labels, timezone, created_at) VALUES ('s', 's', '', '{}', 'UTC', 0)"))
            with engine.connect() as other:  # a second connection while the WAL is in use
                assert other.execute(text("SELECT count(*) FROM shops")).scalar() == 0
        wal, shm = db.with_name("controller.db-wal"), db.with_name("controller.db-shm")
        assert wal.exists() and shm.exists()
        assert (_mode(db), _mode(wal), _mode(shm)) == (0o600, 0o600, 0o600)
        engine.dispose()
    finally:
        os.umask(old)


def test_files_an_older_version_left_readable_are_tightened(tmp_path):
    db = tmp_path / "controller.db"
    engine = create_engine(f"sqlite:///{db}")
    upgrade(engine)
    engine.dispose()
    for f in tmp_path.iterdir():
        f.chmod(0o644)
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert {f.name: _mode(f) for f in tmp_path.iterdir()} == {f.name: 0o600 for f in tmp_path.iterdir()}
    engine.dispose()


def test_sqlite_connections_get_a_large_fleets_page_cache(tmp_path):
    """Every pooled connection (the writer's, the API's) is sized for a large fleet, not SQLite's defaults."""
    from fleet_controller.registry.db import SQLITE_CACHE_KIB

    engine = create_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    try:
        with engine.connect() as a, engine.connect() as b:  # two connections: the pragmas are per connection
            for conn in (a, b):
                assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -SQLITE_CACHE_KIB
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert SQLITE_CACHE_KIB > 2000  # above SQLite's default of 2 MiB
    finally:
        engine.dispose()


def test_node_rows_leave_room_for_their_updates_on_postgresql(db_url):
    """Each heartbeat updates its node's row: on PostgreSQL its pages keep room for the new version
    (a heap-only update that touches no index); SQLite has no such setting and migrates all the same."""
    engine = create_engine(db_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            if engine.dialect.name != "postgresql":
                assert conn.execute(text("select count(*) from nodes")).scalar() == 0
                return
            options = conn.execute(text(
                "select c.reloptions from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where c.relname = 'nodes' and n.nspname = current_schema()")).scalar()
        assert options is not None and "fillfactor=50" in options, options
    finally:
        engine.dispose()


def test_the_writers_checkpointer_copies_the_wal_off_the_commits(tmp_path):
    """With a checkpointer the writer's connections only append to the WAL (their own bound raised), and the thread
    copies every committed frame into the database file; without it the 1,000-page default applies."""
    import time

    from fleet_controller.registry.db import WRITER_AUTOCHECKPOINT_PAGES, start_checkpointer

    plain = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    with plain.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    plain.dispose()
    engine = create_engine(f"sqlite:///{tmp_path / 'writer.db'}")
    checkpointer = start_checkpointer(engine)
    assert checkpointer is not None
    try:
        with engine.begin() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == WRITER_AUTOCHECKPOINT_PAGES
            conn.exec_driver_sql("CREATE TABLE t (x BLOB)")
        for _ in range(20):  # 2,000 pages: past SQLite's own bound, which no longer checkpoints
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (randomblob(400000))")
        before = checkpointer.checkpoints
        deadline = time.monotonic() + 30
        while checkpointer.checkpoints < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints >= before + 2 and checkpointer.failures == 0
        # The 8 MB the commits wrote are in the database file itself, copied there by the thread alone (nothing
        # else checkpointed: the writer's bound is 50,000 pages and no connection closed).
        assert (tmp_path / "writer.db").stat().st_size > 8_000_000
    finally:
        checkpointer.stop()
        engine.dispose()
    assert start_checkpointer(create_engine("sqlite://")) is None  # in memory: nothing to checkpoint


def test_the_wal_stays_near_the_writers_bound_under_a_writer_that_never_pauses(tmp_path, monkeypatch):
    """A passive checkpoint beside a writer that commits all the time rarely lets the WAL start over; the writer's own
    bound does, so the WAL file stays near it instead of growing with everything written."""
    from fleet_controller.registry import db as db_module

    monkeypatch.setattr(db_module, "WRITER_AUTOCHECKPOINT_PAGES", 300)  # 1.2 MB
    engine = create_engine(f"sqlite:///{tmp_path / 'writer.db'}")
    checkpointer = db_module.Checkpointer(engine, period_s=0.02).start()
    wal = tmp_path / "writer.db-wal"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x BLOB)")
        biggest = 0
        for _ in range(700):  # 40 MB, ~16 pages a commit, back to back
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (randomblob(60000))")
                conn.exec_driver_sql("DELETE FROM t WHERE rowid < (SELECT max(rowid) - 50 FROM t)")
            biggest = max(biggest, wal.stat().st_size)
        assert checkpointer.checkpoints > 0 and checkpointer.failures == 0
        assert biggest < 6_000_000, biggest
    finally:
        checkpointer.stop()
        engine.dispose()
