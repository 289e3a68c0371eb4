"""Play a scenario through the real vision and hardware code, into fusion, keeping the ground truth.

**Plan.** Each shopper's visit becomes a trajectory (keyframes on the floor, walking at their speed):
from the street through the door to each slot's stand point, a dwell there with the action at least
1 s from either end, and back out. Shoppers wanting a slot someone is using wait their turn 0.9 m
behind. A person's next visit (a re-entry) waits until they have left. The door contact opens 1 s
before each crossing and closes 1.5 s after it.

**Vision side (real code).** Each camera frame, every visible shopper yields a detection box seen
from the ceiling with noise: missed detections, centre jitter, spurious boxes, occlusion when two
shoppers are close (the one behind is missed or gets a low score), blackouts and ghosts from the
scenario. With several ceiling cameras (``CameraSpec.views``, :class:`_Views`), each view
detects the people on its part of the floor with its own noise and line-of-sight occlusion, and
the views' detections are merged on the floor by :func:`vision.multiview.merge` (the merge's CPU
is counted apart, ``RunResult.merge_cpu_s``) before the one tracker. The boxes go through :class:`vision.tracker.ByteTracker` and
:class:`vision.events.ZoneEvents`; tracks become :class:`~fusion.types.TrackObservation` (with the
appearance vector of the detection the track matched, as a re-id model would give),
``person_entered``/``person_exited`` become door crossings, ended ids become ``TrackLost``.

**Hardware side (real code).** One :class:`hardware.simulator.SimulatedBoard` per shelf (a load cell
per slot, with the simulator's noise and hand transient) and one for the door contact, clocked by
the scenario instead of the wall clock. Every sample interval each board's READINGS message is
encoded into a wire frame (COBS + CRC), split, parsed and decoded by ``hardware.frames``, turned
into readings by ``hardware.driver.readings_from`` and fed to ``hardware.events.BoardProcessor``,
whose ``shelf_change`` and door events go to fusion. Only the pseudo-terminal and the board thread
are skipped (the board is sampled directly, via its ``_sample``), so a 10-minute scenario plays in
seconds. A pulled board delivers nothing for the outage and its processor is reset on return, as
the driver does on reconnect.

Ground truth: every detection carries the shopper it came from, so each track gets, frame by frame,
the shopper it followed. A produced cart is matched to the true cart its tracks followed *while
they were the cart's* (``CartResult.spans``: a tracker id swap that fusion found splits a track
between two carts by time), and each shelf change to the true cart of the hand that made it (the
last hand on that slot before the change settled, ``RunResult.change_truth``).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from fusion.engine import Fusion, FusionConfig
from fusion.layout import SlotSpec
from fusion.scenario import CameraSpec, Scenario, Shopper, true_carts
from fusion.types import (
    BoardLink,
    CartResult,
    DoorContact,
    DoorCrossing,
    FusionInput,
    ShelfChange,
    ShelfUnsettled,
    TrackLost,
    TrackObservation,
    ZoneVisit,
)
from hardware.driver import readings_from
from hardware.events import BoardProcessor, DoorEvent, ShelfEvent, TemperatureSettings
from hardware.frames import (
    ChannelInfo,
    ChannelKind,
    FrameSplitter,
    Hello,
    SensorFrame,
    Unit,
    decode_message,
    encode_message,
)
from hardware.planogram import Planogram, Slot
from hardware.simulator import SimulatedBoard
from hardware.stability import StabilityDetector, StabilitySettings
from vision.boxes import box_iou
from vision.events import ZoneEvents
from vision.multiview import CoverageMap, FloorDetections, MergeConfig, merge
from vision.tracker import ByteTracker, TrackerConfig
from vision.types import Detections
from vision.zones import ZonesConfig, side_of_line

UNSETTLED_AFTER_S = 6.0
"""A slot unsettled this long is reported to fusion as ShelfUnsettled."""


# A ghost fault: (from, until, x, y, appearance).
_Ghost = tuple[float, float, float, float, np.ndarray]

REACH_BEFORE_S = 0.5
"""The hand is in the slot from this long before the weight changes..."""
REACH_AFTER_S = 0.5
"""...until this long after."""


@dataclass(frozen=True)
class _Reach:
    """A hand in a slot, as the ceiling camera may see it: the picker's box stretched over the slot."""

    start: float
    end: float
    visit: str  # shopper id of the hand
    slot: SlotSpec
    point: tuple[float, float]  # where the hand is (in the shelf, just behind the slot's front edge)
    visible: bool  # the picker's stretch shows
    false_draw: float  # compared with reach_false for each other shopper near the slot


