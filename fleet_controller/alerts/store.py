"""Alerts in SQL: open, deduplicate, resolve, acknowledge and silence.

:func:`sync` is the one writer of alert state from the evaluator: it opens a row for a key that
is not firing yet, refreshes the one that is (dedupe), and resolves those whose key no longer
fires, in one transaction, returning what changed so the caller can notify. Operators act
through :func:`acknowledge` and :func:`silence`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fleet_controller.alerts.evaluator import Firing
from fleet_controller.alerts.models import AlertRecord, Silence
from fleet_controller.registry.maintenance import maintenance_until


class AlertNotFound(LookupError):
    """No alert with that id."""


@dataclass(frozen=True)
class AlertView:
    """An alert as pages, the API and the webhook show it."""

    id: int
    key: str
    rule: str
    shop: str
    node: str
    source: str
    severity: str
    summary: str
    value: float | None
    state: str
    started_at: float
    updated_at: float
    resolved_at: float | None
    acked_by: str | None
    acked_at: float | None
    silenced_until: float | None = None

    @property
    def status(self) -> str:
        """Return resolved, silenced, acknowledged or firing, in that order of precedence."""
        if self.state == "resolved":
            return "resolved"
        if self.silenced_until:
            return "silenced"
        return "acknowledged" if self.acked_by else "firing"

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (with ``status``)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["status"] = self.status
        return d


def _view(r: AlertRecord, silenced_until: float | None = None) -> AlertView:
    return AlertView(r.id, r.key, r.rule, r.shop_id, r.node_id, r.source, r.severity, r.summary, r.value, r.state,
                     r.started_at, r.updated_at, r.resolved_at, r.acked_by, r.acked_at, silenced_until)


@dataclass(frozen=True)
class Changes:
    """What one :func:`sync` changed."""

    opened: tuple[AlertView, ...]
    resolved: tuple[AlertView, ...]


def _silences(s: Session, now: float, keys: Iterable[str] | None = None) -> dict[str, float]:
    wanted = None if keys is None else list(keys)
    q = select(Silence.key, func.max(Silence.until)).where(Silence.until > now).group_by(Silence.key)
    if wanted is not None:
        q = q.where(Silence.key.in_(wanted))
    out: dict[str, float] = dict(s.execute(q).all())
    # A shop in maintenance mutes all its alerts (key "rule/shop/node/source") until the maintenance ends.
    held = maintenance_until(s.connection(), now) if wanted else {}
    for key in wanted if held and wanted else []:
        parts = key.split("/")
        until = held.get(parts[1]) if len(parts) > 1 else None
        if until is not None and until > out.get(key, 0.0):
            out[key] = until
    return out


def sync(engine: Engine, firing: Iterable[Firing], now: float) -> Changes:
    """Make the firing alerts in the database match ``firing``; return what opened and resolved."""
    by_key = {f.key: f for f in firing}
    opened: list[AlertRecord] = []
    resolved: list[AlertRecord] = []
    with Session(engine) as s, s.begin():
        current = {r.key: r for r in s.scalars(select(AlertRecord).where(AlertRecord.state == "firing"))}
        for key, f in by_key.items():
            row = current.get(key)
            if row is None:
                row = AlertRecord(key=key, rule=f.rule, shop_id=f.shop, node_id=f.node, source=f.source,
                                  severity=f.severity, summary=f.summary, value=f.value, state="firing",
                                  started_at=now, updated_at=now)
                s.add(row)
                s.flush()
                opened.append(row)
            elif (row.summary, row.value, row.severity) != (f.summary, f.value, f.severity):
                row.summary, row.value, row.severity, row.updated_at = f.summary, f.value, f.severity, now
        for key, row in current.items():
            if key not in by_key:
                row.state, row.resolved_at, row.updated_at = "resolved", now, now
                resolved.append(row)
        sil = _silences(s, now, [r.key for r in opened + resolved])
        return Changes(tuple(_view(r, sil.get(r.key)) for r in opened), tuple(_view(r, sil.get(r.key)) for r in resolved))


def active_keys(engine: Engine) -> frozenset[str]:
    """Return the keys of firing alerts (the evaluator's hysteresis input)."""
    with Session(engine) as s:
        return frozenset(s.scalars(select(AlertRecord.key).where(AlertRecord.state == "firing")))


def firing_counts(engine: Engine) -> dict[str, int]:
    """Return how many alerts are firing in each shop that has any."""
    with Session(engine) as s:
        rows = s.execute(
            select(AlertRecord.shop_id, func.count()).where(AlertRecord.state == "firing").group_by(AlertRecord.shop_id)
        ).all()
    return {shop: int(n) for shop, n in rows}


def list_alerts(engine: Engine, now: float, *, state: str = "firing", shop: str | None = None, limit: int = 500) -> list[AlertView]:
    """Return alerts in ``state`` (firing or resolved), newest first, with their silences."""
    with Session(engine) as s:
        q = select(AlertRecord).where(AlertRecord.state == state)
        if shop:
            q = q.where(AlertRecord.shop_id == shop)
        order = AlertRecord.started_at.desc() if state == "firing" else AlertRecord.resolved_at.desc()
        rows = s.scalars(q.order_by(order, AlertRecord.id.desc()).limit(limit)).all()
        sil = _silences(s, now, [r.key for r in rows])
        return [_view(r, sil.get(r.key)) for r in rows]


def acknowledge(engine: Engine, alert_id: int, username: str, now: float) -> AlertView:
    """Mark an alert acknowledged by ``username`` (idempotent: the first acknowledgement stays)."""
    with Session(engine) as s, s.begin():
        row = s.get(AlertRecord, alert_id)
        if row is None:
            raise AlertNotFound(f"no alert {alert_id}")
        if row.acked_by is None:
            row.acked_by, row.acked_at = username, now
        return _view(row, _silences(s, now, [row.key]).get(row.key))


def silence(engine: Engine, alert_id: int, username: str, duration_s: float, now: float, comment: str = "") -> AlertView:
    """Mute an alert's key for ``duration_s`` seconds (it stays listed, marked silenced)."""
    with Session(engine) as s, s.begin():
        row = s.get(AlertRecord, alert_id)
        if row is None:
            raise AlertNotFound(f"no alert {alert_id}")
        s.add(Silence(key=row.key, until=now + duration_s, created_by=username, created_at=now, comment=comment))
        s.flush()
        return _view(row, _silences(s, now, [row.key]).get(row.key))
