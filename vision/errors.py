"""Errors of the vision library, split by what the caller should do about them.

As in kopf, a ``TemporaryError`` means "retry after a delay" (a camera stream dropped) and a
``PermanentError`` means "stop and report" (a corrupt model package, zones that do not fit the
image). Each subclass names the situation and carries a short ``reason`` code, which is the label
value of the Prometheus counters that count it, so logs, metrics and exceptions agree.
"""

from __future__ import annotations


class VisionError(Exception):
    """Base class: ``reason`` is a short machine-readable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.args[0]} [{self.reason}]"


class TemporaryError(VisionError):
    """Retry after a delay: the condition is expected to clear by itself."""


class PermanentError(VisionError):
    """Stop and report: retrying the same thing will fail the same way."""


class ModelPackageInvalid(PermanentError):
    """A model package is missing, corrupt, or does not match its manifest."""


class ModelFetchFailed(PermanentError):
    """The model's source could not be downloaded or failed its sha256 pin."""


class ConversionError(PermanentError):
    """A Darknet cfg/weights pair could not be converted to ONNX."""


class ZonesInvalid(PermanentError):
    """A zones file is malformed or its shapes do not fit the camera image."""


class SourceUnavailable(TemporaryError):
    """A camera stream or file could not be opened or stopped delivering frames."""


class FrameInvalid(VisionError):
    """A captured frame is unusable (empty, wrong shape or dtype); drop it and go on."""


class FixtureError(PermanentError):
    """A test fixture is missing or does not match its sha256 pin."""
