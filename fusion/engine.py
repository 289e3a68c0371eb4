"""Sessions, attribution and carts: the fusion state machine, fed one input at a time.

``Fusion.feed(value)`` takes any of the inputs of :mod:`fusion.types`, in time order (per source;
a shelf change naturally arrives a second or so after the hand left), and returns the carts that
closed. It does no I/O, so every rule is tested by feeding values.

**Sessions.** A session opens when a track crosses the door line inward while the door contact is
open (or closed less than ``door_grace_s`` ago). People entering during the same opening of the
door share one cart (a family, a couple with one basket); a session closes when its track crosses
outward, and the cart closes ``close_delay_s`` after its last member left, so a shelf change still
settling is counted. A track that appears inside the shop without crossing the door is a lost
shopper found again (an occlusion, an id switch): it joins the open session whose track is not
visible, is reachable from where it was last seen at walking speed, and (when appearance vectors
are given) looks most alike; otherwise it is ignored (a ghost).

**Attribution.** A shelf change at ``ts`` happened about ``settle_delay_s`` earlier. Each session
scores how likely it is that its shopper's hand was at that slot then: the best, over its track
positions in a window around that moment, of a time weight times a place weight (Gaussian across
the shelf, flat within arm's reach in front of it). Scores are normalised with a "nobody" term
into probabilities; the change goes to the likeliest cart.

**Hard cases**, each with its own reason (see ``fusion.types.REASONS``): ``contested`` (another
shopper was nearly as likely), ``wrong-slot`` (a put-back whose weight matches another product in
the cart, not the slot's), ``nobody-near`` (no shopper was near; the carts of shoppers whose track
was lost nearby are flagged), ``quantity-uncertain`` (the weight is not a clear number of units).
A cart with any reason, or with a confidence below ``confidence_bar``, goes to review.

**Bad input** never makes a silent line: it is counted in ``errors`` by reason and, when it can
change a cart, named on that cart.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fusion.layout import ShopLayout, SlotSpec
from fusion.types import (
    Attribution,
    BoardLink,
    CartResult,
    DoorContact,
    DoorCrossing,
    FusionInput,
    Line,
    Reason,
    ShelfChange,
    ShelfUnsettled,
    TrackLost,
    TrackObservation,
    ZoneVisit,
)


class FusionConfig(BaseModel):
    """Tuning of fusion; each value trades review rate against the risk of a wrong receipt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reach_m: float = Field(0.9, gt=0, description="depth of a slot's zone: how far in front of the shelf a hand reaches")
    lateral_sigma_m: float = Field(0.22, gt=0, description="spread across the shelf of where a shopper stands for a slot; smaller separates neighbours better but needs accurate tracks")
    depth_sigma_m: float = Field(0.25, gt=0, description="how fast the place weight falls beyond arm's reach")
    settle_delay_s: float = Field(1.25, ge=0, description="time from the hand on the shelf to the settled shelf_change (hardware transient + stability window)")
    time_sigma_s: float = Field(0.6, gt=0, description="spread of that delay; smaller tells apart shoppers taking turns at one slot")
    window_s: float = Field(1.5, gt=0, description="look this far either side of the estimated moment of the pick")
    place_floor: float = Field(0.02, gt=0, lt=1, description="least place weight of one position in the mean: how much one moment far from the slot counts against a shopper")
    nobody_score: float = Field(0.05, gt=0, lt=1, description="score of 'nobody did it'; a change whose best score is below it is nobody's")
    attribution_bar: float = Field(0.99, gt=0.5, le=1, description="a change attributed with a (calibrated) probability below this is in doubt: 'contested' when another cart holds at least half of the doubt, else 'low-confidence'")
    quantity_bar: float = Field(0.7, ge=0, le=1, description="below this quantity confidence a change is 'quantity-uncertain'")
    confidence_bar: float = Field(0.85, ge=0, le=1, description="a cart below this confidence goes to review")
    door_grace_s: float = Field(2.0, ge=0, description="an entry this long after the door closed still counts (contact and camera clocks differ)")
    group_window_s: float = Field(4.0, ge=0, description="people entering within this long of each other, in one opening of the door, share a cart")
    require_door_contact: bool = Field(True, description="refuse entries while the door contact is closed (or never reported)")
    rejoin_speed_mps: float = Field(2.0, gt=0, description="fastest walking speed assumed when re-joining a found track to a lost session")
    rejoin_similarity: float = Field(0.5, ge=-1, le=1, description="least appearance similarity (cosine) to re-join a found track")
    rejoin_overlap_s: float = Field(0.5, ge=0, description="a found track may start this long before its lost session was last seen (a tracker re-spawning an id on the same person) and still re-join it")
    unseen_entry_s: float = Field(1.5, gt=0, description="a track walking inside this long that nobody saw come in, while no shopper is lost, is a person who entered hidden: joined to the last group's cart, for review ('entry-unseen')")
    bridge_s: float = Field(5.0, ge=0, description="a shopper unseen around a change for at most this long, seen at the slot just before and just after, is counted as there all along (0: unseen time counts at half the weight of the last place seen)")
    visible_gap_s: float = Field(0.35, gt=0, description="a session not seen for this long counts as lost (its track may come back under a new id)")
    close_delay_s: float = Field(3.0, ge=0, description="wait after the last member left before closing a cart, for late shelf changes")
    lost_exit_s: float = Field(20.0, gt=0, description="a session lost this long near the door is closed as 'exit-unseen'")
    door_near_m: float = Field(1.5, gt=0, description="how near the door 'near the door' is")
    history_s: float = Field(30.0, gt=0, description="track positions kept per track; a shelf change older than this is 'stale-change'")
    out_of_order_s: float = Field(0.5, ge=0, description="an input older than the newest seen by more than this is dropped and counted")
    weight_noise_g: float = Field(4.0, ge=0, description="noise of a settled weight change, for matching a put-back to another product")
    swap_margin: float = Field(0.35, gt=0, le=2, description="a track looking this much more like another session than its own is a suspected id swap")
    swap_checks: int = Field(3, ge=1, description="consecutive suspicious checks before a track is moved to the other session")
    lost_exclusion: float = Field(0.8, ge=0, le=1, description="how much a shopper seen standing at the slot lowers the score of a shopper lost away from it; 0 treats a lost shopper as if nobody stood there")
    refound_weight: float = Field(0.5, ge=0, le=1, description="score of a shopper unseen at the moment of a change, found again right after it where the slot is within reach, walkable from where they were lost within bridge_s: this times the place weight of where they were found (blurred 0.3 m per second after the moment), fading over 3 s, as a shopper lost just before the window scores by where they were last seen; when they were lost near the slot too, this times the lower of the two places' weights (each blurred 0.3 m per second from the moment), without fading; 0 turns it off (only a shopper at the slot on both sides of the gap is bridged)")
    calibration_slope: float = Field(1.752, gt=0, description="calibration of the attribution probability, sigmoid(calibration_slope * margin_others + calibration_nobody * margin_nobody + calibration_sparse * sparse + calibration_offset): the weight of the evidence against the other shoppers, margin_others = log(best cart's score / (other carts' scores + others_floor)); fitted on held-out scenarios by fusion.calibrate")
    calibration_slope_sparse: float | None = Field(None, gt=0, description="calibration_slope at a sparse camera (sparse >= 1: at most half the nominal frames), where a track's boxes go to the wrong shopper more often; None: calibration_slope. Fitted apart only with the reach ratios in the scores (python -m fusion.calibrate --reach)")
    calibration_nobody: float = Field(0.0, ge=0, description="see calibration_slope: the weight of the evidence against nobody, margin_nobody = log(best cart's score / nobody_score) (how well the shopper was seen at the slot at all)")
    calibration_sparse: float = Field(-1.504, le=0, description="see calibration_slope: the weight of a sparse camera, sparse = frames missed per nominal frame (frame interval / nominal_frame_s - 1, at least 0); a slow camera swaps and loses tracks, so the same evidence is worth less")
    calibration_offset: float = Field(0.851, description="see calibration_slope; the defaults are the fit on held-out seeds (docs/fusion.md, 'Calibration')")
    others_floor: float = Field(0.01, gt=0, lt=1, description="least score of 'another shopper' in margin_others: with nobody else near, a shopper's own weak evidence still bounds the probability")
    nominal_frame_s: float = Field(0.1, gt=0, description="the camera's nominal frame interval (seconds between track updates); a longer measured interval makes the attribution less sure (calibration_sparse)")
    appearance_alpha: float = Field(0.3, gt=0, le=1, description="weight of a new appearance vector in a track's running average")
    reach_window_s: float = Field(1.0, gt=0, description="look for a shopper's box over the slot this far either side of the estimated moment of the pick")
    reach_overlap_m: float = Field(0.1, ge=0, description="a box reaches into a slot when its part behind the shelf's front edge overlaps the slot's width by at least this much")
    reach_seen_frames: int = Field(2, ge=1, description="boxes of a session in the reach window needed to say it did not reach (fewer: 'unseen', no evidence either way)")
    reach_lr_reached: float = Field(1.0, gt=0, description="factor on a session's score when its box reached into the slot around the change: P(reach seen | the picker) / P(reach seen | another shopper near), at the camera's nominal rate; measured on held-out scenarios by fusion.calibrate (9.31 there); 1 (the default) ignores reach: with the ratios in, the review rate went up, not down (docs/fusion.md, 'Reach')")
    reach_lr_not_reached: float = Field(1.0, gt=0, description="factor on a session's score when its box was seen around the change but never over the slot: P(no reach | the picker) / P(no reach | another shopper near), at the nominal rate; 1 ignores it")
    reach_lr_unseen: float = Field(1.0, gt=0, description="factor on a session's score when fewer than reach_seen_frames of its boxes were seen around the change (lost, occluded): P(unseen | the picker) / P(unseen | another shopper near), at the nominal rate")
    reach_lr_unseen_sparse: float = Field(1.0, gt=0, description="reach_lr_unseen for a sparse camera (sparse >= 1)")
    reach_lr_reached_sparse: float = Field(1.0, gt=0, description="reach_lr_reached for a sparse camera (sparse >= 1: at most half the nominal frames), whose boxes go to the wrong track more often")
    reach_lr_not_reached_sparse: float = Field(1.0, gt=0, description="reach_lr_not_reached for a sparse camera (sparse >= 1)")


