"""Zones files, zone geometry, and the tracks -> events state machine."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vision.errors import ZonesInvalid
from vision.events import ZoneEvents
from vision.types import Tracks
from vision.zones import (
    ZonesConfig,
    load_zones,
    points_in_polygon,
    segments_intersect,
    side_of_line,
)

GOOD = {
    "camera": "cam-1",
    "anchor": "center",
    "door": {"a": [100, 0], "b": [100, 200], "enter_from": "right"},
    "shelves": [{"name": "shelf-3", "polygon": [[200, 50], [300, 50], [300, 150], [200, 150]], "dwell_seconds": 1.0}],
}


def _write(tmp_path, data) -> str:
    p = tmp_path / "zones.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_good_zones_file_loads(tmp_path) -> None:
    z = load_zones(_write(tmp_path, GOOD))
    assert z.camera == "cam-1" and z.shelves[0].name == "shelf-3" and z.door.enter_from == "right"


@pytest.mark.parametrize(
    "data,words",
    [
        pytest.param({**GOOD, "shelfs": []}, "key 'shelfs'", id="typo-key"),
        pytest.param({**GOOD, "shelves": [{"name": "s", "polygon": [[0, 0], [1, 1]]}]}, "key 'shelves.0.polygon'", id="two-point-polygon"),
        pytest.param({**GOOD, "shelves": [{"name": "s", "polygon": [[0, 0], [5, 5], [10, 10]]}]}, "zero area", id="collinear-polygon"),
        pytest.param({**GOOD, "door": {"a": [1, 1], "b": [1, 1], "enter_from": "left"}}, "same point", id="zero-length-door"),
        pytest.param({**GOOD, "door": {"a": [1, 1], "b": [9, 9], "enter_from": "up"}}, "key 'door.enter_from'", id="bad-direction"),
        pytest.param({**GOOD, "shelves": [GOOD["shelves"][0], GOOD["shelves"][0]]}, "unique", id="duplicate-names"),
        pytest.param("camera: [unclosed", "not valid YAML", id="bad-yaml"),
        pytest.param("- a list", "expected a mapping", id="not-a-mapping"),
    ],
)
def test_bad_zones_file_names_file_and_key(tmp_path, data, words: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ZonesInvalid) as exc:
        load_zones(path)
    assert words in str(exc.value) and path in str(exc.value)


def test_missing_zones_file(tmp_path) -> None:
    with pytest.raises(ZonesInvalid, match="does not exist; pass --zones"):
        load_zones(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "size,ok",
    [pytest.param((400, 300), True, id="fits"), pytest.param((250, 300), False, id="shelf-too-wide"), pytest.param((400, 150), False, id="door-too-tall")],
)
def test_zones_must_fit_the_image(size, ok: bool) -> None:
    z = ZonesConfig.model_validate(GOOD)
    if ok:
        z.check_fits(*size)
        return
    with pytest.raises(ZonesInvalid) as exc:
        z.check_fits(*size)
    assert exc.value.reason == "outside-image" and f"{size[0]}x{size[1]}" in str(exc.value)


_pt = st.tuples(st.floats(0, 100), st.floats(0, 100))


@settings(max_examples=150, deadline=None)
@given(poly=st.lists(_pt, min_size=3, max_size=8), pts=st.lists(_pt, min_size=1, max_size=20))
def test_point_in_polygon_agrees_with_opencv(poly, pts) -> None:
    p = np.array(poly, np.float32)
    assume(abs(cv2.contourArea(p)) > 1)
    got = points_in_polygon(np.array(pts, np.float64), p.astype(np.float64))
    for (x, y), g in zip(pts, got, strict=True):
        d = cv2.pointPolygonTest(p.reshape(-1, 1, 2), (float(x), float(y)), True)
        if abs(d) > 1e-3:  # on-edge points may go either way
            assert g == (d > 0)


_ipt = st.tuples(st.integers(0, 100).map(float), st.integers(0, 100).map(float))  # exact arithmetic: touching is decidable


@settings(max_examples=150, deadline=None)
@given(p=_ipt, q=_ipt, a=_ipt, b=_ipt)
def test_segments_intersect_is_symmetric_and_agrees_with_sides(p, q, a, b) -> None:
    assert segments_intersect(p, q, a, b) == segments_intersect(a, b, p, q) == segments_intersect(q, p, b, a)
    assume(np.hypot(b[0] - a[0], b[1] - a[1]) > 1 and np.hypot(q[0] - p[0], q[1] - p[1]) > 1)
    s = side_of_line(np.array([p, q], np.float64), a, b)
    t = side_of_line(np.array([a, b], np.float64), p, q)
    if s[0] * s[1] == 1 or t[0] * t[1] == 1:  # both ends strictly on one side: no crossing
        assert not segments_intersect(p, q, a, b)
    elif s[0] * s[1] == -1 and t[0] * t[1] == -1:
        assert segments_intersect(p, q, a, b)


def test_side_of_line_uses_the_viewers_left() -> None:
    # a->b points right on screen; "up" on screen (smaller y) is on the left of the direction.
    assert side_of_line(np.array([[5.0, -5], [5, 5], [20, 0]]), (0, 0), (10, 0)).tolist() == [1, -1, 0]


def _tracks(frame: int, boxes: dict[int, tuple[float, float]], ended: tuple[int, ...] = ()) -> Tracks:
    ids = list(boxes)
    xyxy = np.array([[x - 10, y - 10, x + 10, y + 10] for x, y in boxes.values()], np.float32).reshape(-1, 4)
    return Tracks(np.array(ids, np.int64), xyxy, np.full(len(ids), 0.9, np.float32), frame, frame / 10, ended)


def _run(zones: dict, frames: list[Tracks]) -> list:
    ev = ZoneEvents(ZonesConfig.model_validate(zones))
    out = []
    for t in frames:
        out += ev.update(t)
    return out


def test_crossing_the_door_both_ways() -> None:
    # door at x=100 pointing down: its left is screen-right; enter_from=right means coming from screen-left.
    walk_in = [_tracks(i, {1: (40 + 10 * i, 100)}) for i in range(13)]  # x 40 -> 160
    walk_out = [_tracks(13 + i, {1: (160 - 10 * i, 100)}) for i in range(13)]
    evs = _run(GOOD, walk_in + walk_out)
    kinds = [(e.kind, e.value) for e in evs if e.kind in ("person_entered", "person_exited", "occupancy")]
    assert kinds == [("person_entered", None), ("occupancy", 1.0), ("person_exited", None), ("occupancy", 0.0)]
    entered = next(e for e in evs if e.kind == "person_entered")
    # frame 6 stands exactly on the line (x=100); the crossing completes at frame 7, on the far side
    assert (entered.camera, entered.track_id, entered.zone, entered.ts) == ("cam-1", 1, "door", 0.7)


def test_walking_past_the_end_of_the_door_line_is_no_crossing() -> None:
    evs = _run(GOOD, [_tracks(i, {1: (40 + 10 * i, 260)}) for i in range(13)])  # y=260, below b=(100,200)
    assert not [e for e in evs if e.kind.startswith("person_")]


def test_occupancy_never_goes_below_zero() -> None:
    evs = _run(GOOD, [_tracks(i, {1: (160 - 10 * i, 100)}) for i in range(13)])  # someone leaves who was never counted
    assert [e.kind for e in evs] == ["person_exited"]


def test_zone_enter_dwell_exit() -> None:
    path = [(150 + 10 * i, 100) for i in range(6)] + [(210, 100)] * 15 + [(210 - 10 * i, 100) for i in range(1, 4)]
    evs = _run(GOOD, [_tracks(i, {7: p}) for i, p in enumerate(path)])
    seq = [(e.kind, e.zone) for e in evs if e.zone == "shelf-3"]
    assert seq == [("zone_enter", "shelf-3"), ("dwell", "shelf-3"), ("zone_exit", "shelf-3")]
    dwell = next(e for e in evs if e.kind == "dwell")
    assert dwell.value == pytest.approx(1.0) and dwell.track_id == 7
    exit_ = next(e for e in evs if e.kind == "zone_exit")
    assert exit_.value == pytest.approx(exit_.ts - next(e for e in evs if e.kind == "zone_enter").ts)


def test_predicted_positions_cause_no_events_and_keep_zone_state() -> None:
    # A hidden shopper's predicted box drifts over the door line and out of the shelf zone: no
    # crossing, no exit; seen again inside the zone, still no event (they never left it).
    def frame(i: int, x: float, predicted: bool) -> Tracks:
        t = _tracks(i, {4: (x, 100)})
        return Tracks(t.ids, t.xyxy, t.scores, t.frame_index, t.ts, predicted=np.array([predicted]))

    seen = [frame(0, 250, False), frame(1, 250, False)]
    drifting = [frame(2 + i, 250 - 60 * (i + 1), True) for i in range(3)]  # x 190, 130, 70: across the door at 100
    evs = _run(GOOD, [*seen, *drifting, frame(5, 250, False)])
    assert [(e.kind, e.zone) for e in evs] == [("zone_enter", "shelf-3")]


def test_a_track_that_ends_inside_a_zone_exits_it() -> None:
    evs = _run(GOOD, [_tracks(0, {3: (250, 100)}), _tracks(1, {3: (250, 100)}), _tracks(2, {}, ended=(3,))])
    assert [(e.kind, e.detail) for e in evs] == [("zone_enter", {}), ("zone_exit", {"reason": "track-lost"})]


_value = st.one_of(st.none(), st.integers(-5, 900), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.lists(st.integers(-5, 900), max_size=3), max_size=5))
_zones_doc = st.dictionaries(
    st.sampled_from(["camera", "anchor", "door", "shelves", "extra"]),
    st.one_of(_value, st.dictionaries(st.sampled_from(["a", "b", "enter_from", "x"]), _value, max_size=4), st.lists(st.dictionaries(st.sampled_from(["name", "polygon", "dwell_seconds"]), _value, max_size=3), max_size=2)),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(doc=_zones_doc)
def test_zones_loader_raises_only_zones_invalid(tmp_path_factory, doc) -> None:
    path = tmp_path_factory.getbasetemp() / "zones-property.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        z = load_zones(path)
    except ZonesInvalid as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(z, ZonesConfig) and z.camera  # whatever loads is a complete, typed config