def _reaches(visits: list[Visit], shop_slot: dict[str, SlotSpec], cam: CameraSpec, rng: random.Random) -> list[_Reach]:
    out = []
    for v in visits:
        for at, slot_name, _units, _product in v.actions:
            sl = shop_slot[slot_name]
            fx, fy = sl.unit_facing()
            lat = rng.uniform(-0.2, 0.2) * sl.width_m
            into = rng.uniform(0.0, 0.12)  # how far past the front edge the hand goes
            point = (sl.front[0] - fy * lat - fx * into, sl.front[1] + fx * lat - fy * into)
            out.append(_Reach(at - REACH_BEFORE_S, at + REACH_AFTER_S, v.shopper.id, sl, point, rng.random() < cam.reach_visible, rng.random()))
    return out


def _stretch(box: tuple[float, float, float, float], hand: tuple[float, float], rng: random.Random) -> tuple[float, float, float, float]:
    """Return a person's box grown to cover their hand (a box of about 0.15 m around it, with noise)."""
    h = 0.075
    hx, hy = hand[0] + rng.gauss(0, 0.03), hand[1] + rng.gauss(0, 0.03)
    return (min(box[0], hx - h), min(box[1], hy - h), max(box[2], hx + h), max(box[3], hy + h))


@dataclass
class Visit:
    """A planned visit: trajectory keyframes, hand actions, door crossings, blackouts."""

    shopper: Shopper
    keys: list[tuple[float, float, float]]
    actions: list[tuple[float, str, int, str]]  # (time, slot, signed units: - taken / + put back, true product)
    crossings: list[float]
    blackouts: list[tuple[float, float]]
    appearance: np.ndarray

    @property
    def start(self) -> float:
        """Return when the shopper appears on the street."""
        return self.keys[0][0]

    @property
    def end(self) -> float:
        """Return when the shopper is gone."""
        return self.keys[-1][0]

    def position(self, t: float) -> tuple[float, float] | None:
        """Return where the shopper is at t, or None before the visit or after it."""
        k = self.keys
        if t < k[0][0] or t > k[-1][0]:
            return None
        lo, hi = 0, len(k) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if k[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (t0, x0, y0), (t1, x1, y1) = k[lo], k[hi]
        f = 0.0 if t1 <= t0 else (t - t0) / (t1 - t0)
        return (x0 + (x1 - x0) * f, y0 + (y1 - y0) * f)


def plan(scenario: Scenario, rng: random.Random) -> list[Visit]:
    """Turn the shoppers of a scenario into timed trajectories and hand actions."""
    shop = scenario.shop
    dx = shop.door.midpoint()[0]
    reserved: dict[str, list[tuple[float, float, str]]] = defaultdict(list)  # slot -> (from, to, visit)
    busy_until: dict[str, float] = {}
    appearances: dict[str, np.ndarray] = {}
    arng = np.random.default_rng(rng.randrange(2**32))
    visits = []
    for sh in sorted(scenario.shoppers, key=lambda s: s.arrive_at):
        speed = sh.speed_mps
        t = max(sh.arrive_at, busy_until.get(sh.person_id, -math.inf))
        off = rng.uniform(-0.35, 0.35)
        keys = [(t, dx + off, -1.8)]
        crossings: list[float] = []

        def walk(x: float, y: float, keys: list[tuple[float, float, float]] = keys, crossings: list[float] = crossings, speed: float = speed) -> float:
            t0, x0, y0 = keys[-1]
            t1 = t0 + math.dist((x0, y0), (x, y)) / speed
            if (y0 < 0) != (y < 0):
                crossings.append(t0 + (t1 - t0) * (0 - y0) / (y - y0))
            keys.append((t1, x, y))
            return t1

        walk(dx + off * 0.5, 0.9)
        actions = []
        blackouts = []
        for i, a in enumerate(sh.actions):
            slot = shop.slot(a.slot)
            assert slot is not None
            for b in sh.blackouts:
                if b.before_action == i:
                    blackouts.append((keys[-1][0], keys[-1][0] + b.duration_s))
            sx, sy = slot.stand_point(0.45)
            fx, fy = slot.unit_facing()
            lat = rng.uniform(-0.06, 0.06)
            sx, sy = sx - fy * lat, sy + fx * lat
            arrive = keys[-1][0] + math.dist(keys[-1][1:], (sx, sy)) / speed
            begin = arrive
            others = [(s, e) for s, e, who in reserved[a.slot] if who != sh.id]  # one's own turn is no queue
            while clash := [e for s, e in others if begin - 1.0 < e and s < begin + a.dwell_s + 1.0]:
                begin = max(clash) + 1.001
            if begin > arrive:  # wait behind whoever is at the slot
                qx, qy = sx + fx * 0.9, sy + fy * 0.9
                walk(qx, qy)
                keys.append((max(keys[-1][0], begin - 0.9 / speed), qx, qy))
            begin = walk(sx, sy)
            keys.append((begin + a.dwell_s, sx, sy))
            reserved[a.slot].append((begin, begin + a.dwell_s, sh.id))
            at = begin + rng.uniform(1.0, a.dwell_s - 1.0)
            product = a.product or slot.product
            actions.append((at, a.slot, -a.take if a.take else a.put_back, product))
        off2 = rng.uniform(-0.35, 0.35)
        walk(dx + off2 * 0.5, 0.9)
        walk(dx + off2, -1.8)
        busy_until[sh.person_id] = keys[-1][0] + 3.0
        if sh.person_id not in appearances:
            appearances[sh.person_id] = _unit(arng.normal(size=scenario.camera.appearance_dims))
        visits.append(Visit(sh, keys, actions, crossings, blackouts, appearances[sh.person_id]))
    return visits


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) or 1.0)


