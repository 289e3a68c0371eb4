"""The durable outbox: every uplink message is stored here before it is sent.

The promise that nothing is lost on the way up (docs/architecture.md, decision 2) rests on this file. A message gets
its ``epoch`` and ``seq`` when it is enqueued, is committed to SQLite (WAL mode, so readers never
block the writer) before anyone may send it, and is deleted only when the broker acknowledged it
(QoS 1 PUBACK). A broker outage, an agent restart or a SIGKILL therefore only delay messages;
after it they are sent again in ``seq`` order. The controller dedupes on ``(node, epoch, seq)``
so re-sending is safe.

The outbox is bounded (messages and bytes) because a shop can be offline for a week. When it is
full, the oldest *telemetry* (heartbeats, readings) goes first: a fresh heartbeat makes an old
one worthless, while events, alerts, command results and reported state are evicted only when no
telemetry is left. One heartbeat per ``keep_heartbeat_every_s`` is a *keeper*, evicted only after
the other telemetry, so a long outage leaves the node's history thinned, not empty.

Every eviction is recorded as a range of seqs (``evicted_ranges``) until a heartbeat that carries
it is acknowledged, so the controller can count an evicted message apart from a lost one. After
the outbox drains, the file gives its space back (the WAL is truncated and, when the file grew
past ``reclaim_above_bytes``, the database is vacuumed).

The same database keeps the presence ``session`` counter, so it grows across restarts too.
Deleting the file starts a new epoch (seq restarts at 1), which the controller treats as a new
stream rather than a gap.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

log = logging.getLogger(__name__)


class Priority(IntEnum):
    """Eviction class of a message (see :data:`EVICTION_ORDER`); the values are stored in the file."""

    TELEMETRY = 0
    IMPORTANT = 1
    KEEPER = 2  # a heartbeat kept through an outage (one per keep_heartbeat_every_s)


EVICTION_ORDER = (Priority.TELEMETRY, Priority.KEEPER, Priority.IMPORTANT)
"""Which messages go first when the outbox is full: plain telemetry, then keeper heartbeats, then
events, alerts, command results and reported state."""


@dataclass(frozen=True)
class EvictedRange:
    """Seqs ``first``..``last`` (inclusive, all of one priority) that the outbox evicted unsent."""

    first: int
    last: int
    priority: Priority

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class OutboxError(RuntimeError):
    """The outbox database cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class OutboxMessage:
    """A stored message, ready to publish with QoS 1."""

    seq: int
    priority: Priority
    kind: str
    topic: str
    payload: bytes
    retain: bool


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_priority_seq ON outbox (priority, seq);
-- Evicted seqs as runs, until a heartbeat carrying them (reported_in) is acknowledged.
CREATE TABLE IF NOT EXISTS evicted (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    reported_in INTEGER
);
"""


class Outbox:
    """A bounded, durable FIFO of uplink messages in one SQLite file. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_messages: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        synchronous: str = "full",
        on_evict: Callable[[Priority, int], None] = lambda priority, n: None,
        keep_heartbeat_every_s: float = 60.0,
        reclaim_above_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be at least 1")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.keep_heartbeat_every_s = keep_heartbeat_every_s
        self.reclaim_above_bytes = reclaim_above_bytes
        self._clock = clock
        self.reclaimed = 0
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self.evicted: dict[Priority, int] = {p: 0 for p in Priority}
        self._last_evict_log = -1e9
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Keep the WAL from staying at its high-water mark after a big drain.
            self._db.execute("PRAGMA journal_size_limit=1048576")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            self.epoch = self._init_meta()
            rows = self._db.execute("SELECT priority, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox GROUP BY priority").fetchall()
        except sqlite3.DatabaseError as exc:
            raise OutboxError(
                f"outbox {self.path} cannot be opened ({exc}); fix: free disk space or permissions, or move the file "
                "away (the agent then starts a new epoch; messages in the old file are not sent)"
            ) from None
        self._count = {p: 0 for p in Priority}
        self._bytes = {p: 0 for p in Priority}
        for prio, count, size in rows:
            self._count[Priority(prio)] = count
            self._bytes[Priority(prio)] = size
        last_keeper = self._db.execute("SELECT MAX(created) FROM outbox WHERE priority=?", (int(Priority.KEEPER),)).fetchone()[0]
        self._last_keeper = float(last_keeper) if last_keeper is not None else -1e18

    def _init_meta(self) -> str:
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', '1')")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('session', '0')")
            return self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> Outbox._Tx:
        return Outbox._Tx(self._db)

    def _meta_int(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def enqueue(
        self,
        kind: str,
        priority: Priority,
        topic: str,
        build: Callable[..., bytes],
        *,
        retain: bool = False,
        report_evictions: int = 0,
    ) -> int:
        """Assign the next seq, store ``build(epoch, seq)`` durably, evict if full; return the seq.

        ``build`` runs inside the transaction, so a payload that fails to build uses no seq. With
        ``report_evictions`` N > 0 (heartbeats), it is called as ``build(epoch, seq, ranges)`` with
        up to N unreported :class:`EvictedRange` values, which this message then carries: they are
        forgotten when it is acknowledged, and offered again if it is evicted itself.
        A heartbeat becomes a keeper when the last one is ``keep_heartbeat_every_s`` old.
        """
        with self._lock, self._tx():
            seq = self._meta_int("next_seq")
            now = self._clock()
            if kind == "heartbeat" and priority == Priority.TELEMETRY and now - self._last_keeper >= self.keep_heartbeat_every_s:
                priority = Priority.KEEPER
                self._last_keeper = now
            if report_evictions > 0:
                rows = self._db.execute(
                    "SELECT first, last, priority FROM evicted WHERE reported_in IS NULL ORDER BY first LIMIT ?", (report_evictions,)
                ).fetchall()
                ranges = [EvictedRange(f, la, Priority(p)) for f, la, p in rows]
                payload = build(self.epoch, seq, ranges)
                self._db.executemany("UPDATE evicted SET reported_in=? WHERE first=?", [(seq, r.first) for r in ranges])
            else:
                payload = build(self.epoch, seq)
            self._db.execute(
                "INSERT INTO outbox (seq, priority, kind, topic, payload, retain, created) VALUES (?,?,?,?,?,?,?)",
                (seq, int(priority), kind, topic, payload, int(retain), now),
            )
            self._db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(seq + 1),))
            self._count[priority] += 1
            self._bytes[priority] += len(payload)
            evicted = self._evict()
        for prio, n in evicted.items():
            if n:
                self._on_evict(prio, n)
        return seq

    def _evict(self) -> dict[Priority, int]:
        """Delete oldest rows, lowest priority first, until within limits (inside the caller's tx)."""
        evicted = {p: 0 for p in Priority}
        while sum(self._count.values()) > self.max_messages or sum(self._bytes.values()) > self.max_bytes:
            for prio in EVICTION_ORDER:
                row = self._db.execute(
                    "SELECT seq, LENGTH(payload) FROM outbox WHERE priority=? ORDER BY seq LIMIT 1", (int(prio),)
                ).fetchone()
                if row is not None:
                    break
            else:
                break
            seq = row[0]
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            self._record_eviction(seq, prio)
            # Ranges this message carried were never delivered: offer them again with the next heartbeat.
            self._db.execute("UPDATE evicted SET reported_in=NULL WHERE reported_in=?", (seq,))
            self._count[prio] -= 1
            self._bytes[prio] -= row[1]
            evicted[prio] += 1
            self.evicted[prio] += 1
        now = time.monotonic()
        if any(evicted.values()) and now - self._last_evict_log > 60:
            self._last_evict_log = now
            log.warning(
                "outbox %s full (limits %d messages, %d bytes): evicting oldest telemetry first; %d telemetry and %d "
                "important messages evicted so far. Raise outbox.max_messages/max_bytes to ride out longer outages.",
                self.path,
                self.max_messages,
                self.max_bytes,
                self.evicted[Priority.TELEMETRY],
                self.evicted[Priority.IMPORTANT],
            )
        return evicted

    def _record_eviction(self, seq: int, prio: Priority) -> None:
        """Add ``seq`` to the evicted runs (inside the caller's tx): extend a run ending at seq-1, else start one."""
        before = self._db.execute(
            "SELECT first FROM evicted WHERE last=? AND priority=? AND reported_in IS NULL", (seq - 1, int(prio))
        ).fetchone()
        if before is not None:
            self._db.execute("UPDATE evicted SET last=? WHERE first=?", (seq, before[0]))
        else:
            self._db.execute("INSERT INTO evicted (first, last, priority) VALUES (?,?,?)", (seq, seq, int(prio)))

    def evicted_ranges(self) -> list[EvictedRange]:
        """Return the evicted runs not yet acknowledged as reported, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT first, last, priority FROM evicted ORDER BY first").fetchall()
        return [EvictedRange(f, la, Priority(p)) for f, la, p in rows]

    def peek(self, after_seq: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Return up to ``limit`` stored messages with seq > ``after_seq``, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, priority, kind, topic, payload, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [OutboxMessage(s, Priority(p), k, t, bytes(b), bool(r)) for s, p, k, t, b, r in rows]

    def get(self, seqs: Iterable[int]) -> list[OutboxMessage]:
        """Return the stored messages among ``seqs`` (those not deleted yet), in seq order."""
        wanted = sorted(set(seqs))
        out: list[OutboxMessage] = []
        with self._lock:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                rows = self._db.execute(
                    f"SELECT seq, priority, kind, topic, payload, retain FROM outbox WHERE seq IN ({','.join('?' * len(chunk))}) ORDER BY seq",
                    chunk,
                ).fetchall()
                out += [OutboxMessage(s, Priority(p), k, t, bytes(b), bool(r)) for s, p, k, t, b, r in rows]
        return out

    def unreported_evictions(self) -> int:
        """Return how many evicted runs no stored heartbeat carries (they wait for the next heartbeat)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM evicted WHERE reported_in IS NULL").fetchone()[0])

    def ack(self, seqs: Iterable[int]) -> list[str]:
        """Delete acknowledged messages; return the kinds of those that were still stored."""
        seqs = list(seqs)
        if not seqs:
            return []
        kinds: list[str] = []
        with self._lock:
            with self._tx():
                for seq in seqs:
                    row = self._db.execute("DELETE FROM outbox WHERE seq=? RETURNING priority, LENGTH(payload), kind", (seq,)).fetchone()
                    if row is not None:
                        self._count[Priority(row[0])] -= 1
                        self._bytes[Priority(row[0])] -= row[1]
                        kinds.append(row[2])
                self._db.executemany("DELETE FROM evicted WHERE reported_in=?", [(s,) for s in seqs])
            if sum(self._count.values()) == 0:
                self._reclaim()
        return kinds

    def ack_stored(self, epoch: str, through: int, missing: Iterable[tuple[int, int]] = ()) -> list[str]:
        """Delete the messages a controller stored-ack covers: seq <= ``through`` outside the ``missing`` ranges.

        An ack of another epoch (a stream this outbox is not) deletes nothing. Returns the kinds deleted.
        """
        if epoch != self.epoch or through < 1:
            return []
        holes = sorted(missing)
        with self._lock:
            seqs = [s for (s,) in self._db.execute("SELECT seq FROM outbox WHERE seq <= ?", (through,))
                    if not any(a <= s <= b for a, b in holes)]
        return self.ack(seqs)

    def _reclaim(self) -> None:
        """Give disk space back once drained (caller holds the lock, no tx open): truncate the WAL, vacuum a grown file."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if self.path.stat().st_size > self.reclaim_above_bytes:
                self._db.execute("VACUUM")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.reclaimed += 1
        except sqlite3.OperationalError as exc:  # a reader holds the WAL: try at the next drain
            log.debug("outbox %s: space not reclaimed yet (%s)", self.path, exc)

    def depth(self) -> int:
        """Return how many messages wait for an acknowledgement."""
        with self._lock:
            return sum(self._count.values())

    def depth_by_priority(self) -> dict[Priority, int]:
        """Return the number of stored messages per priority."""
        with self._lock:
            return dict(self._count)

    def size_bytes(self) -> int:
        """Return the payload bytes stored."""
        with self._lock:
            return sum(self._bytes.values())

    def next_session(self) -> int:
        """Increment and return the persisted presence session number."""
        with self._lock, self._tx():
            session = self._meta_int("session") + 1
            self._db.execute("UPDATE meta SET value=? WHERE key='session'", (str(session),))
        return session

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