# Re-fit 2026-11-30 after the tracker round "slow-camera" (vision/tracker.py with frame_s, main at
# 048f08c): python -m fusion.calibrate --cameras grid --split, the MIX on seeds 1000-1029 (896
# changes, 3 wrong, all at 3 fps); kept on the carts of seeds 0-39 and 2000-2029 (docs/benchmarks.md,
# "Calibration re-fit after the tracker round"). Previous fit (old tracker): 2.2919, 1.3062, 0, -0.8244, 0.6458.
CALIBRATION_GRID: dict[str, float] = {"calibration_slope": 2.1776, "calibration_slope_sparse": 1.3211, "calibration_nobody": 0.1691, "calibration_sparse": -0.9233, "calibration_offset": 0.364}
"""The calibration fitted for a shop with a ceiling camera per square metre, their detections merged
on the floor (``python -m fusion.calibrate --cameras grid --split``, seeds 1000 and up, a slope of
its own at a sparse camera; docs/fusion.md, 'Calibration'): the ``FusionConfig`` keys to set in such
a shop. The defaults are the one-camera fit."""


@dataclass
class _Track:
    id: int
    hist: deque[tuple[float, float, float]]
    first_ts: float
    last_ts: float
    x: float
    y: float
    session: str | None = None
    app: np.ndarray | None = None
    obs: int = 0
    continuity_checked: bool = False
    mismatch: int = 0
    ended: bool = False
    # Appearance of each recent observation, to find when a tracker id swap happened.
    apps: deque[tuple[float, np.ndarray]] = field(default_factory=lambda: deque(maxlen=80))
    # Earlier owners after an id swap: positions before ``until`` (and after the previous entry's) were that session's.
    segments: list[tuple[float, str]] = field(default_factory=list)
    # Detection boxes on the floor (ts, x_min, y_min, x_max, y_max), when the camera sends them: reach evidence.
    boxes: deque[tuple[float, float, float, float, float]] = field(default_factory=deque)

    def owner(self, ts: float) -> str | None:
        """Return the session whose shopper this track followed at ``ts``."""
        for until, sid in self.segments:
            if ts < until:
                return sid
        return self.session


@dataclass
class _Session:
    id: str
    cart: str
    opened_at: float
    tracks: list[int]
    last_ts: float
    x: float
    y: float
    closed_at: float | None = None
    proto: np.ndarray | None = None
    proto_n: int = 0


@dataclass(frozen=True)
class _Change:
    """A shelf change given to a cart, kept so the cart can be rebuilt when it is re-attributed."""

    ch: ShelfChange
    spec: SlotSpec
    probability: float
    candidates: tuple[tuple[str, float, float], ...]
    reasons: tuple[Reason, ...]  # from the attribution itself (contested, planogram-mismatch)
    margin: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # (margin, margin_others, margin_nobody, sparse) of Attribution
    reach: tuple[tuple[str, str, float], ...] = ()  # (session, reach evidence, nearest distance m) of Attribution


@dataclass
class _Cart:
    id: str
    door_opening: int
    opened_at: float
    sessions: list[str] = field(default_factory=list)
    changes: list[_Change] = field(default_factory=list)
    holdings: Counter[str] = field(default_factory=Counter)
    evidence: dict[str, list[str]] = field(default_factory=dict)
    line_conf: dict[str, float] = field(default_factory=dict)
    confidence: float = 1.0
    flags: list[Reason] = field(default_factory=list)  # from outside the changes: board offline, exit unseen...
    derived: list[Reason] = field(default_factory=list)  # from the changes, rebuilt with them
    contests: dict[str, tuple[float, Reason]] = field(default_factory=dict)  # change id -> (its ts, 'contested'): a change given to another cart may be this one's
    attributions: list[Attribution] = field(default_factory=list)
    closing_at: float | None = None

    def flag(self, code: str, detail: str) -> None:
        r = Reason(code, detail)
        if r not in self.flags:
            self.flags.append(r)

    @property
    def reasons(self) -> list[Reason]:
        out = list(self.flags)
        out += [r for r in self.derived if r not in out]
        out += [r for _, r in self.contests.values() if r not in out]
        return out