@dataclass
class RunResult:
    """What a scenario run produced, with the ground truth to score it."""

    scenario: Scenario
    carts: list[CartResult]
    truth: dict[str, Counter[str]]
    cart_truth: dict[str, str | None]
    errors: Counter[str]
    stats: Counter[str]
    fusion_cpu_s: float
    tracker_cpu_s: float
    shopper_minutes: float
    frames: int
    shelf_changes: int
    true_visits: int
    inputs: Counter[str] = field(default_factory=Counter)
    track_votes: dict[int, Counter[str]] = field(default_factory=dict)
    fusion: Fusion | None = None
    change_truth: dict[str, str] = field(default_factory=dict)  # shelf change id -> true cart whose hand made it
    merge_cpu_s: float = 0.0  # several views: merging their detections on the floor (vision.multiview.merge), part of the vision side


class _Boards:
    """Simulated boards sampled on the scenario's clock through the real frame and event code."""

    def __init__(self, scenario: Scenario, clock: list[float], seed: int) -> None:
        shop = scenario.shop
        spec = scenario.boards
        self.noise_g = spec.noise_g
        self.clock = clock
        by_board: dict[str, list[SlotSpec]] = defaultdict(list)
        for s in shop.slots:
            by_board[s.board].append(s)
        planogram = Planogram(slots=tuple(Slot(board=s.board, channel=s.channel, slot=s.slot, product=s.product, unit_weight_g=s.unit_weight_g, unit_weight_sd_g=s.unit_weight_sd_g) for s in shop.slots))
        stability = StabilitySettings()
        self.boards: dict[str, SimulatedBoard] = {}
        self.hello: dict[str, Hello] = {}
        self.processors: dict[str, BoardProcessor] = {}
        self.detectors: dict[tuple[str, int], StabilityDetector] = {}
        self.stable_since: dict[tuple[str, int], float] = {}
        self.unsettled_sent: set[tuple[str, int]] = set()
        self.splitter = FrameSplitter()
        self.seq: Counter[str] = Counter()
        self.door_board = spec.door_board
        for i, (board, slots) in enumerate(sorted(by_board.items())):
            n = max(s.channel for s in slots) + 1
            kinds = ["load_cell"] * n
            self._add(board, kinds, seed + i, stability, planogram)
            for s in slots:
                self.boards[board].set_value(s.channel, spec.stock * s.unit_weight_g)
        self._add(self.door_board, ["door"], seed + 99, stability, planogram)

    def _add(self, board: str, kinds: list[str], seed: int, stability: StabilitySettings, planogram: Planogram) -> None:
        b = SimulatedBoard(board_id=board, channels=tuple(kinds), noise_g=self.noise_g, seed=seed, clock=lambda: self.clock[0])
        self.boards[board] = b
        self.hello[board] = Hello(board, 1, 0, tuple(ChannelInfo(i, ChannelKind.DOOR if k == "door" else ChannelKind.LOAD_CELL, Unit.STATE if k == "door" else Unit.DECIGRAM) for i, k in enumerate(kinds)))
        self.processors[board] = BoardProcessor(board, planogram, stability, TemperatureSettings(), self.noise_g)
        for ch, k in enumerate(kinds):
            if k == "load_cell":
                self.detectors[(board, ch)] = StabilityDetector(stability)

    def replugged(self, board: str, now: float) -> None:
        """Forget the unsettled watch of a board that was away: its silence was not instability."""
        for (b, ch), det in self.detectors.items():
            if b == board:
                det.reset()
                self.stable_since[(b, ch)] = now
                self.unsettled_sent.discard((b, ch))

    def sample(self, board: str, now: float, dt: float) -> list[FusionInput]:
        """Sample one board and pass its frame through the real wire and event code."""
        msg = self.boards[board]._sample(now, dt)
        wire = encode_message(msg, self.seq[board] & 0xFFFF)
        self.seq[board] += 1
        out: list[FusionInput] = []
        for raw in self.splitter.feed(wire):
            if not isinstance(raw, bytes):
                continue
            decoded = decode_message(SensorFrame.parse(raw))
            for r in readings_from(self.hello[board], decoded, now):  # type: ignore[arg-type]
                det = self.detectors.get((board, r.channel))
                if det is not None:
                    det.update(r.board_time, r.value)
                    key = (board, r.channel)
                    if det.stable:
                        self.stable_since[key] = now
                        self.unsettled_sent.discard(key)
                    elif now - self.stable_since.setdefault(key, now) > UNSETTLED_AFTER_S and key not in self.unsettled_sent:
                        self.unsettled_sent.add(key)
                        out.append(ShelfUnsettled(board, r.channel, self.stable_since[key], now))
                for ev in self.processors[board].feed(r):
                    if isinstance(ev, ShelfEvent):
                        out.append(ShelfChange(f"{ev.board}/{ev.channel}@{ev.at:.2f}", ev.board, ev.channel, ev.slot, ev.product, ev.quantity, ev.delta_g, ev.confidence, ev.at))
                    elif isinstance(ev, DoorEvent):
                        out.append(DoorContact(ev.at, ev.type == "door_opened", ev.board))
        return out


