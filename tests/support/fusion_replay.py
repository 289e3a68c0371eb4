"""A fusion scenario replayed as the shop broker carries it: the track stream and each node's events, for the fusion pipeline's tests."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fusion.sim
from edge_agent.pipelines.fusion import Config, FusionPipeline, track_topic
from edge_agent.protocol import Alert, Event, Topics, encode
from fusion.engine import Fusion
from fusion.generate import generate
from fusion.layout import ShopLayout, parse_layout
from fusion.types import (
    BoardLink,
    DoorContact,
    DoorCrossing,
    ShelfChange,
    TrackLost,
    TrackObservation,
    ZoneVisit,
)

SHOP = "shop-f"
TRACK_NODE = "track-stream"
"""The node part of the track stream's broker user ``<shop>.track-stream``: the only node fusion takes tracks from."""
VISION_NODE, SENSOR_NODE = "gpu-1", "pi-1"
"""The nodes the shop's events come from: the camera's agent, and the sensor agent reading every board and the door."""


def with_publishers(layout: ShopLayout, vision: str = VISION_NODE, sensors: str = SENSOR_NODE) -> ShopLayout:
    """Return ``layout`` with its publishers: vision events from ``vision``, the door's and every board's from ``sensors``."""
    boards = {s.board: sensors for s in layout.slots}
    return parse_layout({**layout.model_dump(mode="json"), "publishers": {"vision": vision, "door": sensors, "boards": boards}})


def bound(config: Config, layout: ShopLayout | None = None) -> FusionPipeline:
    """Return the pipeline bound to ``layout`` (default: the 'single' scenario's shop) with its publishers, as run() binds it."""
    p = FusionPipeline(config)
    p.bind(with_publishers(layout or generate("single", seed=1).shop))
    return p


def record_scenario(monkeypatch: Any, name: str, seed: int) -> tuple[Any, list[Any]]:
    """Run a scenario through the real tracker and board code; return its result and fusion inputs (in feed order)."""
    inputs: list = []

    class Recording(Fusion):
        def feed(self, item):  # type: ignore[no-untyped-def]
            inputs.append(item)
            return super().feed(item)

    monkeypatch.setattr(fusion.sim, "Fusion", Recording)
    result = fusion.sim.run(generate(name, seed=seed))
    return result, inputs


def to_messages(inputs: list, base: float, shop: str = SHOP, track_node: str = TRACK_NODE, vision: str = VISION_NODE,
                sensors: str = SENSOR_NODE) -> list[tuple[str, bytes]]:
    """Turn fusion inputs into what the shop broker carries (scenario time + base): camera ``ceiling``'s track
    frames under ``track_node``, door crossings and zone events of ``vision``, board events and alerts of ``sensors``."""
    out: list[tuple[str, bytes]] = []
    seq: Counter[str] = Counter()

    def event(node: str, type_: str, source: str, data: dict, at: float) -> None:
        seq[node] += 1
        msg = Event(shop=shop, node=node, epoch=f"ep-{node}", seq=seq[node], type=type_, source=source, data=data, at=at)
        out.append((Topics.node(shop, node, "events"), encode(msg)))

    frame: dict | None = None
    for it in inputs:
        if isinstance(it, TrackObservation | TrackLost):
            if frame is None or frame["ts"] != round(it.ts + base, 3):
                if frame is not None:
                    out.append((track_topic(shop, track_node, "ceiling"), json.dumps(frame).encode()))
                frame = {"camera": "ceiling", "ts": round(it.ts + base, 3), "tracks": [], "ended": []}
            if isinstance(it, TrackObservation):
                frame["tracks"].append([it.track_id, it.x, it.y])
            else:
                frame["ended"].append(it.track_id)
            continue
        if frame is not None:
            out.append((track_topic(shop, track_node, "ceiling"), json.dumps(frame).encode()))
            frame = None
        at = it.ts + base
        if isinstance(it, DoorCrossing):
            event(vision, "person_entered" if it.direction == "in" else "person_exited", "ceiling", {"camera": "ceiling", "track_id": it.track_id, "zone": "door"}, at)
        elif isinstance(it, ZoneVisit):
            event(vision, it.kind, "ceiling", {"camera": "ceiling", "track_id": it.track_id, "zone": it.zone}, at)
        elif isinstance(it, ShelfChange):
            event(sensors, "shelf_change", it.board, {"board": it.board, "channel": it.channel, "slot": it.slot, "product": it.product,
                                                      "quantity": it.quantity, "delta_g": it.delta_g, "confidence": it.confidence}, at)
        elif isinstance(it, DoorContact):
            event(sensors, "door_opened" if it.open else "door_closed", it.board, {"board": it.board, "channel": 0}, at)
        elif isinstance(it, BoardLink):
            seq[sensors] += 1
            alert = Alert(shop=shop, node=sensors, epoch=f"ep-{sensors}", seq=seq[sensors], ts=at, name="sensor_board_disconnected",
                          state="resolved" if it.connected else "firing", source=it.board)
            out.append((Topics.node(shop, sensors, "events"), encode(alert)))
    if frame is not None:
        out.append((track_topic(shop, track_node, "ceiling"), json.dumps(frame).encode()))
    return out


def offline_carts(result: Any, inputs: list) -> tuple[list[Any], Counter]:
    """What fusion makes of ``inputs`` in time order, its carts closed by time passing, without appearance vectors (the
    vision pipeline's track stream carries positions only); return the carts and Counter((status, lines))."""
    import dataclasses

    plain = [dataclasses.replace(i, appearance=None) if isinstance(i, TrackObservation) else i for i in inputs]
    engine = Fusion(result.scenario.shop)
    made = [c for i in sorted(plain, key=lambda i: i.ts) for c in engine.feed(i)] + engine.advance(max(i.ts for i in inputs) + 60)
    return made, Counter((c.status, tuple(sorted(c.items().items()))) for c in made)
