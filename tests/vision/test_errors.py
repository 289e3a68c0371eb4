"""The vision library's errors carry the shared retry semantics, their reason codes and their CLI text."""

from __future__ import annotations

import pytest

from shopfleet.errors import PermanentError, ShopfleetError, TemporaryError, is_temporary
from vision.errors import (
    ConversionError,
    FixtureError,
    FrameInvalid,
    ModelFetchFailed,
    ModelPackageInvalid,
    SourceUnavailable,
    VisionError,
    ZonesInvalid,
)


@pytest.mark.parametrize("cls", [ModelPackageInvalid, ModelFetchFailed, ConversionError, ZonesInvalid, FixtureError])
def test_config_and_package_errors_are_permanent(cls: type[VisionError]) -> None:
    exc = cls("bad-thing", "fix the thing")
    assert isinstance(exc, PermanentError) and isinstance(exc, VisionError)
    assert not is_temporary(exc)
    assert exc.reason == "bad-thing"


def test_a_lost_camera_is_temporary() -> None:
    exc = SourceUnavailable("stream-ended", "rtsp://cam: no frames for 5s")
    assert isinstance(exc, TemporaryError) and is_temporary(exc)
    assert exc.retry_after is None


def test_a_bad_frame_is_neither_temporary_nor_permanent() -> None:
    exc = FrameInvalid("empty", "frame 3 has no pixels")
    assert isinstance(exc, ShopfleetError)
    assert not isinstance(exc, TemporaryError | PermanentError)


def test_str_keeps_the_reason_code_for_the_cli() -> None:
    assert str(ZonesInvalid("zone-outside", "zone 'door' lies outside 640x480")) == "zone 'door' lies outside 640x480 [zone-outside]"