def _zones(scenario: Scenario) -> tuple[ZonesConfig, float, float]:
    cam, shop = scenario.camera, scenario.shop
    s, oy = cam.px_per_m, cam.outside_m

    def px(x: float, y: float) -> list[float]:
        return [x * s, (y + oy) * s]

    a, b = px(*shop.door.a), px(*shop.door.b)
    mid = shop.door.midpoint()
    outside = np.array([px(mid[0], mid[1] - 1.0)])
    enter_from = "left" if int(side_of_line(outside, (a[0], a[1]), (b[0], b[1]))[0]) > 0 else "right"
    shelves = []
    w, h = shop.width_m * s, (shop.depth_m + oy) * s
    for name in shop.shelves():
        pts = []
        for sl in shop.slots:
            if sl.shelf != name:
                continue
            fx, fy = sl.unit_facing()
            for lat in (-sl.width_m / 2, sl.width_m / 2):
                for depth in (0.0, 0.9):
                    x = sl.front[0] + fx * depth - fy * lat
                    y = sl.front[1] + fy * depth + fx * lat
                    pts.append(px(x, y))
        xs, ys = [min(max(p[0], 0), w) for p in pts], [min(max(p[1], 0), h) for p in pts]
        shelves.append({"name": name, "polygon": [[min(xs), min(ys)], [max(xs), min(ys)], [max(xs), max(ys)], [min(xs), max(ys)]]})
    z = ZonesConfig.model_validate({"camera": "ceiling", "anchor": "center", "door": {"a": a, "b": b, "enter_from": enter_from}, "shelves": shelves})
    return z, w, h


