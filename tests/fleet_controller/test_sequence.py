"""The intake's dedupe and gap logic (:func:`fleet_controller.intake.core.advance`): tables and properties."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_controller.intake.core import MAX_GAP_RANGES, RateLimitedLog, Verdict, advance
from fleet_controller.registry.store import SeqCursor

C = SeqCursor


@pytest.mark.parametrize(
    ("cursor", "epoch", "seq", "verdict", "after", "missing"),
    [
        pytest.param(C(), "e", 1, Verdict.NEW_EPOCH, C("e", 1, ()), 0, id="first-message"),
        pytest.param(C("e", 1), "e", 2, Verdict.NEW, C("e", 2), 0, id="next-in-order"),
        pytest.param(C("e", 2), "e", 5, Verdict.NEW, C("e", 5, ((3, 4),)), 2, id="skip-opens-gap"),
        pytest.param(C("e", 5, ((3, 4),)), "e", 3, Verdict.FILLED, C("e", 5, ((4, 4),)), 0, id="late-fills-gap-start"),
        pytest.param(C("e", 9, ((3, 7),)), "e", 5, Verdict.FILLED, C("e", 9, ((3, 4), (6, 7))), 0, id="late-splits-gap"),
        pytest.param(C("e", 5, ((4, 4),)), "e", 4, Verdict.FILLED, C("e", 5, ()), 0, id="late-closes-gap"),
        pytest.param(C("e", 5), "e", 5, Verdict.DUPLICATE, C("e", 5), 0, id="replay-of-watermark"),
        pytest.param(C("e", 5, ((3, 3),)), "e", 2, Verdict.DUPLICATE, C("e", 5, ((3, 3),)), 0, id="replay-below-gap"),
        pytest.param(C("e", 9, ((3, 3), (6, 6))), "e", 5, Verdict.DUPLICATE, C("e", 9, ((3, 3), (6, 6))), 0, id="replay-between-gaps"),
        pytest.param(C("e", 50, ((3, 3),)), "f", 1, Verdict.NEW_EPOCH, C("f", 1, (), ("e",)), 0, id="new-epoch-resets"),
        pytest.param(C("e", 50), "f", 4, Verdict.NEW_EPOCH, C("f", 4, ((1, 3),), ("e",)), 3, id="new-epoch-with-gap"),
        pytest.param(C("f", 9, (), ("e",)), "e", 51, Verdict.STALE_EPOCH, C("f", 9, (), ("e",)), 0, id="epoch-never-moves-back"),
        pytest.param(C("e", 5), "e", 5 + 100_001, Verdict.JUMP, C("e", 5, pending=("e", 100_006, 1)), 0, id="jump-refused"),
        pytest.param(C("e", 5), "e", 5 + 100_000, Verdict.NEW, C("e", 100_005, ((6, 100_004),)), 99_999, id="jump-at-window-accepted"),
        pytest.param(C("e", 5, pending=("e", 200_000, 2)), "e", 200_001, Verdict.REBASED, C("e", 200_001), 0, id="third-in-a-row-rebases"),
        pytest.param(C("e", 5, pending=("e", 200_000, 2)), "e", 6, Verdict.NEW, C("e", 6), 0, id="real-stream-clears-pending"),
        pytest.param(C("e", 5), "f", 100_001, Verdict.JUMP, C("e", 5, pending=("f", 100_001, 1)), 0, id="new-epoch-jump-refused"),
        pytest.param(C(), "e", 3, Verdict.NEW_EPOCH, C("e", 3, ((1, 2),)), 2, id="first-seen-mid-stream"),
    ],
)
def test_advance_table(cursor, epoch, seq, verdict, after, missing):
    assert advance(cursor, epoch, seq) == (verdict, after, missing)


def test_gap_ranges_are_bounded_oldest_given_up():
    cur = C("e", 0)
    for i in range(MAX_GAP_RANGES + 10):
        _, cur, _ = advance(cur, "e", 2 * i + 2)  # every odd seq missing
    assert len(cur.gaps) == MAX_GAP_RANGES
    assert cur.gaps[0] == (21, 21)  # the 10 oldest given up
    assert advance(cur, "e", 1)[0] is Verdict.DUPLICATE


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=200),
)
def test_every_seq_accepted_exactly_once_whatever_the_order(stream):
    """Any arrival order with any replays: each seq is accepted once, gaps are exactly what is missing."""
    cur = C()
    accepted: list[int] = []
    missing_total = 0
    for seq in stream:
        verdict, cur, missing = advance(cur, "e", seq)
        missing_total += missing
        if verdict is not Verdict.DUPLICATE:
            accepted.append(seq)
    assert sorted(accepted) == sorted(set(stream))
    assert cur.watermark == max(stream)
    open_seqs = {s for lo, hi in cur.gaps for s in range(lo, hi + 1)}
    assert open_seqs == set(range(1, max(stream) + 1)) - set(stream)
    # every seq that was ever missing was counted once when it went missing
    assert missing_total >= len(open_seqs)
    assert all(a[1] < b[0] for a, b in zip(cur.gaps, cur.gaps[1:], strict=False))  # sorted and disjoint


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 20)), min_size=1, max_size=60))
def test_an_epoch_switch_starts_a_fresh_stream_and_never_goes_back(stream):
    cur = C()
    left: set[str] = set()
    stored: set[tuple[str, int]] = set()
    for epoch, seq in stream:
        verdict, new, _ = advance(cur, epoch, seq)
        if epoch in left:
            assert verdict is Verdict.STALE_EPOCH and new == cur
        elif epoch != cur.epoch:
            assert verdict is Verdict.NEW_EPOCH
            assert new.watermark == seq and new.epoch == epoch
            if cur.epoch:
                left.add(cur.epoch)
        if verdict not in (Verdict.DUPLICATE, Verdict.STALE_EPOCH):
            assert (epoch, seq) not in stored  # nothing is ever stored twice
            stored.add((epoch, seq))
        cur = new


def test_rate_limited_log_says_how_many_were_suppressed(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t"), every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        assert rl.warning("bad_json", "bad %s", 1)
        assert not rl.warning("bad_json", "bad %s", 2)
        assert not rl.warning("bad_json", "bad %s", 3)
        assert rl.warning("schema", "other %s", 1)  # a different reason is not suppressed
        now[0] = 11
        assert rl.warning("bad_json", "bad %s", 4)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["bad 1", "other 1", "bad 4 (2 more like it since the last report)"]
