"""The shop as fusion sees it: the door line and the slots, in metres on the shop floor.

Each slot is a place on a shelf edge (``front``), the direction the shelf faces into the aisle
(``facing``) and its width; its *zone* is the rectangle in front of it, ``width_m`` wide and
``reach_m`` deep, where a shopper stands to take from it. The slot also carries its planogram
entry (board, channel, product, unit weight and its spread, price in cents), so fusion can price
a receipt and check that what the boards report matches what the shop believes is on the shelf.

The optional ``publishers`` block says which node may publish each kind of event fusion takes
(the ``{node}`` of ``fleet/v1/{shop}/{node}/events``, which the shop broker's ACL binds to the
publisher): the ``type: fusion`` pipeline requires it and drops every event from another node
(docs/fusion.md, "Events bound to their publisher"); offline runs (scenarios, evaluation) ignore it.

Validation is strict (``extra="forbid"``); errors name the key and the fix.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from fusion.errors import LayoutInvalid

Point = tuple[float, float]

NODE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""A node id as the agents and the broker users use it (``edge_agent.protocol.ID_PATTERN``)."""


class SlotSpec(BaseModel):
    """One slot: where it is, what it holds, what that costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    slot: str = Field(min_length=1, max_length=32, description="slot name printed on the shelf, as the boards' planogram names it")
    shelf: str = Field(min_length=1, description="shelf (vision zone) the slot belongs to")
    board: str = Field(min_length=1, max_length=32, description="board id of the slot's load cell")
    channel: int = Field(ge=0, le=15, description="channel of that board")
    product: str = Field(min_length=1, max_length=64, description="product id (SKU) stocked in the slot")
    unit_weight_g: float = Field(gt=0, le=50000, description="weight of one unit in grams")
    unit_weight_sd_g: float = Field(0.0, ge=0, description="spread of the unit weight between units (1 sigma, grams)")
    price_cents: int = Field(ge=0, description="price of one unit in cents")
    front: Point = Field(description="middle of the slot's shelf edge [x, y] in metres")
    facing: Point = Field(description="direction from the shelf into the aisle [dx, dy] (normalised on load)")
    width_m: float = Field(0.6, gt=0, le=5, description="width of the slot along the shelf")

    @model_validator(mode="after")
    def _facing(self) -> SlotSpec:
        if math.hypot(*self.facing) < 1e-6:
            raise ValueError("facing must be a non-zero direction, e.g. [0, -1] for a shelf facing down the map")
        return self

    def unit_facing(self) -> Point:
        """Return ``facing`` scaled to length 1."""
        n = math.hypot(*self.facing)
        return (self.facing[0] / n, self.facing[1] / n)

    def stand_point(self, depth_m: float = 0.45) -> Point:
        """Return the point ``depth_m`` in front of the slot, where a shopper stands to reach it."""
        fx, fy = self.unit_facing()
        return (self.front[0] + fx * depth_m, self.front[1] + fy * depth_m)


class DoorSpec(BaseModel):
    """The door line and which side of it is inside."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    a: Point = Field(description="one end of the door line [x, y] in metres")
    b: Point = Field(description="the other end")
    inside: Point = Field(description="any point inside the shop, to tell the inner side of the line")

    @model_validator(mode="after")
    def _check(self) -> DoorSpec:
        if math.dist(self.a, self.b) < 0.1:
            raise ValueError("door a and b must be at least 0.1 m apart")
        if self.side(self.inside) == 0:
            raise ValueError("door.inside lies on the door line; give a point well inside the shop")
        return self

    def side(self, p: Point) -> int:
        """Return +1 or -1 for the side of the door line ``p`` is on (0 on the line)."""
        (ax, ay), (bx, by) = self.a, self.b
        c = (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax)
        return 0 if abs(c) < 1e-12 else (1 if c > 0 else -1)

    def is_inside(self, p: Point) -> bool:
        """Return True for points on the shop's side of the door line."""
        return self.side(p) == self.side(self.inside)

    def midpoint(self) -> Point:
        """Return the middle of the door line."""
        return ((self.a[0] + self.b[0]) / 2, (self.a[1] + self.b[1]) / 2)