def run(scenario: Scenario, seed: int | None = None, config: FusionConfig | None = None) -> RunResult:
    """Play a scenario and return the carts fusion made, with the truth to score them."""
    seed = scenario.seed if seed is None else seed
    rng = random.Random(f"plan:{seed}")
    visits = plan(scenario, rng)
    nrng = np.random.default_rng(seed)
    cam = scenario.camera
    S, OY = cam.px_per_m, cam.outside_m
    zones, img_w, img_h = _zones(scenario)
    tracker = ByteTracker(TrackerConfig())
    zone_events = ZoneEvents(zones)
    fusion = Fusion(scenario.shop, config)
    clock = [0.0]
    boards = _Boards(scenario, clock, seed)
    end = max(v.end for v in visits) + 6.0
    hw_actions = sorted((t, slot, units, product) for v in visits for (t, slot, units, product) in v.actions)
    hands = sorted((t, slot, v.shopper.cart_id) for v in visits for (t, slot, _, _) in v.actions)
    door_edges = _door_edges([t for v in visits for t in v.crossings])
    pulls = [(f.at, f.at + f.duration_s, f.board) for f in scenario.faults if f.kind == "board_pull"]
    ghosts = [(f.at, f.at + f.duration_s, f.x, f.y, _unit(nrng.normal(size=cam.appearance_dims))) for f in scenario.faults if f.kind == "ghost"]
    slow = [(f.at, f.at + f.duration_s, f.fps) for f in scenario.faults if f.kind == "camera_fps"]
    rrng = random.Random(f"reach:{seed}")  # its own stream: the detection noise is the same with or without reaches
    reaches = _reaches(visits, {s.slot: s for s in scenario.shop.slots}, cam, rrng)
    votes: dict[int, Counter[str]] = defaultdict(Counter)
    seen_by: dict[int, list[tuple[float, str]]] = defaultdict(list)  # track -> (ts, shopper) of its matched detections
    results: list[CartResult] = []
    inputs: Counter[str] = Counter()
    fusion_s = tracker_s = merge_s = 0.0
    multi = _Views(cam, visits, seed) if cam.views else None
    frames = changes = 0
    pulled: set[str] = set()
    interval = scenario.boards.interval_ms / 1000
    t_hw, t_cam = 0.0, 0.0
    prev_hw = 0.0

    def feed(items: list[FusionInput]) -> None:
        nonlocal fusion_s
        for it in items:
            inputs[type(it).__name__] += 1
            t0 = time.perf_counter()
            results.extend(fusion.feed(it))
            fusion_s += time.perf_counter() - t0

    while min(t_hw, t_cam) < end:
        if t_hw <= t_cam:
            now = clock[0] = t_hw
            while hw_actions and hw_actions[0][0] <= now:
                _, slot_name, units, product = hw_actions.pop(0)
                slot = scenario.shop.slot(slot_name)
                pspec = scenario.shop.products()[product]
                assert slot is not None
                n = abs(units)
                grams = n * pspec.unit_weight_g + nrng.normal(0, math.sqrt(n) * pspec.unit_weight_sd_g)
                b = boards.boards[slot.board]
                (b.pick if units < 0 else b.put_back)(slot.channel, 1, grams)
            while door_edges and door_edges[0][0] <= now:
                _, is_open = door_edges.pop(0)
                boards.boards[boards.door_board].set_door(is_open)
            items: list[FusionInput] = []
            for bid in boards.boards:
                is_pulled = any(a <= now < e and b == bid for a, e, b in pulls)
                if is_pulled and bid not in pulled:
                    pulled.add(bid)
                    items.append(BoardLink(bid, False, now))
                elif not is_pulled and bid in pulled:
                    pulled.discard(bid)
                    boards.processors[bid].reset()  # as the driver does after a reconnect
                    boards.replugged(bid, now)
                    items.append(BoardLink(bid, True, now))
                if is_pulled:
                    boards.boards[bid]._sample(now, now - prev_hw)  # the board runs on; nothing reaches the host
                    continue
                items += boards.sample(bid, now, now - prev_hw)
            changes += sum(isinstance(i, ShelfChange) for i in items)
            feed(items)
            prev_hw = now
            t_hw = round(t_hw + interval, 6)
            continue
        now = t_cam
        fps = next((f for a, e, f in slow if a <= now < e), cam.fps)
        t_cam = now + 1.0 / fps
        frames += 1
        if multi is None:
            boxes, scores, owners, apps = _detect(visits, ghosts, now, cam, nrng, img_w / S, img_h / S - OY, reaches, rrng)
            dets = Detections(np.array(boxes, np.float32).reshape(-1, 4) * S + np.array([0, OY * S, 0, OY * S], np.float32), np.array(scores, np.float32), np.zeros(len(scores), np.int64))
        else:
            per_view, view_owners = multi.detect(visits, ghosts, now, nrng)
            t0 = time.perf_counter()
            merged = merge(per_view, multi.config, multi.coverage)
            merge_s += time.perf_counter() - t0
            dets = merged.detections
            owners = [_owner(per_view, view_owners, m) for m in merged.members]
            apps = list(merged.appearance) if merged.appearance is not None else [np.zeros(cam.appearance_dims)] * len(merged)
        t0 = time.perf_counter()
        tracks = tracker.update(dets, ts=now)
        events = zone_events.update(tracks)
        tracker_s += time.perf_counter() - t0
        iou = box_iou(tracks.xyxy, dets.xyxy) if len(tracks) and len(dets) else np.zeros((len(tracks), 0))
        items = []
        for i, tid in enumerate(tracks.ids.tolist()):
            j = int(np.argmax(iou[i])) if iou.shape[1] else -1
            matched = j >= 0 and iou[i, j] >= 0.3
            owner = owners[j] if matched else None
            if owner is not None:
                votes[tid][owner] += 1
                seen_by[tid].append((now, owner))
            x1, y1, x2, y2 = (float(v) for v in tracks.xyxy[i])
            app = tuple(float(a) for a in apps[j]) if matched else None
            # The box of the detection the track matched in this frame (not the tracker's smoothed
            # one), on the floor: what the vision pipeline sends as the track's box (docs/fusion.md).
            box = None
            if matched:
                bx1, by1, bx2, by2 = (float(v) for v in dets.xyxy[j])
                box = (bx1 / S, by1 / S - OY, bx2 / S, by2 / S - OY)
            items.append(TrackObservation(tid, now, (x1 + x2) / 2 / S, (y1 + y2) / 2 / S - OY, app, box=box))
        for e in events:
            if e.kind in ("person_entered", "person_exited") and e.track_id is not None:
                items.append(DoorCrossing(e.track_id, now, "in" if e.kind == "person_entered" else "out"))
            elif e.kind in ("zone_enter", "zone_exit", "dwell") and e.track_id is not None and e.zone:
                items.append(ZoneVisit(e.track_id, now, e.zone, e.kind))
        items += [TrackLost(tid, now) for tid in tracks.ended]
        feed(items)
    t0 = time.perf_counter()
    results.extend(fusion.finish(end))
    fusion_s += time.perf_counter() - t0

    truth = true_carts(scenario)
    visit_cart = {v.shopper.id: v.shopper.cart_id for v in visits}
    cart_truth: dict[str, str | None] = {}
    for c in results:
        tally: Counter[str] = Counter()
        if c.spans:  # who each track followed while it was this cart's (a tracker id swap splits a track)
            for tid, since, until in c.spans:
                for ts, visit in seen_by.get(tid, ()):
                    if since <= ts <= until:
                        tally[visit_cart[visit]] += 1
        else:
            for tid in c.tracks:
                for visit, n in votes.get(tid, Counter()).items():
                    tally[visit_cart[visit]] += n
        cart_truth[c.cart_id] = tally.most_common(1)[0][0] if tally else None
    change_truth: dict[str, str] = {}
    for c in results:
        for att in c.attributions:
            if att.change_id not in change_truth:
                hand = [h for h in hands if h[1] == att.slot and h[0] < att.ts]  # the last hand on that slot before it settled
                if hand:
                    change_truth[att.change_id] = hand[-1][2]
    minutes = sum((v.crossings[-1] - v.crossings[0]) / 60 for v in visits if len(v.crossings) >= 2)
    return RunResult(scenario, results, truth, cart_truth, fusion.errors, fusion.stats, fusion_s, tracker_s, minutes, frames, changes, len(visits), inputs, dict(votes), fusion, change_truth, merge_s)


