"""Reach evidence (a shopper's box over the slot around a change) and the picks to nobody that must not be dropped."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fusion.engine import FusionConfig
from fusion.scenario import CameraSpec
from fusion.sim import _detect, _Reach
from fusion.types import DoorCrossing, TrackObservation
from tests.support.fusion_shop import A1, APP, AT_A1, Shop, shop_with

# The ratios fusion.calibrate measured on held-out seeds (docs/fusion.md, "Reach").
REACH_ON = FusionConfig(reach_lr_reached=9.31, reach_lr_not_reached=0.29, reach_lr_unseen=0.35)
NEIGHBOUR = (AT_A1[0] + 0.05, AT_A1[1] - 0.1)  # close enough to A1 that place alone cannot tell the two apart


def box(x: float, y: float, reach: bool = False) -> tuple[float, float, float, float]:
    """A 0.6 m box seen from the ceiling; reaching, it stretches over A1 (its front edge is at y 4.6)."""
    return (x - 0.3, y - 0.3, x + 0.3, 4.72 if reach else y + 0.3)


def see(s: Shop, track: int, x: float, y: float, reach: bool = False, with_box: bool = True) -> None:
    s.feed(TrackObservation(track, s.t, x, y, APP[track], box=box(x, y, reach) if with_box else None))


def pick_at_a1(s: Shop, reacher: int | None, hide_box: tuple[int, ...] = ()) -> None:
    """Tracks 1 (at A1) and 2 (right behind, NEIGHBOUR) stand there; A1 loses a cola; ``reacher``'s box is over A1 around the hand."""
    where = {1: AT_A1, 2: NEIGHBOUR}
    for k in range(35):
        hand = 15 <= k <= 25  # the hand is in the slot 0.5 s either side of 2.0 s; the weight settles 1.25 s later
        for track, (x, y) in where.items():
            see(s, track, x, y, reach=hand and track == reacher, with_box=track not in hide_box)
        s.tick()
        if k == 32:
            s.change(A1, -1, -345.0)
    for _ in range(15):
        for track, (x, y) in where.items():
            see(s, track, x, y, with_box=track not in hide_box)
        s.tick()


def close(s: Shop) -> dict[str, object]:
    s.door(True)
    s.leave(1)
    s.leave(2)
    return {c.sessions[0]: c for c in s.close()}


def test_a_box_over_the_slot_is_reach_and_one_in_the_aisle_is_not() -> None:
    s = shop_with(1, 2)
    s.f.config = REACH_ON
    pick_at_a1(s, reacher=2, hide_box=())
    (a,) = [a for c in close(s).values() for a in c.attributions]
    reach = {sid: r for sid, r, _ in a.reach}
    assert reach == {"s1": "not-reached", "s2": "reached"}
    assert a.to_dict()["reach"] == {"s1": "not-reached", "s2": "reached"}  # on the wire, for the reviewer


def test_without_boxes_there_is_no_reach_evidence_either_way() -> None:
    s = shop_with(1, 2)
    pick_at_a1(s, reacher=1, hide_box=(1, 2))
    (a,) = [a for c in close(s).values() for a in c.attributions]
    assert {r for _, r, _ in a.reach} == {"unseen"}


def test_a_neighbour_reaching_into_their_own_slot_is_not_reaching_into_this_one() -> None:
    f = shop_with(1).f
    own = (2.3, 3.85, 2.9, 4.72)  # a shopper at A2 (x 2.6) with the arm in A2: it overlaps A1 by nothing
    assert not f._box_in_slot("A1", own) and f._box_in_slot("A2", own)
    assert f._box_in_slot("A1", box(*AT_A1, reach=True)) and not f._box_in_slot("A1", box(*AT_A1))
    assert not f._box_in_slot("B1", box(*AT_A1, reach=True))  # another shelf


@pytest.mark.parametrize("reacher", [1, 2])
def test_the_reach_decides_a_pick_that_place_alone_leaves_contested(reacher: int) -> None:
    # Without reach, two shoppers at one slot: contested.
    s = shop_with(1, 2)
    pick_at_a1(s, reacher=reacher)
    carts = close(s)
    assert any("contested" in [r.code for r in c.reasons] for c in carts.values())
    # With the measured ratios, the shopper whose arm was over the slot gets it, for sure.
    s = shop_with(1, 2)
    s.f.config = REACH_ON
    pick_at_a1(s, reacher=reacher)
    carts = close(s)
    picker, other = f"s{reacher}", f"s{3 - reacher}"
    assert carts[picker].items() == {"cola": 1} and carts[picker].status == "accepted"
    assert carts[other].items() == {} and carts[other].status == "accepted"
    assert carts[picker].attributions[0].probability >= REACH_ON.attribution_bar


