"""The one place retry semantics are defined: every layer's errors derive from these.

As in kopf, a ``TemporaryError`` means "retry after a delay" (a broker restarting, a camera
stream dropped, a cluster API answering 429) and a ``PermanentError`` means "stop and report"
(bad TLS files, a corrupt model, a manifest the API server refuses). Callers decide by class,
never by parsing a message. Each error carries a short ``reason`` code, which is also the label
value of the Prometheus counter that counts it, so logs, metrics and exceptions agree.

This module imports nothing, so the leaf libraries (``vision``, ``hardware``) and the controller
may import it without depending on anything else of the project (an import-linter contract
allows exactly this module).
"""

from __future__ import annotations


class ShopfleetError(Exception):
    """Base of every shopfleet error: ``reason`` is a short machine-readable code (a metric label)."""

    default_reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class TemporaryError(ShopfleetError):
    """Retry after a delay: the condition is expected to clear by itself.

    ``retry_after`` (seconds), when the source said how long to wait (an HTTP ``Retry-After``,
    a broker's backoff), overrides the caller's own backoff.
    """

    default_reason = "temporary"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class PermanentError(ShopfleetError):
    """Stop and report: retrying the same thing will fail the same way until something changes."""

    default_reason = "permanent"


def is_temporary(exc: BaseException) -> bool:
    """Return True when ``exc`` is worth retrying (a ``TemporaryError``, or a plain OS-level timeout)."""
    return isinstance(exc, TemporaryError | TimeoutError | ConnectionError)
