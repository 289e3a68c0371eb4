"""Fixtures shared by the whole suite: real brokers on free ports and real databases.

Tests talk to real services on loopback (docs/architecture.md, "What is real in tests"): each test
that needs to restart or configure a broker gets its own Mosquitto child process; registry tests
run once on SQLite and once on the PostgreSQL server at 127.0.0.1:5432.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from shopfleet.broker import BrokerProcess
from tests.support.postgres import PG_ADMIN_URL

# Property tests check what a parser or a model does, never how fast: hypothesis's default 200 ms
# deadline per example is a timing assertion that fails on a loaded CI machine, so it is off.
settings.register_profile("shopfleet", deadline=None)
settings.load_profile("shopfleet")



@pytest.fixture
def broker(tmp_path) -> Iterator[BrokerProcess]:
    """A fresh MQTT broker (Mosquitto, or amqtt where it is missing) of this test's own."""
    b = BrokerProcess(workdir=tmp_path / "broker")
    (tmp_path / "broker").mkdir()
    b.start()
    yield b
    b.cleanup()


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory) -> Iterator[BrokerProcess]:
    """One broker for tests that only publish and subscribe (cheaper than a broker per test)."""
    d = tmp_path_factory.mktemp("shared-broker")
    b = BrokerProcess(workdir=d)
    b.start()
    yield b
    b.cleanup()


def _postgres_available() -> str | None:
    """Return None if PostgreSQL answers, else the reason it does not."""
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}: {str(exc)[:200]}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema of this test's own (dropped afterwards)."""
    reason = _postgres_available()
    if reason:
        pytest.skip(reason)
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'create schema "{schema}"'))
    sep = "&" if "?" in PG_ADMIN_URL else "?"
    yield f"{PG_ADMIN_URL}{sep}options=-csearch_path%3D{schema}"
    with eng.connect() as c:
        c.execute(sa.text(f'drop schema "{schema}" cascade'))
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A database URL for each engine the registry supports: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")
