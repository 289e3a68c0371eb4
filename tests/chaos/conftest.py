"""Fixtures of the chaos tier (docs/chaos.md): a deploy directory the broker user can read, and a
database per engine whose PostgreSQL connections carry a name of their own (so the tier can count
them)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def chaos_root() -> Iterator[Path]:
    """A temporary deploy directory Mosquitto (dropping to the ``mosquitto`` user) can traverse."""
    d = Path(tempfile.mkdtemp(prefix="shopfleet-chaos-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_url: str) -> tuple[str, str]:
    """``(url, application_name)``: this test's own PostgreSQL schema, its connections named."""
    app = f"chaos_{uuid.uuid4().hex[:10]}"
    return f"{postgres_url}&application_name={app}", app
