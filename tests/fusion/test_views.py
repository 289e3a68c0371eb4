"""Several ceiling cameras in scenarios: the format, line-of-sight occlusion per view, and a run through vision.multiview."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fusion.errors import ScenarioInvalid
from fusion.generate import ceiling_grid, default_layout, generate
from fusion.scenario import CameraSpec, Scenario, Shopper, ViewSpec, dump_scenario, parse_scenario
from fusion.sim import Visit, _Views, run
from shopfleet.cli import main

LAYOUT = default_layout()


def _still(sid: str, x: float, y: float, blackouts: list[tuple[float, float]] | None = None) -> Visit:
    """A shopper standing at (x, y) from 0 to 100 s."""
    return Visit(Shopper(id=sid, arrive_at=0.0), [(0.0, x, y), (100.0, x, y)], [], [], blackouts or [], np.eye(16)[0])


def _cam(**kw: object) -> CameraSpec:
    base = {"miss_rate": 0.0, "false_positives": 0.0, "occlusion_drop": 1.0, "jitter_m": 0.0}
    return CameraSpec.model_validate(base | kw)


def _seen(cam: CameraSpec, visits: list[Visit], seed: int = 0) -> list[set[str]]:
    views = _Views(cam, visits, seed)
    _, owners = views.detect(visits, [], 1.0, np.random.default_rng(0))
    return [{o for o in ow if o} for ow in owners]


def test_a_neighbour_hides_a_shopper_from_an_oblique_view_not_from_the_camera_above() -> None:
    above = ViewSpec(id="above", x=3.0, y=4.0, floor=(0, 0, 8, 6))
    oblique = ViewSpec(id="oblique", x=0.6, y=4.0, floor=(0, 0, 8, 6))  # 2.4 m along the shelf from the picker
    picker, neighbour = _still("picker", 3.0, 4.0), _still("neighbour", 2.4, 4.0)  # 0.6 m apart along the shelf
    seen = _seen(_cam(views=(above, oblique)), [picker, neighbour])
    assert seen[0] == {"picker", "neighbour"}
    assert seen[1] == {"neighbour"}  # the neighbour stands in the oblique view's line of sight to the picker
    behind = _seen(_cam(views=(above, oblique)), [picker, _still("behind", 3.6, 4.0)])
    assert behind[1] == {"picker"}  # someone beyond the picker does not hide them (the picker hides them)
    assert behind[0] == {"picker", "behind"}


def test_a_view_sees_only_its_floor_and_blackouts_hide_from_the_drawn_share_of_views() -> None:
    views = (*(ViewSpec(id=f"v{i}", x=1.0 + i, y=1.0, floor=(0, 0, 8, 6)) for i in range(6)), ViewSpec(id="far", x=7.0, y=5.0, floor=(6, 4, 8, 6)))
    dark = _still("dark", 2.0, 1.0, blackouts=[(0.0, 5.0)])
    all_views = _seen(_cam(views=views), [dark])
    assert all(not s for s in all_views)  # blackout_views 1: every view loses them
    none = _seen(_cam(views=views, blackout_views=0.0), [dark])
    assert [bool(s) for s in none] == [True] * 6 + [False]  # the far view never covers (2, 1)
    some = _seen(_cam(views=views, blackout_views=0.5), [dark], seed=3)
    assert 0 < sum(bool(s) for s in some[:6]) < 6


def test_views_round_trip_and_are_validated() -> None:
    sc = generate("crowd", seed=2, cameras="grid")
    assert len(sc.camera.views) == 8 * 6 + 1
    assert parse_scenario(yaml.safe_load(dump_scenario(sc))) == sc
    assert generate("crowd", seed=2).camera.views == ()  # the default: one camera, as before
    assert generate("crowd", seed=2).shoppers == sc.shoppers  # the cameras do not change the shoppers
    base = sc.model_dump(mode="json")
    for bad, match in (
        ({"views": [{"id": "a", "x": 1, "y": 1, "floor": [0, 0, 2, 2]}] * 2}, "unique"),
        ({"views": [{"id": "a", "x": 1, "y": 1, "floor": [2, 0, 1, 2]}]}, "x_max > x_min"),
        ({"person_height_m": 2.0, "views": [{"id": "a", "x": 1, "y": 1, "height_m": 1.9, "floor": [0, 0, 2, 2]}]}, "not above a person"),
        ({"reach_visible": 0.5}, "one camera only"),
    ):
        data = base | {"camera": base["camera"] | bad}
        with pytest.raises(ScenarioInvalid, match=match):
            parse_scenario(data)
    with pytest.raises(ScenarioInvalid, match="camera layout"):
        generate("crowd", cameras="fisheye")


def test_the_grid_sees_every_point_of_the_floor_several_times_and_the_street_once() -> None:
    views = ceiling_grid(LAYOUT)
    rect = np.array([v.floor for v in views])

    def count(x: float, y: float) -> int:
        return int(((rect[:, 0] <= x) & (x <= rect[:, 2]) & (rect[:, 1] <= y) & (y <= rect[:, 3])).sum())

    assert count(4.2, 3.2) == 9 and count(0.2, 0.2) >= 4 and count(4.0, 5.2) >= 6
    assert count(4.0, -2.0) == 1  # the street: the door camera only


def test_a_crowd_plays_through_the_merge_and_the_tracker_and_repeats() -> None:
    sc = generate("crowd", seed=5, cameras="grid")
    a, b = run(sc), run(sc)
    assert a.merge_cpu_s > 0
    assert [(c.cart_id, c.status, c.items()) for c in a.carts] == [(c.cart_id, c.status, c.items()) for c in b.carts]
    assert len(a.carts) == 4
    assert sum(a.cart_truth[c.cart_id] is not None for c in a.carts) == 4
    single = run(generate("crowd", seed=5))
    assert single.merge_cpu_s == 0.0


def test_a_scenario_file_with_views_plays() -> None:
    views = [{"id": f"v{i}", "x": 1.0 + 2 * i, "y": 3.0, "floor": [max(0.0, 2 * i - 0.5), -2.5, min(8.0, 2 * i + 2.5), 6.0]} for i in range(4)]
    data = {"name": "two-views", "shop": LAYOUT.model_dump(mode="json"), "camera": {"views": views}, "shoppers": [{"id": "p1", "arrive_at": 1.0, "actions": [{"slot": "A3", "take": 1}]}]}
    sc = parse_scenario(data)
    assert isinstance(sc, Scenario)
    r = run(sc, seed=1)
    (cart,) = r.carts
    assert r.cart_truth[cart.cart_id] == "p1" and dict(cart.items()) == {"chips-150": 1}


def test_fusion_eval_and_scenario_take_the_camera_layout(capsys, tmp_path) -> None:
    assert main(["fusion", "eval", "--scenario", "single", "--seed", "2", "--cameras", "grid"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["views"] == 49 and summary["merge_cpu_ms_per_shopper_minute"] > 0 and summary["carts"] == 1
    out = tmp_path / "s.yaml"
    assert main(["fusion", "scenario", "crowd", "--cameras", "grid", "--out", str(out)]) == 0
    assert len(yaml.safe_load(out.read_text())["camera"]["views"]) == 49