def _door_edges(crossings: list[float]) -> list[tuple[float, bool]]:
    spans = sorted((t - 1.0, t + 1.5) for t in crossings)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [e for a, b in merged for e in ((max(a, 0.0), True), (b, False))]


def _detect(
    visits: list[Visit],
    ghosts: list[_Ghost],
    now: float,
    cam: CameraSpec,
    rng: np.random.Generator,
    width: float,
    depth: float,
    reaches: list[_Reach] = (),  # type: ignore[assignment]
    rrng: random.Random | None = None,
) -> tuple[list[tuple[float, float, float, float]], list[float], list[str | None], list[np.ndarray]]:
    """Return this frame's detection boxes (metres, y from the street edge), scores, owners, appearances.

    A shopper whose hand is in a slot (``reaches``) has a box stretched over the hand when the
    reach shows (``reach_visible`` per action, ``reach_frame_miss`` per frame); another shopper
    standing within 1.2 m of that slot may have a box stretched over the slot's near edge too
    (``reach_false``, drawn once per hand action): a neighbour within an arm's length of the
    slot's edge leaning in, whose box overlaps the slot.
    """
    rrng = rrng or random.Random(0)
    active = [r for r in reaches if r.start <= now <= r.end]
    people: list[tuple[Visit, tuple[float, float]]] = []
    for v in visits:
        p = v.position(now)
        if p is None or any(a <= now < e for a, e in v.blackouts):
            continue
        people.append((v, p))
    boxes: list[tuple[float, float, float, float]] = []
    scores: list[float] = []
    owners: list[str | None] = []
    apps: list[np.ndarray] = []
    half = cam.box_m / 2
    for i, (v, (x, y)) in enumerate(people):
        if rng.random() < cam.miss_rate:
            continue
        score = float(rng.uniform(0.55, 0.95))
        if any(math.dist((x, y), q) < cam.occlusion_m for _, q in people[:i]):
            if rng.random() < cam.occlusion_drop:
                continue
            score = float(rng.uniform(0.15, 0.45))
        cx, cy = x + rng.normal(0, cam.jitter_m), y + rng.normal(0, cam.jitter_m)
        hs = half * (1 + rng.normal(0, 0.04))
        box = (cx - hs, cy - hs, cx + hs, cy + hs)
        for r in active:
            if r.visit == v.shopper.id:
                if r.visible and rrng.random() >= cam.reach_frame_miss:
                    box = _stretch(box, r.point, rrng)
            elif r.false_draw < cam.reach_false and rrng.random() >= cam.reach_frame_miss:
                fx, fy = r.slot.unit_facing()
                side = 1.0 if (x - r.slot.front[0]) * -fy + (y - r.slot.front[1]) * fx > 0 else -1.0
                lat = side * 0.4 * r.slot.width_m  # the slot's edge on their side
                edge = (r.slot.front[0] - fy * lat - fx * 0.03, r.slot.front[1] + fx * lat - fy * 0.03)
                if math.dist((x, y), edge) <= 0.9:  # within an arm's length: a neighbour, not someone waiting behind
                    box = _stretch(box, edge, rrng)
        boxes.append(box)
        scores.append(score)
        owners.append(v.shopper.id)
        apps.append(_unit(v.appearance + rng.normal(0, cam.appearance_noise, v.appearance.shape)))
    for a, e, gx, gy, app in ghosts:
        if a <= now < e:
            boxes.append((gx - half, gy - half, gx + half, gy + half))
            scores.append(0.8)
            owners.append(None)
            apps.append(_unit(app + rng.normal(0, cam.appearance_noise, app.shape)))
    for _ in range(rng.poisson(cam.false_positives)):
        x, y = rng.uniform(half, width - half), rng.uniform(-cam.outside_m + half, depth - half)
        boxes.append((x - half, y - half, x + half, y + half))
        scores.append(float(rng.uniform(0.3, 0.65)))
        owners.append(None)
        apps.append(_unit(rng.normal(size=cam.appearance_dims)))
    return boxes, scores, owners, apps


