"""Several ceiling cameras: projection to the floor, merging the views' duplicates, one tracker."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from vision.multiview import (
    CoverageMap,
    FloorDetections,
    FloorView,
    MergeConfig,
    MultiViewTracker,
    merge,
    project,
)
from vision.tracker import ByteTracker
from vision.types import Detections

SQUARE = np.array([(0.0, 0.0), (3.0, 0.0), (3.0, 3.0), (0.0, 3.0)])


def _view(camera: str, x0: float, y0: float, size: float = 3.0, px: float = 100.0) -> FloorView:
    """A camera looking straight down at the floor square [x0, x0 + size] x [y0, y0 + size], px pixels per metre."""
    h = ((1 / px, 0.0, x0), (0.0, 1 / px, y0), (0.0, 0.0, 1.0))
    return FloorView(camera=camera, homography=h, image_size=(int(size * px), int(size * px)))


def _dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.zeros(len(scores), np.int64))


def _floor(points: list[tuple[float, float]], scores: list[float], half: float = 0.3, app: np.ndarray | None = None) -> FloorDetections:
    xy = np.array(points, np.float64).reshape(-1, 2)
    return FloorDetections(xy, np.c_[xy - half, xy + half], np.array(scores, np.float64), app)


def test_from_points_fits_a_homography_that_maps_the_marks() -> None:
    true = np.array([[0.01, 0.002, 1.0], [-0.001, 0.012, -2.0], [0.0001, 0.00005, 1.0]])
    img = [(0.0, 0.0), (640.0, 0.0), (640.0, 480.0), (0.0, 480.0), (320.0, 240.0)]
    q = np.c_[np.array(img), np.ones(5)] @ true.T
    floor = [(float(a), float(b)) for a, b in q[:, :2] / q[:, 2:]]
    v = FloorView.from_points("cam-1", img, floor)
    assert np.allclose(v.to_floor(np.array([[100.0, 50.0]])), (np.array([[100.0, 50.0, 1.0]]) @ true.T)[:, :2] / (np.array([[100.0, 50.0, 1.0]]) @ true.T)[:, 2:], atol=1e-6)
    with pytest.raises(ValueError, match="at least 4"):
        FloorView.from_points("cam-1", img[:3], floor[:3])
    with pytest.raises(ValidationError, match="invertible"):
        FloorView(camera="cam-1", homography=((1, 0, 0), (0, 0, 0), (0, 0, 1)))


def test_project_uses_the_centre_or_the_feet() -> None:
    down = _view("a", 2.0, 1.0)
    fd = project(down, _dets([[100, 100, 160, 160]], [0.9]))
    assert np.allclose(fd.xy, [[3.3, 2.3]])
    assert np.allclose(fd.boxes, [[3.0, 2.0, 3.6, 2.6]])
    oblique = down.model_copy(update={"anchor": "bottom"})
    fo = project(oblique, _dets([[100, 100, 160, 200]], [0.9]))
    assert np.allclose(fo.xy, [[3.3, 3.0]])  # the feet: the bottom of the box
    assert np.allclose((fo.boxes[:, :2] + fo.boxes[:, 2:]) / 2, fo.xy)
    assert len(project(down, Detections.empty())) == 0


def test_coverage_counts_the_views_over_a_point() -> None:
    cov = CoverageMap([SQUARE, SQUARE + np.array([2.0, 0.0]), None])
    assert cov.count(np.array([[1.0, 1.0], [2.5, 1.0], [4.5, 1.0], [9.0, 9.0]])).tolist() == [1, 2, 1, 0]
    assert _view("a", 0, 0).floor_polygon() is not None
    assert FloorView(camera="b", homography=((1, 0, 0), (0, 1, 0), (0, 0, 1))).floor_polygon() is None


def test_one_person_seen_by_three_views_is_one_detection_at_the_weighted_centre() -> None:
    views = [_floor([(2.0, 2.0)], [0.9]), _floor([(2.1, 2.0)], [0.3]), _floor([(2.0, 2.1)], [0.6])]
    m = merge(views)
    assert len(m) == 1 and m.views.tolist() == [3]
    assert m.detections.scores.tolist() == pytest.approx([0.9])
    assert m.xy[0] == pytest.approx([2.0 + 0.1 * 0.3 / 1.8, 2.0 + 0.1 * 0.6 / 1.8])
    assert sorted(m.members[0]) == [(0, 0), (1, 0), (2, 0)]
    # In the top view: metres to pixels, with the origin.
    m2 = merge(views, MergeConfig(px_per_m=10, origin_m=(0.0, -1.0)))
    assert m2.detections.xyxy[0, 1] == pytest.approx((m.xy[0, 1] - 0.3 + 1.0) * 10, abs=1e-3)


def test_two_people_are_kept_apart_and_one_view_never_merges_with_itself() -> None:
    a = _floor([(2.0, 2.0), (2.6, 2.0)], [0.9, 0.8])  # neighbours 0.6 m apart, seen by both views
    b = _floor([(2.02, 2.0), (2.58, 2.0)], [0.7, 0.85])
    m = merge([a, b])
    assert len(m) == 2 and m.views.tolist() == [2, 2]
    assert sorted(round(float(x), 1) for x in m.xy[:, 0]) == [2.0, 2.6]
    close = _floor([(2.0, 2.0), (2.2, 2.0)], [0.9, 0.8])  # two boxes of ONE view within the gate: two people
    assert len(merge([close])) == 2


def test_a_lone_box_where_many_views_look_is_doubted_not_where_one_looks() -> None:
    cov = CoverageMap([SQUARE, SQUARE, SQUARE, SQUARE + np.array([5.0, 0.0])])
    lone_in_crowd_of_views = merge([_floor([(1.0, 1.0)], [0.6]), FloorDetections.empty(), FloorDetections.empty()], coverage=cov)
    assert lone_in_crowd_of_views.detections.scores.tolist() == pytest.approx([0.6 * 0.7])
    seen_twice = merge([_floor([(1.0, 1.0)], [0.6]), _floor([(1.05, 1.0)], [0.5])], coverage=cov)
    assert seen_twice.detections.scores.tolist() == pytest.approx([0.6])
    only_view_there = merge([_floor([(6.0, 1.0)], [0.6])], coverage=cov)
    assert only_view_there.detections.scores.tolist() == pytest.approx([0.6])
    off = merge([_floor([(1.0, 1.0)], [0.6])], MergeConfig(lone_view_factor=1.0), coverage=cov)
    assert off.detections.scores.tolist() == pytest.approx([0.6])


def test_appearance_is_the_score_weighted_mean_renormalized() -> None:
    e0, e1 = np.eye(4)[0:1], np.eye(4)[1:2]
    near = (0.8 * e0 + 0.6 * e1) / 1.0  # unit, cosine 0.8 with e0: the same person from another angle
    m = merge([_floor([(1.0, 1.0)], [0.9], app=e0), _floor([(1.0, 1.1)], [0.3], app=near)])
    assert m.appearance is not None and len(m) == 1
    assert np.linalg.norm(m.appearance[0]) == pytest.approx(1.0)
    assert m.appearance[0, 0] / m.appearance[0, 1] == pytest.approx((0.9 + 0.3 * 0.8) / (0.3 * 0.6))
    mixed = merge([_floor([(1.0, 1.0)], [0.9], app=e0), _floor([(1.0, 1.1)], [0.3])])  # the second view gives none
    assert mixed.appearance is not None and mixed.appearance[0].tolist() == pytest.approx(e0[0].tolist())
    assert merge([_floor([(1.0, 1.0)], [0.9])]).appearance is None


def test_two_people_passing_closer_than_the_gate_stay_two_when_they_do_not_look_alike() -> None:
    e0, e1 = np.eye(4)[0:1], np.eye(4)[1:2]
    a = _floor([(1.0, 1.0)], [0.9], app=e0)
    b = _floor([(1.1, 1.0)], [0.8], app=e1)  # 0.1 m apart, in two views, different looks
    assert len(merge([a, b])) == 2
    assert len(merge([a, b], MergeConfig(min_similarity=None))) == 1  # on distance alone: one


def _walk(t: int) -> tuple[float, float]:
    return (0.5 + 0.05 * t, 1.5)


def _box_px(view: FloorView, x: float, y: float) -> list[float]:
    h = np.linalg.inv(np.array(view.homography))
    p = h @ np.array([x, y, 1.0])
    cx, cy = p[:2] / p[2]
    return [cx - 30, cy - 30, cx + 30, cy + 30]


def test_a_shopper_missed_by_each_view_in_turn_keeps_one_id_and_is_seen_every_frame() -> None:
    a, b = _view("a", 0.0, 0.0), _view("b", 1.0, 0.0)
    mv = MultiViewTracker([a, b])
    alone = ByteTracker()
    ids: list[int] = []
    shown_alone = 0
    for t in range(40):
        x, y = _walk(t)
        frames = {}
        if t % 3:  # view a misses every third frame, view b sees only those
            frames["a"] = _dets([_box_px(a, x, y)], [0.9])
        else:
            frames["b"] = _dets([_box_px(b, x, y)], [0.9])
        tracks, merged = mv.update(frames, ts=t / 10)
        ids += tracks.ids.tolist()
        assert len(merged) == 1
        if len(tracks):
            assert mv.to_floor(tracks.xyxy)[0] == pytest.approx([x, y], abs=0.1)
        shown_alone += len(alone.update(frames.get("a", Detections.empty()), ts=t / 10))
    assert len(ids) == 39 and set(ids) == {ids[0]}  # from its second frame on, every frame, one id
    assert shown_alone < 30  # one camera alone: not reported in the frames it missed


def test_a_camera_without_a_frame_does_not_make_the_others_boxes_lone() -> None:
    views = [_view(f"c{i}", 0.0, 0.0) for i in range(3)]  # three views of the same floor
    mv = MultiViewTracker(views)
    both = mv.merge({"c0": _dets([[100, 100, 160, 160]], [0.6])})
    assert both.detections.scores.tolist() == pytest.approx([0.6])  # c1 and c2 sent nothing: they do not count
    all3 = mv.merge({"c0": _dets([[100, 100, 160, 160]], [0.6]), "c1": Detections.empty(), "c2": Detections.empty()})
    assert all3.detections.scores.tolist() == pytest.approx([0.42])  # they looked and saw nobody
    with pytest.raises(ValueError, match="unknown camera"):
        mv.merge({"nope": Detections.empty()})
    with pytest.raises(ValueError, match="unique"):
        MultiViewTracker([views[0], views[0]])


def test_floor_detections_check_their_shapes() -> None:
    with pytest.raises(ValueError, match="FloorDetections"):
        FloorDetections(np.zeros((2, 2)), np.zeros((1, 4)), np.zeros(2))
    with pytest.raises(ValueError, match="appearance"):
        FloorDetections(np.zeros((1, 2)), np.zeros((1, 4)), np.zeros(1), np.zeros(3))
    assert len(merge([])) == 0
