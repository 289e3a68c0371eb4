"""A hand-driven fusion engine in a small shop layout, shared by the fusion tests."""

from __future__ import annotations

from fusion.engine import Fusion, FusionConfig
from fusion.layout import DoorSpec, ShopLayout, SlotSpec
from fusion.types import DoorContact, DoorCrossing, ShelfChange, TrackObservation

COLA = dict(product="cola", unit_weight_g=345.0, unit_weight_sd_g=3.0, price_cents=150)
CHIPS = dict(product="chips", unit_weight_g=160.0, unit_weight_sd_g=4.0, price_cents=220)
WATER = dict(product="water", unit_weight_g=520.0, unit_weight_sd_g=4.0, price_cents=90)


def layout() -> ShopLayout:
    # A1 and A2 side by side on the back wall (0.6 m apart), B1 on the left wall.
    return ShopLayout(
        name="t",
        width_m=6,
        depth_m=5,
        door=DoorSpec(a=(2.5, 0), b=(3.5, 0), inside=(3, 1)),
        slots=(
            SlotSpec(slot="A1", shelf="shelf-1", board="b1", channel=0, front=(2.0, 4.6), facing=(0, -1), **COLA),
            SlotSpec(slot="A2", shelf="shelf-1", board="b1", channel=1, front=(2.6, 4.6), facing=(0, -1), **CHIPS),
            SlotSpec(slot="B1", shelf="shelf-2", board="b2", channel=0, front=(0.4, 2.0), facing=(1, 0), **WATER),
        ),
    )


APP = {1: (1.0, 0.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0, 0.0), 3: (0.0, 0.0, 1.0, 0.0)}


class Shop:
    """A driver for the engine: people walk, stand, pick; the test says where and when."""

    def __init__(self, config: FusionConfig | None = None) -> None:
        self.f = Fusion(layout(), config)
        self.carts: list = []
        self.t = 0.0
        self.person: dict[int, int] = {}  # track -> who it is (its appearance)

    def feed(self, item) -> None:
        self.carts += self.f.feed(item)

    def door(self, is_open: bool) -> None:
        self.feed(DoorContact(self.t, is_open))

    def see(self, track: int, x: float, y: float, person: int | None = None) -> None:
        if person is not None:
            self.person[track] = person
        self.feed(TrackObservation(track, self.t, x, y, APP[self.person.get(track, track)]))

    def tick(self, dt: float = 0.1) -> None:
        self.t = round(self.t + dt, 3)

    def enter(self, track: int, person: int | None = None, x: float = 3.0) -> None:
        """Walk a track from the street through the door (open) to 1 m inside."""
        for y in (-1.0, -0.5, -0.1):
            self.see(track, x, y, person)
            self.tick()
        self.see(track, x, 0.2, person)
        self.feed(DoorCrossing(track, self.t, "in"))
        self.tick()
        self.see(track, x, 1.0, person)

    def leave(self, track: int, person: int | None = None) -> None:
        self.see(track, 3.0, 0.3, person)
        self.tick()
        self.see(track, 3.0, -0.2, person)
        self.feed(DoorCrossing(track, self.t, "out"))

    def stand(self, seconds: float, *where: tuple[int, float, float]) -> None:
        """Several tracks stand still at (x, y) for a while, seen every 0.1 s."""
        for _ in range(round(seconds / 0.1)):
            for track, x, y in where:
                self.see(track, x, y)
            self.tick()

    def change(self, slot_ch: tuple[str, int, str, str], quantity: int, delta_g: float, confidence: float = 1.0, cid: str | None = None) -> None:
        board, ch, slot, product = slot_ch
        self.feed(ShelfChange(cid or f"{board}/{ch}@{self.t}", board, ch, slot, product, quantity, delta_g, confidence, self.t))

    def close(self, seconds: float = 5.0) -> list:
        self.tick(seconds)
        self.carts += self.f.advance(self.t)
        return self.carts


A1 = ("b1", 0, "A1", "cola")
A2 = ("b1", 1, "A2", "chips")
B1 = ("b2", 0, "B1", "water")
AT_A1 = (2.0, 4.15)
AT_A2 = (2.6, 4.15)


def shop_with(*tracks: int, config: FusionConfig | None = None) -> Shop:
    s = Shop(config)
    for t in tracks:
        s.door(True)
        s.enter(t)
        s.tick(0.5)
        s.door(False)
        s.tick(3.0)  # separate door openings: separate carts
    return s