def test_a_box_checks_itself() -> None:
    with pytest.raises(ValueError, match="box"):
        TrackObservation(1, 0.0, 1.0, 1.0, box=(2.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="box"):
        TrackObservation(1, 0.0, 1.0, 1.0, box=(0.0, 0.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="box"):
        TrackObservation(1, 0.0, 1.0, 1.0, box=(0.0, 0.0, float("nan"), 1.0))


def test_the_simulated_camera_stretches_a_reaching_shoppers_box_over_the_slot_unless_the_reach_is_hidden() -> None:
    from fusion.generate import default_layout
    from fusion.scenario import Scenario, Shopper
    from fusion.sim import plan

    shop = default_layout()
    sc = Scenario(name="t", seed=1, shop=shop, shoppers=(Shopper(id="p1", arrive_at=1.0, actions=({"slot": "A3", "take": 1, "dwell_s": 3.0},)),))  # type: ignore[arg-type]
    (v,) = plan(sc, random.Random(1))
    at = v.actions[0][0]
    slot = shop.slot("A3")
    assert slot is not None
    for visible, stretched in ((True, True), (False, False)):
        r = _Reach(at - 0.5, at + 0.5, "p1", slot, (slot.front[0], slot.front[1] + 0.05), visible, 1.0)
        cam = CameraSpec(miss_rate=0.0, false_positives=0.0, reach_frame_miss=0.0)
        boxes, _, owners, _ = _detect([v], [], at, cam, np.random.default_rng(0), 8.0, 6.0, [r], random.Random(0))
        (b,) = [b for b, o in zip(boxes, owners, strict=True) if o == "p1"]
        assert (b[3] > slot.front[1]) is stretched  # the box's shelf side passes the slot's front edge (y 5.6)


def test_a_pick_while_the_picker_is_on_no_session_sends_their_later_cart_to_review() -> None:
    """At 3 fps a shopper's entry was missed: their track is on no session when they pick, and nobody else is near.

    The pick goes to nobody; the cart their track ends up on later (here: a session opened when a
    new track of theirs, first seen inside, crosses the door) must not be accepted without it.
    """
    s = Shop()
    s.door(True)
    s.tick(1)
    for k in range(40):  # track 5 walks about inside, on no session (its entry was never seen), and stands at A1
        s.feed(TrackObservation(5, s.t, *AT_A1, APP[1]))
        s.tick()
        if k == 30:
            s.change(A1, -1, -345.0)
    assert s.f.errors["nobody-near"] == 1 and s.f.open_sessions() == []
    s.tick(1)
    # The same person, found again inside by a new track that walks out through the door: a session (exit side).
    for y in (1.0, 0.6, 0.2):
        s.feed(TrackObservation(6, s.t, 3.0, y, APP[1]))
        s.tick()
    s.feed(DoorCrossing(6, s.t, "in"))  # the door line crossed the wrong way round by a confused tracker: any session will do
    s.tick()
    s.feed(TrackObservation(6, s.t, 3.0, 1.0, APP[1]))
    carts = s.close(10)
    carts += s.f.finish(s.t + 30)
    assert carts and all(c.status == "review" and "nobody-near" in [r.code for r in c.reasons] for c in carts)


@pytest.mark.parametrize("lost", [True, False])
def test_a_doubtful_pick_flags_the_cart_of_a_shopper_lost_near_the_slot_who_holds_a_share_of_it(lost: bool) -> None:
    """A pick given to one shopper with a low probability while another, 0.5 m along the shelf, holds a few percent of it.

    That is 'low-confidence', not 'contested' (the other holds less than half of the doubt). When
    the other shopper was lost around the pick, their cart may be the one lacking the item: both
    carts go to review. Seen all along beside the slot, they were not at it: theirs is accepted.
    """
    s = shop_with(1, 2)
    s.f.config = FusionConfig(others_floor=0.5)  # weak evidence against another shopper: in doubt without a rival
    for k in range(50):
        s.see(1, *AT_A1)
        if not (lost and 20 <= k < 45):
            s.see(2, AT_A1[0] + 0.5, AT_A1[1])
        s.tick()
        if k == 30:
            s.change(A1, -1, -345.0)
    carts = close(s)
    a = carts["s1"].attributions[0]
    assert [r.code for r in a.reasons] == ["low-confidence"]
    share = {sid: p for sid, p, _ in a.candidates}
    assert a.probability < 0.99 and 0.01 < share["s2"] < (1 - a.probability) / 2
    assert carts["s1"].status == "review" and carts["s2"].items() == {}
    if lost:
        assert carts["s2"].status == "review" and [r.code for r in carts["s2"].reasons] == ["low-confidence"]
        assert "may have made it" in carts["s2"].reasons[0].detail
    else:
        assert carts["s2"].status == "accepted"
