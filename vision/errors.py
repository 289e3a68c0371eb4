"""Errors of the vision library, split by what the caller should do about them.

Retry semantics come from :mod:`shopfleet.errors`, the one place they are defined: a
:class:`~shopfleet.errors.TemporaryError` means "retry after a delay" (a camera stream dropped)
and a :class:`~shopfleet.errors.PermanentError` means "stop and report" (a corrupt model package,
zones that do not fit the image). Every error here is a :class:`VisionError` (so the CLI catches
the library's errors in one clause) and, where the answer is known, also one of the two shared
classes (so a caller outside the library decides by class, never by message). Each subclass
names the situation and carries a short ``reason`` code, which is the label value of the
Prometheus counters that count it, so logs, metrics and exceptions agree.
"""

from __future__ import annotations

from shopfleet.errors import PermanentError, ShopfleetError, TemporaryError


class VisionError(ShopfleetError):
    """Base class: ``reason`` is a short machine-readable code, the message says what to do.

    The reason comes first (``VisionError("no-frames", "...")``) because every call site in the
    library names the situation before it explains it; ``str()`` appends it in brackets so a
    one-line CLI error shows the code an operator can grep the metrics for.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)

    def __str__(self) -> str:
        return f"{self.args[0]} [{self.reason}]"


class ModelPackageInvalid(VisionError, PermanentError):
    """A model package is missing, corrupt, or does not match its manifest."""


class ModelFetchFailed(VisionError, PermanentError):
    """The model's source could not be downloaded or failed its sha256 pin."""


class ConversionError(VisionError, PermanentError):
    """A Darknet cfg/weights pair could not be converted to ONNX."""


class ZonesInvalid(VisionError, PermanentError):
    """A zones file is malformed or its shapes do not fit the camera image."""


class SourceUnavailable(VisionError, TemporaryError):
    """A camera stream or file could not be opened or stopped delivering frames."""


class FrameInvalid(VisionError):
    """A captured frame is unusable (empty, wrong shape or dtype); drop it and go on."""


class FixtureError(VisionError, PermanentError):
    """A test fixture is missing or does not match its sha256 pin."""