class PublishersSpec(BaseModel):
    """Which node publishes each kind of event fusion takes: the node part of its broker user ``<shop>.<node>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vision: str = Field(
        pattern=NODE_PATTERN,
        description="node whose events person_entered, person_exited, zone_enter, zone_exit and dwell (of fusion's camera) are taken: "
        "the agent running the camera whose tracks fusion follows (as deployed <gpu node>-vision; with camera: floor, the agent running the floor pipeline)",
    )
    door: str = Field(pattern=NODE_PATTERN, description="node whose door_opened / door_closed are taken: the sensor agent reading the door contact (as deployed <node>-sensors)")
    boards: dict[str, str] = Field(
        min_length=1,
        description="board id -> node whose shelf_change and sensor_board_disconnected of that board are taken: the sensor agent reading it "
        "(as deployed <node>-sensors); every board a slot names, and only those",
    )

    @model_validator(mode="after")
    def _nodes(self) -> PublishersSpec:
        import re

        bad = {b: n for b, n in sorted(self.boards.items()) if not re.match(NODE_PATTERN, n)}
        if bad:
            raise ValueError(f"boards: the nodes of {bad} (board: node) are not node ids: lower-case letters, digits and '-', the <node> of <shop>.<node>")
        return self

    def board_nodes(self) -> frozenset[str]:
        """Return the nodes some board is bound to."""
        return frozenset(self.boards.values())


class ShopLayout(BaseModel):
    """A shop: its name, floor size, door and slots."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("shop", min_length=1, description="shop id written on carts")
    width_m: float = Field(gt=0, le=200, description="floor width (x) in metres")
    depth_m: float = Field(gt=0, le=200, description="floor depth (y) in metres, the door on y=0 by convention")
    door: DoorSpec = Field(description="the door line")
    slots: tuple[SlotSpec, ...] = Field(min_length=1, description="every stocked slot")
    publishers: PublishersSpec | None = Field(
        None, description="which node publishes each kind of event (required by the type: fusion pipeline, ignored offline)"
    )
    _names: dict[str, SlotSpec] = PrivateAttr(default_factory=dict)
    _channels: dict[tuple[str, int], SlotSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> ShopLayout:
        names = [s.slot for s in self.slots]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"slot names must be unique; repeated: {dup}")
        chans = [(s.board, s.channel) for s in self.slots]
        dupc = sorted({c for c in chans if chans.count(c) > 1})
        if dupc:
            raise ValueError(f"each (board, channel) holds one slot; repeated: {dupc}")
        if self.publishers is not None:
            slot_boards = dict.fromkeys(s.board for s in self.slots)
            unknown = sorted(set(self.publishers.boards) - set(slot_boards))
            if unknown:
                raise ValueError(f"publishers.boards names boards no slot is on: {unknown} (the slots' boards: {list(slot_boards)}); "
                                 "correct the board id or remove it (a door contact's board is bound by publishers.door)")
            unbound = [b for b in slot_boards if b not in self.publishers.boards]
            if unbound:
                slots = {b: [s.slot for s in self.slots if s.board == b] for b in unbound}
                raise ValueError(f"publishers.boards has no node for boards {slots} (board: its slots): add '<board>: <node>', the node "
                                 "whose hardware pipeline reads it; fusion would drop all its shelf changes")
        return self

    def slot(self, name: str) -> SlotSpec | None:
        """Return the slot called ``name``, or None."""
        return self._by_name().get(name)

    def slot_at(self, board: str, channel: int) -> SlotSpec | None:
        """Return the slot on a board's channel, or None."""
        return self._by_channel().get((board, channel))

    def shelves(self) -> tuple[str, ...]:
        """Return the shelf (zone) names, in order of first appearance."""
        return tuple(dict.fromkeys(s.shelf for s in self.slots))

    def products(self) -> dict[str, SlotSpec]:
        """Return product -> one slot that stocks it (for weights and prices)."""
        out: dict[str, SlotSpec] = {}
        for s in self.slots:
            out.setdefault(s.product, s)
        return out

    def _by_name(self) -> dict[str, SlotSpec]:
        return self._names

    def _by_channel(self) -> dict[tuple[str, int], SlotSpec]:
        return self._channels

    def model_post_init(self, __context: object) -> None:
        """Index the slots by name and by (board, channel): fusion looks one up per shelf change."""
        self._names = {s.slot: s for s in self.slots}
        self._channels = {(s.board, s.channel): s for s in self.slots}


def parse_layout(data: object, source: str = "layout") -> ShopLayout:
    """Validate a layout mapping; raise LayoutInvalid naming the source, the key and the fix."""
    try:
        return ShopLayout.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise LayoutInvalid(f"{source}: invalid shop layout: {problems} (format: docs/fusion.md, 'Scenario files')") from None


def planogram_mismatches(layout: ShopLayout, planogram: list[tuple[str, int, str, str]]) -> list[str]:
    """Compare the layout with the boards' planogram rows (board, channel, slot, product).

    Returns one message per disagreement (a slot on another channel, another product, a slot
    the other side lacks); an empty list means they match. Run at start-up: a mismatch would make
    every change on that slot a wrong line.
    """
    problems = []
    seen = set()
    for board, channel, slot, product in planogram:
        spec = layout.slot_at(board, channel)
        seen.add((board, channel))
        if spec is None:
            problems.append(f"board {board} channel {channel} (slot {slot}) is in the boards' planogram but not in the layout")
        elif spec.slot != slot or spec.product != product:
            problems.append(f"board {board} channel {channel}: boards say slot {slot} holds {product}, layout says slot {spec.slot} holds {spec.product}")
    for s in layout.slots:
        if (s.board, s.channel) not in seen:
            problems.append(f"slot {s.slot} (board {s.board} channel {s.channel}) is in the layout but not in the boards' planogram")
    return problems
