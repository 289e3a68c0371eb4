"""Named scenarios, generated from a seed: ``single``, ``crowd``, ``family``, ``wrong-slot``,
``reenter``, ``board-pulled`` and ``slow-camera``.

All share one shop (:func:`default_layout`): 8 x 6 m, the door in the middle of the front wall,
three shelves (back wall, left wall, a fridge on the right wall) with 18 slots of products whose
unit weights differ enough to tell one from another by weight. The seed picks who arrives when
and what they take, so ``generate("crowd", seed=3)`` is always the same scenario.

``cameras="grid"`` plays the same scenario under the camera layout of a real shop of this kind
(:func:`ceiling_grid`): a ceiling camera per square metre, each seeing 3 x 3 m of floor, so every
point inside is seen by up to nine views, plus one over the door that also sees the street. The
default, ``"single"``, is the one camera over the whole floor of the earlier rounds.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fusion.errors import ScenarioInvalid
from fusion.layout import DoorSpec, ShopLayout, SlotSpec
from fusion.scenario import Action, Blackout, CameraSpec, Fault, Scenario, Shopper, ViewSpec

# product, unit weight g, its spread g, price cents. Weights differ by well over 3 sigma.
CATALOGUE: tuple[tuple[str, float, float, int], ...] = (
    ("cola-330", 345, 3, 150), ("water-500", 520, 4, 90), ("chips-150", 160, 4, 220), ("choc-100", 105, 2, 180),
    ("sandwich", 235, 10, 450), ("apple", 182, 25, 60), ("yogurt-125", 133, 3, 85), ("coffee-1kg", 1010, 8, 1290),
    ("gum", 34, 1, 120), ("juice-1l", 1085, 8, 260), ("beer-500", 760, 6, 190), ("salad", 290, 12, 390),
    ("milk-1l", 1045, 6, 140), ("cheese-200", 212, 4, 340), ("ham-150", 460, 3, 310), ("pizza", 410, 8, 520),
    ("butter-250", 255, 3, 260), ("eggs-6", 385, 10, 290),
)

SHELVES = ("shelf-1", "shelf-2", "shelf-3")


def default_layout(name: str = "demo-shop") -> ShopLayout:
    """Return the generated shop: 18 slots on three shelves, one board per shelf."""
    slots = []
    i = 0
    for k in range(8):  # back wall, facing the door
        p, w, sd, price = CATALOGUE[i]
        slots.append(SlotSpec(slot=f"A{k + 1}", shelf="shelf-1", board="shelf-1", channel=k, product=p, unit_weight_g=w, unit_weight_sd_g=sd, price_cents=price, front=(1.9 + 0.6 * k, 5.6), facing=(0.0, -1.0)))
        i += 1
    for k in range(5):  # left wall
        p, w, sd, price = CATALOGUE[i]
        slots.append(SlotSpec(slot=f"B{k + 1}", shelf="shelf-2", board="shelf-2", channel=k, product=p, unit_weight_g=w, unit_weight_sd_g=sd, price_cents=price, front=(0.4, 1.8 + 0.7 * k), facing=(1.0, 0.0)))
        i += 1
    for k in range(5):  # fridge, right wall
        p, w, sd, price = CATALOGUE[i]
        slots.append(SlotSpec(slot=f"C{k + 1}", shelf="shelf-3", board="shelf-3", channel=k, product=p, unit_weight_g=w, unit_weight_sd_g=sd, price_cents=price, front=(7.6, 1.8 + 0.7 * k), facing=(-1.0, 0.0)))
        i += 1
    return ShopLayout(name=name, width_m=8.0, depth_m=6.0, door=DoorSpec(a=(3.4, 0.0), b=(4.6, 0.0), inside=(4.0, 1.0)), slots=tuple(slots))


CAMERA_LAYOUTS = ("single", "grid")
"""``generate``'s camera layouts: one camera over the whole floor, or :func:`ceiling_grid`."""


