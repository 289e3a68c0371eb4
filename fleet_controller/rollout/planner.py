"""Plan a rollout: which shops go in which wave. A pure function, so it is tested as tables.

``plan_rollout(fleet, release, policy)`` looks at nothing but its arguments (like Rancher Fleet's
partitioning): the target narrows the fleet; each wave takes its named shops, then shops matching
its labels, then fills its cumulative percentage with the next shops in a stable order. The order
is a hash of ``(release, shop)``: deterministic (the same inputs give the same plan, so a restarted
controller agrees with itself), spread across regions (not alphabetical), and different per release
(the same shops are not always first). Shops already on the release, or excluded, are listed as
skipped with the reason.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_controller.rollout.policy import RolloutPolicy, Target


@dataclass(frozen=True)
class FleetShop:
    """What planning and gating need to know about a shop."""

    id: str
    region: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    node_classes: frozenset[str] = frozenset()
    timezone: str = "UTC"
    release: str | None = None


@dataclass(frozen=True)
class PlannedWave:
    """A wave of the plan: its name and shops, in the order they will be started."""

    name: str
    shops: tuple[str, ...]


@dataclass(frozen=True)
class RolloutPlan:
    """The waves, and the shops left out with why."""

    release: str
    waves: tuple[PlannedWave, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def shops(self) -> tuple[str, ...]:
        """Return every planned shop in order."""
        return tuple(s for w in self.waves for s in w.shops)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (stored with the rollout)."""
        return {
            "release": self.release,
            "waves": [{"name": w.name, "shops": list(w.shops)} for w in self.waves],
            "skipped": [list(s) for s in self.skipped],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutPlan:
        """Return the plan stored by :meth:`to_json`."""
        return cls(
            data["release"],
            tuple(PlannedWave(w["name"], tuple(w["shops"])) for w in data["waves"]),
            tuple((s, r) for s, r in data.get("skipped", [])),
        )


def _targeted(shop: FleetShop, target: Target) -> str | None:
    """Return why ``shop`` is outside the target, or None if it is inside."""
    if shop.id in target.exclude:
        return "excluded"
    if target.regions and shop.region not in target.regions:
        return f"region {shop.region or '(none)'} not targeted"
    for k, v in target.labels.items():
        if shop.labels.get(k) != v:
            return f"label {k}={v} missing"
    if target.node_classes and not (shop.node_classes & set(target.node_classes)):
        return f"no node of class {'/'.join(target.node_classes)}"
    return None


def _order_key(release: str, shop: str) -> bytes:
    return hashlib.sha256(f"{release}\0{shop}".encode()).digest()


def plan_rollout(fleet: Iterable[FleetShop], release: str, policy: RolloutPolicy) -> RolloutPlan:
    """Return the waves that take ``release`` to the shops of ``fleet`` that ``policy`` targets (pure)."""
    skipped: list[tuple[str, str]] = []
    targeted: dict[str, FleetShop] = {}
    for shop in sorted(fleet, key=lambda s: s.id):
        why = _targeted(shop, policy.target)
        if why is None and shop.release == release:
            why = "already on this release"
        if why is None:
            targeted[shop.id] = shop
        else:
            skipped.append((shop.id, why))
    known = {s for s, _ in skipped} | set(targeted)
    for w in policy.waves:
        for s in w.shops:
            if s not in known:
                skipped.append((s, f"named in wave {w.name!r} but not in the fleet"))
                known.add(s)
    total = len(targeted)
    remaining = sorted(targeted, key=lambda s: _order_key(release, s))
    assigned: set[str] = set()
    waves: list[PlannedWave] = []
    for w in policy.waves:
        picked: list[str] = [s for s in w.shops if s in targeted and s not in assigned]
        assigned.update(picked)
        if w.labels:
            for s in remaining:
                if s not in assigned and all(targeted[s].labels.get(k) == v for k, v in w.labels.items()):
                    picked.append(s)
                    assigned.add(s)
        if w.percent is not None:
            goal = math.ceil(total * w.percent / 100 - 1e-9)
            for s in remaining:
                if len(assigned) >= goal:
                    break
                if s not in assigned:
                    picked.append(s)
                    assigned.add(s)
        if picked:
            waves.append(PlannedWave(w.name, tuple(picked)))
    return RolloutPlan(release, tuple(waves), tuple(sorted(skipped)))
