"""``shopfleet controller``'s graceful stop is bounded even when a batch cannot finish (chaos tier finding).

A real controller process on a real Mosquitto and its own SQLite registry: while a node streams,
the test takes the database's write lock, so the registry writer's batch waits on SQLite's busy
timeout (30 s, then the next queued batch waits again). SIGTERM then: the stop must not wait for
that writer (before the fix it took a minute and more, each queued batch another 30 s); it kills
the writer past ``STOP_WRITER_S``, says what it abandoned, and exits 1. Nothing is lost: the
messages were never acknowledged, so the restarted controller (same client id, persistent
session) gets them from the broker and stores every event exactly once.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fleet_controller.registry.db import create_engine
from fleet_controller.registry.store import EVENTS
from fleet_controller.service import STOP_WRITER_S
from tests.support.controller import Node, event, presence
from tests.support.wait import wait_for

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs mosquitto")

RUN = (
    "import argparse, logging, sys; from fleet_controller import cli; logging.basicConfig(level=logging.INFO); "
    "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def start_controller(broker, data: Path, client_id: str, log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115  # the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "controller", "--broker", f"127.0.0.1:{broker.port}", "--api", "127.0.0.1:0",
         "--data-dir", str(data), "--client-id", client_id],
        stdout=out, stderr=subprocess.STDOUT,
    )
    start = log.stat().st_size if log.exists() else 0

    def listening() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return re.search(r": API http", log.read_text(errors="replace")[start:]) is not None

    wait_for(listening, 90, "the controller's API line")
    return proc


def stored_events(db: Path) -> tuple[int, int]:
    """Return (rows, distinct seqs) of the node's events."""
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as c:
            mine = EVENTS.c.type == "door_opened"  # the node's events, not the controller's own (presence changes)
            rows = int(c.scalar(select(func.count()).select_from(EVENTS).where(mine)) or 0)
            distinct = int(c.scalar(select(func.count(func.distinct(EVENTS.c.seq))).where(mine)) or 0)
        return rows, distinct
    finally:
        engine.dispose()


def test_sigterm_with_a_stuck_writer_stops_within_bound_and_loses_nothing(broker, tmp_path):
    data, log = tmp_path / "data", tmp_path / "controller.log"
    client_id = f"stop-{uuid.uuid4().hex[:8]}"
    proc = start_controller(broker, data, client_id, log)
    db = data / "controller.db"
    node = Node(broker, "shop-stop", "pi-1")
    lock: sqlite3.Connection | None = None
    try:
        node.send(presence("shop-stop", "pi-1"))
        for seq in range(1, 21):
            node.send(event("shop-stop", "pi-1", seq))
        wait_for(lambda: stored_events(db)[0] == 20, 30, "the first 20 events stored")

        lock = sqlite3.connect(db, timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the writer's next batch waits on the busy timeout
        # Each send waits for the broker's PUBACK, so while these go out the controller receives them and
        # hands its first batch to the writer, which then waits on the lock. (Were nothing with the writer
        # yet, the stop would be clean and exit 0: the assertions below would fail, not pass by luck.)
        for seq in range(21, 301):
            node.send(event("shop-stop", "pi-1", seq))

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_WRITER_S + 25)  # the old stop waited for every queued batch: 60 s and more
        took = time.monotonic() - t0
        text = log.read_text(errors="replace")
        assert code == 1, text[-3000:]
        assert "registry writer did not close within" in text, text[-3000:]
        assert "abandoned on stop: registry writer" in text, text[-3000:]
        assert took < STOP_WRITER_S + 25, took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if lock is not None:
            lock.rollback()
            lock.close()

    # Nothing lost: the broker kept every unacknowledged event for the persistent session.
    proc = start_controller(broker, data, client_id, log)
    try:
        wait_for(lambda: stored_events(db) == (300, 300), 60, "all 300 events stored exactly once after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text(errors="replace")[-3000:]
        assert re.search(r"controller \S+ stopped\n", log.read_text(errors="replace")), log.read_text(errors="replace")[-3000:]
    finally:
        node.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_task_that_ignores_cancellation_is_abandoned_within_its_deadline(broker, tmp_path, monkeypatch):
    """In process: a worker that swallows its cancellation no longer holds ``stop()`` forever."""
    import asyncio

    from fleet_controller import service as service_mod
    from fleet_controller.service import ControllerService
    from tests.support.controller import controller_settings

    monkeypatch.setattr(service_mod, "STOP_TASKS_S", 0.5)
    service = ControllerService(controller_settings(broker, tmp_path, intake={"writer": "thread"}))
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # the bug this guards against: a task that will not end

    service.add_worker("stubborn", stubborn)
    await service.start()
    t0 = time.monotonic()
    abandoned = await service.stop()
    took = time.monotonic() - t0
    release.set()
    assert abandoned == ["background tasks"], abandoned
    assert took < 0.5 + 5 + 5, took  # the tasks' deadline, plus the other steps done promptly
    assert not service.mqtt.connected
