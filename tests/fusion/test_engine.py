"""The fusion engine fed by hand: sessions, attribution, each hard case with its reason, bad input."""

from __future__ import annotations

import json
import math

import pytest

from fusion.engine import Fusion, FusionConfig
from fusion.layout import planogram_mismatches
from fusion.types import (
    BoardLink,
    DoorCrossing,
    ShelfChange,
    ShelfUnsettled,
    TrackLost,
    TrackObservation,
    ZoneVisit,
)
from tests.support.fusion_shop import (
    A1,
    A2,
    AT_A1,
    AT_A2,
    B1,
    Shop,
    layout,
    shop_with,
)


def test_a_shopper_who_takes_two_colas_leaves_with_a_priced_receipt() -> None:
    s = shop_with(1)
    assert s.f.open_sessions() == ["s1"]
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -2, -690.0, 0.99, cid="ev-1")
    s.stand(1.0, (1, *AT_A1))
    s.door(True)
    s.leave(1)
    assert s.f.open_sessions() == []
    (cart,) = s.close()
    assert cart.status == "accepted" and cart.reasons == ()
    assert cart.items() == {"cola": 2}
    assert cart.total_cents == 300 and cart.evidence == ("ev-1",)
    event = cart.to_event()
    assert event["type"] == "cart_receipt" and event["total_cents"] == 300
    assert json.loads(json.dumps(event)) == event  # plain JSON for the outbox


def test_a_board_without_a_planogram_is_counted_by_the_layout() -> None:
    """A deployed sensor driver without a planogram reports grams only (quantity 0, no product, slot 'board/channel'): the layout counts them."""
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(("b1", 0, "b1/0", ""), 0, -688.0, 0.0, cid="ev-1")  # 2 colas of 345 g (sd 3 g), as hardware.events names it
    s.stand(2.0, (1, *AT_A2))
    s.change(("b1", 1, "", ""), 0, -50.0, 0.0, cid="ev-2")  # a third of a bag of chips: no whole unit
    s.stand(1.0, (1, *AT_A2))
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert cart.items() == {"cola": 2}
    assert cart.status == "review" and "quantity-uncertain" in [r.code for r in cart.reasons], "no whole unit: review sees the grams"
    assert s.f.errors["planogram-mismatch"] == 0 and s.f.stats["counted_by_layout"] == 2


def test_a_board_counting_by_the_layout_alone_makes_a_clean_receipt() -> None:
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(("b1", 0, "", ""), 0, -345.5, 0.0)
    s.stand(1.0, (1, *AT_A1))
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert (cart.status, cart.items(), cart.reasons) == ("accepted", {"cola": 1}, ())


def test_an_entry_while_the_door_contact_is_closed_opens_no_session() -> None:
    s = Shop()
    s.door(False)
    s.tick(5)
    s.enter(1)
    assert s.f.open_sessions() == []
    assert s.f.errors["entry-door-closed"] == 1


def test_people_entering_in_one_door_opening_share_a_cart_and_others_do_not() -> None:
    s = Shop()
    s.door(True)
    s.enter(1)
    s.enter(2, x=2.8)
    s.tick(1)
    s.door(False)
    s.tick(5)
    s.door(True)
    s.enter(3)
    carts = {s.f.cart_of(sid) for sid in s.f.open_sessions()}
    assert len(s.f.open_sessions()) == 3 and len(carts) == 2
    assert s.f.cart_of(s.f.session_of(1)) == s.f.cart_of(s.f.session_of(2)) != s.f.cart_of(s.f.session_of(3))


