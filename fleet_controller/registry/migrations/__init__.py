"""Schema migrations of the controller database (Alembic), runnable from code.

Each area of the controller owns a branch of revisions rooted at ``0001_registry`` (releases
add ``0002_releases``, accounts ``0003_accounts``), so the upgrade target is always ``heads``:
every branch to its newest revision. The controller upgrades at start unless told not to; the
same call is what tests use, so the schema they run against is the one production gets.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None) -> Config:
    """Return an Alembic config for this package; with ``engine``, migrations run on it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    if engine is not None:
        cfg.attributes["engine"] = engine
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, target: str = "heads") -> None:
    """Upgrade the database behind ``engine`` to ``target`` (every branch head by default)."""
    # Alembic narrates every step at INFO; the controller's own log line says what happened.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    command.upgrade(alembic_config(engine), target)


def pending(engine: Engine) -> set[str]:
    """Return the head revisions the database has not reached yet (empty when up to date)."""
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    script = ScriptDirectory.from_config(alembic_config())
    reached: set[str] = set()
    for rev in current:
        reached |= {r.revision for r in script.iterate_revisions(rev, "base")}
    return heads - reached
