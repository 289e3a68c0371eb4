"""The controller's intake: validate, dedupe and store every message nodes send, in batches.

Shaped by three requirements:

* **A loop never dies of bad input.** Every payload goes through
  :func:`edge_agent.protocol.parse_message_view` (``parse_message``'s validation and rejections;
  what the fast path accepts stays its msgspec Struct, never built into a model); a bad one is counted in
  ``shopfleet_controller_rejected_total{reason}``, logged at most once per reason per
  ``log_every_s`` (a flood of garbage cannot flood the log), acknowledged and dropped.
* **Nothing lost, nothing doubled.** Messages are acknowledged to the broker only after the
  batch holding them is committed (paho's manual ack), so a controller crash redelivers them;
  redeliveries and agent replays are then recognised by :func:`advance`, a pure function over a
  per-node :class:`SeqCursor` (epoch, watermark, open gaps). A late message that fills a gap is
  accepted; a replayed one is a duplicate; a new epoch (a new outbox database) restarts at 1.
* **1,000+ msg/s on SQLite.** Messages are gathered into a batch until ``batch_max_messages`` or
  ``batch_max_delay_s`` and written in one transaction by the registry's single writer
  (:class:`RegistryWriter`), by default a child process so that parsing and storing use a second
  core instead of fighting the MQTT network thread for the GIL. While a batch is being written
  the broker keeps sending up to its in-flight window, so the next batch is already waiting.

Three parts: the MQTT thread calls :meth:`Intake.submit`; :meth:`Intake.run` is the asyncio task
that gathers batches, hands them to the writer and acknowledges them; :class:`IntakeCore` is what
runs on the writer (parse, dedupe, store) and returns a :class:`BatchOutcome` for the metrics.
The writer gets each message as a plain ``(topic, payload, received_at)`` tuple (:data:`RawMessage`):
pickling 500 :class:`InboundMessage` dataclasses and unpickling them again took ~6 ms per batch,
the tuples take 0.15 ms, and the writer needs nothing else (ack ids stay in this process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from multiprocessing import connection as mp_connection
from typing import Any

import msgspec

from edge_agent.protocol import (
    EVENT_TYPES,
    HEARTBEAT_TYPES,
    MAX_ACK_MISSING,
    PRESENCE_TYPES,
    Channel,
    EvictedRun,
    ProtocolError,
    StoredAck,
    Topics,
    encode,
    parse_message_view,
    parse_topic,
)
from fleet_controller.intake.mqtt import InboundMessage
from fleet_controller.metrics import ControllerMetrics
from fleet_controller.registry.bus import BusEvent
from fleet_controller.registry.carts import CART_EVENT_TYPES, CartStore
from fleet_controller.registry.db import Checkpointer, create_engine, start_checkpointer
from fleet_controller.registry.store import (
    MAX_RETIRED_EPOCHS,
    CursorConflict,
    NodeKey,
    NodeNotRemovable,
    NodeUpdate,
    Quarantined,
    RegistryStore,
    SeqCursor,
    WriteBatch,
    store_quarantined,
    store_unavailable,
)
from fleet_controller.settings import IntakeSettings
from shopfleet.errors import TemporaryError

log = logging.getLogger(__name__)

MAX_GAP_RANGES = 1000
"""Open gap ranges kept per node. More means a very late message can still be accepted after a
long, patchy outage; fewer bounds memory. The oldest ranges beyond it are given up (they stay
counted as missing)."""


PAUSE_S = 0.002
"""A stream silent this long ends the batch early: the broker has filled its in-flight window and
waits for our acks. Longer gathers more per transaction on a trickling stream; shorter loses
less time per window when the backlog is large."""


RawMessage = tuple[str, bytes, float]
"""A message as the writer receives it: topic, payload, received_at."""


def raw_messages(batch: Sequence[InboundMessage]) -> list[RawMessage]:
    """Return the batch as the writer needs it: plain tuples, cheap to pickle to the writer process."""
    return [(m.topic, m.payload, m.received_at) for m in batch]


ACK_PERIOD_S = 1.0
"""Stored-acks (``intake.ack_nodes``) are coalesced: each node gets at most one per this period, the newest
(cumulative, so it speaks for every batch of the period). Before, every batch published one per node it
touched: one MQTT publish per message received in a drain of many nodes. Longer publishes fewer; the agents
then keep their messages that much longer."""

PAUSE_MAX_S = 2.0
"""Longest the MQTT network thread is held at a time by flow control. While it is held paho sends
nothing: no PUBACK of a committed batch, no keepalive ping. Held longer than 1.5 x keepalive (45 s at
the default 30 s), the broker drops the connection, and the acks of every message received on it are
lost with it (a manual ack names a packet id of the old connection): the broker's in-flight window
never frees and the stream stalls until the next reconnect. Measured: bench/scale.py stored almost
nothing for minutes with the controller and its writer idle. After this long, one message is let in
(the queue may pass ``intake.max_queue`` by one a pause) so the thread can send its acks and pings."""

PIPELINE_DEPTH = 2
"""Batches handed to the writer before the oldest is acknowledged (at least 2). 2 keeps the writer busy while
this process acknowledges; more only holds more messages unacknowledged."""


PRESENCE_SUFFIX = f"/{Channel.PRESENCE.value}"


class Verdict(StrEnum):
    """What the intake decides about one (epoch, seq) of a node."""

    NEW = "new"  # above the watermark
    FILLED = "filled"  # fills an open gap
    NEW_EPOCH = "new_epoch"  # first message of a new outbox epoch
    REBASED = "rebased"  # the stream really continues beyond a jump: the cursor moves there, no gap counted
    DUPLICATE = "duplicate"  # seen before: drop
    JUMP = "seq_jump"  # too far above the watermark: refused (a reject reason)
    STALE_EPOCH = "stale_epoch"  # an epoch the node has left: refused (a reject reason)


REFUSED = frozenset({Verdict.JUMP, Verdict.STALE_EPOCH})


@dataclass(frozen=True)
class SeqLimits:
    """The intake's sequence-sanity settings (``intake.max_seq_jump`` and friends), sent with every batch."""

    max_seq_jump: int = 100_000
    seq_resync_after: int = 3
    max_session_jump: int | None = 10_000
    acks: bool = False  # return each touched node's stored-ack (intake.ack_nodes)


CURSOR_CONFLICT_RETRIES = 20
"""Times a batch is decided again after another replica moved one of its nodes' cursors; beyond
it the batch is held and retried later like one the database refused (it never happens without
a livelock between replicas)."""

AckInfo = tuple[str, str, str, int, tuple[tuple[int, int], ...]]
"""A stored-ack to publish: shop, node, epoch, seq, missing ranges (see :class:`edge_agent.protocol.StoredAck`)."""