def test_two_shoppers_at_neighbouring_slots_each_get_their_own_pick() -> None:
    s = shop_with(1, 2)
    s.stand(2.0, (1, *AT_A1), (2, *AT_A2))
    s.change(A1, -1, -345.0)
    s.change(A2, -1, -160.0)
    s.stand(1.5, (1, *AT_A1), (2, *AT_A2))
    s.door(True)
    s.leave(1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    assert carts["s1"].items() == {"cola": 1} and carts["s1"].status == "accepted"
    assert carts["s2"].items() == {"chips": 1} and carts["s2"].status == "accepted"
    a = carts["s1"].attributions[0]
    assert a.probability > 0.9 and next(c[0] for c in a.candidates) == "s1"


def test_two_shoppers_at_the_same_slot_make_the_pick_contested() -> None:
    s = shop_with(1, 2)
    s.stand(2.0, (1, *AT_A1), (2, AT_A1[0] + 0.05, AT_A1[1] - 0.1))
    s.change(A1, -1, -345.0)
    s.stand(1.5, (1, *AT_A1), (2, AT_A1[0] + 0.05, AT_A1[1] - 0.1))
    s.door(True)
    s.leave(1)
    s.leave(2)
    carts = s.close()
    with_line = [c for c in carts if c.lines]
    assert len(with_line) == 1
    assert with_line[0].status == "review"
    assert "contested" in [r.code for r in with_line[0].reasons]
    assert with_line[0].to_event()["type"] == "cart_review"


def test_someone_walking_past_does_not_contest_the_shopper_standing_there() -> None:
    s = shop_with(1, 2)
    for i in range(30):  # 1 stands at A1 while 2 walks along the shelf, passing behind at 0.8 m
        s.see(1, *AT_A1)
        s.see(2, 0.5 + 0.1 * i, 3.8)
        s.tick()
        if i == 20:
            s.change(A1, -1, -345.0)
    s.door(True)
    s.leave(1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    assert carts["s1"].items() == {"cola": 1} and carts["s1"].status == "accepted"


def test_a_put_back_on_the_wrong_slot_takes_the_item_off_by_its_weight() -> None:
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -2, -690.0)
    s.stand(2.0, (1, 0.85, 2.0))
    s.change(B1, 1, 347.0, 0.35)  # a cola (345 g) on the water slot: 0.67 units of water
    s.stand(1.0, (1, 0.85, 2.0))
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert cart.items() == {"cola": 1}
    assert cart.status == "review" and [r.code for r in cart.reasons] == ["wrong-slot"]


def test_a_weight_change_nobody_was_near_is_an_orphan_and_flags_a_lost_shopper_nearby() -> None:
    s = shop_with(1, 2)
    s.stand(1.0, (1, 1.0, 2.5), (2, 5.0, 1.5))
    s.feed(TrackLost(1, s.t))
    s.stand(3.0, (2, 5.0, 1.5))
    s.change(A2, -1, -160.0)
    assert s.f.errors["nobody-near"] == 1 and s.f.orphans[0].reasons[0].code == "nobody-near"
    s.see(3, 2.2, 2.6, person=1)  # found again, re-joined by looks, 2 m from the shelf
    s.tick()
    s.see(3, 2.4, 1.8, person=1)
    assert s.f.session_of(3) == "s1"
    s.door(True)
    s.leave(3, person=1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    # Found again 2 m from the slot within the change's window: the change is judged again on
    # that and goes on s1's cart, in doubt (it was nobody's while s1 was lost). Found nearer, the
    # found-again evidence makes it theirs (test_a_pick_made_unseen_goes_to_the_shopper_found_at_the_slot_right_after).
    assert carts["s1"].status == "review" and carts["s1"].items() == {"chips": 1}
    # The nobody-near flag went with the change when it was judged again; its doubt now is its own.
    assert {r.code for r in carts["s1"].reasons} == {"low-confidence"}
    assert carts["s2"].status == "accepted" and carts["s2"].lines == ()


def test_a_quantity_the_weight_cannot_settle_sends_the_cart_to_review() -> None:
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -2, -520.0, 0.1)  # 1.5 colas
    s.stand(1.0, (1, *AT_A1))
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert cart.status == "review" and "quantity-uncertain" in [r.code for r in cart.reasons]
    assert cart.items() == {"cola": 2}  # the best guess is shown to the reviewer


def test_a_lost_track_found_again_keeps_its_cart_and_a_ghost_does_not_join() -> None:
    s = shop_with(1)
    s.stand(1.0, (1, 2.0, 3.0))
    s.feed(TrackLost(1, s.t))
    s.tick(1.0)
    s.see(7, 4.5, 3.0, person=3)  # a ghost that looks like nobody inside
    s.tick()
    s.see(7, 4.5, 3.0, person=3)
    assert s.f.session_of(7) is None
    s.see(8, 2.3, 3.5, person=1)
    s.stand(2.0, (8, *AT_A1))
    assert s.f.session_of(8) == "s1"
    s.change(A1, -1, -345.0)
    s.stand(1.0, (8, *AT_A1))
    s.door(True)
    s.leave(8, person=1)
    (cart,) = s.close()
    assert cart.items() == {"cola": 1} and cart.status == "accepted" and cart.tracks == (1, 8)


def test_an_unknown_slot_is_counted_and_named_on_the_carts_inside() -> None:
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(("b9", 3, "b9/3", ""), -1, -200.0)
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert s.f.errors["unknown-slot"] == 1
    assert cart.status == "review" and cart.reasons[0].code == "unknown-slot" and "b9/3" in cart.reasons[0].detail


def test_a_planogram_that_disagrees_with_the_layout_never_makes_a_silent_line() -> None:
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(("b1", 0, "A1", "lemonade"), -1, -345.0)
    s.stand(1.0, (1, *AT_A1))
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert s.f.errors["planogram-mismatch"] == 1
    assert cart.status == "review" and "planogram-mismatch" in [r.code for r in cart.reasons]
    rows = [("b1", 0, "A1", "cola"), ("b1", 1, "A2", "crisps"), ("b3", 0, "Z1", "x")]
    problems = planogram_mismatches(layout(), rows)
    assert len(problems) == 3 and any("crisps" in p for p in problems) and any("B1" in p for p in problems)


def test_out_of_order_and_stale_input_is_counted_not_used() -> None:
    s = shop_with(1)
    s.stand(1.0, (1, *AT_A1))
    before = s.f.errors["out-of-order"]
    s.feed(TrackObservation(1, s.t - 5.0, 0.0, 0.0))
    assert s.f.errors["out-of-order"] == before + 1
    s.tick(40.0)
    s.see(1, *AT_A1)
    s.feed(ShelfChange("old", "b1", 0, "A1", "cola", -1, -345.0, 1.0, s.t - 35.0))
    assert s.f.errors["stale-change"] == 1
    s.door(True)
    s.leave(1)
    (cart,) = s.close()
    assert cart.lines == () and [r.code for r in cart.reasons] == ["stale-change"]


def test_a_weight_that_never_settles_and_a_board_offline_flag_the_shopper_near_them() -> None:
    s = shop_with(1, 2)
    s.feed(BoardLink("b1", False, s.t))
    s.stand(3.0, (1, *AT_A1), (2, 0.85, 2.0))
    s.feed(BoardLink("b1", True, s.t))
    start = s.t
    s.stand(7.0, (1, 4.0, 2.0), (2, 0.85, 2.0))
    s.feed(ShelfUnsettled("b2", 0, start, s.t))
    s.feed(ZoneVisit(1, s.t, "shelf-9"))
    assert s.f.errors["unknown-zone"] == 1
    s.door(True)
    s.leave(1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    assert [r.code for r in carts["s1"].reasons] == ["board-offline"]
    assert [r.code for r in carts["s2"].reasons] == ["weight-unsettled"]


def test_a_cart_below_the_confidence_bar_goes_to_review() -> None:
    s = Shop(FusionConfig(confidence_bar=0.99))
    s.door(True)
    s.enter(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -1, -370.0, 0.95)  # 5 spreads from one cola: the board's 0.95 stands
    s.stand(1.0, (1, *AT_A1))
    s.leave(1)
    (cart,) = s.close()
    assert [r.code for r in cart.reasons] == ["low-confidence"]


def test_a_shopper_still_inside_at_the_end_is_never_left() -> None:
    s = shop_with(1)
    s.stand(1.0, (1, 3.0, 3.0))
    (cart,) = s.f.finish(s.t + 1)
    assert [r.code for r in cart.reasons] == ["never-left"]


def test_inputs_check_themselves() -> None:
    with pytest.raises(ValueError, match="confidence"):
        ShelfChange("x", "b", 0, "A1", "p", -1, -1.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="direction"):
        DoorCrossing(1, 0.0, "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        TrackObservation(1, float("nan"), 0.0, 0.0)
    with pytest.raises(TypeError, match="not a fusion input"):
        Fusion(layout()).feed("hello")  # type: ignore[arg-type]


def test_an_id_swap_found_after_a_pick_moves_the_pick_to_the_shopper_who_made_it() -> None:
    s = shop_with(1, 2)
    s.stand(2.0, (1, 2.0, 4.05), (2, 2.35, 3.6))  # 1 at A1, 2 just behind: their looks become known
    s.person[1], s.person[2] = 2, 1  # the tracker swaps the ids: track 2 now follows shopper 1, still at A1
    s.stand(1.3, (2, *AT_A1), (1, 2.6, 3.3))
    s.change(A1, -1, -345.0)  # shopper 1's pick, half of its window on each side of the swap
    assert s.f.stats["swaps"] == 0
    s.stand(3.0, (2, *AT_A1), (1, 3.0, 2.5))
    assert s.f.stats["swaps"] >= 1 and s.f.stats["reattributed"] >= 1
    s.door(True)
    s.leave(2)
    s.leave(1)
    carts = {c.sessions[0]: c for c in s.close()}
    assert carts["s1"].items() == {"cola": 1} and carts["s1"].status == "accepted"
    assert carts["s2"].lines == () and carts["s2"].status == "accepted"


def test_a_contested_pick_sends_both_shoppers_carts_to_review() -> None:
    s = shop_with(1, 2)
    s.stand(2.0, (1, *AT_A1), (2, AT_A1[0] + 0.05, AT_A1[1] - 0.1))
    s.change(A1, -1, -345.0)
    s.stand(1.5, (1, *AT_A1), (2, AT_A1[0] + 0.05, AT_A1[1] - 0.1))
    s.door(True)
    s.leave(1)
    s.leave(2)
    carts = s.close()
    assert len(carts) == 2 and all(c.status == "review" for c in carts)
    without = next(c for c in carts if not c.lines)
    assert [r.code for r in without.reasons] == ["contested"]  # if the cola was theirs, their cart lacks it


def test_a_pick_nobody_was_near_flags_every_shopper_not_watched_then_however_far() -> None:
    s = shop_with(1, 2)
    s.stand(1.0, (1, 5.5, 1.0), (2, 5.0, 2.5))
    s.feed(TrackLost(1, s.t))  # lost 4 m from A2
    s.stand(3.0, (2, 5.0, 2.5))
    s.change(A2, -1, -160.0)
    s.stand(1.0, (2, 5.0, 2.5))
    s.see(3, 5.4, 1.2, person=1)
    s.tick()
    s.see(3, 5.3, 1.0, person=1)
    assert s.f.session_of(3) == "s1"
    s.door(True)
    s.leave(3, person=1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    assert [r.code for r in carts["s1"].reasons] == ["nobody-near"]  # unseen then: the pick may be theirs
    assert carts["s2"].status == "accepted"  # seen all the time 2.6 m away: not theirs


def _pick_while_another_is_lost_behind(config: FusionConfig | None) -> dict:
    s = shop_with(1, 2, config=config)
    s.stand(1.0, (1, *AT_A1), (2, 2.7, 3.95))  # 2 waits behind the next slot, 0.7 m along the shelf from A1
    s.feed(TrackLost(2, s.t))
    s.stand(3.5, (1, *AT_A1))
    s.change(A1, -1, -345.0)
    s.stand(1.0, (1, *AT_A1))
    s.see(4, 2.7, 3.9, person=2)  # found again where it was lost
    s.tick()
    s.see(4, 2.7, 3.8, person=2)
    s.door(True)
    s.leave(1)
    s.leave(4, person=2)
    return {c.sessions[0]: c for c in s.close()}


def test_a_shopper_lost_away_from_a_slot_someone_stands_at_does_not_contest_the_pick() -> None:
    carts = _pick_while_another_is_lost_behind(None)
    assert carts["s1"].items() == {"cola": 1} and carts["s1"].status == "accepted"
    assert carts["s2"].status == "accepted"
    # Without the exclusion the lost shopper's blurred last place makes the same pick doubtful.
    without = _pick_while_another_is_lost_behind(FusionConfig(lost_exclusion=0.0))
    assert without["s1"].status == "review" and "contested" in [r.code for r in without["s1"].reasons]


def test_a_person_found_walking_inside_whom_nobody_saw_come_in_is_not_nobody() -> None:
    # Shopper 2 walked in hidden behind shopper 1 and is first tracked at the shelves after the door closed.
    s = shop_with(1)
    s.stand(1.0, (1, 4.5, 2.5))
    for k in range(25):  # walking along the back wall to A1, shopper 1 in view all along
        s.see(1, 4.5, 2.5)
        s.see(9, 3.6 - 0.064 * k, 4.15, person=2)
        s.tick()
    assert s.f.session_of(9) is not None and s.f.stats["entries_unseen"] == 1
    s.stand(1.5, (1, 4.5, 2.5), (9, *AT_A1))
    s.change(A1, -1, -345.0)
    s.stand(1.0, (1, 4.5, 2.5), (9, *AT_A1))
    s.door(True)
    s.leave(9, person=2)
    s.leave(1)
    (cart,) = s.close()
    assert cart.items() == {"cola": 1}  # on a cart, not an orphan nobody pays for
    assert cart.status == "review" and "entry-unseen" in [r.code for r in cart.reasons]
    assert not s.f.orphans


def test_a_track_walking_in_from_the_street_is_a_new_shopper_not_a_lost_one_found_again() -> None:
    s = shop_with(1)
    s.stand(0.5, (1, 3.0, 1.2))
    s.feed(TrackLost(1, s.t))  # shopper 1 is lost just inside the door
    s.tick(1.0)
    s.door(True)
    for y in (-1.2, -0.8, -0.4, 0.1, 0.4, 0.7, 1.0):  # someone who even looks alike walks in from the street
        s.see(2, 3.0, y, person=1)
        s.tick()
    s.feed(DoorCrossing(2, s.t, "in"))  # the crossing is reported a few frames late
    assert s.f.session_of(2) not in (None, "s1")
    assert s.f.open_sessions() == ["s1", s.f.session_of(2)]


def test_someone_walking_in_near_a_shopper_lost_at_the_door_does_not_close_that_shopper() -> None:
    s = shop_with(1)
    s.stand(1.0, (1, 3.0, 0.6))
    s.feed(TrackLost(1, s.t))  # lost at the door, still inside
    s.tick(0.5)
    s.door(True)
    for k in range(8):  # a new track on the street walking towards the door, looking like shopper 1
        s.see(2, 3.1, -1.6 + 0.1 * k, person=1)
        s.tick()
    assert s.f.stats["exits_by_continuity"] == 0 and s.f.open_sessions() == ["s1"]


def test_a_track_the_tracker_re_spawns_a_frame_early_re_joins_its_shopper() -> None:
    s = shop_with(1)
    s.stand(1.0, (1, 2.0, 3.0))
    for _ in range(3):  # the new id starts while the old one is still seen for a few frames
        s.see(5, 2.1, 3.0, person=1)
        s.see(1, 2.05, 3.0)
        s.tick()
    for _ in range(10):
        s.see(5, 2.1, 3.0)
        s.tick()
    assert s.f.session_of(5) == "s1"


def test_a_swapped_track_is_split_between_the_two_carts_by_time() -> None:
    s = shop_with(1, 2)
    s.stand(2.0, (1, 2.0, 4.05), (2, 2.35, 3.6))
    s.person[1], s.person[2] = 2, 1
    s.stand(4.0, (2, *AT_A1), (1, 3.0, 2.5))
    assert s.f.stats["swaps"] >= 1
    s.door(True)
    s.leave(2)
    s.leave(1)
    carts = {c.sessions[0]: c for c in s.close()}
    first = {t for t, _, _ in carts["s1"].spans}
    assert first == {1, 2}  # track 1 until the swap, then track 2
    split = next(b for t, a, b in carts["s1"].spans if t == 1)
    assert any(t == 2 and a <= split for t, a, _ in carts["s1"].spans)
    assert any(t == 1 and a >= split - 1e-9 for t, a, _ in carts["s2"].spans)


def test_the_calibration_turns_the_evidence_into_a_probability() -> None:
    f = Fusion(layout(), FusionConfig(calibration_slope=2.0, calibration_slope_sparse=1.0, calibration_nobody=0.5, calibration_sparse=-1.0, calibration_offset=-1.0))
    assert f.calibrated(0.5, 0.0) == pytest.approx(0.5)
    assert f.calibrated(3.0, 2.0) == pytest.approx(1 / (1 + math.exp(-6.0)))
    assert f.calibrated(3.0, 2.0, sparse=0.5) == pytest.approx(1 / (1 + math.exp(-5.5)))  # below 1: the nominal slope
    assert f.calibrated(3.0, 2.0, sparse=2.0) == pytest.approx(1 / (1 + math.exp(-1.0)))  # a sparse camera: its own slope
    assert f.calibrated(-100.0, 0.0) == 0.0
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -1, -345.0)
    s.stand(1.0, (1, *AT_A1))
    s.leave(1)
    (cart,) = s.close()
    (a,) = cart.attributions
    assert a.probability == pytest.approx(s.f.calibrated(a.margin_others, a.margin_nobody, a.sparse)) and a.margin > 2.0
    # Nobody else near: the evidence against others is the shopper's own score over others_floor.
    assert a.margin_others == pytest.approx(a.margin_nobody + math.log(s.f.config.nobody_score / s.f.config.others_floor))
    assert a.sparse == 0.0 and cart.status == "accepted"


def _shopper_alone_seen_part_of_the_time(config: FusionConfig, fps: float = 10.0) -> tuple[float, float, float]:
    """A shopper alone at A1, occluded two thirds of the time (in bursts) around their pick: (margin, probability, sparse)."""
    s = Shop(config)
    s.door(True)
    s.enter(1)
    dt = round(1.0 / fps, 3)
    for _ in range(round(5.0 / dt)):  # in the aisle for a while, seen every frame of the camera
        s.see(1, 3.0, 2.0)
        s.tick(dt)
    for k in range(round(6.0 / dt)):
        if k % 9 < 3:  # seen three frames, then hidden for six
            s.see(1, *AT_A1)
        s.tick(dt)
        if k == round(3.0 / dt):
            s.change(A1, -1, -345.0)
    s.leave(1)
    (cart,) = s.close()
    (a,) = cart.attributions
    return a.margin, a.probability, a.sparse


def test_a_weak_score_with_nobody_else_near_is_judged_apart_from_a_contested_one() -> None:
    """The evidence against other shoppers and against nobody are separate features of the calibration."""
    margin, p, _ = _shopper_alone_seen_part_of_the_time(FusionConfig())
    lumped, p_lumped, _ = _shopper_alone_seen_part_of_the_time(FusionConfig(calibration_slope=1.728, others_floor=0.05))
    assert margin == pytest.approx(lumped)  # the reported margin is the old one: nobody counts as a rival
    assert p > p_lumped  # with nobody else near, the shopper's own weak score is less doubtful than a rival's


def test_a_slow_camera_makes_the_same_evidence_less_sure() -> None:
    _, p10, sparse10 = _shopper_alone_seen_part_of_the_time(FusionConfig(), fps=10.0)
    _, p3, sparse3 = _shopper_alone_seen_part_of_the_time(FusionConfig(), fps=3.0)
    assert sparse10 == pytest.approx(0.0, abs=0.05)
    assert 1.8 < sparse3 < 2.6  # about 2.33 frames missed per nominal frame at 3 fps
    assert p3 < p10


def _pick_while_unseen(config: FusionConfig) -> float:
    """A shopper at A1, unseen for 2.4 s around their pick (someone in front), seen there again: the pick's margin."""
    s = Shop(config)
    s.door(True)
    s.enter(1)
    s.stand(2.0, (1, *AT_A1))
    s.tick(2.4)  # not seen at all
    s.stand(0.7, (1, *AT_A1))
    s.change(A1, -1, -345.0)  # the hand was on the shelf about 1.25 s ago, in the middle of the gap
    s.stand(1.0, (1, *AT_A1))
    s.leave(1)
    (cart,) = s.close()
    (a,) = cart.attributions
    assert cart.items() == {"cola": 1}
    return a.margin


def test_a_shopper_seen_at_the_slot_before_and_after_an_unseen_pick_was_there_all_along() -> None:
    bridged = _pick_while_unseen(FusionConfig())
    unbridged = _pick_while_unseen(FusionConfig(bridge_s=0.0))
    assert bridged > unbridged + 0.2


def _pick_of_cola(delta_g: float, board_confidence: float):
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -1, delta_g, confidence=board_confidence)
    s.stand(1.0, (1, *AT_A1))
    s.leave(1)
    (cart,) = s.close()
    return cart


def test_a_weight_only_one_count_can_explain_is_sure_whatever_the_board_heuristic_says() -> None:
    # 357 g is 2.4 spreads (unit sd 3 g, noise 4 g) from one cola and 67 spreads from two: one cola.
    cart = _pick_of_cola(-357.0, board_confidence=0.8)
    assert cart.status == "accepted" and cart.items() == {"cola": 1} and cart.confidence > 0.99
    # 400 g is no count of cola (11 spreads from one): the board's own 0.8 stands, and the cart goes to review.
    cart = _pick_of_cola(-400.0, board_confidence=0.8)
    assert cart.status == "review" and cart.confidence == pytest.approx(0.8, abs=0.01)
    assert "low-confidence" in {r.code for r in cart.reasons}
    # A weight between two counts is still unsure: 517 g is 1.5 colas.
    cart = _pick_of_cola(-517.0, board_confidence=0.0)
    assert cart.status == "review"


def test_a_change_is_judged_again_when_its_lost_shopper_is_found_at_the_slot() -> None:
    """Lost at A1 just before the pick, found there again (new id) after the change came: the bridge applies then."""
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.feed(TrackLost(1, s.t))
    s.tick(1.6)  # unseen: someone in front
    s.change(A1, -1, -345.0)
    (cart,) = s.f._carts.values()
    before = cart.changes[-1].probability
    s.tick(0.3)
    s.see(2, AT_A1[0], AT_A1[1] - 0.05, person=1)  # a new id where the shopper stood
    s.tick()
    s.stand(1.0, (2, *AT_A1))
    assert s.f.session_of(2) == "s1"
    after = cart.changes[-1].probability
    assert after > before and after >= s.f.config.attribution_bar
    s.leave(2, person=1)
    (closed,) = s.close()
    assert closed.status == "accepted" and closed.items() == {"cola": 1}


def _out_and_in(person_back: int) -> list:
    """Track 1 picks a cola, walks out, and within a second the same track id comes back in as ``person_back``, who picks chips."""
    s = shop_with(1)
    s.stand(2.0, (1, *AT_A1))
    s.change(A1, -1, -345.0, 0.99)
    s.stand(1.5, (1, *AT_A1))
    s.door(True)
    s.leave(1)
    s.tick()
    for _ in range(3):  # outside: the tracker's id now on whoever it follows
        s.see(1, 3.0, -0.8, person_back)
        s.tick()
    s.enter(1, person_back)
    s.tick(0.5)
    s.door(False)
    s.stand(2.0, (1, *AT_A2))
    s.change(A2, -1, -160.0, 0.99)
    s.stand(1.5, (1, *AT_A2))
    s.door(True)
    s.leave(1)
    return s.close()


def test_a_track_carried_from_a_leaver_to_a_newcomer_at_the_door_opens_a_new_cart() -> None:
    carts = _out_and_in(person_back=3)
    assert sorted(sorted(c.items().items()) for c in carts) == [[("chips", 1)], [("cola", 1)]]  # two carts, one item each
    assert all(c.status == "accepted" for c in carts)


def test_the_same_shopper_stepping_out_and_straight_back_in_keeps_one_cart() -> None:
    (cart,) = _out_and_in(person_back=1)
    assert cart.items() == {"cola": 1, "chips": 1}


# -- round "crowd-grid": continuity across an unseen stretch -------------------------------------

AT_B1 = (0.85, 2.0)


def _pick_while_lost_found_at_the_slot_after(config: FusionConfig | None = None) -> dict:
    """Shopper 1, last seen at B1, unseen 4 s (a blackout) during which they pick at A1, found standing at A1 1.35 s after the moment; shopper 2 far away, seen all along."""
    s = shop_with(1, 2, config=config)
    s.stand(1.0, (1, *AT_B1), (2, 5.0, 2.5))
    s.feed(TrackLost(1, s.t))
    s.stand(2.6, (2, 5.0, 2.5))
    s.change(A1, -1, -345.0)  # the hand was on the shelf 1.25 s ago, 1.35 s into the gap
    s.stand(1.3, (2, 5.0, 2.5))
    s.see(3, AT_A1[0], AT_A1[1] - 0.02, person=1)  # found again at A1, 2.45 m from B1 after 4 s: walkable
    s.tick()
    s.stand(1.0, (3, *AT_A1), (2, 5.0, 2.5))
    assert s.f.session_of(3) == "s1"
    s.door(True)
    s.leave(3, person=1)
    s.leave(2)
    return {c.sessions[0]: c for c in s.close()}


def test_a_pick_made_unseen_goes_to_the_shopper_found_at_the_slot_right_after() -> None:
    carts = _pick_while_lost_found_at_the_slot_after()
    assert carts["s1"].items() == {"cola": 1}
    # The pick first went to nobody (s1 unseen, last seen at B1) and flagged s1's cart; found at A1, the
    # change is attributed again to s1 and the flag goes with it.
    assert carts["s1"].status == "accepted" and carts["s1"].reasons == ()
    assert carts["s2"].status == "accepted" and carts["s2"].items() == {}
    # Without the found-again evidence only a shopper at the slot on both sides of the gap is bridged:
    # the pick stays nobody's and s1's cart goes to review, short of the cola.
    off = _pick_while_lost_found_at_the_slot_after(FusionConfig(refound_weight=0.0))
    assert off["s1"].status == "review" and "nobody-near" in [r.code for r in off["s1"].reasons]
    assert off["s1"].items() == {}


def test_a_shopper_found_after_the_pick_behind_someone_standing_at_the_slot_does_not_contest_it() -> None:
    """Shopper 2 lost near the door, found 0.9 m behind A1 just after shopper 1, seen at A1 all along, picked there."""
    s = shop_with(1, 2)
    s.stand(1.0, (1, *AT_A1), (2, 3.0, 1.2))
    s.feed(TrackLost(2, s.t))
    s.stand(2.6, (1, *AT_A1))
    s.stand(0.3, (1, *AT_A1))
    s.see(3, AT_A1[0], AT_A1[1] - 0.9, person=2)  # 0.15 s after the moment, 1.35 m from the shelf
    s.tick()
    s.change(A1, -1, -345.0)  # the hand was on the shelf 1.25 s ago
    s.stand(1.5, (1, *AT_A1), (3, AT_A1[0], AT_A1[1] - 0.9))
    assert s.f.session_of(3) == "s2"
    s.door(True)
    s.leave(1)
    s.leave(3, person=2)
    carts = {c.sessions[0]: c for c in s.close()}
    # Last seen by the door before the moment, so not at the slot: the place was taken by shopper 1.
    assert carts["s1"].items() == {"cola": 1} and carts["s1"].status == "accepted", carts["s1"].reasons
    assert carts["s2"].status == "accepted"


def test_a_shopper_lost_at_the_slot_does_not_contest_the_one_seen_stepping_in_after_them() -> None:
    """Shopper 1 lost at A1 (a blackout), shopper 2, seen 0.9 m behind all along, steps up and picks 3 s later."""
    s = shop_with(1, 2)
    behind = (AT_A1[0], AT_A1[1] - 0.9)
    s.stand(1.0, (1, *AT_A1), (2, *behind))
    s.feed(TrackLost(1, s.t))
    s.stand(0.5, (2, *behind))
    s.stand(4.5, (2, *AT_A1))
    s.change(A1, -1, -345.0)
    s.stand(1.0, (2, *AT_A1))
    s.see(3, 4.0, 2.0, person=1)  # found again, away
    s.tick()
    s.stand(0.5, (3, 4.0, 2.0), (2, *AT_A1))
    s.door(True)
    s.leave(2)
    s.leave(3, person=1)
    carts = {c.sessions[0]: c for c in s.close()}
    # Lost right at the slot, 1 may be the one standing there under another id; but the one standing
    # there was seen 0.9 m away when 1 was lost, and all the time since: two people.
    assert carts["s2"].items() == {"cola": 1} and carts["s2"].status == "accepted", carts["s2"].reasons
    assert carts["s1"].status == "accepted" and carts["s1"].items() == {}


def test_a_pick_made_unseen_between_lost_at_the_slot_and_found_near_it_goes_to_that_shopper() -> None:
    """Shopper 1 lost standing at A1 (a blackout), picks there 2.65 s later, found 1.1 m from the shelf 2.15 s after the moment; shopper 2 stands 0.4 m to the side all along."""
    s = shop_with(1, 2)
    beside = (AT_A1[0] + 0.4, AT_A1[1])
    s.stand(1.0, (1, *AT_A1), (2, *beside))
    s.feed(TrackLost(1, s.t))
    s.stand(3.9, (2, *beside))  # 2.65 s to the moment, 1.25 s for the weight to settle
    s.change(A1, -1, -345.0)
    s.stand(0.9, (2, *beside))
    s.see(3, 2.4, 3.5, person=1)  # found again walking away from the shelf, 4.8 s after lost: within bridge_s
    s.tick()
    s.stand(0.5, (3, 2.6, 3.2), (2, *beside))
    assert s.f.session_of(3) == "s1"
    s.door(True)
    s.leave(3, person=1)
    s.leave(2)
    carts = {c.sessions[0]: c for c in s.close()}
    # Each side alone (lost at the slot 2.65 s before, found 1.1 m away 2.15 s after) is weak evidence
    # against a neighbour standing 0.4 m off (before: p 0.971, low-confidence, in review); pinned at the
    # slot on both sides of the gap, the found place does not fade with the time after the moment.
    (att,) = carts["s1"].attributions
    assert att.cart_id == carts["s1"].cart_id and att.probability >= 0.99
    assert carts["s1"].status == "accepted" and carts["s1"].items() == {"cola": 1}
    assert carts["s2"].status == "accepted" and carts["s2"].items() == {}
