"""Shop maintenance, remote actions and per-node command counters, in the registry.

* **Maintenance** (``shop_maintenance``): a shop an operator is working on. While it lasts the
  rollout executor starts no new update on the shop (``rollout.step`` holds it; a rollback still
  goes through) and its alerts are muted (``alerts.store`` treats them as silenced). One row per
  shop; ``until`` ends it by itself, or it is cleared.
* **Remote actions** (``remote_actions``): every restart, maintenance change and re-send of a
  desired state an operator asked for, with its state (``pending``, ``ok``, ``failed``,
  ``expired``) and the agent's message, so the shop page shows the result and the audit log has
  the request. A command's row is matched to the node's ``CommandResult`` by correlation id.
* **Command counters** (``command_counters``): the counter the controller puts in each signed
  command, +1 per node and command, taken in one transaction so controllers sharing the database
  never hand out the same value twice. The agent refuses a command whose counter is not above the
  last one it accepted, so a captured command cannot be replayed.

Plain functions over an engine or a connection: the rollout executor, the alert store and the web
layer all call them, and this module is below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base, table_of


class ShopMaintenance(Base):
    """A shop in maintenance: rollouts hold, alerts muted."""

    __tablename__ = "shop_maintenance"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    since: Mapped[float] = mapped_column(Float, nullable=False)
    until: Mapped[float | None] = mapped_column(Float, nullable=True)
    by: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")


class RemoteAction(Base):
    """One remote action an operator asked for, and how it ended."""

    __tablename__ = "remote_actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63), nullable=False, index=True)
    node_id: Mapped[str | None] = mapped_column(String(63), nullable=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    args: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    correlation_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    requested_by: Mapped[str] = mapped_column(String(64), nullable=False)
    requested_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class CommandCounter(Base):
    """The last counter signed into a command for one node."""

    __tablename__ = "command_counters"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    counter: Mapped[int] = mapped_column(Integer, nullable=False)


MAINTENANCE = table_of(ShopMaintenance)
ACTIONS = table_of(RemoteAction)
COUNTERS = table_of(CommandCounter)


@dataclass(frozen=True)
class MaintenanceView:
    """A shop's maintenance as the shop page shows it."""

    shop: str
    since: float
    until: float | None
    by: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RemoteActionView:
    """A remote action and its result."""

    id: int
    shop: str
    node: str | None
    action: str
    args: dict[str, Any]
    correlation_id: str | None
    revision: int | None
    status: str
    message: str
    requested_by: str
    requested_at: float
    expires_at: float | None
    finished_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _active(now: float) -> Any:
    return or_(MAINTENANCE.c.until.is_(None), MAINTENANCE.c.until > now)


def shops_in_maintenance(conn: Connection | Engine, now: float) -> frozenset[str]:
    """Return the ids of shops in maintenance at ``now``."""
    stmt = select(MAINTENANCE.c.shop_id).where(_active(now))
    if isinstance(conn, Engine):
        with conn.connect() as c:
            return frozenset(c.execute(stmt).scalars())
    return frozenset(conn.execute(stmt).scalars())


def maintenance_until(conn: Connection, now: float) -> dict[str, float]:
    """Return shop id -> end of its maintenance, for shops in maintenance at ``now`` (open-ended: a year ahead)."""
    rows = conn.execute(select(MAINTENANCE.c.shop_id, MAINTENANCE.c.until).where(_active(now))).all()
    return {shop: until if until is not None else now + 365 * 86400.0 for shop, until in rows}


def maintenance(engine: Engine, shop: str, now: float) -> MaintenanceView | None:
    """Return the shop's maintenance if it is in maintenance at ``now``."""
    with engine.connect() as conn:
        r = conn.execute(select(MAINTENANCE).where(MAINTENANCE.c.shop_id == shop, _active(now))).first()
    return None if r is None else MaintenanceView(r.shop_id, r.since, r.until, r.by, r.reason)