def _unit(v: tuple[float, ...] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else a


class Fusion:
    """One shop's fusion state: feed inputs in time order, collect closed carts."""

    def __init__(self, layout: ShopLayout, config: FusionConfig | None = None) -> None:
        self.layout = layout
        self.config = config or FusionConfig()
        self.errors: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.orphans: list[Attribution] = []
        self.now = -math.inf
        self._tracks: dict[int, _Track] = {}
        self._sessions: dict[str, _Session] = {}
        self._carts: dict[str, _Cart] = {}
        self._door_open = False
        self._door_known = False
        self._door_closed_at = -math.inf
        self._door_opened_at = -math.inf
        self._door_opening = 0
        self._offline: dict[str, float] = {}
        self._pending: list[tuple[ShelfChange, SlotSpec]] = []  # orphans that an id swap may still explain
        self._unowned_near: dict[int, str] = {}  # track on no session near a change that went to nobody -> why its cart is in doubt
        self._n_sessions = 0
        self._n_carts = 0
        self._frame_gaps: deque[float] = deque(maxlen=50)  # recent times between camera frames (track updates)
        self._last_frame_ts = -math.inf
        self._shelves = set(layout.shelves())
        self._geom = {s.slot: self._slot_geometry(s) for s in layout.slots}

    # -- public API --------------------------------------------------------------------------
    def feed(self, item: FusionInput) -> list[CartResult]:
        """Take one input; return the carts it (or the time it carries) closed."""
        if not isinstance(item, TrackObservation | ShelfChange | DoorCrossing | TrackLost | DoorContact | BoardLink | ShelfUnsettled | ZoneVisit):
            raise TypeError(f"Fusion.feed: {type(item).__name__} is not a fusion input")
        ts = item.ts
        if isinstance(item, TrackObservation):
            self._observe(item)
        elif isinstance(item, ShelfChange):
            self._shelf_change(item)
        elif isinstance(item, DoorCrossing):
            self._crossing(item)
        elif isinstance(item, TrackLost):
            t = self._tracks.get(item.track_id)
            if t is not None:
                t.ended = True
        elif isinstance(item, DoorContact):
            self._door(item)
        elif isinstance(item, BoardLink):
            self._board_link(item)
        elif isinstance(item, ShelfUnsettled):
            self._unsettled(item)
        elif item.zone not in self._shelves:  # a ZoneVisit: the vision zones and the layout must agree
            self.errors["unknown-zone"] += 1
        return self.advance(ts)

    def advance(self, now: float) -> list[CartResult]:
        """Move the clock to ``now``: close lost-at-the-door sessions and carts whose delay ran out."""
        if now > self.now:
            self.now = now
        now = self.now
        cfg = self.config
        door = self.layout.door.midpoint()
        for s in list(self._sessions.values()):
            if s.closed_at is None and now - s.last_ts > cfg.lost_exit_s and math.dist((s.x, s.y), door) <= cfg.door_near_m:
                self._carts[s.cart].flag("exit-unseen", f"session {s.id} lost near the door at {s.last_ts:.1f}s")
                self._close_session(s, s.last_ts)
        done = [c for c in self._carts.values() if c.closing_at is not None and c.closing_at <= now]
        return [self._finalize(c) for c in sorted(done, key=lambda c: c.closing_at or 0.0)]

    def finish(self, now: float | None = None) -> list[CartResult]:
        """End of the run: close every open session ('never-left') and every cart."""
        end = self.now if now is None else max(now, self.now)
        out = self.advance(end)
        door = self.layout.door.midpoint()
        for s in list(self._sessions.values()):
            if s.closed_at is None:
                if end - s.last_ts > self.config.visible_gap_s and math.dist((s.x, s.y), door) <= self.config.door_near_m:
                    self._carts[s.cart].flag("exit-unseen", f"session {s.id} lost near the door at {s.last_ts:.1f}s")
                else:
                    self._carts[s.cart].flag("never-left", f"session {s.id} was still inside at {end:.1f}s")
                self._close_session(s, end)
        for c in list(self._carts.values()):
            c.closing_at = end
        return out + [self._finalize(c) for c in list(self._carts.values())]

    def open_sessions(self) -> list[str]:
        """Return the ids of sessions whose shopper is inside."""
        return [s.id for s in self._sessions.values() if s.closed_at is None]

    def session_of(self, track_id: int) -> str | None:
        """Return the session a track belongs to, if any."""
        t = self._tracks.get(track_id)
        return t.session if t else None

    def cart_of(self, session_id: str) -> str | None:
        """Return the cart a session shops for."""
        s = self._sessions.get(session_id)
        return s.cart if s else None

    # -- tracks and sessions -----------------------------------------------------------------
    def _observe(self, o: TrackObservation) -> None:
        cfg = self.config
        if o.ts < self.now - cfg.out_of_order_s:
            self.errors["out-of-order"] += 1
            return
        self._frame(o.ts)
        t = self._tracks.get(o.track_id)
        if t is None:
            t = _Track(o.track_id, deque(), o.ts, o.ts, o.x, o.y)
            self._tracks[o.track_id] = t
        elif o.ts < t.last_ts:
            self.errors["out-of-order"] += 1
            return
        t.hist.append((o.ts, o.x, o.y))
        while t.hist and t.hist[0][0] < o.ts - cfg.history_s:
            t.hist.popleft()
        t.last_ts, t.x, t.y = o.ts, o.x, o.y
        if o.box is not None:
            t.boxes.append((o.ts, *o.box))
            while t.boxes[0][0] < o.ts - cfg.history_s:
                t.boxes.popleft()
        t.obs += 1
        if o.appearance is not None:
            a = _unit(o.appearance)
            t.apps.append((o.ts, a))
            t.app = a if t.app is None else _unit((1 - cfg.appearance_alpha) * t.app + cfg.appearance_alpha * a)
        if t.session is None:
            if t.obs <= 3 or t.obs % 5 == 0:
                self._try_rejoin(t)
            if t.session is None and t.obs == 2:
                self._entry_by_continuity(t)
            if t.session is None and not t.continuity_checked and t.last_ts - t.first_ts >= 0.4:
                t.continuity_checked = True  # judged once, when the track has moved long enough to show its heading
                self._exit_by_continuity(t)
            if t.session is None and t.obs % 5 == 0 and t.last_ts - t.first_ts >= cfg.unseen_entry_s:
                self._entry_unseen(t)
            return
        s = self._sessions[t.session]
        if s.closed_at is None:
            s.last_ts, s.x, s.y = o.ts, o.x, o.y
            if o.appearance is not None and s.proto_n < 15:
                a = _unit(o.appearance)
                s.proto = a if s.proto is None else s.proto + a
                s.proto_n += 1
            if t.app is not None and t.obs % 5 == 0:
                self._check_swap(t, s)
        self._tracks_gc(o.ts)

    def _frame(self, ts: float) -> None:
        """Follow the camera's frame interval: every observation of one frame carries the frame's time."""
        gap = ts - self._last_frame_ts
        if gap <= 0:
            return
        self._last_frame_ts = ts
        if gap > 2.0:  # nobody in view for a while (an empty shop), not a slow camera
            return
        self._frame_gaps.append(gap)

    def frame_interval(self) -> float | None:
        """Return the camera's frame interval: a low quantile of the recent gaps between frames.

        Fusion only sees frames with somebody in them, so a shopper occluded for a while leaves
        longer gaps; the low quantile follows the camera, not the occlusions (which come in bursts).
        """
        if len(self._frame_gaps) < 5:
            return None
        gaps = sorted(self._frame_gaps)
        return gaps[len(gaps) // 5]

    def sparse(self) -> float:
        """Return the frames the camera misses per nominal frame now (0 at its nominal rate or faster)."""
        frame = self.frame_interval()
        if frame is None:
            return 0.0
        return max(0.0, frame / self.config.nominal_frame_s - 1.0)

    def _tracks_gc(self, now: float) -> None:
        if len(self._tracks) < 64:
            return
        for tid in [tid for tid, t in self._tracks.items() if t.ended and t.last_ts < now - self.config.history_s]:
            if self._tracks[tid].session is None:
                self._unowned_near.pop(tid, None)  # never joined a session: no cart to flag
            del self._tracks[tid]

    def _sim(self, a: np.ndarray | None, b: np.ndarray | None) -> float | None:
        if a is None or b is None:
            return None
        return float(np.dot(a, _unit(b)))

    def _try_rejoin(self, t: _Track) -> None:
        """Join a track found inside (no door crossing) to the lost session it most likely is."""
        if not self.layout.door.is_inside((t.x, t.y)) or not self.layout.door.is_inside((t.hist[0][1], t.hist[0][2])):
            return  # a track first seen on the street is someone coming in, not a shopper lost inside
        cfg = self.config
        best: tuple[float, _Session] | None = None
        for s in self._sessions.values():
            if s.closed_at is not None or s.last_ts - t.first_ts > cfg.rejoin_overlap_s or t.last_ts - s.last_ts < cfg.visible_gap_s:
                # Left, or seen at the same time as this track (more than the frame or two a tracker
                # takes to give up an id it has just re-spawned), or not lost at all: not the same person.
                continue
            gap = max(0.0, t.first_ts - s.last_ts)
            # 1.5 m of slack: a track the tracker is about to give up coasts on its prediction, away from the shopper.
            if math.dist((s.x, s.y), (t.hist[0][1], t.hist[0][2])) > cfg.rejoin_speed_mps * gap + 1.5:
                continue
            sim = self._sim(t.app, s.proto)
            if sim is not None and sim < cfg.rejoin_similarity:
                continue
            score = sim if sim is not None else -math.dist((s.x, s.y), (t.x, t.y))
            if best is None or score > best[0]:
                best = (score, s)
        if best is not None:
            s = best[1]
            lost_at = s.last_ts
            t.session = s.id
            s.tracks.append(t.id)
            s.last_ts, s.x, s.y = t.last_ts, t.x, t.y
            self.stats["rejoined"] += 1
            # Changes attributed while the shopper was lost were judged without where they turned up
            # again: seen at the slot before and after, they stood there all along (bridge_s).
            if t.first_ts - lost_at <= cfg.bridge_s:
                self._reattribute(lost_at - cfg.window_s)

    def _entry_by_continuity(self, t: _Track) -> None:
        """Open a session for a new track just inside the open door that is nobody lost.

        Someone occluded by the person in front of them crosses the door unseen and is first
        tracked a step inside; with the door open and no lost shopper to re-join, they came in.
        """
        cfg = self.config
        door = self.layout.door
        if not door.is_inside((t.x, t.y)) or not self._door_known or not self._door_allows_entry(t.first_ts):
            return
        # As far in as someone could have walked since the door opened (at most 4 m).
        reach = min(4.0, cfg.door_near_m + 0.5 + 1.2 * max(0.0, t.first_ts - self._door_opened_at))
        if math.dist((t.x, t.y), door.midpoint()) > reach:
            return
        self.stats["entries_by_continuity"] += 1
        self._enter(t, t.first_ts)

    def _entry_unseen(self, t: _Track) -> None:
        """Join a person walking inside whom nobody saw come in to the cart of the last people in; review every cart inside.

        Someone who entered hidden behind the person in front (a family walking in close together)
        may first be tracked deep inside, after the door closed. With every shopper inside in view
        (nobody lost whom the track could be), the track is a person, not a lost shopper: their
        picks must not be nobody's. They join the last group's cart, and every cart inside then goes to
        review ('entry-unseen'): the person came in with one of them. A track that does not move (a ghost, a
        poster) or is first seen outside is not joined.
        """
        cfg = self.config
        door = self.layout.door
        if not door.is_inside((t.x, t.y)) or not door.is_inside((t.hist[0][1], t.hist[0][2])):
            return
        xs, ys = [h[1] for h in t.hist], [h[2] for h in t.hist]
        if max(max(xs) - min(xs), max(ys) - min(ys)) < 0.5:
            return
        open_sessions = [s for s in self._sessions.values() if s.closed_at is None]
        if any(t.last_ts - s.last_ts >= cfg.visible_gap_s for s in open_sessions):
            return  # a shopper is lost: the track may be them (re-joining decides)
        latest = max((s for s in open_sessions if s.opened_at <= t.first_ts), key=lambda s: s.opened_at, default=None)
        if latest is None:
            return
        cart = self._carts[latest.cart]
        self._n_sessions += 1
        sid = f"s{self._n_sessions}"
        cart.sessions.append(sid)
        sess = _Session(sid, cart.id, t.first_ts, [t.id], t.last_ts, t.x, t.y)
        if t.app is not None:
            sess.proto, sess.proto_n = t.app.copy(), 1
        self._sessions[sid] = sess
        t.session = sid
        self._inherit_unowned(t, cart)
        # They came in with one of the groups inside: each of those carts may lack what they take.
        for c in {self._sessions[s.id].cart for s in open_sessions if s.opened_at <= t.first_ts}:
            self._carts[c].flag("entry-unseen", f"track {t.id} found walking inside at {t.first_ts:.1f}s without being seen coming in; joined to {latest.id}'s cart")
        self.stats["entries_unseen"] += 1
        self._reattribute(t.first_ts - cfg.window_s)

    def _exit_by_continuity(self, t: _Track) -> None:
        """Close a session lost at the door when a track that looks like it appears just outside.

        At low frame rates the tracker can lose a shopper on the door line and start a new id on
        the street, so no crossing is ever reported; the new track's place and looks show the
        shopper left.
        """
        cfg = self.config
        door = self.layout.door
        if door.is_inside((t.x, t.y)) or math.dist((t.x, t.y), door.midpoint()) > cfg.door_near_m + 1.0:
            return
        # Someone leaving walks away from the door; a track walking towards it is someone coming in.
        if math.dist((t.x, t.y), door.midpoint()) - math.dist((t.hist[0][1], t.hist[0][2]), door.midpoint()) < 0.1:
            return
        for s in self._sessions.values():
            gap = t.first_ts - s.last_ts
            if s.closed_at is not None or not cfg.visible_gap_s <= gap <= 4.0 or math.dist((s.x, s.y), door.midpoint()) > cfg.door_near_m:
                continue
            sim = self._sim(t.app, s.proto)
            if sim is not None and sim < cfg.rejoin_similarity:
                continue
            if sim is None:
                self._carts[s.cart].flag("exit-unseen", f"session {s.id} lost at the door, an unknown track {t.id} appeared outside")
            s.tracks.append(t.id)
            t.session = s.id
            self.stats["exits_by_continuity"] += 1
            self._close_session(s, t.first_ts)
            return

    def _check_swap(self, t: _Track, s: _Session) -> None:
        """Move a track to another open session when it keeps looking like that shopper instead."""
        cfg = self.config
        own = self._sim(t.app, s.proto)
        if own is None or s.proto_n < 5:
            return
        best: tuple[float, _Session] | None = None
        for o in self._sessions.values():
            if o is s or o.closed_at is not None or o.proto_n < 5:
                continue
            sim = self._sim(t.app, o.proto)
            if sim is not None and (best is None or sim > best[0]):
                best = (sim, o)
        if best is None or best[0] - own < cfg.swap_margin:
            t.mismatch = 0
            return
        t.mismatch += 1
        if t.mismatch < cfg.swap_checks:
            return
        other = best[1]
        split = self._swap_moment(t, s, other)
        s.tracks.remove(t.id)
        other.tracks.append(t.id)
        # Positions before the swap stay the old session's: its shopper was there, and its picks stay its own.
        t.segments.append((split, s.id))
        t.session, t.mismatch = other.id, 0
        other.last_ts, other.x, other.y = t.last_ts, t.x, t.y
        before = [h for h in t.hist if h[0] < split]
        if before and s.last_ts >= split:
            s.last_ts, s.x, s.y = before[-1]  # where the old session's shopper was last seen: lost from there
        self.stats["swaps"] += 1
        self._reattribute(split - self.config.window_s)

    def _swap_moment(self, t: _Track, s: _Session, other: _Session) -> float:
        """Return when the tracker swapped: the split of the track's recent looks that best separates the two shoppers.

        After the split the observations look like ``other`` rather than ``s``; the running average
        the check uses lags the swap by several frames, so the moment is found on the raw looks.
        """
        if not t.apps or s.proto is None or other.proto is None:
            return t.last_ts
        ps, po = _unit(s.proto), _unit(other.proto)
        d = [float(np.dot(a, po) - np.dot(a, ps)) for _, a in t.apps]
        best_k, best, run = len(d) - 1, -math.inf, 0.0
        for k in range(len(d) - 1, -1, -1):  # maximise the evidence for 'other' after k
            run += d[k]
            if run > best:
                best_k, best = k, run
        return t.apps[best_k][0]

    def _door(self, d: DoorContact) -> None:
        self._door_known = True
        if d.open and not self._door_open:
            self._door_opening += 1
            self._door_opened_at = d.ts
        elif not d.open and self._door_open:
            self._door_closed_at = d.ts
        self._door_open = d.open

    def _door_allows_entry(self, ts: float) -> bool:
        if not self.config.require_door_contact:
            return True
        return self._door_open or ts - self._door_closed_at <= self.config.door_grace_s

    def _crossing(self, c: DoorCrossing) -> None:
        t = self._tracks.get(c.track_id)
        if t is None:
            self.errors["crossing-unknown-track"] += 1
            return
        if c.direction == "in":
            self._enter(t, c.ts)
        else:
            self._exit(t, c.ts)

    def _enter(self, t: _Track, ts: float) -> None:
        if t.session is not None:
            s = self._sessions[t.session]
            sim = self._sim(t.app, s.proto)
            if s.closed_at is not None and sim is not None and sim < self.config.rejoin_similarity:
                # Out, and back in looking like someone else: the tracker carried the id from a shopper
                # leaving to one coming in at the door. Its positions up to the exit stay the leaver's.
                t.segments.append((s.closed_at, s.id))
                if t.id in s.tracks:
                    s.tracks.remove(t.id)
                t.session = None
                self.stats["door_handovers"] += 1
            elif s.closed_at is not None and self._carts.get(s.cart) is not None and s.closed_at >= ts - self.config.close_delay_s:
                s.closed_at = None  # stepped out and straight back in (jitter on the line): same visit
                self._carts[s.cart].closing_at = None
                return
            elif s.closed_at is None:
                return
        if not self._door_allows_entry(ts):
            self.errors["entry-door-closed"] += 1
            return
        self._n_sessions += 1
        sid = f"s{self._n_sessions}"
        cart = next(
            (c for c in self._carts.values() if c.door_opening == self._door_opening and c.closing_at is None and self._door_allows_entry(ts) and ts - c.opened_at <= self.config.group_window_s),
            None,
        )
        if cart is None:
            self._n_carts += 1
            cart = _Cart(f"{self.layout.name}-c{self._n_carts}", self._door_opening, ts)
            self._carts[cart.id] = cart
        cart.sessions.append(sid)
        self._sessions[sid] = _Session(sid, cart.id, ts, [t.id], ts, t.x, t.y)
        if t.app is not None:
            self._sessions[sid].proto, self._sessions[sid].proto_n = t.app.copy(), 1
        t.session = sid
        self.stats["sessions"] += 1
        self._inherit_unowned(t, cart)

    def _inherit_unowned(self, t: _Track, cart: _Cart) -> None:
        """Flag a new session's cart when it may be a person who was inside on no session near a change that went to nobody.

        That person's track ended (or was last seen) before this one started, and could have walked
        from where it was last seen to where this one starts (as a re-join would need): a shopper
        whose entry the camera missed, given a session only later (at worst, on the way out).
        """
        cfg = self.config
        if not self._unowned_near or not self.layout.door.is_inside((t.hist[0][1], t.hist[0][2])):
            return  # first seen on the street: someone coming in, not a person who was inside
        for tid, why in list(self._unowned_near.items()):
            u = self._tracks.get(tid)
            if u is None or u.session is not None or u is t or not u.hist:
                continue
            gap = t.first_ts - u.last_ts
            if gap < -cfg.rejoin_overlap_s or gap > cfg.history_s:
                continue
            if math.dist((u.x, u.y), (t.hist[0][1], t.hist[0][2])) <= cfg.rejoin_speed_mps * max(gap, 0.0) + 1.5:
                cart.flag("nobody-near", why)

    def _exit(self, t: _Track, ts: float) -> None:
        if t.session is None:
            self._try_rejoin_at_exit(t)
        if t.session is None:
            self.errors["exit-unknown-track"] += 1
            return
        s = self._sessions[t.session]
        if s.closed_at is None:
            self._close_session(s, ts)

    def _try_rejoin_at_exit(self, t: _Track) -> None:
        """An unknown track leaving is most likely a lost shopper: join the lost session it looks like."""
        cfg = self.config
        cands = [s for s in self._sessions.values() if s.closed_at is None and s.last_ts < t.first_ts]
        scored = [(self._sim(t.app, s.proto), s) for s in cands]
        ok = [(sim, s) for sim, s in scored if sim is not None and sim >= cfg.rejoin_similarity]
        if ok:
            s = max(ok, key=lambda p: p[0])[1]
        elif len(cands) == 1 and scored[0][0] is None:
            s = cands[0]
        else:
            return
        t.session = s.id
        s.tracks.append(t.id)
        self.stats["rejoined"] += 1

    def _close_session(self, s: _Session, ts: float) -> None:
        s.closed_at = ts
        cart = self._carts[s.cart]
        if all(self._sessions[m].closed_at is not None for m in cart.sessions):
            cart.closing_at = ts + self.config.close_delay_s

    # -- attribution -------------------------------------------------------------------------
    @staticmethod
    def _slot_geometry(s: SlotSpec) -> tuple[float, float, float, float, float]:
        nx, ny = s.unit_facing()
        return (s.front[0], s.front[1], nx, ny, s.width_m)

    def _place_weight(self, slot: str, x: float, y: float, extra_m: float = 0.0) -> tuple[float, float]:
        """Return (weight 0..1, distance m) of a position for a slot: across the shelf, and within reach."""
        fx, fy, nx, ny, _ = self._geom[slot]
        dx, dy = x - fx, y - fy
        depth = dx * nx + dy * ny
        lat = -dx * ny + dy * nx
        cfg = self.config
        sl = cfg.lateral_sigma_m + extra_m
        over = max(0.0, depth - cfg.reach_m, -depth)
        sd = cfg.depth_sigma_m + extra_m
        w = math.exp(-(lat * lat) / (2 * sl * sl) - (over * over) / (2 * sd * sd))
        return w, math.hypot(dx, dy)

    def _open_at(self, s: _Session, ts: float) -> bool:
        return s.opened_at <= ts + 1.0 and (s.closed_at is None or s.closed_at >= ts - 1.0) and s.cart in self._carts

    def _scores(self, slot: str, t_act: float) -> dict[str, tuple[float, float, bool]]:
        """Return session -> (score, nearest distance, seen in the window) for a change at t_act.

        The score is the time-weighted *geometric* mean of the place weight over the session's
        positions around t_act, times the share of that time the session was seen. A hand on the
        shelf means standing there for a while: someone walking past scores low for the moments
        they were away, and someone who only arrives after the change scores low for not being
        seen when it happened.
        """
        cfg = self.config
        lo, hi = t_act - cfg.window_s, t_act + cfg.window_s
        full = cfg.time_sigma_s * math.sqrt(2 * math.pi) * math.erf(cfg.window_s / cfg.time_sigma_s / math.sqrt(2))
        acc: dict[str, list[float]] = {}  # session -> [sum w*log L, sum w, sum w*dt, nearest, best place weight up to t_act (-1: none)]
        for t in self._tracks.values():
            if (t.session is None and not t.segments) or t.last_ts < lo or not t.hist or t.hist[0][0] > hi:
                continue
            prev = None
            owner: str | None = None
            a = [0.0, 0.0, 0.0, math.inf, -1.0]
            for ts, x, y in reversed(t.hist):
                if ts > hi:
                    continue
                if ts < lo:
                    break
                o = t.owner(ts)
                if o != owner:  # the track followed another shopper before an id swap
                    owner, prev = o, None
                    if o is None or o not in self._sessions:
                        continue
                    a = acc.setdefault(o, [0.0, 0.0, 0.0, math.inf, -1.0])
                if owner is None or owner not in self._sessions:
                    continue
                w, d = self._place_weight(slot, x, y)
                z = (ts - t_act) / cfg.time_sigma_s
                wt = math.exp(-0.5 * z * z)
                dt = min(0.5, prev - ts) if prev is not None else 0.1
                prev = ts
                a[0] += wt * math.log(max(w, cfg.place_floor))
                a[1] += wt
                a[2] += wt * dt
                a[3] = min(a[3], d)
                if ts <= t_act:
                    a[4] = max(a[4], w)
        out: dict[str, tuple[float, float, bool]] = {}
        parts: dict[str, tuple[float, float, float, float, float]] = {}  # sid -> (seen, coverage, unseen, near, pre)
        for sid, (wlog, wsum, wdt, near, pre) in acc.items():
            if wsum <= 1e-9 or near > cfg.reach_m + 1.0:
                continue  # never within a step of the slot's zone: not a candidate at all
            coverage = min(1.0, wdt / full)
            # Time not seen (an occlusion at the shelf) counts at half the weight of where it was last
            # seen by the time the change was reported (not later: a change judged again after a
            # re-join must be judged on the same past).
            unseen = 0.0
            if coverage < 1.0:
                last = self._seen_before(sid, t_act + cfg.settle_delay_s)
                if last is not None:
                    unseen = 0.5 * self._place_weight(slot, last[1], last[2], extra_m=0.2)[0]
                # Seen at the slot just before the moment and again just after (a lost track re-joined):
                # a person does not jump, so the time unseen in between was spent there too.
                bridged = self._bridge(sid, slot, t_act)
                if bridged is not None:
                    unseen = max(unseen, bridged)
            if pre < 0.0:
                # Not seen in the window before the moment: where they were last seen before it (however
                # long ago) says whether they were at the slot, so that someone standing there all along
                # still takes the place (below) from a shopper lost elsewhere and found after the change.
                before = self._seen_before(sid, t_act)
                if before is not None:
                    pre = self._place_weight(slot, before[1], before[2])[0]
            # Squared: one moment in front of the slot while walking past must not look like standing there.
            seen = math.exp(2.0 * wlog / wsum)
            parts[sid] = (seen, coverage, unseen, near, pre)
        for sid, (seen, coverage, unseen, near, pre) in parts.items():
            # Unseen time is doubtful when someone else stood at the slot all along and this shopper was
            # not at it before the moment (walking up, or lost elsewhere): the place was taken.
            other = max((p[0] for o, p in parts.items() if o != sid and p[1] > 0.5), default=0.0)
            if pre >= 0.0:
                unseen *= pre + (1.0 - pre) * (1.0 - cfg.lost_exclusion * other)
            out[sid] = (seen * coverage + unseen * (1.0 - coverage), near, coverage > 0.5)
        # Someone seen standing at the slot all through the window leaves little room for a
        # shopper lost elsewhere: the slot's place is taken (the lost one could only reach past them).
        standing_sid = max((sid for sid, v in out.items() if v[2]), key=lambda sid: out[sid][0], default=None)
        standing = out[standing_sid][0] if standing_sid is not None else 0.0
        for s in self._sessions.values():
            if s.id in out or not self._open_at(s, t_act):
                continue
            # Lost before the window: judge by where it was last seen, blurred by how long ago. (Its
            # own positions, not the session's latest: it may have been found again since.)
            last = self._seen_before(s.id, lo)
            if last is None:
                continue
            gap = t_act - last[0]
            if gap > 10.0:
                continue
            w, d = self._place_weight(slot, last[1], last[2], extra_m=min(1.0, 0.3 * gap))
            # Lost right at the slot keeps its full weight (it may be the one standing there, under another id).
            at_slot = self._place_weight(slot, last[1], last[2])[0]
            if standing_sid is not None and self._other_person(standing_sid, last, hi):
                at_slot = 0.0  # not under another id: the one standing there was someone else, seen all the while
            room = at_slot + (1.0 - at_slot) * (1.0 - cfg.lost_exclusion * standing)
            score = 0.5 * w * math.exp(-gap / 3.0)
            bridged = self._bridge(s.id, slot, t_act)
            if bridged is not None:  # found again at the slot: it stood there all along
                score = max(score, bridged)
            out[s.id] = (score * room, d, False)
        return out

    def _other_person(self, sid: str, lost: tuple[float, float, float], until: float) -> bool:
        """Return True when session ``sid`` cannot be a shopper lost at ``lost`` (ts, x, y) under another id.

        It was seen elsewhere (at least 0.5 m away) when the lost one was last seen, and all the time
        since then, up to ``until`` (or now): two people, whatever ids the tracker gave them later.
        """
        ts, x, y = lost
        near = [h for t in self._tracks.values() for h in t.hist if abs(h[0] - ts) <= 0.3 and t.owner(h[0]) == sid]
        if not near:
            return False
        _, ox, oy = min(near, key=lambda h: abs(h[0] - ts))
        return math.dist((ox, oy), (x, y)) >= 0.5 and self._watched(sid, ts, until)

    def _seen_before(self, sid: str, until: float) -> tuple[float, float, float] | None:
        """Return the last position (ts, x, y) of a session seen at or before ``until``, on any of its tracks."""
        best: tuple[float, float, float] | None = None
        for t in self._tracks.values():
            if not t.hist or t.hist[0][0] > until or (t.session != sid and not any(o == sid for _, o in t.segments)):
                continue
            if best is not None and t.last_ts <= best[0]:
                continue
            for h in reversed(t.hist):
                if h[0] <= until and t.owner(h[0]) == sid:
                    if best is None or h[0] > best[0]:
                        best = h
                    break
        return best

    def _box_in_slot(self, slot: str, box: tuple[float, float, float, float]) -> bool:
        """Return True when a box reaches into a slot: its part behind the front edge overlaps the slot's width."""
        fx, fy, nx, ny, width = self._geom[slot]
        x1, y1, x2, y2 = box
        depths, lats = [], []
        for x, y in ((x1, y1), (x1, y2), (x2, y1), (x2, y2)):
            dx, dy = x - fx, y - fy
            depths.append(dx * nx + dy * ny)
            lats.append(-dx * ny + dy * nx)
        if min(depths) > 0.0:
            return False  # all of it in the aisle
        overlap = min(max(lats), width / 2) - max(min(lats), -width / 2)
        return overlap >= self.config.reach_overlap_m

    def _reach(self, sid: str, slot: str, t_act: float) -> str:
        """Return 'reached', 'not-reached' or 'unseen': a session's boxes over the slot around t_act."""
        cfg = self.config
        lo, hi = t_act - cfg.reach_window_s, t_act + cfg.reach_window_s
        seen = 0
        for t in self._tracks.values():
            if not t.boxes or t.boxes[0][0] > hi or t.boxes[-1][0] < lo or (t.session != sid and not any(o == sid for _, o in t.segments)):
                continue
            for ts, x1, y1, x2, y2 in t.boxes:
                if ts < lo or ts > hi or t.owner(ts) != sid:
                    continue
                if self._box_in_slot(slot, (x1, y1, x2, y2)):
                    return "reached"
                seen += 1
        return "not-reached" if seen >= cfg.reach_seen_frames else "unseen"

    def _bridge(self, sid: str, slot: str, t_act: float) -> float | None:
        """Return the place weight of a session's unseen stretch around t_act, when it was seen at the slot on both sides.

        The last position before t_act and the first after it (on any of the session's tracks)
        must be within ``bridge_s`` of each other in time; the weight is the lower of the two. A
        shopper lost and found again (``refound_weight``): at least that times the found place's
        weight, blurred and fading with the time after the moment, or times the lower of the lost
        and the found places' weights, each blurred with its time from the moment, not fading.
        """
        cfg = self.config
        before: tuple[float, float, float] | None = None
        after: tuple[float, float, float] | None = None
        for t in self._tracks.values():
            if not t.hist or t.last_ts < t_act - cfg.bridge_s or t.hist[0][0] > t_act + cfg.bridge_s:
                continue
            for h in t.hist:
                ts = h[0]
                if ts < t_act - cfg.bridge_s or ts > t_act + cfg.bridge_s or t.owner(ts) != sid:
                    continue
                if ts <= t_act and (before is None or ts > before[0]):
                    before = h
                elif ts > t_act and (after is None or ts < after[0]):
                    after = h
        if before is None or after is None or after[0] - before[0] > cfg.bridge_s:
            return None
        both = min(self._place_weight(slot, before[1], before[2])[0], self._place_weight(slot, after[1], after[2])[0])
        # Found again right after the moment, where the slot is within reach, having had time to walk
        # there from where they were lost: evidence for them, mirroring a shopper lost just before the
        # window, who scores by where they were last seen (blurred with the time, fading over 3 s).
        late = after[0] - t_act
        if cfg.refound_weight <= 0.0 or after[0] - before[0] <= cfg.visible_gap_s or math.dist(before[1:], after[1:]) > cfg.rejoin_speed_mps * (after[0] - before[0]) + 1.5:
            return both
        found_at = self._place_weight(slot, after[1], after[2], extra_m=min(1.0, 0.3 * late))[0]
        found = cfg.refound_weight * found_at * math.exp(-late / 3.0)
        # Lost near the slot before the moment too: pinned on both sides, the found place does not fade.
        lost_at = self._place_weight(slot, before[1], before[2], extra_m=min(1.0, 0.3 * (t_act - before[0])))[0]
        pinned = cfg.refound_weight * min(found_at, lost_at)
        return max(both, found, pinned)

    def _shelf_change(self, ch: ShelfChange) -> None:
        cfg = self.config
        self.stats["changes"] += 1
        t_act = ch.ts - cfg.settle_delay_s
        spec = self.layout.slot_at(ch.board, ch.channel) or self.layout.slot(ch.slot)
        if spec is None:
            self.errors["unknown-slot"] += 1
            self._flag_open(t_act, "unknown-slot", f"change {ch.id} on {ch.board}/{ch.channel} ({ch.slot or 'no slot'}) is not in the layout")
            return
        if not ch.product and ch.quantity == 0:
            ch = self._counted_by_layout(spec, ch)  # a board without a planogram reports grams only
        elif spec.slot != ch.slot or spec.product != ch.product:
            self.errors["planogram-mismatch"] += 1
        if t_act < self.now - cfg.history_s:
            self.errors["stale-change"] += 1
            self._flag_open(t_act, "stale-change", f"change {ch.id} on {spec.slot} at {ch.ts:.1f}s arrived after {self.now:.1f}s")
            return
        cart = self._attribute(ch, spec)
        if cart is not None:
            self._rebuild(cart)

    def _attribute(self, ch: ShelfChange, spec: SlotSpec, reattributing: bool = False) -> _Cart | None:
        """Give a change to the likeliest cart (returned, not yet rebuilt) or keep it as an orphan.

        The evidence is per cart (family members' scores add up): the margin is the log of the
        best cart's score over every other cart's plus 'nobody'. The calibration
        (``calibration_slope``, ``calibration_offset``, fitted on held-out scenarios by
        ``fusion.calibrate``) turns the margin into the probability that the change is that cart's.
        """
        cfg = self.config
        t_act = ch.ts - cfg.settle_delay_s
        scores = self._scores(spec.slot, t_act)
        # Reach: a shopper whose box was over the slot around the change is likelier the picker than
        # one seen there without reaching (likelihood ratios fitted on held-out scenarios by
        # fusion.calibrate; all 1 by default: measured, they did not pay, docs/fusion.md).
        reach = {sid: self._reach(sid, spec.slot, t_act) for sid in scores}
        sparse = self.sparse()
        if sparse >= 1.0:
            lr = {"reached": cfg.reach_lr_reached_sparse, "not-reached": cfg.reach_lr_not_reached_sparse, "unseen": cfg.reach_lr_unseen_sparse}
        else:
            lr = {"reached": cfg.reach_lr_reached, "not-reached": cfg.reach_lr_not_reached, "unseen": cfg.reach_lr_unseen}
        scores = {sid: (v[0] * lr[reach[sid]], v[1], v[2]) for sid, v in scores.items()}
        reach_t = tuple(sorted((sid, r, round(scores[sid][1], 3)) for sid, r in reach.items()))
        by_cart: dict[str, float] = {}
        for sid, v in scores.items():
            c = self._sessions[sid].cart
            by_cart[c] = by_cart.get(c, 0.0) + v[0]
        if not scores or max(v[0] for v in scores.values()) < cfg.nobody_score:
            total = sum(v[0] for v in scores.values()) + cfg.nobody_score
            candidates = tuple((sid, v[0] / total, v[1]) for sid, v in sorted(scores.items(), key=lambda kv: -kv[1][0]) if v[0] / total >= 0.01)
            if not reattributing:
                self.errors["nobody-near"] += 1
            a = Attribution(ch.id, spec.slot, spec.product, ch.quantity, ch.ts, None, 0.0, candidates, (Reason("nobody-near", f"{spec.slot} at {t_act:.1f}s"),), sparse=sparse, reach=reach_t)
            self.orphans.append(a)
            self._pending.append((ch, spec))
            # A person near the slot whom no session follows (come in unseen, or a lost shopper not yet
            # re-joined): whichever cart their track ends up on may hold this change (flagged when it closes).
            for t in self._tracks.values():
                if t.session is None and not t.segments and not t.ended and t.hist and t.last_ts >= t_act - cfg.window_s and t.hist[0][0] <= t_act + cfg.window_s:
                    near = min((self._place_weight(spec.slot, x, y)[1] for ts, x, y in t.hist if abs(ts - t_act) <= cfg.window_s), default=math.inf)
                    if near <= cfg.reach_m + 1.0:
                        self._unowned_near.setdefault(t.id, f"change {ch.id} on {spec.slot} at {t_act:.1f}s went to nobody while track {t.id}, then on no session, was {near:.1f} m away")
            # Somebody's hand did it: every shopper inside who was not watched the whole time may be that somebody.
            for sess in self._sessions.values():
                if self._open_at(sess, t_act) and not self._watched(sess.id, t_act - cfg.window_s, t_act + cfg.window_s):
                    away = next((f" ({d:.1f} m away)" for sid, _, d in candidates if sid == sess.id), "")
                    # Tied to the change, as a contest is: if the change is attributed again (the shopper
                    # found), the flag goes with it.
                    self._carts[sess.cart].contests[ch.id] = (ch.ts, Reason("nobody-near", f"change {ch.id} on {spec.slot} at {t_act:.1f}s while session {sess.id} was not seen{away}"))
            return None
        (top, s1), *rest = sorted(by_cart.items(), key=lambda kv: -kv[1])
        others = sum(v for _, v in rest) + cfg.nobody_score
        margin = math.log(s1) - math.log(others)
        # Two kinds of doubt, weighed apart: another shopper who may have done it, and nobody seen
        # doing it (a weak score with nobody else near: the picker seen only part of the time).
        margin_others = math.log(s1) - math.log(others - cfg.nobody_score + cfg.others_floor)
        margin_nobody = math.log(s1) - math.log(cfg.nobody_score)
        p = self.calibrated(margin_others, margin_nobody, sparse)
        # Each session's share: the chosen cart's members split p, the others split the rest.
        candidates = tuple(
            sorted(
                (
                    (sid, (p * v[0] / s1) if self._sessions[sid].cart == top else (1.0 - p) * v[0] / others, v[1])
                    for sid, v in scores.items()
                ),
                key=lambda r: -r[1],
            )
        )
        candidates = tuple(c for c in candidates if c[1] >= 0.01)
        cart = self._carts[top]
        reasons: list[Reason] = []
        if 1.0 - p > 1.0 - cfg.attribution_bar:
            # In doubt. Contested when another cart holds most of the doubt (two shoppers at the
            # shelf); otherwise the evidence is weak for anyone (seen only part of the time).
            runner_cart, s2 = rest[0] if rest else (None, 0.0)
            runner = (1.0 - p) * s2 / others
            best_sid = max((sid for sid in scores if self._sessions[sid].cart == top), key=lambda sid: scores[sid][0])
            if runner_cart is not None and runner >= (1.0 - p) / 2:
                runner_sid = max((sid for sid in scores if self._sessions[sid].cart == runner_cart), key=lambda sid: scores[sid][0])
                contested = Reason("contested", f"{spec.slot} at {t_act:.1f}s: {best_sid} p={p:.3f}, {runner_sid} p={runner:.3f}")
                reasons.append(contested)
                # The runner-up's cart is in doubt too: if the change was theirs, their cart lacks it.
                for c, sc in rest:
                    if (1.0 - p) * sc / others >= (1.0 - p) / 2 or (1.0 - p) * sc / others > 1 - cfg.attribution_bar:
                        self._carts[c].contests[ch.id] = (ch.ts, contested)
            else:
                reasons.append(Reason("low-confidence", f"{spec.slot} at {t_act:.1f}s: {best_sid} p={p:.3f} < {cfg.attribution_bar}, nobody else near enough to contest it"))
                # A cart holding less than half of the doubt may still be the picker's when its shopper
                # was lost then (not seen all through the window): above the bar's share it is flagged
                # too, or it would be accepted short. (One seen all along, elsewhere, was not at the slot;
                # unless the camera is sparse: there a track seen all along may be another shopper's.)
                for c, sc in rest:
                    share = (1.0 - p) * sc / others
                    if share <= 1 - cfg.attribution_bar:
                        continue
                    sid = max((x for x in scores if self._sessions[x].cart == c), key=lambda x: scores[x][0])
                    if sparse >= 1.0 or not self._watched(sid, t_act - cfg.window_s, t_act + cfg.window_s):
                        self._carts[c].contests[ch.id] = (ch.ts, Reason("low-confidence", f"{spec.slot} at {t_act:.1f}s went to {best_sid} with p={p:.3f}; {sid} p={share:.3f} may have made it"))
        if spec.slot != ch.slot or spec.product != ch.product:
            reasons.append(Reason("planogram-mismatch", f"board {ch.board}/{ch.channel} reports {ch.slot}:{ch.product}, layout has {spec.slot}:{spec.product}"))
        cart.changes.append(_Change(ch, spec, p, candidates, tuple(reasons), (margin, margin_others, margin_nobody, sparse), reach_t))
        if not reattributing:
            self.stats["attributed"] += 1
        return cart

    def calibrated(self, margin_others: float, margin_nobody: float, sparse: float = 0.0) -> float:
        """Return the calibrated probability that a change is the chosen cart's, given its evidence."""
        cfg = self.config
        slope = cfg.calibration_slope_sparse if sparse >= 1.0 and cfg.calibration_slope_sparse is not None else cfg.calibration_slope
        z = slope * margin_others + cfg.calibration_nobody * margin_nobody + cfg.calibration_sparse * sparse + cfg.calibration_offset
        return 1.0 / (1.0 + math.exp(-z)) if z > -50 else 0.0

    def _watched(self, sid: str, lo: float, hi: float, max_gap_s: float = 1.0) -> bool:
        """Return True when the session was seen all through [lo, hi], never unseen for ``max_gap_s``."""
        seen = sorted(ts for t in self._tracks.values() for ts, _, _ in t.hist if lo - max_gap_s <= ts <= hi + max_gap_s and t.owner(ts) == sid)
        if not seen or seen[0] > lo + max_gap_s / 2 or seen[-1] < min(hi, self.now) - max_gap_s / 2:
            return False
        return all(b - a < max_gap_s for a, b in pairwise(seen))

    def _rebuild(self, cart: _Cart) -> None:
        """Replay a cart's changes in time order: its lines, confidence, attributions and their reasons."""
        cart.holdings, cart.evidence, cart.line_conf, cart.confidence = Counter(), {}, {}, 1.0
        cart.derived, cart.attributions = [], []
        cart.changes.sort(key=lambda c: c.ch.ts)
        for c in cart.changes:
            reasons = list(c.reasons) + self._apply(cart, c.spec, c.ch, c.probability)
            for r in reasons:
                if r not in cart.derived:
                    cart.derived.append(r)
            ch = c.ch
            cart.attributions.append(Attribution(ch.id, c.spec.slot, c.spec.product, ch.quantity, ch.ts, cart.id, c.probability, c.candidates, tuple(reasons), *c.margin, reach=c.reach))

    def _reattribute(self, since: float) -> None:
        """Attribute again every change since ``since`` (an id swap changed who was where).

        Changes on carts still open are taken off them and given again from the corrected tracks
        (a change that is now doubtful gets its reason, e.g. 'contested'); orphans get another
        chance. Carts already closed keep what they had: the swapped sessions are both open, so
        the changes that matter are on open carts.
        """
        cfg = self.config
        moved: list[tuple[ShelfChange, SlotSpec, str | None]] = []
        touched: dict[str, _Cart] = {}
        for cart in self._carts.values():
            keep = []
            for cid in [cid for cid, (ts, _) in cart.contests.items() if ts - cfg.settle_delay_s >= since]:
                del cart.contests[cid]
            for c in cart.changes:
                if c.ch.ts - cfg.settle_delay_s >= since:
                    moved.append((c.ch, c.spec, cart.id))
                    touched[cart.id] = cart
                else:
                    keep.append(c)
            cart.changes = keep
        pending, self._pending = self._pending, []
        for ch, spec in pending:
            if ch.ts - cfg.settle_delay_s >= since and ch.ts - cfg.settle_delay_s >= self.now - cfg.history_s:
                self.orphans = [a for a in self.orphans if a.change_id != ch.id]
                moved.append((ch, spec, None))
            else:
                self._pending.append((ch, spec))
        for ch, spec, was in sorted(moved, key=lambda m: m[0].ts):
            to = self._attribute(ch, spec, reattributing=True)
            if to is not None:
                touched[to.id] = to
            if (to.id if to else None) != was:
                self.stats["reattributed"] += 1
        for cart in touched.values():
            self._rebuild(cart)
        self._pending = [(ch, spec) for ch, spec in self._pending if ch.ts >= self.now - cfg.history_s]

    def _apply(self, cart: _Cart, spec: SlotSpec, ch: ShelfChange, p: float) -> list[Reason]:
        """Put a change on a cart; return the hard-case reasons it raised."""
        cfg = self.config
        reasons = []
        q = ch.quantity
        qconf = self._quantity_confidence(spec, ch)
        conf = p * qconf
        product = spec.product
        uncertain = q == 0 or qconf < cfg.quantity_bar
        if q > 0 and cart.holdings[product] < q:
            other = self._match_put_back(cart, ch.delta_g, exclude=product)
            if other is None:
                code = "quantity-uncertain" if uncertain else "unexplained-put-back"
                reasons.append(Reason(code, f"{ch.delta_g:+.0f} g put back on {spec.slot} ({spec.product}) matches nothing the cart holds"))
                cart.confidence = min(cart.confidence, conf)
                return reasons
            product, q = other
            reasons.append(Reason("wrong-slot", f"{q} x {product} put back on {spec.slot} ({spec.product}), matched by {ch.delta_g:+.0f} g"))
            conf = p  # the weight matched another product of the cart; the slot's own estimate does not apply
        elif uncertain:
            reasons.append(Reason("quantity-uncertain", f"{spec.slot}: {ch.delta_g:+.0f} g is {ch.delta_g / spec.unit_weight_g:+.2f} units of {spec.product} (confidence {qconf:.2f})"))
            if q == 0:
                cart.confidence = min(cart.confidence, conf)
                return reasons  # no whole unit to put on the cart; the reviewer sees the grams
        cart.holdings[product] -= q  # q < 0 is a pick: holdings grow
        if cart.holdings[product] <= 0:
            del cart.holdings[product]
        cart.evidence.setdefault(product, []).append(ch.id)
        cart.line_conf[product] = min(cart.line_conf.get(product, 1.0), conf)
        cart.confidence = min(cart.confidence, conf)
        return reasons

    def _counted_by_layout(self, spec: SlotSpec, ch: ShelfChange) -> ShelfChange:
        """Return a change the board reported in grams only (no planogram: quantity 0, no product, slot ``board/channel``) counted in units.

        The layout is what names the slot's product and its unit weight: the count is the delta
        over the unit weight, rounded, and its confidence the probability of that count against
        the counts next to it (:meth:`_count_probability`), as for a board's own count. A delta
        under half a unit stays 0 (``quantity-uncertain``: the reviewer sees the grams).
        """
        q = round(ch.delta_g / spec.unit_weight_g)
        conf = (self._count_probability(spec, ch.delta_g, q) or 0.0) if q else 0.0
        self.stats["counted_by_layout"] += 1
        return replace(ch, slot=spec.slot, product=spec.product, quantity=q, confidence=conf)

    def _count_probability(self, spec: SlotSpec, delta_g: float, q: int) -> float | None:
        """Return the probability that ``delta_g`` is ``q`` units of the slot's product, against the counts next to it.

        Gaussian spread sqrt(n) x unit sd plus ``weight_noise_g``, counts equally likely; None for a
        weight more than 3 spreads from ``q`` units (no count of this product explains it).
        """
        def spread(n: int) -> float:  # of the weight of n units: their spread and the cell's noise
            return math.sqrt(abs(n) * spec.unit_weight_sd_g**2 + self.config.weight_noise_g**2)

        if abs(delta_g - q * spec.unit_weight_g) > 3.0 * spread(q):
            return None
        like = {}
        for n in range(q - 2, q + 3):
            if n == 0 or (n > 0) != (q > 0):
                continue  # no whole unit, or the other direction: the weight's sign says which way it went
            sd = spread(n)
            z = (delta_g - n * spec.unit_weight_g) / sd
            like[n] = math.exp(-0.5 * z * z) / sd
        total = sum(like.values())
        return like[q] / total if total > 0 else 0.0

    def _quantity_confidence(self, spec: SlotSpec, ch: ShelfChange) -> float:
        """Return how sure the change's quantity is: the board's confidence, or the layout's weights' if surer.

        The board's confidence is a heuristic (1 at an exact multiple of the unit weight, falling
        to 0 half a unit away beyond the expected spread), so a product whose units vary a lot
        (fruit: 182 g +- 25 g) gets 0.8 for a weight that cannot be any other count. With the
        layout's unit weight and spread, fusion weighs the board's count against the counts next to
        it (Gaussian spread sqrt(n) x unit sd plus ``weight_noise_g``, counts equally likely): the
        probability of the board's count. Only when the board and the layout agree on the slot's
        product, and only for a weight within 3 spreads of the board's count (beyond, no count of
        this product explains it: another product put back on the slot); never below the board's
        own figure.
        """
        q = ch.quantity
        if q == 0 or spec.product != ch.product or spec.slot != ch.slot:
            return ch.confidence
        posterior = self._count_probability(spec, ch.delta_g, q)
        if posterior is None:
            return ch.confidence  # no count of this product explains the weight (another product put back here?)
        return max(ch.confidence, posterior)

    def _match_put_back(self, cart: _Cart, delta_g: float, exclude: str) -> tuple[str, int] | None:
        """Return (product, units) of a product in the cart whose weight explains a put-back."""
        products = self.layout.products()
        best: tuple[float, str, int] | None = None
        for product, held in cart.holdings.items():
            if product == exclude or held <= 0 or product not in products:
                continue
            spec = products[product]
            k = round(delta_g / spec.unit_weight_g)
            if not 1 <= k <= held:
                continue
            resid = abs(delta_g - k * spec.unit_weight_g)
            tol = 3.0 * math.sqrt(k * spec.unit_weight_sd_g**2 + self.config.weight_noise_g**2)
            if resid <= tol and (best is None or resid < best[0]):
                best = (resid, product, k)
        return (best[1], best[2]) if best else None

    def _flag_open(self, ts: float, code: str, detail: str) -> None:
        for s in self._sessions.values():
            if self._open_at(s, ts):
                self._carts[s.cart].flag(code, detail)

    def _near_slots(self, slots: list[SlotSpec], lo: float, hi: float, code: str, detail: str) -> None:
        """Flag carts of sessions whose tracks came within reach of any of ``slots`` in [lo, hi]."""
        for t in self._tracks.values():
            if (t.session is None and not t.segments) or t.last_ts < lo or (t.hist and t.hist[0][0] > hi):
                continue
            covered = bool(t.hist) and t.hist[0][0] <= lo
            near: set[str] = set()
            for ts, x, y in t.hist:
                o = t.owner(ts)
                if o is not None and o not in near and lo <= ts <= hi and any(self._place_weight(s.slot, x, y)[0] > 0.2 for s in slots):
                    near.add(o)
            if not covered and t.session is not None and t.session in self._sessions and self._sessions[t.session].opened_at < lo:
                near.add(t.session)
            for sid in near:
                sess = self._sessions.get(sid)
                if sess is not None and sess.cart in self._carts:
                    self._carts[sess.cart].flag(code, detail)

    def _board_link(self, b: BoardLink) -> None:
        if not b.connected:
            self._offline.setdefault(b.board, b.ts)
            self.errors["board-offline"] += 1
            return
        since = self._offline.pop(b.board, None)
        if since is not None:
            slots = [s for s in self.layout.slots if s.board == b.board]
            self._near_slots(slots, since, b.ts, "board-offline", f"board {b.board} offline {since:.1f}-{b.ts:.1f}s")

    def _unsettled(self, u: ShelfUnsettled) -> None:
        self.errors["weight-unsettled"] += 1
        spec = self.layout.slot_at(u.board, u.channel)
        if spec is None:
            self.errors["unknown-slot"] += 1
            return
        self._near_slots([spec], u.since, u.ts, "weight-unsettled", f"{spec.slot} unsettled {u.since:.1f}-{u.ts:.1f}s")

    # -- closing -----------------------------------------------------------------------------
    def _finalize(self, cart: _Cart) -> CartResult:
        for board, since in self._offline.items():
            slots = [s for s in self.layout.slots if s.board == board]
            self._near_slots(slots, since, self.now, "board-offline", f"board {board} offline since {since:.1f}s")
        del self._carts[cart.id]
        products = self.layout.products()
        lines = tuple(
            Line(p, q, products[p].price_cents if p in products else 0, cart.line_conf.get(p, 1.0), tuple(cart.evidence.get(p, ())))
            for p, q in sorted(cart.holdings.items())
            if q > 0
        )
        if cart.confidence < self.config.confidence_bar:
            cart.flag("low-confidence", f"{cart.confidence:.2f} < {self.config.confidence_bar}")
        spans = self._spans(set(cart.sessions))
        sessions = [self._sessions.pop(sid) for sid in cart.sessions if sid in self._sessions]
        tracks = tuple(tid for s in sessions for tid in s.tracks)
        for tid in tracks:
            if tid in self._unowned_near:
                cart.flag("nobody-near", self._unowned_near.pop(tid))
        for tid in tracks:
            if tid in self._tracks:
                self._tracks[tid].session = None  # a track still seen outside is nobody's until it enters again
        status: Literal["accepted", "review"] = "review" if cart.reasons else "accepted"
        self.stats[f"carts_{status}"] += 1
        return CartResult(
            cart_id=cart.id,
            shop=self.layout.name,
            sessions=tuple(cart.sessions),
            tracks=tracks,
            opened_at=cart.opened_at,
            closed_at=max((s.closed_at or cart.closing_at or 0.0) for s in sessions) if sessions else cart.closing_at or 0.0,
            lines=lines,
            confidence=cart.confidence,
            reasons=tuple(cart.reasons),
            status=status,
            attributions=tuple(cart.attributions),
            spans=spans,
        )

    def _spans(self, sids: set[str]) -> tuple[tuple[int, float, float], ...]:
        """Return (track, from, until) for every stretch of a track that followed one of ``sids``."""
        out = []
        for t in self._tracks.values():
            start = t.first_ts
            for until, sid in t.segments:
                if sid in sids and until > start:
                    out.append((t.id, start, until))
                start = max(start, until)
            if t.session in sids:
                out.append((t.id, start, t.last_ts))
        return tuple(sorted(out))