class _Views:
    """Several ceiling cameras (``CameraSpec.views``): each view's detections on the floor, with independent noise.

    Per frame and view, every person inside the view's floor rectangle not blacked out in it is
    detected unless missed (``miss_rate``) or hidden: another person within ``body_radius_m`` of
    the view's line of sight to their shoulders (three quarters of ``person_height_m``) below
    head height hides them (dropped with ``occlusion_drop``, else a low score), which happens at
    an oblique angle and not straight below the camera. Jitter grows with the angle,
    ``jitter_m * (1 + distance / height)``. False positives are ``false_positives`` per view per
    frame, uniform over its rectangle; a ghost fault is seen by every view covering it. A
    blackout hides its shopper from ``blackout_views`` of the views (drawn once per blackout).
    """

    def __init__(self, cam: CameraSpec, visits: list[Visit], seed: int) -> None:
        self.cam = cam
        vs = cam.views
        self.pos = np.array([(v.x, v.y) for v in vs], np.float64)
        self.height = np.array([v.height_m for v in vs], np.float64)
        self.rect = np.array([v.floor for v in vs], np.float64)
        self.config = MergeConfig(px_per_m=cam.px_per_m, origin_m=(0.0, -cam.outside_m))
        self.coverage = CoverageMap([np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]) for x0, y0, x1, y1 in self.rect])
        brng = random.Random(f"blackout-views:{seed}")  # its own stream: the rest of the noise does not depend on it
        self.hidden: dict[str, list[tuple[float, float, np.ndarray]]] = {}
        for v in visits:
            self.hidden[v.shopper.id] = [(a, e, np.array([brng.random() < cam.blackout_views for _ in vs], bool)) for a, e in v.blackouts]

    def detect(self, visits: list[Visit], ghosts: list[_Ghost], now: float, rng: np.random.Generator) -> tuple[list[FloorDetections], list[list[str | None]]]:
        """Return each view's floor detections of this frame and the shopper each came from (None: spurious)."""
        cam = self.cam
        nv = len(self.pos)
        here = [(v, q) for v in visits if (q := v.position(now)) is not None]
        n = len(here)
        boxes: list[list[np.ndarray]] = [[] for _ in range(nv)]
        scores: list[list[float]] = [[] for _ in range(nv)]
        owners: list[list[str | None]] = [[] for _ in range(nv)]
        apps: list[list[np.ndarray]] = [[] for _ in range(nv)]
        half = cam.box_m / 2
        if n:
            pts = np.array([q for _, q in here], np.float64)
            r = self.rect
            inside = (pts[None, :, 0] >= r[:, None, 0]) & (pts[None, :, 0] <= r[:, None, 2]) & (pts[None, :, 1] >= r[:, None, 1]) & (pts[None, :, 1] <= r[:, None, 3])
            for i, (v, _) in enumerate(here):
                for start, stop, mask in self.hidden[v.shopper.id]:
                    if start <= now < stop:
                        inside[:, i] &= ~mask
            a = pts[None, :, :] - self.pos[:, None, :]  # (V, n, 2): camera -> person, on the floor
            dist = np.hypot(a[..., 0], a[..., 1])
            occluded = np.zeros((nv, n), bool)
            if n > 1:
                aa = np.maximum((a * a).sum(-1), 1e-9)  # (V, n)
                t = np.einsum("vid,vjd->vij", a, a) / aa[:, :, None]  # where j stands along the sight line to i
                perp = np.linalg.norm(a[:, None, :, :] - t[..., None] * a[:, :, None, :], axis=-1)
                sight = 0.75 * cam.person_height_m
                z = self.height[:, None, None] - (self.height[:, None, None] - sight) * t  # the sight line's height over j
                block = (t > 0) & (t < 1) & (perp < cam.body_radius_m) & (z < cam.person_height_m)
                block[:, np.arange(n), np.arange(n)] = False
                occluded = block.any(-1)
            miss = rng.random((nv, n)) < cam.miss_rate
            drop = rng.random((nv, n)) < cam.occlusion_drop
            sc = np.where(occluded, rng.uniform(0.15, 0.45, (nv, n)), rng.uniform(0.55, 0.95, (nv, n)))
            sigma = cam.jitter_m * (1 + dist / self.height[:, None])
            jit = rng.normal(0, 1, (nv, n, 2)) * sigma[..., None]
            hs = half * (1 + rng.normal(0, 0.04, (nv, n)))
            seen = inside & ~miss & ~(occluded & drop)
            vi, pi = np.nonzero(seen)
            noise = rng.normal(0, cam.appearance_noise, (len(vi), cam.appearance_dims))
            for k, (vv, ii) in enumerate(zip(vi.tolist(), pi.tolist(), strict=True)):
                cx, cy = pts[ii] + jit[vv, ii]
                h = hs[vv, ii]
                boxes[vv].append(np.array([cx - h, cy - h, cx + h, cy + h]))
                scores[vv].append(float(sc[vv, ii]))
                owners[vv].append(here[ii][0].shopper.id)
                apps[vv].append(_unit(here[ii][0].appearance + noise[k]))
        for a0, e0, gx, gy, app in ghosts:
            if a0 <= now < e0:
                for vv in np.nonzero((gx >= self.rect[:, 0]) & (gx <= self.rect[:, 2]) & (gy >= self.rect[:, 1]) & (gy <= self.rect[:, 3]))[0].tolist():
                    boxes[vv].append(np.array([gx - half, gy - half, gx + half, gy + half]))
                    scores[vv].append(0.8)
                    owners[vv].append(None)
                    apps[vv].append(_unit(app + rng.normal(0, cam.appearance_noise, app.shape)))
        for vv, n_fp in enumerate(rng.poisson(cam.false_positives, nv).tolist()):
            x0, y0, x1, y1 = self.rect[vv]
            for _ in range(n_fp):
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                boxes[vv].append(np.array([x - half, y - half, x + half, y + half]))
                scores[vv].append(float(rng.uniform(0.3, 0.65)))
                owners[vv].append(None)
                apps[vv].append(_unit(rng.normal(size=cam.appearance_dims)))
        out = []
        for vv in range(nv):
            if scores[vv]:
                b = np.stack(boxes[vv])
                out.append(FloorDetections((b[:, :2] + b[:, 2:]) / 2, b, np.array(scores[vv]), np.stack(apps[vv])))
            else:
                out.append(FloorDetections.empty(cam.appearance_dims))
        return out, owners


def _owner(per_view: list[FloorDetections], owners: list[list[str | None]], members: tuple[tuple[int, int], ...]) -> str | None:
    """Return the shopper most of a merged detection's members came from (by score), None if spurious."""
    tally: dict[str | None, float] = {}
    for v, j in members:
        who = owners[v][j]
        tally[who] = tally.get(who, 0.0) + float(per_view[v].scores[j])
    return max(tally, key=lambda k: tally[k])