def stored_ack(cursor: SeqCursor) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Return ``(seq, missing)`` of the stored-ack for ``cursor``: its watermark and open gaps.

    At most ``MAX_ACK_MISSING`` ranges are listed; with more, ``seq`` stops below the first range
    left out, so the ack never claims a seq it did not list as missing.
    """
    gaps = cursor.gaps
    if len(gaps) <= MAX_ACK_MISSING:
        return cursor.watermark, gaps
    return gaps[MAX_ACK_MISSING][0] - 1, gaps[:MAX_ACK_MISSING]


def drop_evicted(cursor: SeqCursor, runs: Sequence[EvictedRun]) -> tuple[SeqCursor, dict[str, int]]:
    """Remove the seqs of ``runs`` from the cursor's open gaps; return the cursor and the seqs removed per priority.

    Only seqs in an open gap count: a seq that was stored (sent and stored before the outbox
    evicted it while waiting for the stored-ack) or lies above the watermark is not evicted from
    the controller's point of view. Once removed, a seq is below the watermark and in no gap, so a
    late arrival of it (impossible: the agent deleted it) would be dropped as a duplicate and
    change no other count.
    """
    gaps = list(cursor.gaps)
    removed: dict[str, int] = {}
    for run in runs:
        out: list[tuple[int, int]] = []
        for lo, hi in gaps:
            a, b = max(lo, run.first), min(hi, run.last)
            if a > b:
                out.append((lo, hi))
                continue
            removed[run.priority] = removed.get(run.priority, 0) + b - a + 1
            out += [r for r in ((lo, a - 1), (b + 1, hi)) if r[0] <= r[1]]
        gaps = out
    if not removed:
        return cursor, removed
    return msgspec.structs.replace(cursor, gaps=tuple(gaps)), removed


NUL_ESCAPE = b"\\u0000"
NUL_ERROR = ("PostgreSQL text and jsonb cannot hold the NUL character (\\u0000): kept here raw, unstored; "
             "fix the sender to strip NUL from its strings")


Unstorable = tuple[bytes, str, str]
"""A parsed message the registry cannot store: its raw payload, the quarantine reason and the error."""


def has_nul_escape(payload: bytes) -> bool:
    """Return whether a JSON payload holds the NUL character: an unescaped ``\\u0000`` escape.

    JSON cannot carry a raw NUL byte in a string, only this escape; an escaped backslash before
    it (``\\\\u0000``, the text ``\\u0000``) is no NUL. A ``bytes.find`` per message: cheap enough for
    the writer's hot path.
    """
    i = payload.find(NUL_ESCAPE)
    while i != -1:
        j = i
        while j > 0 and payload[j - 1] == 0x5C:  # backslashes before this one
            j -= 1
        if (i - j) % 2 == 0:
            return True
        i = payload.find(NUL_ESCAPE, i + 1)
    return False


def _at_rev(c: SeqCursor, rev: int) -> SeqCursor:
    """Return ``c`` at revision ``rev``: ``dataclasses.replace`` without its field introspection (twice per node of every batch)."""
    return SeqCursor(c.epoch, c.watermark, c.gaps, c.retired, c.pending, rev)


def advance(
    cursor: SeqCursor, epoch: str, seq: int, max_jump: int = SeqLimits.max_seq_jump, resync_after: int = SeqLimits.seq_resync_after,
) -> tuple[Verdict, SeqCursor, int]:
    """Decide about ``(epoch, seq)``; return the verdict, the new cursor and how many seqs became missing.

    Sequence sanity, in the spirit of Sparkplug B's seq checks:

    * an epoch only moves forward: a message of an epoch the node has left (``cursor.retired``) is
      refused, so flipping to another epoch and back can never re-store old messages;
    * a seq more than ``max_jump`` above the watermark (0 for a new epoch) is refused and leaves
      the cursor where it was, so one absurd seq cannot count a billion missing messages or make
      the real stream's next messages look like gap fills;
    * unless ``resync_after`` consecutive seqs arrive beyond the window (seq, seq+1, ...): then the
      node really continues there (an outbox that evicted more than the window during a long
      outage, a controller that lost its database), and the cursor is rebased without counting a gap.
    """
    verdict = Verdict.NEW
    base = cursor
    if epoch != cursor.epoch:
        if epoch in cursor.retired:
            return Verdict.STALE_EPOCH, cursor, 0
        verdict = Verdict.NEW_EPOCH
        retired = (*cursor.retired, cursor.epoch)[-MAX_RETIRED_EPOCHS:] if cursor.epoch else cursor.retired
        base = SeqCursor(epoch=epoch, retired=retired)
    if seq > base.watermark + max_jump:
        p = cursor.pending
        run = p[2] + 1 if p is not None and p[0] == epoch and p[1] + 1 == seq else 1
        if run < resync_after:
            return Verdict.JUMP, msgspec.structs.replace(cursor, pending=(epoch, seq, run)), 0
        return Verdict.REBASED, SeqCursor(epoch, seq, base.gaps, base.retired), 0
    if seq > base.watermark:
        missing = seq - base.watermark - 1
        gaps = base.gaps + (((base.watermark + 1, seq - 1),) if missing else ())
        if len(gaps) > MAX_GAP_RANGES:
            gaps = gaps[-MAX_GAP_RANGES:]
        return verdict, SeqCursor(epoch, seq, gaps, base.retired), missing
    for i, (lo, hi) in enumerate(base.gaps):
        if lo <= seq <= hi:
            pieces = tuple(r for r in ((lo, seq - 1), (seq + 1, hi)) if r[0] <= r[1])
            gaps = base.gaps[:i] + pieces + base.gaps[i + 1:]
            return Verdict.FILLED, SeqCursor(epoch, base.watermark, gaps, base.retired), 0
        if seq < lo:
            break
    return Verdict.DUPLICATE, cursor, 0


@dataclass(frozen=True)
class BatchOutcome:
    """What storing one batch did: counts for the metrics, and the changes for the event bus."""

    stored: int = 0
    rejected: int = 0
    duplicates: int = 0
    events: tuple[BusEvent, ...] = ()
    kinds: tuple[tuple[str, int], ...] = ()  # stored messages per kind
    reasons: tuple[tuple[str, int], ...] = ()  # rejected messages per reason
    missing: int = 0  # seqs that became missing (gaps)
    filled: int = 0  # late messages that filled a gap
    quarantined: tuple[tuple[str, int], ...] = ()  # messages kept in the dead-letter table, per reason
    rebased: int = 0  # streams that really continued beyond a seq jump
    dropped_events: int = 0  # bus events that could not be returned from the writer process
    evicted: tuple[tuple[str, int], ...] = ()  # seqs reported evicted by their node's outbox, per priority
    acks: tuple[AckInfo, ...] = ()  # stored-acks of the nodes the batch touched (SeqLimits.acks)
    cursor_conflicts: int = 0  # times the batch was decided again after another replica moved a cursor

    @staticmethod
    def combine(parts: Sequence[BatchOutcome]) -> BatchOutcome:
        """Return the sum of several outcomes."""
        kinds: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        quarantined: collections.Counter[str] = collections.Counter()
        evicted: collections.Counter[str] = collections.Counter()
        acks: dict[tuple[str, str], AckInfo] = {}
        for p in parts:
            kinds.update(dict(p.kinds))
            reasons.update(dict(p.reasons))
            quarantined.update(dict(p.quarantined))
            evicted.update(dict(p.evicted))
            acks.update({(a[0], a[1]): a for a in p.acks})  # the last part's ack of a node is the newest
        return BatchOutcome(
            sum(p.stored for p in parts), sum(p.rejected for p in parts), sum(p.duplicates for p in parts),
            tuple(e for p in parts for e in p.events), tuple(kinds.items()), tuple(reasons.items()),
            sum(p.missing for p in parts), sum(p.filled for p in parts), tuple(quarantined.items()),
            sum(p.rebased for p in parts), sum(p.dropped_events for p in parts), tuple(evicted.items()),
            tuple(acks.values()), sum(p.cursor_conflicts for p in parts),
        )

    @property
    def quarantined_total(self) -> int:
        """Messages of the batch quarantined, whatever the reason."""
        return sum(n for _, n in self.quarantined)


def record(metrics: ControllerMetrics, outcome: BatchOutcome) -> None:
    """Add a batch outcome to the controller's metrics."""
    for kind, n in outcome.kinds:
        metrics.ingested.labels(kind=kind).inc(n)
    for reason, n in outcome.reasons:
        metrics.rejected.labels(reason=reason).inc(n)
    for reason, n in outcome.quarantined:
        metrics.quarantined.labels(reason=reason).inc(n)
    if outcome.duplicates:
        metrics.duplicates.inc(outcome.duplicates)
    if outcome.missing:
        metrics.gaps.inc(outcome.missing)
    if outcome.filled:
        metrics.gaps_filled.inc(outcome.filled)
    if outcome.rebased:
        metrics.seq_rebases.inc(outcome.rebased)
    if outcome.dropped_events:
        metrics.bus_dropped.inc(outcome.dropped_events)
    for priority, n in outcome.evicted:
        metrics.evicted.labels(priority=priority).inc(n)
    if outcome.cursor_conflicts:
        metrics.cursor_conflicts.inc(outcome.cursor_conflicts)


