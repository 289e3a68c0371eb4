"""Errors of the apply path, split the way the caller must react.

They derive from :mod:`shopfleet.errors`, where retry semantics are defined once:

* ``StateRefused`` (and its subclasses) is permanent for that message: report ``refused`` and
  wait for the next desired state. ``reason`` is one of ``REFUSE_REASONS``.
* ``ApplyFailed`` is permanent for that revision (the API server refused an object, or a workload
  cannot become ready): report ``failed``; the controller decides whether to roll back.
  ``ObjectNotFound`` (HTTP 404) and ``UnknownKind`` (no such kind in discovery) are the two
  refusals the handler tells apart, by class.
* ``ClusterUnavailable`` is temporary (HTTP 429, 409, 5xx, a timeout, a refused connection): the
  handler retries with backoff until its deadline and reports ``retrying``, never ``failed``.

The HTTP status, when there was one, is kept as the ``status`` field; nothing parses it back
out of a message.
"""

from __future__ import annotations

from shopfleet.errors import PermanentError, TemporaryError

REFUSE_REASONS = ("unsigned", "unknown_key", "forged", "replay", "wrong_shop", "state_store")


class StateRefused(PermanentError):
    """A desired state the agent must not apply; ``reason`` is one of REFUSE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason)
        self.detail = detail


class SignatureInvalid(StateRefused):
    """Unsigned, signed by an unknown key, or a signature that does not verify."""


class ReplayRefused(StateRefused):
    """A revision older than the one already applied."""

    def __init__(self, detail: str) -> None:
        super().__init__("replay", detail)


class ApplyFailed(PermanentError):
    """The cluster rejected an object or a workload cannot become ready; ``status`` is the HTTP status if any."""

    default_reason = "rejected"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message, reason=reason)
        self.status = status


class ObjectNotFound(ApplyFailed):
    """HTTP 404: the object (or, for a namespaced object, its namespace) does not exist."""

    default_reason = "not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class UnknownKind(ApplyFailed):
    """The API server's discovery does not list this apiVersion/kind (e.g. its CRD is not there yet)."""

    default_reason = "unknown_kind"


class ClusterUnavailable(TemporaryError):
    """The cluster API did not answer usefully (429, 409, 5xx, timeout, connection); retry after a delay."""

    default_reason = "cluster_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason, retry_after=retry_after)
        self.status = status


class StateStoreCorrupt(PermanentError):
    """The file holding the last applied revision cannot be read; nothing is applied until it is fixed."""

    default_reason = "state_store"
