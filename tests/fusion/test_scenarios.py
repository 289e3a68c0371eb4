"""Scenario files, the generator's ground truth, the harness through real code, and ``fusion eval``."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.errors import ScenarioInvalid
from fusion.generate import GENERATORS, default_layout, generate
from fusion.scenario import (
    Action,
    Scenario,
    Shopper,
    dump_scenario,
    load_scenario,
    parse_scenario,
    true_carts,
)
from fusion.sim import plan, run
from shopfleet.cli import main

LAYOUT = default_layout()
SLOTS = [s.slot for s in LAYOUT.slots]
PRODUCTS = [s.product for s in LAYOUT.slots]

actions = st.one_of(
    st.builds(Action, slot=st.sampled_from(SLOTS), take=st.integers(1, 5), dwell_s=st.floats(2.0, 10.0)),
    st.builds(Action, slot=st.sampled_from(SLOTS), put_back=st.integers(1, 3), product=st.none() | st.sampled_from(PRODUCTS), dwell_s=st.floats(2.0, 10.0)),
)
shoppers = st.lists(
    st.builds(Shopper, id=st.text("abcdefgh123", min_size=1, max_size=6), cart=st.none() | st.sampled_from(["c1", "c2"]), arrive_at=st.floats(0, 100), speed_mps=st.floats(0.5, 2.0), actions=st.lists(actions, max_size=5).map(tuple)),
    min_size=1,
    max_size=5,
    unique_by=lambda s: s.id,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(people=shoppers, seed=st.integers(0, 2**31))
def test_any_scenario_round_trips_through_yaml_and_its_truth_follows_the_actions(people: list[Shopper], seed: int) -> None:
    sc = Scenario(name="h", seed=seed, shop=LAYOUT, shoppers=tuple(people))
    again = parse_scenario(yaml.safe_load(dump_scenario(sc)))
    assert again == sc
    truth = true_carts(sc)
    assert set(truth) == {p.cart_id for p in people}
    for cart, items in truth.items():
        net: Counter[str] = Counter()
        for p in people:
            if p.cart_id != cart:
                continue
            for a in p.actions:
                slot = LAYOUT.slot(a.slot)
                assert slot is not None
                net[slot.product] += a.take
                net[a.product or slot.product] -= a.put_back
        assert items == Counter({k: v for k, v in net.items() if v > 0})


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_named_scenario_is_valid_reproducible_and_plannable(name: str) -> None:
    a, b = generate(name, seed=3), generate(name, seed=3)
    assert a == b and parse_scenario(yaml.safe_load(dump_scenario(a))) == a
    visits = plan(a, random.Random(0))
    assert len(visits) == len(a.shoppers)
    for v in visits:
        assert len(v.crossings) == 2 and v.crossings[0] < v.crossings[1]  # in through the door, out again
        assert len(v.actions) == len(v.shopper.actions)
        for t, slot, units, _ in v.actions:  # the hand is at the shelf while standing at the slot
            spec = a.shop.slot(slot)
            assert spec is not None and units != 0
            pos = v.position(t)
            assert pos is not None and abs(pos[0] - spec.stand_point()[0]) < 0.1 and abs(pos[1] - spec.stand_point()[1]) < 0.1


def test_shoppers_take_turns_at_a_busy_slot_and_a_person_is_in_one_place_at_a_time() -> None:
    sc = generate("crowd", seed=1, shoppers=8)
    visits = plan(sc, random.Random(1))
    by_slot: dict[str, list[float]] = {}
    for v in visits:
        for t, slot, _, _ in v.actions:
            by_slot.setdefault(slot, []).append(t)
    for times in by_slot.values():
        times.sort()
        assert all(b - a >= 2.0 for a, b in itertools.pairwise(times))
    re = plan(generate("reenter", seed=2), random.Random(2))
    first, second = (v for v in re if v.shopper.person_id == "p1")
    assert second.start > first.end


def test_named_scenarios_have_the_truth_they_promise() -> None:
    fam = generate("family", seed=1)
    assert len({s.cart_id for s in fam.shoppers if s.id.startswith("f")}) == 1
    ws = generate("wrong-slot", seed=1)
    for s in ws.shoppers:
        wrong = [a for a in s.actions if a.put_back]
        assert len(wrong) == 1 and wrong[0].product != ws.shop.slot(wrong[0].slot).product  # type: ignore[union-attr]
    assert generate("slow-camera").camera.fps == 3.0
    assert [f.kind for f in generate("board-pulled").faults] == ["board_pull"]
    assert len(generate("crowd", shoppers=7).shoppers) == 7


def test_a_bad_scenario_file_names_the_key_and_the_fix(tmp_path) -> None:
    data = yaml.safe_load(dump_scenario(generate("single")))
    data["shoppers"][0]["actions"] = [{"slot": "Z9", "take": 1}]
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioInvalid, match="Z9.*not a slot"):
        load_scenario(f)
    data["shoppers"][0]["actions"] = [{"slot": "A1", "take": 1, "put_back": 1}]
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioInvalid, match="either takes or puts back"):
        load_scenario(f)
    with pytest.raises(ScenarioInvalid, match="unknown scenario"):
        generate("mall")


def test_a_single_shopper_through_the_real_tracker_and_board_code_gets_the_true_cart() -> None:
    sc = generate("single", seed=0)
    r = run(sc)
    takes = sum(1 for s in sc.shoppers for a in s.actions)
    assert r.shelf_changes == takes  # one settled shelf_change per hand action, from the load-cell samples
    assert r.inputs["DoorContact"] == 4 and r.inputs["DoorCrossing"] == 2
    (cart,) = r.carts
    assert r.cart_truth[cart.cart_id] == "p1"
    assert Counter(cart.items()) == r.truth["p1"]
    assert cart.status == "accepted"


def test_a_pulled_board_flags_the_cart_of_the_shopper_at_it() -> None:
    r = run(generate("board-pulled", seed=0))
    assert r.inputs["BoardLink"] == 2
    reasons = {c.cart_id: {x.code for x in c.reasons} for c in r.carts}
    assert any("board-offline" in v for v in reasons.values())


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["single", "wrong-slot"])
def test_fusion_eval_prints_carts_and_a_json_summary(name: str, capsys) -> None:
    assert main(["fusion", "eval", "--scenario", name, "--seed", "1"]) == 0
    out = capsys.readouterr().out
    summary = _last_json(out)
    for key in ("carts", "exact_cart_rate", "line_precision", "line_recall", "review_rate", "wrong_accepted_rate"):
        assert key in summary
    assert summary["carts"] == len(out.strip().splitlines()) - 1
    if name == "wrong-slot":
        assert summary["review_rate"] == 1.0 and summary["review_reasons"]["wrong-slot"] == summary["carts"]
    else:
        assert summary["wrong_accepted_rate"] == 0.0


def test_fusion_eval_reads_a_scenario_file_and_refuses_unknown_names(tmp_path, capsys) -> None:
    f = tmp_path / "s.yaml"
    assert main(["fusion", "scenario", "single", "--seed", "2", "--out", str(f)]) == 0
    assert main(["fusion", "eval", "--scenario", str(f), "--seed", "2"]) == 0
    assert _last_json(capsys.readouterr().out)["scenario"] == "single"
    assert main(["fusion", "eval", "--scenario", "mall"]) == 2
    assert "neither a named scenario" in capsys.readouterr().err