class TemporaryStoreError(TemporaryError):
    """The database cannot be reached or is locked: keep the batch and retry later."""

    default_reason = "store"


class WriterDied(TemporaryStoreError):
    """The writer process died (or was killed) while working on a batch; a new one is started."""

    default_reason = "writer"


class RateLimitedLog:
    """Log a message of a given key at most once per ``every_s``, saying how many were suppressed."""

    def __init__(self, logger: logging.Logger, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._every = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` as a warning unless ``key`` was logged recently; return whether it was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._suppressed[key] += 1
            return False
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} more like it since the last report)" if n else ""
        self._log.warning(msg + "%s", *args, suffix)
        return True


class IntakeCore:
    """Parse, dedupe and store batches into the registry; the part of the intake that runs on the writer.

    Holds the per-node sequence cursors in memory (loaded from the database on first sight of a
    node), so it must be the only writer of the registry's nodes.
    """

    def __init__(self, registry: RegistryStore, log_every_s: float = 60.0) -> None:
        self.registry = registry
        # PostgreSQL refuses NUL in text: such a message would fail its whole batch, which would then
        # be stored message by message (every good message of it waiting); it is quarantined up front.
        self._screen_nul = registry.engine.dialect.name == "postgresql"
        self._cursors: dict[NodeKey, SeqCursor] = {}
        self._rlog = RateLimitedLog(log, log_every_s)
        self._carts = CartStore(registry.engine)

    def process_batch(
        self, batch: Sequence[RawMessage | InboundMessage], now: float | None = None, limits: SeqLimits = SeqLimits(),
    ) -> BatchOutcome:
        """Parse, dedupe and store one batch; fall back to one by one when storing it fails.

        ``batch`` holds :data:`RawMessage` tuples (what the writer receives) or :class:`InboundMessage` values.
        Raises only when the database is unavailable (:func:`store_unavailable`: down, locked, out
        of connections): the caller keeps the batch and retries. A message that breaks storing in
        any other way is stored alone, and if it fails alone it is quarantined: kept raw in the
        dead-letter table with the error, counted, and acknowledged like every other message.
        """
        raw = [m if isinstance(m, tuple) else (m.topic, m.payload, m.received_at) for m in batch]
        try:
            return self._process(raw, now, limits)
        except Exception as exc:
            if store_unavailable(exc):
                raise
            if len(raw) == 1:
                return self.quarantine(raw, "store", exc, now, limits)
        return BatchOutcome.combine([self.process_batch([m], now, limits) for m in raw])

    def quarantine(self, raw: Sequence[RawMessage], reason: str, exc: BaseException | str, now: float | None = None,
                   limits: SeqLimits = SeqLimits()) -> BatchOutcome:
        """Keep ``raw`` in the dead-letter table with ``reason`` and the error; return the outcome to count.

        One message of a node's stream is judged against its node's cursor first, in the same
        transaction as its dead-letter row (see :meth:`_decide_and_write`'s ``unstorable``): its
        seq counts as received, so it opens no gap (``missing_total`` would count it as lost) and
        the stored-ack covers it (an agent would otherwise send it again, to be quarantined again,
        for ever); a duplicate stays a duplicate. When even that fails, or for anything else (a
        message the writer process died on, reason ``writer``, is not parsed again), the rows are
        inserted alone. Raises only when the database is unavailable. If the dead-letter
        insert itself fails for any other reason, the messages are logged and counted (reason
        ``lost``), never retried.
        """
        error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}"
        if len(raw) == 1 and reason != "writer":  # (a message the writer process died on is not parsed again)
            topic, payload, received = raw[0]
            try:
                view = parse_message_view(topic, payload)
            except ProtocolError:
                view = None
            if view is not None and not isinstance(view, PRESENCE_TYPES):
                try:
                    return self._decide([(view, received, topic)], collections.Counter(), time.time() if now is None else now,
                                        limits, {id(view): (payload, reason, error)})
                except Exception as qexc:
                    if store_unavailable(qexc):
                        raise
                    log.warning("quarantine of a message on %r with its seq failed (%s); keeping it without: %s",
                                topic[:200], reason, qexc)
        items = []
        for topic, payload, received in raw:
            try:
                info = parse_topic(topic)
                shop, node = info.shop, info.node
            except ProtocolError:
                shop = node = None
            items.append(Quarantined(topic, payload, received, reason, error, shop, node))
            self._rlog.warning(f"quarantine:{reason}", "quarantined a message on %r (%s): %s", topic[:200], reason, error[:300])
        try:
            store_quarantined(self.registry.engine, items, now)
        except Exception as qexc:
            if store_unavailable(qexc):
                raise
            log.error("could not quarantine %s message(s) (%s); they are dropped: %s", len(items), error[:300], qexc)
            return BatchOutcome(quarantined=(("lost", len(items)),))
        return BatchOutcome(quarantined=((reason, len(items)),))

    def remove_node(self, shop: str, node: str, now: float | None = None) -> BusEvent:
        """Remove a node from the registry and from this writer's cursors (:meth:`RegistryStore.remove_node`)."""
        event = self.registry.remove_node(shop, node, now)
        self._cursors.pop((shop, node), None)
        return event

    def _process(self, batch: list[RawMessage], now: float | None, limits: SeqLimits) -> BatchOutcome:
        now = time.time() if now is None else now
        reasons: collections.Counter[str] = collections.Counter()
        parsed = []
        unstorable: dict[int, Unstorable] = {}  # messages PostgreSQL cannot hold, by id of the view
        for topic, payload, received in batch:
            if not payload and topic.endswith(PRESENCE_SUFFIX):
                # A retained presence cleared (an admin removed the node, or a node's retained birth was
                # wiped by hand): the broker passes the clearing to subscribers. Nothing to store; counted apart.
                reasons["retained_clear"] += 1
                continue
            try:
                # Wire views, not models: the writer only reads attributes (see parse_message_view).
                view = parse_message_view(topic, payload)
            except ProtocolError as exc:
                reasons[exc.reason] += 1
                self._rlog.warning(exc.reason, "rejected a message on %r: %s", topic[:200], exc.detail[:500])
                continue
            if self._screen_nul and not isinstance(view, PRESENCE_TYPES) and has_nul_escape(payload):
                unstorable[id(view)] = (payload, "store", NUL_ERROR)
            parsed.append((view, received, topic))
        return self._decide(parsed, reasons, now, limits, unstorable)

    def _decide(self, parsed: list[tuple[Any, float, str]], reasons: collections.Counter[str], now: float, limits: SeqLimits,
                unstorable: dict[int, Unstorable] | None = None) -> BatchOutcome:
        """Decide and write ``parsed`` (:meth:`_decide_and_write`), again while other writers move its nodes' cursors."""
        for attempt in range(CURSOR_CONFLICT_RETRIES + 1):
            try:
                outcome = self._decide_and_write(parsed, collections.Counter(reasons), now, limits, unstorable)
            except CursorConflict as exc:
                # Another replica stored messages of these nodes since we read their cursors:
                # nothing of this batch was stored; decide it again against the stored cursors.
                for key in exc.keys:
                    self._cursors.pop(key, None)
                self.registry.forget(exc.keys)  # a row removed under us is created again, not updated in vain
                continue
            return replace(outcome, cursor_conflicts=attempt) if attempt else outcome
        raise TemporaryStoreError(f"node cursors kept moving under this batch ({CURSOR_CONFLICT_RETRIES} retries); holding it")

    def _decide_and_write(
        self, parsed: list[tuple[Any, float, str]], reasons: collections.Counter[str], now: float, limits: SeqLimits,
        unstorable: dict[int, Unstorable] | None = None,
    ) -> BatchOutcome:
        """Decide every parsed message against the node cursors and store the batch in one transaction.

        ``unstorable`` (by ``id`` of the view: its raw payload, quarantine reason and error) are
        messages the database cannot hold (a NUL on PostgreSQL; one that failed alone, from
        :meth:`quarantine`). Judged like the others (a duplicate stays a duplicate), one
        accepted goes to the dead-letter table in the same transaction instead of the history,
        and its seq counts as received: no gap, so a node waiting for the stored-ack stops sending
        it again, and the batch around it is not failed and stored again message by message.

        Raises :class:`CursorConflict` (nothing stored) when another writer moved a cursor meanwhile.
        """
        wb = WriteBatch(max_session_jump=limits.max_session_jump)
        kinds: collections.Counter[str] = collections.Counter()
        evicted: collections.Counter[str] = collections.Counter()
        # Cursors this batch moves, on top of the committed ones; merged only after the commit.
        cursors: dict[NodeKey, SeqCursor] = {}
        revs: dict[NodeKey, int] = {}  # the revision each moved cursor was read at
        known = self._cursors
        unknown = {(msg.shop, msg.node) for msg, _, _ in parsed if not isinstance(msg, PRESENCE_TYPES)}
        unknown = {k for k in unknown if k not in known}  # not "- known.keys()": that walks every known node
        if unknown:
            cursors.update(self.registry.load_cursors(unknown))
        counts: dict[NodeKey, list[int]] = {}  # per node: [stored, duplicates, net missing, evicted]
        seen = wb.seen
        duplicates = missing_total = filled = rebased = 0
        for msg, received, topic in parsed:
            key = (msg.shop, msg.node)
            if isinstance(msg, PRESENCE_TYPES):
                seen[key] = max(seen.get(key, 0.0), received)
                wb.presences.append((msg, received))
                kinds["presence"] += 1
                continue
            cur = cursors.get(key) or self._cursors.get(key) or SeqCursor()
            if key not in revs:
                revs[key] = cur.rev
            verdict, cursors[key], missing = advance(cur, msg.epoch, msg.seq, limits.max_seq_jump, limits.seq_resync_after)
            if verdict in REFUSED:
                reasons[verdict.value] += 1
                self._rlog.warning(
                    verdict.value, "refused a message on %r: epoch %s seq %s against epoch %s watermark %s (%s)",
                    topic[:200], msg.epoch, msg.seq, cur.epoch, cur.watermark,
                    "an epoch the node has left" if verdict is Verdict.STALE_EPOCH
                    else f"more than intake.max_seq_jump={limits.max_seq_jump} ahead",
                )
                continue
            seen[key] = max(seen.get(key, 0.0), received)
            c = counts.get(key)
            if c is None:
                c = counts[key] = [0, 0, 0, 0]
            if verdict is Verdict.DUPLICATE:
                duplicates += 1
                c[1] += 1
                continue
            if isinstance(msg, HEARTBEAT_TYPES) and msg.evicted and msg.epoch == cursors[key].epoch:
                cursors[key], removed = drop_evicted(cursors[key], msg.evicted)
                n = sum(removed.values())
                if n:
                    evicted.update(removed)
                    c[2] -= n
                    c[3] += n
            if verdict is Verdict.FILLED:
                filled += 1
                c[2] -= 1
            elif verdict is Verdict.REBASED:
                rebased += 1
                log.warning("%s/%s: stream continues at epoch %s seq %s beyond the jump window; rebased without counting a gap",
                            msg.shop, msg.node, msg.epoch, msg.seq)
            missing_total += missing
            c[2] += missing
            held = unstorable.get(id(msg)) if unstorable else None
            if held is not None:
                payload, why, error = held
                wb.quarantine.append(Quarantined(topic, payload, received, why, error, msg.shop, msg.node))
                self._rlog.warning(f"quarantine:{why}", "quarantined a message on %r (%s): %s", topic[:200], why, error[:300])
                continue
            c[0] += 1
            wb.uplinks.append((msg, received))
            kinds[msg.kind] += 1
        wb.nodes = {key: NodeUpdate(cursors[key], c[0], c[1], c[2], c[3], True, revs[key]) for key, c in counts.items()}
        # Carts first, in their own transaction: idempotent on cart_id, so a batch retried after
        # a failed write_batch (or a cursor conflict) stores each cart once (fleet_controller.registry.carts).
        cart_events = [(m.shop, m.node, m.type, m.data) for m, _ in wb.uplinks if isinstance(m, EVENT_TYPES) and m.type in CART_EVENT_TYPES]
        cart_bus: list[BusEvent] = []
        if cart_events:
            cart_bus, bad = self._carts.ingest(cart_events, now)
            for err in bad:
                reasons["bad_cart"] += 1
                self._rlog.warning("bad_cart", "a cart event is not a valid cart (kept as a plain event): %s", err[:500])
        events = self.registry.write_batch(wb, now) + cart_bus
        if wb.refused_nodes:  # reports of nodes the registry does not know: nothing stored, no cursor kept
            for key in wb.refused_nodes:
                cursors.pop(key, None)
                counts.pop(key, None)
            refused = sum(1 for m, _ in wb.uplinks if (m.shop, m.node) in wb.refused_nodes)
            reasons["unknown_node"] += refused
            kinds["reported_state"] -= refused
        # Committed: only now does the in-memory cursor move on (at the revision the row now holds).
        committed = {key: _at_rev(cursors[key], revs[key] + 1) for key in counts}
        self._cursors.update(cursors)
        self._cursors.update(committed)
        acks: tuple[AckInfo, ...] = ()
        if limits.acks:
            acks = tuple((k[0], k[1], cur.epoch, *stored_ack(cur)) for k, cur in committed.items())
        if wb.session_jumps:
            reasons["session_jump"] += wb.session_jumps
            kinds["presence"] -= wb.session_jumps
        return BatchOutcome(
            stored=sum(kinds.values()), rejected=sum(reasons.values()), duplicates=duplicates, events=tuple(events),
            kinds=tuple((k, n) for k, n in kinds.items() if n), reasons=tuple(reasons.items()), missing=missing_total,
            filled=filled, rebased=rebased, evicted=tuple(evicted.items()), acks=acks,
            quarantined=tuple(collections.Counter(q.reason for q in wb.quarantine).items()),
        )


# ----- the single writer, on a thread or in a child process ------------------------------------

_CORES: dict[str, IntakeCore] = {}
"""Writer state by writer key, in whichever process hosts the writer."""
_CHECKPOINTERS: dict[str, Checkpointer | None] = {}
"""The SQLite checkpointer thread of each writer (see :class:`~fleet_controller.registry.db.Checkpointer`)."""


PARENT_WATCH_S = 0.5
"""How often a writer process checks that its controller still lives."""


def _die_with_parent() -> None:
    """Make this writer process exit when the controller that started it dies, even by SIGKILL.

    A SIGKILLed controller runs no cleanup: without this its writer (re-parented to pid 1) lived
    on, holding its database connections, and with it multiprocessing's resource tracker (which
    exits once every holder of its pipe has). A daemon thread polls the parent pid and
    calls ``os._exit`` when it changes; the kernel then closes the writer's sockets, so the database
    sees its connections end. (Linux's PR_SET_PDEATHSIG is not used: it fires when the *thread*
    that forked the child exits, which for a process pool is whichever thread submitted first.)
    """
    # The pid multiprocessing recorded at spawn, not os.getppid() now: a controller killed while
    # this process was still importing must be noticed too.
    parent_process = multiprocessing.parent_process()
    parent = parent_process.pid if parent_process is not None else os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                log.error("the controller (pid %s) is gone; the registry writer exits", parent)
                os._exit(3)
            time.sleep(PARENT_WATCH_S)

    threading.Thread(target=watch, name="writer-parent-watch", daemon=True).start()


WRITER_GC_THRESHOLDS = (20_000, 10, 10)
"""The writer process's collector thresholds (Python's default: 700, 10, 10). A batch allocates
hundreds of thousands of objects that live until it ends, nearly none in a cycle; at 700 the
collector ran ~300 times per 10,000 messages, scanning each batch's live objects again and again
(13 % of the writer's CPU at 10,000 nodes, bench/writer.py). At 20,000 it runs a handful of times;
a cycle that does form waits at most that many allocations longer to be freed."""


def _init_writer(key: str, db_url: str, log_every_s: float, log_level: int | None) -> None:
    """Set up the writer's own engine, registry and intake core (runs on the writer)."""
    if log_level is not None:  # a spawned child starts with no logging set up
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[writer]: %(message)s")
    engine = create_engine(db_url)
    _CHECKPOINTERS[key] = start_checkpointer(engine)
    _CORES[key] = IntakeCore(RegistryStore(engine), log_every_s)
    if multiprocessing.parent_process() is not None:
        _die_with_parent()
        # The writer's own process: move everything imported so far out of the collector's sight.
        # Parsing allocates heavily, and each full collection otherwise rescans the whole heap of
        # imported modules (a quarter of the writer's time in a profile).
        gc.freeze()
        gc.set_threshold(*WRITER_GC_THRESHOLDS)


def _returnable(outcome: BatchOutcome) -> BatchOutcome | bytes:
    """Return ``outcome`` ready to cross back to the controller process: pickled here, where a failure can be handled.

    Pickling happens in the writer, on purpose: if a result cannot be pickled (a bus event holding
    a value the pickler chokes on), the executor would otherwise fail the whole call *after* the
    batch was committed, and the controller could only guess. Here the bus events that cannot be
    pickled are dropped (counted in ``shopfleet_controller_bus_dropped_total``); what was stored stays stored.
    In a thread writer nothing crosses a process boundary and the outcome is returned as is.
    """
    if multiprocessing.parent_process() is None:
        return outcome
    try:
        return pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        kept = []
        for e in outcome.events:
            try:
                pickle.dumps(e, pickle.HIGHEST_PROTOCOL)
                kept.append(e)
            except Exception:
                log.error("dropping a %s bus event of %s/%s that cannot be returned from the writer: %s",
                          e.topic, e.shop, e.node, type(exc).__name__)
        trimmed = replace(outcome, events=tuple(kept), dropped_events=outcome.dropped_events + len(outcome.events) - len(kept))
        return pickle.dumps(trimmed, pickle.HIGHEST_PROTOCOL)


SLOW_WRITER_OP_S = 0.5
"""A writer operation that takes longer is logged (with its name and time): every message behind it waits that long."""


def _run_on_writer(key: str, op: str, *args: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return _dispatch_on_writer(key, op, *args)
    finally:
        took = time.perf_counter() - t0
        if took > SLOW_WRITER_OP_S:
            log.warning("registry writer: %s took %.2f s (every message behind it waited as long)", op, took)


def _dispatch_on_writer(key: str, op: str, *args: Any) -> Any:
    core = _CORES[key]
    try:
        if op == "batch":
            return _returnable(core.process_batch(*args))
        if op == "quarantine":
            raw, reason, error = args
            return _returnable(core.quarantine(raw, reason, error))
        if op == "sweep":
            return core.registry.sweep_presence(*args)
        if op == "retention":
            return core.registry.enforce_retention(*args)
        if op == "register_shop":
            shop, name, region, labels, timezone, applier = args
            return core.registry.register_shop(shop, name=name, region=region, labels=labels, timezone=timezone, applier=applier)
        if op == "remove_node":
            try:
                return ("removed", core.remove_node(*args))
            except NodeNotRemovable as exc:  # an answer, not a failure (and it crosses the process boundary as a value)
                return (exc.reason, str(exc))
        if op == "ping":
            return os.getpid()
        if op == "db_ping":
            with core.registry.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        if op == "close":
            try:
                core.registry.flush_series()
            except Exception as exc:  # another writer folds these rows again once this one is taken for dead
                log.warning("could not flush the series roll-ups on close (%s); another writer recovers them", exc)
            checkpointer = _CHECKPOINTERS.pop(key, None)
            if checkpointer is not None:
                checkpointer.stop()
            core.registry.engine.dispose()
            del _CORES[key]
            return None
    except Exception as exc:
        # Plain exceptions across the process boundary (the originals may not pickle).
        text = f"{type(exc).__name__}: {str(getattr(exc, 'orig', None) or exc)[:300]}"
        if store_unavailable(exc):
            raise TemporaryStoreError(text) from None
        raise RuntimeError(text) from None
    raise ValueError(f"unknown writer operation {op!r}")


class RegistryWriter:
    """The one writer of the registry: intake batches, presence sweeps and retention, in order.

    ``mode="process"`` (the default of the service) runs it in a child process, so parsing and
    storing use the second core instead of competing for the GIL with the MQTT network thread;
    ``mode="thread"`` keeps it in this process (simpler to debug, one core).
    """

    def __init__(self, db_url: str, *, mode: str = "process", log_every_s: float = 60.0) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"writer mode {mode!r}: use 'process' or 'thread'")
        self.db_url = db_url
        self.mode = mode
        self._key = uuid.uuid4().hex
        self._log_every_s = log_every_s
        self._executor: Executor | None = None

    def _make_executor(self) -> Executor:
        if self.mode == "thread":
            return ThreadPoolExecutor(1, "registry-writer", initializer=_init_writer,
                                      initargs=(self._key, self.db_url, self._log_every_s, None))
        level = logging.getLogger().getEffectiveLevel()
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_writer,
                                   initargs=(self._key, self.db_url, self._log_every_s, level))

    async def call(self, op: str, *args: Any) -> Any:
        """Run ``op`` ('batch', 'sweep', 'retention', 'register_shop', 'ping') on the writer; raise ``TemporaryStoreError`` to retry."""
        if self._executor is None:
            self._executor = self._make_executor()
        executor = self._executor
        try:
            try:
                future = executor.submit(_run_on_writer, self._key, op, *args)
            except BrokenExecutor:
                raise  # a dead writer (BrokenExecutor is a RuntimeError too): replaced below
            except RuntimeError as exc:
                # Shut down (the process is exiting): no fault of the messages, so hold them, never quarantine.
                raise TemporaryStoreError(f"registry writer is shut down: {exc}") from None
            return await asyncio.wrap_future(future)
        except BrokenExecutor as exc:
            if self._executor is executor:  # the first caller to notice replaces it
                log.error("registry writer died (%s); starting a new one", exc)
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            raise WriterDied(f"registry writer died: {exc}") from None

    async def register_shop(
        self, shop: str, *, name: str | None = None, region: str | None = None,
        labels: dict[str, str] | None = None, timezone: str | None = None, applier: str | None = None,
    ) -> None:
        """Create a shop or update its name, region, labels, time zone and applier node, on the writer (in order with the intake)."""
        await self.call("register_shop", shop, name, region, labels, timezone, applier)

    async def remove_node(self, shop: str, node: str) -> BusEvent:
        """Remove a node from the registry, on the writer (in order with the intake); raise :class:`NodeNotRemovable`."""
        outcome, value = await self.call("remove_node", shop, node)
        if outcome != "removed":
            raise NodeNotRemovable(outcome, value)
        event: BusEvent = value
        return event

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the writer after the work already submitted; return False if it had to be killed.

        Bounded: a writer that has not finished its queue and closed within ``timeout`` seconds
        (a batch stuck on a database lock, say) is killed (:meth:`kill`) instead of waited for.
        """
        if self._executor is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            self._executor.submit(_run_on_writer, self._key, "close").result(timeout)
        except Exception as exc:
            log.error("registry writer did not close within %.0fs (%s); killing it: what it had not committed is "
                      "rolled back, and those messages were not acknowledged, so the broker keeps them", timeout,
                      type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
            self.kill()
            return False
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        if not processes:  # a thread writer: its queue is done
            self._executor.shutdown(wait=True)
            self._executor = None
            return True
        # Not shutdown(wait=True): that joins the writer process without a deadline.
        # Waiting on the sentinels, not join(): the pool's own thread reaps the process meanwhile.
        self._executor.shutdown(wait=False)
        pending = {p.sentinel: p.pid for p in processes}
        while pending and (left := deadline - time.monotonic()) > 0:
            for ready in mp_connection.wait(list(pending), left):
                pending.pop(ready, None)
        alive = list(pending.values())
        self._executor = None
        if alive:
            log.error("registry writer process %s did not exit within %.0fs of closing; killing it", alive, timeout)
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(pid, signal.SIGKILL)
            return False
        return True

    def kill(self) -> None:
        """Abandon the writer now: cancel what is queued and terminate a writer process (its transaction rolls back)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list(getattr(executor, "_processes", None) or {})  # ProcessPoolExecutor's children, by pid
        executor.shutdown(wait=False, cancel_futures=True)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


WRITER_DEATHS_BEFORE_ISOLATING = 2
"""Writer deaths on one batch (or one message) before it is stored one by one (or quarantined): a
message that kills the writer process must not kill it forever."""
STORE_ATTEMPTS_BEFORE_PROBING = 5
"""Failed attempts of one batch, each blamed on the database, before the intake asks the database
whether it answers; if it does, the batch is blamed instead and stored one by one."""
STORE_FAILING_ALERT_S = 60.0
"""An unavailable database is logged as an error (once per outage) after this long."""


def _with_limited(outcome: BatchOutcome, limited: int) -> BatchOutcome:
    """Return ``outcome`` with ``limited`` messages dropped over their node's budget counted as rejected (``rate_limited``)."""
    if not limited:
        return outcome
    return BatchOutcome.combine([outcome, BatchOutcome(rejected=limited, reasons=(("rate_limited", limited),))])


_Submitted = tuple[list[InboundMessage], list[InboundMessage], "asyncio.Task[Any]", float]
"""A batch handed to the writer: its messages (all acknowledged), those the writer stores (within their nodes' budget),
the writer call's task, when it was handed over."""


class NodeBudget:
    """Per-node token buckets: ``burst`` messages at once, then ``rate_per_s`` (see ``intake.node_burst``).

    Keyed by the topic's shop and node (``fleet/v1/<shop>/<node>/<channel>``; any other topic has
    one bucket of its own kind, the writer rejects it anyway). Only buckets still refilling are kept:
    every ``PRUNE_EVERY_S`` the full ones are forgotten, so memory follows the nodes that sent
    recently, not the fleet.
    """

    PRUNE_EVERY_S = 60.0

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[str, list[float]] = {}  # node prefix of the topic -> [tokens, last refill]
        self._pruned = float("-inf")

    def take(self, topic: str, now: float) -> bool:
        """Charge one message of ``topic``'s node at ``now`` (monotonic seconds); return whether its budget allowed it."""
        key = topic.rpartition("/")[0]
        b = self._buckets.get(key)
        if b is None:
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return True
        b[0] = tokens
        return False

    def prune(self, now: float) -> None:
        """Forget the buckets that have refilled (every ``PRUNE_EVERY_S`` at most)."""
        if now - self._pruned < self.PRUNE_EVERY_S:
            return
        self._pruned = now
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


class Intake:
    """Gather messages from the MQTT adapter into batches and have the registry writer store them."""

    def __init__(
        self,
        writer: RegistryWriter,
        metrics: ControllerMetrics,
        settings: IntakeSettings,
        *,
        ack: Callable[[InboundMessage], None] = lambda m: None,
        on_events: Callable[[Sequence[BusEvent]], None] = lambda e: None,
        publish: Callable[[str, bytes], object] | None = None,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.settings = settings
        self._ack = ack
        self._on_events = on_events
        self._publish = publish
        self._retry_delay = retry_delay_s
        self._pending: collections.deque[InboundMessage] = collections.deque()
        self._room = threading.Condition()  # the MQTT thread waits on it while the queue is full
        self.max_queue = settings.max_queue
        self.queue_high_water = 0  # the longest the queue has been (tests and the flow-control docs)
        self.pauses = 0
        self.pause_timeouts = 0  # pauses that ended after PAUSE_MAX_S with the queue still full
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._waiting = threading.Event()
        self._rlog = RateLimitedLog(log, settings.log_every_s)
        self.stored_total = 0
        self.quarantined_total = 0
        self.failing_since: float | None = None  # when storing started failing, while it does
        self._failing_logged = False
        self.limits = SeqLimits(settings.max_seq_jump, settings.seq_resync_after, settings.max_session_jump,
                                acks=settings.ack_nodes and publish is not None)
        self._acks_due: dict[tuple[str, str], AckInfo] = {}  # the newest stored-ack of each node, until the next flush
        self.budget = NodeBudget(settings.node_rate_per_s, settings.node_burst) if settings.node_rate_per_s > 0 else None
    # ----- producer side (MQTT thread) -------------------------------------------------------

    def submit(self, message: InboundMessage) -> None:
        """Queue one received message; safe to call from the MQTT network thread.

        Flow control: when the queue holds ``intake.max_queue`` messages, the calling (network)
        thread waits until batches have taken it below half of that, ``PAUSE_MAX_S`` at most at a
        time (then one message is let in and the thread sends its acks and keepalive pings before
        it reads the next). paho reads nothing from the socket meanwhile, so the broker keeps the
        backlog (TCP back-pressure, then its own queue) instead of this process's memory. Nothing is
        lost: every held message is still unacknowledged.
        """
        if len(self._pending) >= self.max_queue:
            self._pause()
        self._pending.append(message)
        n = len(self._pending)
        if n > self.queue_high_water:
            self.queue_high_water = n
        loop = self._loop
        if loop is not None and self._waiting.is_set():
            self._waiting.clear()
            loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]

    def _pause(self) -> None:
        self.pauses += 1
        self.metrics.intake_paused.set(1)
        self._rlog.warning("paused", "intake queue full (%s messages, intake.max_queue): reading from the broker paused "
                           "until it drains below half", len(self._pending))
        loop = self._loop
        if loop is not None and self._waiting.is_set():  # the collector may be asleep: wake it to drain
            self._waiting.clear()
            loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]
        deadline = time.monotonic() + PAUSE_MAX_S
        with self._room:
            while len(self._pending) > self.max_queue // 2:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.pause_timeouts += 1
                    break  # let the network thread send its acks and pings (PAUSE_MAX_S)
                self._room.wait(min(left, 0.5))
        self.metrics.intake_paused.set(0)

    # ----- consumer side (asyncio) -------------------------------------------------------------

    async def run(self) -> None:
        """Collect batches and write them until cancelled.

        Up to ``PIPELINE_DEPTH`` batches are handed to the writer at once, so it starts on the
        next batch while this process acknowledges the previous one; results are taken (and
        messages acknowledged) strictly in the order the batches were formed.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        submitted: asyncio.Queue[_Submitted] = asyncio.Queue(PIPELINE_DEPTH - 1)
        completer = asyncio.create_task(self._complete_in_order(submitted), name="intake-completer")
        flusher = asyncio.create_task(self._flush_acks_every(ACK_PERIOD_S), name="intake-acks") if self.limits.acks else None
        try:
            while True:
                batch = await self._collect()
                if batch:
                    kept = self._within_budget(batch)
                    task = asyncio.create_task(self._call_batch(raw_messages(kept)))
                    await submitted.put((batch, kept, task, time.perf_counter()))
        finally:
            completer.cancel()
            if flusher is not None:
                flusher.cancel()
            self._flush_acks()  # what was committed gets its ack on the way out too
            while not submitted.empty():
                submitted.get_nowait()[2].cancel()

    async def _flush_acks_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self._flush_acks()

    def _flush_acks(self) -> None:
        """Publish the coalesced stored-acks: one per node that had a batch committed since the last flush."""
        if self._acks_due:
            acks, self._acks_due = list(self._acks_due.values()), {}
            self._publish_acks(acks)

    async def _complete_in_order(self, submitted: asyncio.Queue[_Submitted]) -> None:
        while True:
            batch, kept, task, t0 = await submitted.get()
            await self._finish(batch, kept, task, t0)

    def _within_budget(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        """Return the messages of ``batch`` to store: those within their node's budget (the rest are counted by ``_finish``).

        Every message is charged to its node (:class:`NodeBudget`); one over budget is acknowledged
        with its batch, in order, never reaches the writer, and is logged per node. The budget is
        charged whether or not the controller is busy: behind Mosquitto's in-flight window the
        intake cannot tell a backlog waiting in the broker from a quiet stream, so a flood is cut
        wherever it comes from. The defaults leave honest nodes far inside it (docs/controller.md).
        """
        budget = self.budget
        if budget is None:
            return batch
        now = time.monotonic()
        budget.prune(now)
        kept: list[InboundMessage] = []
        dropped: collections.Counter[str] = collections.Counter()
        for m in batch:
            if budget.take(m.topic, now):
                kept.append(m)
            else:
                dropped[m.topic.rpartition("/")[0]] += 1
        for node, n in dropped.items():
            self._rlog.warning(f"rate_limited:{node}", "%s sent more than intake.node_burst=%s messages at once and more than "
                               "intake.node_rate_per_s=%s a second since: %s of its messages "
                               "dropped (acknowledged, not stored)", node, self.settings.node_burst, self.settings.node_rate_per_s, n)
        return kept

    async def _collect(self) -> list[InboundMessage]:
        assert self._wake is not None
        limit = self.settings.batch_max_messages
        while not self._pending:
            self._wake.clear()
            self._waiting.set()
            if self._pending:  # raced with submit: do not sleep on a non-empty queue
                self._waiting.clear()
                break
            await self._wake.wait()
        deadline = time.monotonic() + self.settings.batch_max_delay_s
        batch: list[InboundMessage] = []
        while True:
            while self._pending and len(batch) < limit:
                batch.append(self._pending.popleft())
            if len(batch) >= limit:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Linger for more messages, but stop early when the stream pauses (the broker's
            # in-flight window is full and waits for our acks).
            self._wake.clear()
            self._waiting.set()
            if self._pending:
                self._waiting.clear()
                continue
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that arrives
                # as the wake-up does (while agents stream), and the intake then never ended on stop.
                async with asyncio.timeout(min(remaining, PAUSE_S)):
                    await self._wake.wait()
            except TimeoutError:
                self._waiting.clear()
                break
        self.metrics.intake_queue.set(len(self._pending))
        if len(self._pending) <= self.max_queue // 2:
            with self._room:
                self._room.notify_all()
        return batch

    async def _call_batch(self, raw: list[RawMessage]) -> BatchOutcome:
        """Store ``raw`` on the writer; return its outcome (unpickled when it came from the writer process)."""
        if not raw:  # every message of the batch was over its node's budget
            return BatchOutcome()
        result = await self.writer.call("batch", raw, None, self.limits)
        return pickle.loads(result) if isinstance(result, bytes) else result  # type: ignore[no-any-return]

    async def _finish(self, batch: list[InboundMessage], kept: list[InboundMessage], task: asyncio.Task[Any], t0: float) -> None:
        """Wait for a submitted batch, then record and acknowledge it.

        Only an unavailable database holds the stream (retried with capped backoff; ``/healthz``
        degrades meanwhile). Every other failure ends in at most a few attempts: the batch is
        stored one message at a time and what still fails is quarantined, so no message can stall
        the intake of the fleet.
        """
        attempt = deaths = 0
        while True:
            try:
                outcome: BatchOutcome = await task
                break
            except WriterDied as exc:
                deaths += 1
                self.metrics.store_errors.labels(kind="writer").inc()
                if deaths >= WRITER_DEATHS_BEFORE_ISOLATING:
                    log.error("the registry writer died %s times on a batch of %s messages (%s); storing them one by one", deaths, len(batch), exc)
                    outcome = await self._isolate(kept, "writer", str(exc))
                    break
            except TemporaryStoreError as exc:
                attempt += 1
                self._failing()
                self.metrics.store_errors.labels(kind="temporary").inc()
                if attempt >= STORE_ATTEMPTS_BEFORE_PROBING and await self._db_answers():
                    # The database answers, yet this batch keeps failing as if it did not: blame the batch.
                    log.error("a batch of %s messages failed %s times while the database answers (%s); storing them one by one",
                              len(batch), attempt, exc)
                    outcome = await self._isolate(kept, "store", str(exc))
                    break
                await self._back_off(attempt, len(batch), exc)
            except Exception as exc:
                # A bug, or a result that could not come back from the writer: never retried as is.
                self.metrics.store_errors.labels(kind="unexpected").inc()
                log.exception("storing a batch of %s messages failed unexpectedly; storing them one by one, quarantining what fails", len(batch))
                outcome = await self._isolate(kept, "unexpected", f"{type(exc).__name__}: {exc}")
                break
            task = asyncio.create_task(self._call_batch(raw_messages(kept)))
        outcome = _with_limited(outcome, len(batch) - len(kept))
        self.failing_since = None
        self._failing_logged = False
        done = time.time()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        record(self.metrics, outcome)
        if outcome.acks:  # committed: published by the next flush (ACK_PERIOD_S), the newest per node
            self._acks_due.update(((a[0], a[1]), a) for a in outcome.acks)
        for m in batch:
            self.metrics.ingest_latency.observe(max(done - m.received_at, 0.0))
            self._ack(m)
        self.stored_total += outcome.stored
        self.quarantined_total += outcome.quarantined_total
        if outcome.events:
            self._on_events(outcome.events)

    def _publish_acks(self, acks: Sequence[AckInfo]) -> None:
        """Tell each node of a committed batch what is stored of its stream (QoS 1, not retained).

        Best effort by design: an ack lost here (the broker is away) costs the agent a re-send,
        which the dedupe drops and acknowledges again; it can never lose a message.
        """
        publish = self._publish
        if publish is None:
            return
        for shop, node, epoch, seq, missing in acks:
            payload = encode(StoredAck(shop=shop, node=node, epoch=epoch, seq=seq, missing=missing))
            try:
                publish(Topics.node(shop, node, Channel.ACK), payload)
            except Exception as exc:
                self._rlog.warning("stored_ack", "could not publish a stored-ack to %s/%s: %s", shop, node, exc)
                continue
            self.metrics.acks_published.inc()

    def _failing(self) -> None:
        now = time.time()
        if self.failing_since is None:
            self.failing_since = now
        elif not self._failing_logged and now - self.failing_since > STORE_FAILING_ALERT_S:
            self._failing_logged = True
            log.error("the registry database has been unavailable for %.0fs: the intake holds every message until it is back "
                      "(/healthz reports degraded)", now - self.failing_since)

    async def _back_off(self, attempt: int, n: int, exc: BaseException) -> None:
        delay = min(self._retry_delay * 2 ** min(attempt - 1, 5), 30.0)
        self._rlog.warning("store", "cannot store %s message(s) (%s); retrying in %.1fs", n, exc, delay)
        await asyncio.sleep(delay)

    async def _db_answers(self) -> bool:
        try:
            return bool(await self.writer.call("db_ping"))
        except Exception:
            return False

    async def _isolate(self, batch: list[InboundMessage], reason: str, error: str) -> BatchOutcome:
        """Store each message of ``batch`` alone; quarantine the ones that still fail (with ``reason``).

        Messages of the batch that were already committed (a failure after the commit) come back
        as duplicates, so nothing is stored twice.
        """
        parts = []
        for m in batch:
            raw = [(m.topic, m.payload, m.received_at)]
            attempt = deaths = 0
            while True:
                try:
                    parts.append(await self._call_batch(raw))
                    break
                except WriterDied as exc:
                    deaths += 1
                    if deaths >= WRITER_DEATHS_BEFORE_ISOLATING:
                        parts.append(await self._quarantine(raw, "writer", f"the registry writer died on this message: {exc}"))
                        break
                except TemporaryStoreError as exc:
                    attempt += 1
                    self._failing()
                    if attempt >= STORE_ATTEMPTS_BEFORE_PROBING and await self._db_answers():
                        parts.append(await self._quarantine(raw, "store", str(exc)))
                        break
                    await self._back_off(attempt, 1, exc)
                except Exception as exc:
                    parts.append(await self._quarantine(raw, reason, f"{error}; alone: {type(exc).__name__}: {exc}"))
                    break
        return BatchOutcome.combine(parts)

    async def _quarantine(self, raw: list[RawMessage], reason: str, error: str) -> BatchOutcome:
        attempt = 0
        while True:
            try:
                result = await self.writer.call("quarantine", raw, reason, error)
                return pickle.loads(result) if isinstance(result, bytes) else result  # type: ignore[no-any-return]
            except TemporaryStoreError as exc:  # the database is down: the dead-letter table is in it too
                attempt += 1
                self._failing()
                await self._back_off(attempt, len(raw), exc)
            except Exception as exc:
                log.error("could not quarantine a message on %r (%s: %s); it is dropped: %s", raw[0][0][:200], reason, error[:300], exc)
                return BatchOutcome(quarantined=(("lost", len(raw)),))
