"""Turn tracks into shop events: door crossings, shelf-zone visits, dwell and occupancy.

``ZoneEvents.update(tracks)`` is a small state machine per track id with no I/O: it remembers
each track's last anchor point and door side, the shelf zones it is in and since when, and the
shop's occupancy count, and returns the ``ShopEvent`` values the frame caused.
Tracks marked ``predicted`` (hidden for a moment, reported at the tracker's prediction) change
no state and cause no event: their zones stay as they were until the track is seen again or ends.

- ``person_entered`` / ``person_exited``: the track's anchor moved across the door segment
  (the movement segment intersects it and the side flipped); direction comes from ``enter_from``.
  Requiring the segments to intersect, not just a side flip, ignores people walking past the
  extension of the door line.
- ``zone_enter`` / ``zone_exit`` (with seconds spent as ``value``); a track that ends while in a
  zone exits it, so every enter has its exit.
- ``dwell``: once per visit, when a track has stayed ``dwell_seconds`` in a shelf zone.
- ``occupancy``: the count of people inside (entries minus exits, never below zero) whenever it
  changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from vision.types import ShopEvent, Tracks
from vision.zones import (
    ZonesConfig,
    anchor_points,
    points_in_polygon,
    segments_intersect,
    side_of_line,
)


@dataclass
class _State:
    point: tuple[float, float]
    side: int
    zones: dict[str, float] = field(default_factory=dict)  # zone -> entered at
    dwelled: set[str] = field(default_factory=set)


class ZoneEvents:
    """Per-camera event state machine fed one Tracks value per frame."""

    def __init__(self, zones: ZonesConfig, camera: str | None = None) -> None:
        self.zones = zones
        self.camera = camera or zones.camera
        self._polys = [(s.name, np.array(s.polygon, np.float64), s.dwell_seconds) for s in zones.shelves]
        self._state: dict[int, _State] = {}
        self.occupancy = 0

    def _door(self, tid: int, st: _State, pt: tuple[float, float], side: int, ts: float) -> list[ShopEvent]:
        door = self.zones.door
        if door is None or side == 0 or st.side == 0 or side == st.side:
            return []
        if not segments_intersect(st.point, pt, door.a, door.b):
            return []
        from_side = "left" if st.side > 0 else "right"
        kind: Literal["person_entered", "person_exited"] = "person_entered" if from_side == door.enter_from else "person_exited"
        before = self.occupancy
        self.occupancy = self.occupancy + 1 if kind == "person_entered" else max(0, self.occupancy - 1)
        out = [ShopEvent(kind, self.camera, ts, track_id=tid, zone="door")]
        if self.occupancy != before:
            out.append(ShopEvent("occupancy", self.camera, ts, value=float(self.occupancy)))
        return out

    def update(self, tracks: Tracks) -> list[ShopEvent]:
        """Return the events caused by this frame's tracks (and by tracks that ended)."""
        ts = tracks.ts
        events: list[ShopEvent] = []
        pts = anchor_points(tracks.xyxy, self.zones.anchor)
        door = self.zones.door
        sides = side_of_line(pts, door.a, door.b) if door else np.zeros(len(pts), np.int64)
        inside = {name: points_in_polygon(pts, poly) for name, poly, _ in self._polys}
        predicted = tracks.predicted if tracks.predicted is not None else np.zeros(len(tracks), bool)
        for i, tid in enumerate(tracks.ids.tolist()):
            if predicted[i]:
                # A hidden shopper's predicted box: it keeps the track alive but is no evidence of a
                # crossing or a zone change (a coasting prediction can drift over the door line).
                continue
            pt = (float(pts[i, 0]), float(pts[i, 1]))
            side = int(sides[i])
            st = self._state.get(tid)
            if st is None:
                st = self._state[tid] = _State(pt, side)
            else:
                events += self._door(tid, st, pt, side, ts)
            for name, _, dwell in self._polys:
                now_in = bool(inside[name][i])
                if now_in and name not in st.zones:
                    st.zones[name] = ts
                    events.append(ShopEvent("zone_enter", self.camera, ts, track_id=tid, zone=name))
                elif not now_in and name in st.zones:
                    events.append(ShopEvent("zone_exit", self.camera, ts, track_id=tid, zone=name, value=round(ts - st.zones.pop(name), 3)))
                    st.dwelled.discard(name)
                if now_in and name not in st.dwelled and ts - st.zones[name] >= dwell:
                    st.dwelled.add(name)
                    events.append(ShopEvent("dwell", self.camera, ts, track_id=tid, zone=name, value=round(ts - st.zones[name], 3)))
            st.point = pt
            if side != 0:
                st.side = side
        for tid in tracks.ended:
            st = self._state.pop(tid, None)
            if st is None:
                continue
            for name, since in st.zones.items():
                events.append(ShopEvent("zone_exit", self.camera, ts, track_id=tid, zone=name, value=round(ts - since, 3), detail={"reason": "track-lost"}))
        return events
