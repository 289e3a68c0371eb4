"""The scenario format: a shop, its sensors' noise, and shoppers with scripted visits.

A scenario is YAML (docs/fusion.md, 'Scenario files'), validated strictly (``extra="forbid"``):
the shop layout (door, slots with their planogram entries and prices), the camera (frame rate,
detector noise: missed detections, jitter, false positives, occlusion, appearance noise), the
boards (load-cell noise, sample interval), the shoppers (when they arrive, which cart they shop
for, their walking speed, and their actions: take or put back N units at a slot, possibly a
product of another slot, i.e. on the wrong slot; optional blackouts where the camera loses them)
and faults (a board pulled for a while, a ghost that the detector sees for a few seconds).

The true cart of each ground-truth cart id follows from the actions alone (:func:`true_carts`),
so a scenario file is its own answer key. ``dump_scenario`` and ``parse_scenario`` round-trip.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fusion.errors import ScenarioInvalid
from fusion.layout import ShopLayout


class ViewSpec(BaseModel):
    """One of several ceiling cameras: where it hangs and the floor rectangle it sees people in."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=32, description="camera name")
    x: float = Field(description="position of the camera on the floor plan, metres")
    y: float = Field(description="position of the camera on the floor plan, metres (negative: over the street)")
    height_m: float = Field(2.5, gt=1.8, le=10, description="height of the camera above the floor")
    floor: tuple[float, float, float, float] = Field(description="the floor rectangle [x_min, y_min, x_max, y_max] (metres) in which it detects people")

    @model_validator(mode="after")
    def _rect(self) -> ViewSpec:
        x0, y0, x1, y1 = self.floor
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"view {self.id}: floor must be [x_min, y_min, x_max, y_max] with x_max > x_min and y_max > y_min")
        return self


class CameraSpec(BaseModel):
    """The ceiling camera(s) over the shop floor and the noise of the person detector.

    No ``views``: ONE camera sees the whole floor, and two people closer than ``occlusion_m``
    occlude each other (the model of the earlier rounds; scenario files without ``views`` play
    as before). With ``views``: each view detects the people in its floor rectangle with its own
    independent misses, jitter (growing with how obliquely it sees the person), false positives,
    appearance noise and occlusion by line of sight (a person hides another when they stand
    between the camera and the other's head and shoulders, so straight below a camera nobody is
    hidden and at an oblique angle a neighbour is); the views' detections are merged on the floor
    by ``vision.multiview`` and tracked once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    fps: float = Field(10.0, gt=0, le=60, description="frames per second")
    px_per_m: float = Field(60.0, gt=0, description="image pixels per metre of floor")
    outside_m: float = Field(2.5, ge=1, description="metres of street in front of the door the camera sees")
    box_m: float = Field(0.6, gt=0, description="side of a person's box seen from above")
    miss_rate: float = Field(0.05, ge=0, lt=1, description="share of a person's detections missed")
    jitter_m: float = Field(0.04, ge=0, description="box centre noise, 1 sigma in metres")
    false_positives: float = Field(0.05, ge=0, description="mean spurious boxes per frame")
    occlusion_m: float = Field(0.7, ge=0, description="two people closer than this occlude one another")
    occlusion_drop: float = Field(0.5, ge=0, le=1, description="chance the occluded person's box is missed (else its score drops)")
    appearance_dims: int = Field(16, ge=2, le=512, description="length of the appearance vectors")
    appearance_noise: float = Field(0.15, ge=0, description="per-dimension noise of an appearance vector, 1 sigma")
    reach_visible: float = Field(0.0, ge=0, le=1, description="chance that a hand action's reach shows: the picker's box stretches over the slot while the hand is in it (else the arm is hidden, e.g. under a neighbour or the shelf lip); 0 = boxes never stretch")
    reach_false: float = Field(0.0, ge=0, le=1, description="chance, per hand action, that the other shoppers within an arm's length of the slot's edge have their box stretched over that edge too (leaning in, an arm over the neighbouring slot)")
    reach_frame_miss: float = Field(0.15, ge=0, le=1, description="share of frames of a visible reach in which the box is not stretched")
    views: tuple[ViewSpec, ...] = Field((), description="several ceiling cameras (each with the noise above, drawn independently); empty: one camera over the whole floor")
    person_height_m: float = Field(1.75, gt=0.5, le=2.2, description="views: height of a person's head; a person hides another in a view when they stand within body_radius_m of its line of sight to the other's shoulders below this height")
    body_radius_m: float = Field(0.25, gt=0, le=1, description="views: half a person's width seen from above")
    blackout_views: float = Field(1.0, ge=0, le=1, description="views: share of the views (drawn per blackout) that lose a blacked-out shopper; 1 = every view (a detector failing on that person)")

    @model_validator(mode="after")
    def _views(self) -> CameraSpec:
        ids = [v.id for v in self.views]
        if len(set(ids)) != len(ids):
            raise ValueError(f"views: camera ids must be unique, got {sorted({i for i in ids if ids.count(i) > 1})}")
        if self.views and (self.reach_visible > 0 or self.reach_false > 0):
            raise ValueError("reach_visible and reach_false are modelled for one camera only; set them to 0 or remove views")
        for v in self.views:
            if v.height_m <= self.person_height_m:
                raise ValueError(f"views: camera {v.id} hangs at {v.height_m} m, not above a person's head ({self.person_height_m} m)")
        return self


class BoardsSpec(BaseModel):
    """The simulated shelf boards (one per shelf) and the door board."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    noise_g: float = Field(2.0, ge=0, le=100, description="load-cell noise, 1 sigma in grams")
    interval_ms: int = Field(100, ge=10, le=1000, description="time between readings")
    stock: int = Field(20, ge=0, description="units on every slot at the start")
    door_board: str = Field("door-1", min_length=1, max_length=32, description="board id of the door contact")


