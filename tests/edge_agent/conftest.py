"""Fixtures of the agent tests.

``broker`` is the suite's per-test Mosquitto, except that when the tests run as root (CI
containers) Mosquitto is told to stay root: otherwise it drops to the ``mosquitto`` user, cannot
write its persistence file in the test's private directory, and a broker restart loses retained
messages and queued sessions, which the outage tests depend on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shopfleet.broker import BrokerProcess


@pytest.fixture
def broker(tmp_path) -> Iterator[BrokerProcess]:
    """A fresh Mosquitto of this test's own whose persistence survives restarts."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    extra = "user root" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    b = BrokerProcess(workdir=workdir, extra_config=extra)
    b.start()
    yield b
    b.cleanup()