def ceiling_grid(layout: ShopLayout, outside_m: float = 2.5, spacing_m: float = 1.0, sees_m: float = 1.5, height_m: float = 2.5) -> tuple[ViewSpec, ...]:
    """Return a ceiling camera every ``spacing_m`` over the shop floor, each seeing ``sees_m`` around it, and one over the door.

    The grid cameras hang at ``height_m`` (a shipping container's ceiling) over the middle of each
    cell and see people within ``sees_m`` either way, inside the shop; the door camera, just
    inside the door, also sees ``outside_m`` of street in front of it, where shoppers are first
    seen.
    """
    views = []
    nx, ny = round(layout.width_m / spacing_m), round(layout.depth_m / spacing_m)
    for i in range(nx):
        for j in range(ny):
            x, y = (i + 0.5) * spacing_m, (j + 0.5) * spacing_m
            rect = (max(0.0, x - sees_m), max(0.0, y - sees_m), min(layout.width_m, x + sees_m), min(layout.depth_m, y + sees_m))
            views.append(ViewSpec(id=f"c{i}-{j}", x=x, y=y, height_m=height_m, floor=rect))
    mx, my = layout.door.midpoint()
    views.append(ViewSpec(id="door", x=mx, y=my + 0.2, height_m=height_m, floor=(max(0.0, mx - 2.5), my - outside_m, min(layout.width_m, mx + 2.5), my + 1.5)))
    return tuple(views)


def _actions(rng: random.Random, layout: ShopLayout, n: int, shelf: str | None = None, put_back_chance: float = 0.15) -> list[Action]:
    pool = [s for s in layout.slots if shelf is None or s.shelf == shelf]
    out: list[Action] = []
    held: list[str] = []
    for _ in range(n):
        if held and rng.random() < put_back_chance:
            slot = held.pop(rng.randrange(len(held)))
            out.append(Action(slot=slot, put_back=1, dwell_s=round(rng.uniform(2.5, 4.0), 1)))
            continue
        s = rng.choice(pool)
        count = 1 if rng.random() < 0.75 else 2
        out.append(Action(slot=s.slot, take=count, dwell_s=round(rng.uniform(2.5, 4.5), 1)))
        held.append(s.slot)
    return out


