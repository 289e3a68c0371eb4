"""The durable outbox: order, persistence across reopen, eviction policy, corrupt files."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.outbox import Outbox, OutboxError, Priority

T, I = Priority.TELEMETRY, Priority.IMPORTANT  # noqa: E741 - short names keep the priority tables readable


def put(box: Outbox, prio: Priority, size: int = 10, kind: str = "event") -> int:
    return box.enqueue(kind, prio, "fleet/v1/s/n/events", lambda epoch, seq: b"x" * size)


def test_seq_starts_at_one_and_payload_sees_epoch_and_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    seen = []
    for _ in range(3):
        box.enqueue("event", I, "t", lambda epoch, seq: seen.append((epoch, seq)) or f"{seq}".encode())
    assert [s for _, s in seen] == [1, 2, 3]
    assert {e for e, _ in seen} == {box.epoch}
    assert [m.payload for m in box.peek()] == [b"1", b"2", b"3"]


def test_persistence_across_reopen_keeps_epoch_seq_session_and_messages(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    epoch = box.epoch
    for _ in range(5):
        put(box, I)
    box.ack([1, 2])
    assert box.next_session() == 1
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.epoch == epoch
    assert [m.seq for m in box.peek()] == [3, 4, 5]
    assert put(box, T) == 6
    assert box.next_session() == 2
    assert box.depth() == 4


def test_new_file_means_new_epoch(tmp_path: Path) -> None:
    assert Outbox(tmp_path / "a.db").epoch != Outbox(tmp_path / "b.db").epoch


def test_uses_wal_journal(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db")
    mode = sqlite3.connect(tmp_path / "o.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_build_failure_uses_no_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")

    def bad(epoch: str, seq: int) -> bytes:
        raise ValueError("invalid field")

    with pytest.raises(ValueError):
        box.enqueue("event", I, "t", bad)
    assert put(box, I) == 1
    assert box.depth() == 1


def test_peek_after_cursor_and_limit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for _ in range(10):
        put(box, I)
    assert [m.seq for m in box.peek(after_seq=4, limit=3)] == [5, 6, 7]


def test_ack_returns_kinds_only_of_stored_messages(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    put(box, T, kind="heartbeat")
    put(box, I, kind="event")
    assert box.ack([1, 2, 99]) == ["heartbeat", "event"]
    assert box.ack([1]) == []
    assert box.depth() == 0 and box.size_bytes() == 0


@pytest.mark.parametrize(
    ("stored", "new", "max_messages", "evicted_seqs", "counts"),
    [
        pytest.param([T, I, T], I, 3, [1], {T: 1, I: 0}, id="oldest-telemetry-first"),
        pytest.param([I, I, T], I, 3, [3], {T: 1, I: 0}, id="telemetry-even-if-newer-than-events"),
        pytest.param([I, I, I], T, 3, [4], {T: 1, I: 0}, id="new-telemetry-dropped-when-only-events-stored"),
        pytest.param([I, I, I], I, 3, [1], {T: 0, I: 1}, id="oldest-event-when-no-telemetry-left"),
        pytest.param([T, T], T, 2, [1], {T: 1, I: 0}, id="telemetry-fifo"),
    ],
)
def test_eviction_policy(tmp_path: Path, stored, new, max_messages, evicted_seqs, counts) -> None:
    reported: list[tuple[Priority, int]] = []
    box = Outbox(tmp_path / "o.db", max_messages=max_messages, on_evict=lambda p, n: reported.append((p, n)))
    for prio in stored:
        put(box, prio)
    put(box, new)
    all_seqs = set(range(1, len(stored) + 2))
    assert {m.seq for m in box.peek()} == all_seqs - set(evicted_seqs)
    assert box.evicted == {Priority.KEEPER: 0, **counts}
    assert sum(n for _, n in reported) == len(evicted_seqs)
    assert [s for r in box.evicted_ranges() for s in range(r.first, r.last + 1)] == sorted(evicted_seqs)


def test_byte_limit_evicts_until_it_fits(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100)
    for _ in range(4):
        put(box, T, size=30)  # 4th pushes to 120 bytes
    assert box.size_bytes() == 90
    assert [m.seq for m in box.peek()] == [2, 3, 4]
    put(box, I, size=100)  # needs every telemetry message gone
    assert [m.seq for m in box.peek()] == [5]
    assert box.evicted[T] == 4


def test_corrupt_file_gives_clear_error_and_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="move the file away"):
        Outbox(path)
    assert path.exists()


# ----- property test against a reference model ------------------------------------------------

op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from([T, I]), st.integers(1, 40)),
    st.tuples(st.just("ack"), st.integers(0, 30)),
    st.tuples(st.just("reopen")),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(op, max_size=40), max_messages=st.integers(1, 8), max_bytes=st.integers(40, 200))
def test_outbox_matches_reference_model(ops, max_messages, max_bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "o.db"
        box = Outbox(path, max_messages=max_messages, max_bytes=max_bytes, synchronous="normal")
        model: list[tuple[int, Priority, int]] = []
        next_seq = 1
        evicted = {T: 0, I: 0, Priority.KEEPER: 0}  # since the last (re)open, like Outbox.evicted
        for o in ops:
            if o[0] == "put":
                _, prio, size = o
                assert put(box, prio, size) == next_seq
                model.append((next_seq, prio, size))
                next_seq += 1
                while len(model) > max_messages or sum(s for _, _, s in model) > max_bytes:
                    victims = [m for m in model if m[1] == T] or model
                    evicted[victims[0][1]] += 1
                    model.remove(victims[0])
            elif o[0] == "ack":
                stored = [m[0] for m in model]
                if stored:
                    seq = stored[o[1] % len(stored)]
                    box.ack([seq])
                    model = [m for m in model if m[0] != seq]
            else:
                box.close()
                box = Outbox(path, max_messages=max_messages, max_bytes=max_bytes, synchronous="normal")
                evicted = {T: 0, I: 0, Priority.KEEPER: 0}
            got = box.peek(limit=1000)
            assert [(m.seq, m.priority, len(m.payload)) for m in got] == model
            assert box.depth() == len(model)
            assert box.size_bytes() == sum(s for _, _, s in model)
            assert box.evicted == evicted
        box.close()


# ----- thinned heartbeats, evicted ranges, reclaimed space (what an outage leaves behind) ---------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def heartbeat(box: Outbox, clock: Clock, step: float = 10.0, size: int = 10) -> int:
    clock.now += step
    return box.enqueue("heartbeat", T, "fleet/v1/s/n/telemetry", lambda epoch, seq, ranges: b"h" * size, report_evictions=50)


def test_an_outage_keeps_one_heartbeat_a_minute_and_evicts_the_rest_first(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "o.db", max_messages=12, clock=clock, keep_heartbeat_every_s=60)
    for _ in range(60):  # ten minutes of heartbeats every 10 s with the link down
        heartbeat(box, clock)
    kept = box.peek(limit=100)
    keepers = [m for m in kept if m.priority == Priority.KEEPER]
    assert len(keepers) == 10  # one a minute survived
    assert [b.seq - a.seq for a, b in itertools.pairwise(keepers)] == [6] * 9
    assert box.evicted[Priority.KEEPER] == 0 and box.evicted[Priority.TELEMETRY] == 60 - 12


def test_evicted_seqs_are_runs_that_a_heartbeat_carries_until_it_is_acknowledged(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "o.db", max_messages=3, clock=clock, keep_heartbeat_every_s=1e9)
    carried: dict[int, list] = {}

    def hb() -> int:
        clock.now += 10
        return box.enqueue("heartbeat", T, "t", lambda epoch, seq, ranges: (carried.setdefault(seq, list(ranges)) and b"h") or b"h",
                           report_evictions=50)

    hb()  # seq 1 is a keeper (the first heartbeat); the rest are plain telemetry
    for _ in range(3):
        put(box, T, kind="telemetry")  # 2, 3, 4: the fourth message evicts seq 2
    put(box, I)  # 5 evicts 3
    put(box, T, kind="telemetry")  # 6 evicts 4 (a run 2..4 of telemetry)
    assert [(r.first, r.last, r.priority) for r in box.evicted_ranges()] == [(2, 4, Priority.TELEMETRY)]
    seq = hb()  # evicts 6 (telemetry; 5 is an event, 1 a keeper) and carries the run 2..4
    assert [(r.first, r.last) for r in carried[seq]] == [(2, 4)]
    box.ack([seq])
    assert [(r.first, r.last) for r in box.evicted_ranges()] == [(6, 6)]  # reported and acknowledged runs are forgotten


def test_a_heartbeat_evicted_with_its_ranges_hands_them_to_the_next(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "o.db", max_messages=3, clock=clock, keep_heartbeat_every_s=1e9)
    carried: dict[int, list] = {}

    def hb() -> int:
        clock.now += 10
        return box.enqueue("heartbeat", T, "t", lambda epoch, seq, ranges: (carried.__setitem__(seq, [(r.first, r.last) for r in ranges]), b"h")[1],
                           report_evictions=50)

    put(box, I)  # 1
    hb()  # 2, a keeper (the first heartbeat)
    put(box, T, kind="telemetry")  # 3
    put(box, T, kind="telemetry")  # 4 evicts 3
    first = hb()  # 5 carries [3..3] and evicts 4
    assert carried[first] == [(3, 3)]
    put(box, T, kind="telemetry")  # 6 evicts 5: the heartbeat that carried [3..3] never left
    second = hb()  # 7
    assert carried[second] == [(3, 3), (4, 5)]  # offered again, with the runs evicted since


def test_unreported_evictions_counts_the_runs_no_stored_heartbeat_carries(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_messages=2, keep_heartbeat_every_s=1e9)
    assert box.unreported_evictions() == 0
    for _ in range(3):
        put(box, T, kind="telemetry")  # the third evicts seq 1
    put(box, I)  # evicts 2: still one run, 1..2
    assert box.unreported_evictions() == 1
    box.ack([m.seq for m in box.peek()])  # drained: the run stays until a heartbeat carries it
    assert box.unreported_evictions() == 1
    seq = box.enqueue("heartbeat", T, "t", lambda epoch, seq, ranges: b"h", report_evictions=50)
    assert box.unreported_evictions() == 0  # carried, though not yet acknowledged
    box.ack([seq])
    assert box.unreported_evictions() == 0 and box.evicted_ranges() == []


def test_get_returns_only_the_stored_ones_of_the_asked_seqs(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    seqs = [put(box, I, size=s) for s in range(1, 8)]
    box.ack([seqs[1], seqs[4]])
    got = box.get([seqs[6], seqs[1], seqs[0], seqs[4], 99, seqs[0]])
    assert [m.seq for m in got] == [seqs[0], seqs[6]] and [len(m.payload) for m in got] == [1, 7]
    assert box.get([]) == []
    many = [put(box, T, kind="telemetry") for _ in range(1200)]  # more than one SQL chunk
    assert [m.seq for m in box.get(many)] == many


def test_a_drained_outbox_gives_its_space_back(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", reclaim_above_bytes=256 * 1024, synchronous="normal")
    seqs = [put(box, T, size=4096, kind="telemetry") for _ in range(500)]  # ~2 MB of payload
    grown = (tmp_path / "o.db").stat().st_size + (tmp_path / "o.db-wal").stat().st_size
    assert grown > 2_000_000
    box.ack(seqs)
    assert box.depth() == 0 and box.reclaimed == 1
    after = (tmp_path / "o.db").stat().st_size + (tmp_path / "o.db-wal").stat().st_size
    assert after < 200_000, after
    put(box, I)  # still usable, seq goes on
    assert box.peek()[0].seq == 501
