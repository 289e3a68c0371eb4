"""Tiny inline-SVG charts for the shop page, computed on the server (no chart library).

Pure: values in, an SVG polyline's ``points`` attribute out. ``None`` values (a heartbeat
without that fact) are skipped, so a gap does not drag the line to zero.
"""

from __future__ import annotations

from collections.abc import Sequence


def sparkline(values: Sequence[float | None], width: float = 120, height: float = 28, pad: float = 2) -> str:
    """Return the ``points`` of a polyline drawing ``values`` left to right in a width x height box."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    if not pts:
        return ""
    lo = min(v for _, v in pts)
    hi = max(v for _, v in pts)
    span = hi - lo or 1.0
    n = max(len(values) - 1, 1)
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    return " ".join(
        f"{pad + inner_w * i / n:.1f},{pad + inner_h * (1 - (v - lo) / span):.1f}" for i, v in pts
    )
