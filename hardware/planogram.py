"""The planogram: which product sits on which board channel, and what one unit weighs.

A shelf_change event carries grams; what the shop needs is "2 x cola-330 taken from slot A1".
The planogram file (YAML, docs/hardware.md) maps (board, channel) to a slot and a product with
its unit weight and the spread of that weight between units. The quantity estimate is a pure
function of the delta and the unit weight, with a confidence that says how well the delta
matches a whole number of units, so a downstream fusion step can ask a human when it is low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shopfleet.errors import PermanentError


class PlanogramError(PermanentError, ValueError):
    """A planogram file that cannot be used; the message names the file, the key and the fix."""

    default_reason = "planogram_invalid"


class Slot(BaseModel):
    """One shelf slot on one load-cell channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    board: str = Field(min_length=1, max_length=32, description="Board id as the board reports it in HELLO.")
    channel: int = Field(ge=0, le=15, description="Channel index on that board (0-based, as in HELLO).")
    slot: str = Field(min_length=1, max_length=32, description="Slot name printed on the shelf, e.g. 'A1'.")
    product: str = Field(min_length=1, max_length=64, description="Product id (SKU) stocked in the slot.")
    unit_weight_g: float = Field(gt=0, le=50000, description="Weight of one unit in grams.")
    unit_weight_sd_g: float = Field(
        0.0, ge=0, description="Standard deviation of unit weight between units (filling, packaging), in grams."
    )


class Planogram(BaseModel):
    """All slots of a shop."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    slots: tuple[Slot, ...] = Field(default=(), description="Every stocked slot of the shop.")

    @model_validator(mode="after")
    def _unique(self) -> Planogram:
        seen: dict[tuple[str, int], str] = {}
        for s in self.slots:
            key = (s.board, s.channel)
            if key in seen:
                raise ValueError(f"board {s.board!r} channel {s.channel} is used by slots {seen[key]!r} and {s.slot!r}: give each slot its own channel")
            seen[key] = s.slot
        return self

    def slot_for(self, board: str, channel: int) -> Slot | None:
        """Return the slot on a board's channel, or None if the planogram has none there."""
        for s in self.slots:
            if s.board == board and s.channel == channel:
                return s
        return None


def load_planogram(path: Path) -> Planogram:
    """Load and validate a planogram YAML file, raising PlanogramError naming file, key and fix."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise PlanogramError(f"{path}: cannot read planogram: {exc.strerror}; check the path") from exc
    except yaml.YAMLError as exc:
        raise PlanogramError(f"{path}: not valid YAML: {exc}; fix the syntax") from exc
    try:
        return Planogram.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise PlanogramError(f"{path}: invalid planogram: {problems} (see docs/hardware.md, 'Planogram')") from exc


@dataclass(frozen=True)
class QuantityEstimate:
    """Units added (positive) or taken (negative), and how sure we are (0..1)."""

    quantity: int
    confidence: float


def estimate_quantity(delta_g: float, unit_weight_g: float, unit_weight_sd_g: float = 0.0, noise_g: float = 0.0) -> QuantityEstimate:
    """Estimate the number of units in a weight delta, with a confidence.

    The quantity is the nearest whole number of units. The confidence falls with the residual
    (how far the delta is from that whole number) relative to half a unit, and with the
    uncertainty the quantity itself brings (n units spread by sqrt(n) * unit sd, plus noise):
    1.0 is an exact multiple; 0.0 is exactly between two counts.
    """
    units = delta_g / unit_weight_g
    q = round(units)
    residual_g = abs(delta_g - q * unit_weight_g)
    spread_g = math.sqrt(abs(q) * unit_weight_sd_g**2 + noise_g**2)
    excess = max(residual_g - spread_g, 0.0)
    confidence = max(0.0, 1.0 - excess / (unit_weight_g / 2))
    if q == 0:
        confidence = 0.0  # a settled change that is not a unit: something else is on the shelf
    return QuantityEstimate(int(q), round(confidence, 3))