def set_maintenance(engine: Engine, shop: str, by: str, now: float, *, until: float | None = None, reason: str = "") -> MaintenanceView:
    """Put ``shop`` in maintenance from ``now`` (until ``until``, or until cleared); replace an earlier one."""
    with engine.begin() as conn:
        conn.execute(delete(MAINTENANCE).where(MAINTENANCE.c.shop_id == shop))
        conn.execute(insert(MAINTENANCE).values(shop_id=shop, since=now, until=until, by=by, reason=reason[:500]))
    return MaintenanceView(shop, now, until, by, reason[:500])


def clear_maintenance(engine: Engine, shop: str) -> bool:
    """End the shop's maintenance; return whether it was in maintenance."""
    with engine.begin() as conn:
        n = conn.execute(delete(MAINTENANCE).where(MAINTENANCE.c.shop_id == shop)).rowcount
    return bool(n)


def next_counter(engine: Engine, shop: str, node: str) -> int:
    """Return the next command counter of a node (1, 2, ...), unique across controllers sharing the database."""
    with engine.begin() as conn:
        ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(COUNTERS)
        conn.execute(ins.values(shop_id=shop, node_id=node, counter=0).on_conflict_do_nothing())
        conn.execute(update(COUNTERS).where(COUNTERS.c.shop_id == shop, COUNTERS.c.node_id == node)
                     .values(counter=COUNTERS.c.counter + 1))
        value = conn.execute(select(COUNTERS.c.counter).where(COUNTERS.c.shop_id == shop, COUNTERS.c.node_id == node)).scalar_one()
    return int(value)


def _action_view(r: Any) -> RemoteActionView:
    return RemoteActionView(r.id, r.shop_id, r.node_id, r.action, r.args or {}, r.correlation_id, r.revision, r.status,
                            r.message, r.requested_by, r.requested_at, r.expires_at, r.finished_at)


def add_action(engine: Engine, *, shop: str, node: str | None, action: str, args: dict[str, Any], requested_by: str, now: float,
               status: str = "pending", message: str = "", correlation_id: str | None = None, revision: int | None = None,
               expires_at: float | None = None) -> RemoteActionView:
    """Store a remote action; return it with its id."""
    values = dict(shop_id=shop, node_id=node, action=action, args=args, correlation_id=correlation_id, revision=revision,
                  status=status, message=message, requested_by=requested_by, requested_at=now, expires_at=expires_at,
                  finished_at=None if status == "pending" else now)
    with engine.begin() as conn:
        new_id = conn.execute(insert(ACTIONS).values(**values)).inserted_primary_key[0]  # type: ignore[index]
        r = conn.execute(select(ACTIONS).where(ACTIONS.c.id == new_id)).one()
    return _action_view(r)


def finish_action(engine: Engine, action_id: int, status: str, message: str, now: float) -> bool:
    """Mark a pending action ok, failed or expired; return whether it was still pending."""
    with engine.begin() as conn:
        n = conn.execute(update(ACTIONS).where(ACTIONS.c.id == action_id, ACTIONS.c.status == "pending")
                         .values(status=status, message=message[:2000], finished_at=now)).rowcount
    return bool(n)


def list_actions(engine: Engine, *, shop: str | None = None, limit: int = 20) -> list[RemoteActionView]:
    """Return remote actions, newest first."""
    stmt = select(ACTIONS)
    if shop:
        stmt = stmt.where(ACTIONS.c.shop_id == shop)
    with engine.connect() as conn:
        rows = conn.execute(stmt.order_by(ACTIONS.c.id.desc()).limit(limit)).all()
    return [_action_view(r) for r in rows]


def get_action(engine: Engine, action_id: int) -> RemoteActionView | None:
    """Return one remote action."""
    with engine.connect() as conn:
        r = conn.execute(select(ACTIONS).where(ACTIONS.c.id == action_id)).first()
    return None if r is None else _action_view(r)
