"""Rollout policy: what an ML engineer asks for, checked when it is built.

A policy is plain data (pydantic, ``extra="forbid"``, a description on every field) that comes
from a YAML file (``shopfleet rollout start --policy FILE``) or the API. Cross-field checks catch
what would otherwise surface in the middle of a rollout: waves whose percentages go down, a last
wave that does not reach 100 %, a bake time longer than the deadline, a window with a time zone
that does not exist.
"""

from __future__ import annotations

import re
from datetime import time as dtime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the file, the key and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class Target(_Model):
    """Which shops the rollout may touch at all."""

    regions: tuple[str, ...] = Field((), description="Only shops in these regions (empty = every region).")
    labels: dict[str, str] = Field(default_factory=dict, description="Only shops whose labels include all of these (e.g. tier: standard).")
    node_classes: tuple[str, ...] = Field((), description="Only shops that have a node of one of these classes (e.g. gpu).")
    exclude: tuple[str, ...] = Field((), description="Shop ids never to touch.")


class Wave(_Model):
    """One wave: named canary shops, shops matching labels, and/or a cumulative percentage of the target."""

    name: str = Field(min_length=1, max_length=64, description="Wave name shown in status, e.g. 'canary'.")
    shops: tuple[str, ...] = Field((), description="Shop ids in this wave (a canary).")
    labels: dict[str, str] = Field(default_factory=dict, description="Also every not-yet-planned shop whose labels include these.")
    percent: float | None = Field(
        None, gt=0, le=100, description="Cumulative share of the targeted shops done after this wave; the next shops in a stable hash order fill it."
    )

    @model_validator(mode="after")
    def _something(self) -> Wave:
        if not self.shops and not self.labels and self.percent is None:
            raise ValueError(f"wave {self.name!r} selects no shop: give it shops, labels or percent")
        return self


class MetricGate(_Model):
    """A bound on a numeric metric the shop's nodes report in heartbeats (e.g. cart_review_rate)."""

    metric: str = Field(min_length=1, max_length=64, description="Name of a heartbeat metric.")
    max: float | None = Field(None, description="Gate fails if any node reports more than this.")
    min: float | None = Field(None, description="Gate fails if any node reports less than this.")

    @model_validator(mode="after")
    def _bound(self) -> MetricGate:
        if self.max is None and self.min is None:
            raise ValueError(f"metric gate {self.metric!r} has no bound: set max and/or min")
        return self


class Gates(_Model):
    """Health a shop must show during its bake time, on heartbeats sent after it applied."""

    min_nodes_online: float = Field(1.0, ge=0, le=1, description="Share of the shop's nodes that must be online (1.0 = all).")
    offline_grace_s: float = Field(
        60.0, ge=0, description="Seconds the online share may stay below min_nodes_online before the gate fails; rides out a flaky link or a controller restart, but delays catching a node the release crashed."
    )
    min_fps: float | None = Field(5.0, ge=0, description="Every running vision pipeline must report at least this fps; null disables.")
    max_errors_per_minute: float | None = Field(
        10.0, ge=0, description="Pipeline errors (summed over the shop) per minute of bake time must stay below this; null disables."
    )
    metrics: tuple[MetricGate, ...] = Field((), description="Bounds on any reported metric, e.g. cart_review_rate max 0.1.")


class TimeWindow(_Model):
    """A daily window in the shop's local time zone; ``end`` before ``start`` wraps past midnight."""

    start: str = Field(description="Local start time, HH:MM.")
    end: str = Field(description="Local end time, HH:MM (exclusive).")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not HH:MM (24 h), e.g. 02:30")
        return v

    def contains(self, t: dtime) -> bool:
        """Return whether local time ``t`` falls in the window."""
        s, e = dtime.fromisoformat(self.start), dtime.fromisoformat(self.end)
        if s == e:
            return True
        return s <= t < e if s < e else (t >= s or t < e)


class IdleRule(_Model):
    """"No shopper inside and the door closed", from the shop's latest telemetry readings."""

    occupancy_reading: str = Field("occupancy", description="Reading name of shoppers inside; idle when every such reading is 0.")
    door_reading: str = Field("door_open", description="Reading name of the door contact; idle when every such reading is 0.")
    max_age_s: float = Field(120.0, gt=0, description="Readings older than this do not count (a silent shop is not idle).")


class Windows(_Model):
    """When a shop may be updated: inside any local time window, or when idle; nothing set = any time."""

    local: tuple[TimeWindow, ...] = Field((), description="Daily local-time windows.")
    idle: IdleRule | None = Field(None, description="Also open when the shop is idle (no shopper, door closed).")


class RolloutPolicy(_Model):
    """How a release reaches the fleet."""

    target: Target = Field(default_factory=Target, description="Which shops the rollout may touch.")
    waves: tuple[Wave, ...] = Field(
        default_factory=lambda: (Wave(name="all", percent=100),), min_length=1, description="Waves in order; the last must reach 100 %."
    )
    max_in_flight: int = Field(10, ge=1, description="Most shops applying or baking at once; higher is faster, risks more at a time.")
    bake_time_s: float = Field(600.0, ge=0, description="Seconds a shop must stay healthy after applying before it counts as done.")
    apply_timeout_s: float = Field(900.0, gt=0, description="Seconds a shop may take to report its apply before it counts as failed.")
    deadline_s: float | None = Field(None, gt=0, description="Seconds after start when no new shop is started; null = no deadline.")
    gates: Gates = Field(default_factory=Gates, description="Health gates checked during bake time.")
    windows: Windows = Field(default_factory=Windows, description="Per-shop maintenance windows.")

    @model_validator(mode="after")
    def _waves(self) -> RolloutPolicy:
        names = [w.name for w in self.waves]
        if len(set(names)) != len(names):
            raise ValueError(f"wave names {names} repeat: give each wave its own name")
        last = 0.0
        for w in self.waves:
            if w.percent is not None:
                if w.percent < last:
                    raise ValueError(f"wave {w.name!r} has percent {w.percent} below an earlier wave's {last}: percentages are cumulative")
                last = w.percent
        if self.waves[-1].percent != 100:
            raise ValueError("the last wave must have percent: 100 so that every targeted shop is planned")
        if self.deadline_s is not None and self.deadline_s < self.bake_time_s:
            raise ValueError(f"deadline_s {self.deadline_s} is shorter than bake_time_s {self.bake_time_s}: no shop could finish")
        return self


def load_policy(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RolloutPolicy:
    """Load a policy YAML file (or defaults) plus overrides; raise ``PolicyError`` naming file, key and fix."""
    data: dict[str, Any] = {}
    source = str(path) if path else "(defaults)"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise PolicyError(f"{source}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PolicyError(f"{source}: the policy must be a mapping of keys (target, waves, bake_time_s, ...)")
        data = loaded or {}
    data.update(overrides or {})
    return policy_from_dict(data, source)


def policy_from_dict(data: dict[str, Any], source: str = "(policy)") -> RolloutPolicy:
    """Validate a policy dict; raise ``PolicyError`` naming the source, the key and the fix."""
    try:
        return RolloutPolicy.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "(policy)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key: remove it or check its spelling (docs/rollouts.md lists every key)"
            parts.append(f"{loc}: {msg}")
        raise PolicyError(f"{source}: " + "; ".join(parts)) from None

