"""The ByteTrack-style tracker: stable ids through occlusion, and its measured quality."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shopfleet.cli import main as shopfleet_main
from vision.eval import MotFormatError, evaluate, load_gt, parse_mot
from vision.tracker import ByteTracker, TrackerConfig
from vision.types import Detections


def _dets(boxes: list[list[float]], scores: list[float] | None = None) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    s = np.array(scores if scores is not None else [0.9] * len(b), np.float32)
    return Detections(b, s, np.zeros(len(b), np.int64))


def _walker(x0: float, dx: float, t: int, y: float = 100.0) -> list[float]:
    x = x0 + dx * t
    return [x, y, x + 40, y + 100]


def test_ids_survive_a_short_occlusion() -> None:
    tr = ByteTracker()
    ids = []
    for t in range(40):
        boxes = [] if 15 <= t < 22 else [_walker(0, 5, t)]  # hidden for 7 frames behind a shelf
        out = tr.update(_dets(boxes), ts=t / 10)
        ids.extend(out.ids.tolist())
    assert set(ids) == {ids[0]}
    assert len(ids) == 40 - 7 - 1  # reported from its second hit on, except while hidden


def test_two_people_crossing_keep_their_ids() -> None:
    tr = ByteTracker()
    seen: dict[int, list[float]] = {}
    for t in range(50):
        out = tr.update(_dets([_walker(0, 6, t, 100), _walker(300, -6, t, 130)]), ts=float(t))
        for tid, box in zip(out.ids.tolist(), out.xyxy, strict=True):
            seen.setdefault(tid, []).append(float(box[0]))
    assert len(seen) == 2
    for xs in seen.values():  # each id moves monotonically one way: no swap at the crossing
        d = np.diff(xs)
        assert (d > 0).all() or (d < 0).all()


def test_low_score_detections_extend_but_do_not_start_tracks() -> None:
    tr = ByteTracker()
    for t in range(5):
        tr.update(_dets([_walker(0, 5, t)]), ts=float(t))
    out = tr.update(_dets([_walker(0, 5, 5)], [0.3]), ts=5.0)  # half hidden: weak detection
    assert len(out) == 1
    for t in range(6, 12):
        out = tr.update(_dets([[600, 400, 640, 500]], [0.3]), ts=float(t))
    assert all(i == 1 for i in out.ids.tolist())


def test_lost_tracks_end_and_ids_are_never_reused() -> None:
    tr = ByteTracker(TrackerConfig(max_lost_frames=3))
    for t in range(4):
        tr.update(_dets([_walker(0, 5, t)]), ts=float(t))
    ended = []
    for t in range(4, 9):
        ended += tr.update(_dets([]), ts=float(t)).ended
    assert ended == [1]
    for t in range(9, 12):
        out = tr.update(_dets([_walker(0, 5, 0)]), ts=float(t))
    assert out.ids.tolist() == [2]


@pytest.mark.parametrize(
    "noise,min_mota,min_idf1,max_switches",
    [
        pytest.param({}, 0.95, 0.95, 0, id="perfect-detections"),
        pytest.param({"drop": 0.1, "jitter": 0.05, "false_positives": 1.0}, 0.8, 0.85, 2, id="typical-detector"),
        pytest.param({"drop": 0.3, "jitter": 0.1, "false_positives": 2.0}, 0.5, 0.55, 8, id="bad-detector"),
    ],
)
def test_quality_on_tud_campus(media, noise, min_mota, min_idf1, max_switches) -> None:
    r = evaluate(load_gt(media["tud-campus-gt.txt"]), seed=1, **noise)
    assert r["frames"] == 71 and r["objects"] == 8
    assert r["mota"] >= min_mota and r["idf1"] >= min_idf1 and r["id_switches"] <= max_switches, r


def test_eval_tracker_command_prints_json(media, capsys) -> None:
    rc = shopfleet_main(["vision", "eval-tracker", "--gt", str(media["tud-campus-gt.txt"]), "--drop", "0.2", "--seed", "3"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["drop"] == 0.2 and 0 < out["mota"] <= 1 and {"idf1", "id_switches"} <= out.keys()


def test_eval_tracker_command_rejects_a_bad_gt_file(tmp_path, capsys) -> None:
    bad = tmp_path / "gt.txt"
    bad.write_text("1,1,10,10,5\n")
    assert shopfleet_main(["vision", "eval-tracker", "--gt", str(bad)]) == 2
    assert "line 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,words",
    [
        pytest.param("1,1,10,10,5\n", "at least 6", id="too-few-fields"),
        pytest.param("1,a,10,10,5,5\n", "must be numbers", id="not-a-number"),
        pytest.param("0,1,10,10,5,5\n", "frame must be >= 1", id="frame-zero"),
        pytest.param("1,1,10,10,-5,5\n", "positive size", id="negative-width"),
        pytest.param("\n\n", "no ground-truth rows", id="empty"),
    ],
)
def test_parse_mot_errors(text: str, words: str) -> None:
    with pytest.raises(MotFormatError, match=words):
        parse_mot(text)


_row = st.tuples(st.integers(1, 500), st.integers(1, 50), st.floats(-100, 2000), st.floats(-100, 2000), st.floats(0.5, 500), st.floats(0.5, 500))


@settings(max_examples=100, deadline=None)
@given(st.lists(_row, min_size=1, max_size=30))
def test_parse_mot_round_trips_rows(rows) -> None:
    text = "\n".join(f"{f},{i},{x!r},{y!r},{w!r},{h!r},1,-1,-1,-1" for f, i, x, y, w, h in rows)
    gt = parse_mot(text)
    assert gt.frames.tolist() == [r[0] for r in rows] and gt.ids.tolist() == [r[1] for r in rows]
    np.testing.assert_allclose(gt.xyxy[:, 2] - gt.xyxy[:, 0], [r[4] for r in rows], rtol=1e-9, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789,.-\n e")), max_size=120))
def test_parse_mot_raises_only_format_errors(text: str) -> None:
    with contextlib.suppress(MotFormatError):
        parse_mot(text)