class Action(BaseModel):
    """What a shopper does at a slot: take or put back ``count`` units."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    slot: str = Field(min_length=1, description="slot the shopper stands at")
    take: int = Field(0, ge=0, le=50, description="units taken from the slot")
    put_back: int = Field(0, ge=0, le=50, description="units put back on the slot")
    product: str | None = Field(None, description="put_back: the product actually put back (default: the slot's; another product means the wrong slot)")
    dwell_s: float = Field(3.0, ge=2.0, le=120, description="seconds standing at the slot (the action is at least 1 s from either end)")

    @model_validator(mode="after")
    def _one(self) -> Action:
        if (self.take > 0) == (self.put_back > 0) and not (self.take == 0 and self.put_back == 0):
            raise ValueError("an action either takes or puts back, not both; split it into two actions")
        if self.product is not None and self.put_back == 0:
            raise ValueError("product is only for put_back (the item put back on this slot)")
        return self


class Blackout(BaseModel):
    """The camera loses a shopper (a tall shelf, a pillar) on the way to an action."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    before_action: int = Field(ge=0, description="index of the action the shopper walks to while unseen")
    duration_s: float = Field(gt=0, le=60, description="seconds unseen")


class Shopper(BaseModel):
    """One visit: a person arriving, shopping and leaving."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, description="visit id (ground truth)")
    person: str | None = Field(None, description="who it is (same person = same appearance, e.g. a re-entry); default: the id")
    cart: str | None = Field(None, description="ground-truth cart (family members share one); default: the id")
    arrive_at: float = Field(ge=0, description="seconds from the start when the shopper reaches the door from outside")
    speed_mps: float = Field(1.0, gt=0.2, le=3, description="walking speed")
    actions: tuple[Action, ...] = Field((), description="in order")
    blackouts: tuple[Blackout, ...] = Field((), description="stretches the camera cannot see the shopper")

    @property
    def person_id(self) -> str:
        """Return who this is (defaults to the visit id)."""
        return self.person or self.id

    @property
    def cart_id(self) -> str:
        """Return the ground-truth cart (defaults to the visit id)."""
        return self.cart or self.id


class Fault(BaseModel):
    """Something going wrong during the run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["board_pull", "ghost", "camera_fps"] = Field(description="board_pull: a shelf board's cable pulled; ghost: a detector ghost (reflection) at x, y; camera_fps: the camera drops to 'fps'")
    at: float = Field(ge=0, description="seconds from the start")
    duration_s: float = Field(5.0, gt=0, description="how long it lasts")
    board: str | None = Field(None, description="board_pull: board id")
    x: float = Field(0.0, description="ghost: position in metres")
    y: float = Field(0.0, description="ghost: position in metres")
    fps: float = Field(3.0, gt=0, le=60, description="camera_fps: the frame rate during the fault")


