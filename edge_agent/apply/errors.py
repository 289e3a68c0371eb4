"""Errors of the apply path, split the way the caller must react (STYLE.md rule 6).

``StateRefused`` (and its subclasses) is permanent for that message: report ``refused`` and
wait for the next desired state. ``ApplyFailed`` is permanent for that revision: report
``failed``; the controller decides whether to roll back. ``ClusterUnavailable`` is temporary:
retry after a delay.
"""

from __future__ import annotations

REFUSE_REASONS = ("unsigned", "unknown_key", "forged", "replay", "wrong_shop", "state_store")


class StateRefused(Exception):
    """A desired state the agent must not apply; ``reason`` is one of REFUSE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SignatureInvalid(StateRefused):
    """Unsigned, signed by an unknown key, or a signature that does not verify."""


class ReplayRefused(StateRefused):
    """A revision older than the one already applied."""

    def __init__(self, detail: str) -> None:
        super().__init__("replay", detail)


class ApplyFailed(Exception):
    """The cluster rejected an object or a workload did not become ready in time."""


class ClusterUnavailable(Exception):
    """The cluster API did not answer; retry after a delay."""


class StateStoreCorrupt(RuntimeError):
    """The file holding the last applied revision cannot be read; nothing is applied until it is fixed."""
