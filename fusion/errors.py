"""Errors of the fusion library; retry semantics come from ``shopfleet.errors``.

Bad *events* (an unknown slot, a timestamp going backwards) are not exceptions: they are counted
in ``Fusion.errors`` and, where they can change a cart, written on that cart as a reason. These
classes are for bad *configuration* (a layout or a scenario file that cannot be used), which must
stop the run with a message naming the file, the key and the fix.
"""

from __future__ import annotations

from shopfleet.errors import PermanentError


class LayoutInvalid(PermanentError):
    """A shop layout (door, slots, planogram) that cannot be used."""

    default_reason = "layout-invalid"


class ScenarioInvalid(PermanentError):
    """A scenario file or name that cannot be used."""

    default_reason = "scenario-invalid"