def _single(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    return [Shopper(id="p1", arrive_at=1.0, speed_mps=round(rng.uniform(0.8, 1.3), 2), actions=tuple(_actions(rng, layout, rng.randint(2, 6))))], [], CameraSpec()


def _crowd(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    out = []
    t = 1.0
    for i in range(shoppers):
        acts = _actions(rng, layout, rng.randint(2, 4), shelf="shelf-1") + _actions(rng, layout, rng.randint(0, 1), put_back_chance=0)
        blackouts = (Blackout(before_action=rng.randrange(len(acts)), duration_s=round(rng.uniform(3.5, 5.0), 1)),) if rng.random() < 0.2 else ()
        out.append(Shopper(id=f"p{i + 1}", arrive_at=round(t, 1), speed_mps=round(rng.uniform(0.8, 1.3), 2), actions=tuple(acts), blackouts=blackouts))
        t += rng.uniform(4.5, 7.0)  # one door opening each: people entering together share a cart
    return out, [], CameraSpec()


def _family(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    members = max(2, min(shoppers, 4)) if shoppers != 4 else rng.randint(2, 4)
    out = [
        Shopper(id=f"f{i + 1}", cart="family", arrive_at=round(1.0 + 0.9 * i, 1), speed_mps=round(rng.uniform(0.8, 1.2), 2), actions=tuple(_actions(rng, layout, rng.randint(1, 3))))
        for i in range(members)
    ]
    out.append(Shopper(id="p1", arrive_at=round(1.0 + 0.9 * members + rng.uniform(8, 15), 1), actions=tuple(_actions(rng, layout, rng.randint(2, 4)))))
    return out, [], CameraSpec()


def _wrong_slot(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    out = []
    for i in range(max(1, min(shoppers, 3)) if shoppers != 4 else 2):
        acts = _actions(rng, layout, rng.randint(2, 3), put_back_chance=0)
        taken = next(a for a in acts if a.take)
        product = layout.slot(taken.slot).product  # type: ignore[union-attr]
        wrong = rng.choice([s for s in layout.slots if s.product != product])
        acts.append(Action(slot=wrong.slot, put_back=1, product=product, dwell_s=3.0))
        out.append(Shopper(id=f"p{i + 1}", arrive_at=round(1.0 + 12.0 * i, 1), actions=tuple(acts)))
    return out, [], CameraSpec()


def _reenter(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    first = Shopper(id="p1-a", person="p1", arrive_at=1.0, actions=tuple(_actions(rng, layout, rng.randint(1, 3), put_back_chance=0)))
    # The second visit waits until the first has left: a person is in one place at a time.
    second = Shopper(id="p1-b", person="p1", arrive_at=2.0, actions=tuple(_actions(rng, layout, rng.randint(1, 3), put_back_chance=0)))
    other = Shopper(id="p2", arrive_at=round(rng.uniform(6, 12), 1), actions=tuple(_actions(rng, layout, rng.randint(2, 4))))
    return [first, second, other], [], CameraSpec()


def _board_pulled(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    out = [
        Shopper(id=f"p{i + 1}", arrive_at=round(1.0 + 8.0 * i, 1), actions=tuple(_actions(rng, layout, rng.randint(2, 4), shelf="shelf-1" if i == 0 else None)))
        for i in range(2)
    ]
    return out, [Fault(kind="board_pull", board="shelf-1", at=round(rng.uniform(6, 12), 1), duration_s=round(rng.uniform(8, 15), 1))], CameraSpec()


def _slow_camera(rng: random.Random, layout: ShopLayout, shoppers: int) -> tuple[list[Shopper], list[Fault], CameraSpec]:
    n = 3 if shoppers == 4 else shoppers
    out = [Shopper(id=f"p{i + 1}", arrive_at=round(1.0 + rng.uniform(5.0, 8.0) * i, 1), speed_mps=round(rng.uniform(0.8, 1.1), 2), actions=tuple(_actions(rng, layout, rng.randint(2, 4)))) for i in range(n)]
    return out, [], CameraSpec(fps=3.0)


GENERATORS: dict[str, Callable[[random.Random, ShopLayout, int], tuple[list[Shopper], list[Fault], CameraSpec]]] = {
    "single": _single,
    "crowd": _crowd,
    "family": _family,
    "wrong-slot": _wrong_slot,
    "reenter": _reenter,
    "board-pulled": _board_pulled,
    "slow-camera": _slow_camera,
}
"""Every named scenario; ``--shoppers`` sets the crowd size (others use it as a hint or ignore it)."""


def generate(name: str, seed: int = 0, shoppers: int = 4, cameras: str = "single", blackout_views: float = 1.0) -> Scenario:
    """Return the named scenario for a seed; raise ScenarioInvalid for an unknown name.

    ``cameras``: ``"single"`` (one camera over the floor) or ``"grid"`` (:func:`ceiling_grid`,
    with ``blackout_views`` of the views losing a blacked-out shopper). The shoppers, their
    actions and the seed's draws do not depend on the cameras.
    """
    gen = GENERATORS.get(name)
    if gen is None:
        raise ScenarioInvalid(f"unknown scenario {name!r}; named scenarios: {', '.join(GENERATORS)} (or give a YAML file)")
    if cameras not in CAMERA_LAYOUTS:
        raise ScenarioInvalid(f"unknown camera layout {cameras!r}; use one of {', '.join(CAMERA_LAYOUTS)}")
    if shoppers < 1:
        raise ScenarioInvalid(f"--shoppers must be at least 1, got {shoppers}")
    rng = random.Random(f"{name}:{seed}:{shoppers}")
    layout = default_layout()
    people, faults, camera = gen(rng, layout, shoppers)
    if cameras == "grid":
        camera = CameraSpec.model_validate({**camera.model_dump(), "views": ceiling_grid(layout, camera.outside_m), "blackout_views": blackout_views})
    return Scenario(name=name, seed=seed, shop=layout, camera=camera, shoppers=tuple(people), faults=tuple(faults))