class Scenario(BaseModel):
    """A complete scenario: shop, sensors, shoppers, faults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("scenario", min_length=1, description="name shown in results")
    seed: int = Field(0, description="seed of the sensor noise")
    shop: ShopLayout = Field(description="the shop layout (door, slots, planogram, prices)")
    camera: CameraSpec = Field(default_factory=CameraSpec)
    boards: BoardsSpec = Field(default_factory=BoardsSpec)
    shoppers: tuple[Shopper, ...] = Field(min_length=1, description="the visits")
    faults: tuple[Fault, ...] = Field((), description="faults during the run")

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        ids = [s.id for s in self.shoppers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"shopper ids must be unique, got {sorted({i for i in ids if ids.count(i) > 1})}")
        products = {s.product for s in self.shop.slots}
        boards = {s.board for s in self.shop.slots}
        for i, sh in enumerate(self.shoppers):
            for j, a in enumerate(sh.actions):
                if self.shop.slot(a.slot) is None:
                    raise ValueError(f"shoppers.{i}.actions.{j}.slot: {a.slot!r} is not a slot of the shop; use one of {[s.slot for s in self.shop.slots]}")
                if a.product is not None and a.product not in products:
                    raise ValueError(f"shoppers.{i}.actions.{j}.product: {a.product!r} is not stocked in the shop")
            for b in sh.blackouts:
                if b.before_action >= len(sh.actions):
                    raise ValueError(f"shoppers.{i}.blackouts: before_action {b.before_action} but the shopper has {len(sh.actions)} actions")
        for i, f in enumerate(self.faults):
            if f.kind == "board_pull" and f.board not in boards:
                raise ValueError(f"faults.{i}.board: {f.board!r} is not a board of the shop; use one of {sorted(boards)}")
        return self


def true_carts(scenario: Scenario) -> dict[str, Counter[str]]:
    """Return ground-truth cart id -> product -> units the shoppers leave with."""
    out: dict[str, Counter[str]] = {}
    for sh in scenario.shoppers:
        cart = out.setdefault(sh.cart_id, Counter())
        for a in sh.actions:
            slot = scenario.shop.slot(a.slot)
            assert slot is not None
            if a.take:
                cart[slot.product] += a.take
            else:
                cart[a.product or slot.product] -= a.put_back
    return {k: Counter({p: q for p, q in v.items() if q > 0}) for k, v in out.items()}


def parse_scenario(data: object, source: str = "scenario") -> Scenario:
    """Validate a scenario mapping; raise ScenarioInvalid naming the source, the key and the fix."""
    if not isinstance(data, dict):
        raise ScenarioInvalid(f"{source}: expected a mapping with shop, shoppers, ...; see docs/fusion.md")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ScenarioInvalid(f"{source}: invalid scenario: {problems} (format: docs/fusion.md, 'Scenario files')") from None


def load_scenario(path: str | Path) -> Scenario:
    """Load a scenario YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ScenarioInvalid(f"{p}: cannot read scenario: {exc.strerror}; check the path") from None
    except yaml.YAMLError as exc:
        raise ScenarioInvalid(f"{p}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    return parse_scenario(data, str(p))


def dump_scenario(scenario: Scenario) -> str:
    """Return the scenario as YAML (defaults left out, so files stay short)."""
    return yaml.safe_dump(scenario.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
