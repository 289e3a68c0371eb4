"""Alerts in SQL: open, deduplicate, resolve with hysteresis, acknowledge, silence, history.

:func:`sync` is the one writer of alert state from the evaluator: it opens a row for a key that
is not open yet, refreshes the one that is (dedupe), and resolves a row only after its condition
has been clear for the rule's ``resolve_after_s``. A condition that comes back within that window
reopens the same row and counts a flap, so a cable that comes and goes is one alert with a count,
not twenty. It all happens in one transaction, returning what changed so the caller can notify.
Operators act through :func:`acknowledge`, :func:`silence` / :func:`silence_key` and
:func:`expire_silence` (undo). The "for N seconds" timers live in ``alert_pending``
(:func:`load_pending`, :func:`save_pending`) so they survive a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fleet_controller.alerts.evaluator import Firing
from fleet_controller.alerts.models import AlertRecord, PendingCondition, Silence
from fleet_controller.registry.maintenance import maintenance_until


class AlertNotFound(LookupError):
    """No alert (or silence) with that id."""


@dataclass(frozen=True)
class AlertView:
    """An alert as pages, the API and the channels show it."""

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
    details: str = ""
    runbook: str = ""
    flaps: int = 0
    clear_since: float | None = None

    @property
    def status(self) -> str:
        """Return resolved, silenced, acknowledged or firing, in that order of precedence."""
        if self.state == "resolved":
            return "resolved"
        if self.silenced_until:
            return "silenced"
        return "acknowledged" if self.acked_by else "firing"

    def duration_s(self, now: float) -> float:
        """Return how long the condition lasted (so far, while open)."""
        return max(0.0, (self.resolved_at if self.resolved_at is not None else now) - self.started_at)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """Return a JSON-ready dict (with ``status``, and ``duration_s`` when ``now`` is given or it resolved)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["status"] = self.status
        end = self.resolved_at if self.resolved_at is not None else now
        d["duration_s"] = None if end is None else max(0.0, end - self.started_at)
        return d


def _view(r: AlertRecord, silenced_until: float | None = None) -> AlertView:
    return AlertView(r.id, r.key, r.rule, r.shop_id, r.node_id, r.source, r.severity, r.summary, r.value, r.state,
                     r.started_at, r.updated_at, r.resolved_at, r.acked_by, r.acked_at, silenced_until,
                     r.details or "", r.runbook or "", r.flaps or 0, r.clear_since)


@dataclass(frozen=True)
class Changes:
    """What one :func:`sync` changed: ``flapped`` alerts came back within ``resolve_after_s`` (no new alert)."""

    opened: tuple[AlertView, ...]
    resolved: tuple[AlertView, ...]
    flapped: tuple[AlertView, ...] = ()


def _active_silence(now: float) -> Any:
    return Silence.until > now


def _silences(s: Session, now: float, keys: Iterable[str] | None = None) -> dict[str, float]:
    wanted = None if keys is None else list(keys)
    q = select(Silence.key, func.max(Silence.until)).where(_active_silence(now)).group_by(Silence.key)
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


EVENT_RULE_PREFIX = "security:"
"""Rules of alerts opened by an event (:func:`record_event`), not by a condition the evaluator sees."""

EVENT_QUIET_S = 3600.0
"""An event alert resolves once no event of its key came for this long (one-shot events never "clear")."""


def sync(engine: Engine, firing: Iterable[Firing], now: float,
         resolve_after: Callable[[str], float] = lambda rule: 0.0, event_quiet_s: float = EVENT_QUIET_S) -> Changes:
    """Make the open alerts in the database match ``firing``; return what opened, resolved and flapped.

    ``resolve_after(rule)`` is how long a condition must stay clear before its alert resolves;
    the alert keeps firing meanwhile (``clear_since`` set) and its ``resolved_at`` is when the
    condition cleared, so durations are true. Event alerts (rule ``security:...``) are not the
    evaluator's: they resolve here once their last event is ``event_quiet_s`` old.
    """
    by_key = {f.key: f for f in firing}
    opened: list[AlertRecord] = []
    resolved: list[AlertRecord] = []
    flapped: list[AlertRecord] = []
    with Session(engine) as s, s.begin():
        rows = list(s.scalars(select(AlertRecord).where(AlertRecord.state == "firing")))
        current = {r.key: r for r in rows if not r.rule.startswith(EVENT_RULE_PREFIX)}
        for quiet in rows:
            if quiet.rule.startswith(EVENT_RULE_PREFIX) and now - quiet.updated_at >= event_quiet_s:
                quiet.state, quiet.resolved_at, quiet.updated_at = "resolved", quiet.updated_at, now
                resolved.append(quiet)
        for key, f in by_key.items():
            row = current.get(key)
            if row is None:
                started = min(f.since, now) if f.since is not None else now
                row = AlertRecord(key=key, rule=f.rule, shop_id=f.shop, node_id=f.node, source=f.source,
                                  severity=f.severity, summary=f.summary, value=f.value, state="firing",
                                  started_at=started, updated_at=now, details=f.details, runbook=f.runbook, flaps=0)
                s.add(row)
                s.flush()
                opened.append(row)
                continue
            if row.clear_since is not None:  # it came back before resolve_after_s ran out: same alert, one more flap
                row.clear_since, row.flaps, row.updated_at = None, (row.flaps or 0) + 1, now
                flapped.append(row)
            if (row.summary, row.value, row.severity, row.details) != (f.summary, f.value, f.severity, f.details):
                row.summary, row.value, row.severity, row.updated_at = f.summary, f.value, f.severity, now
                row.details = f.details or row.details
            if f.runbook and row.runbook != f.runbook:
                row.runbook = f.runbook
        for key, row in current.items():
            if key in by_key:
                continue
            if row.clear_since is None:
                row.clear_since, row.updated_at = now, now
            if now - row.clear_since >= resolve_after(row.rule):
                row.state, row.resolved_at, row.updated_at = "resolved", row.clear_since, now
                resolved.append(row)
        sil = _silences(s, now, [r.key for r in opened + resolved + flapped])
        return Changes(tuple(_view(r, sil.get(r.key)) for r in opened), tuple(_view(r, sil.get(r.key)) for r in resolved),
                       tuple(_view(r, sil.get(r.key)) for r in flapped))


def record_event(engine: Engine, f: Firing, now: float) -> tuple[AlertView, bool]:
    """Open an event alert for ``f`` (rule ``security:...``), or count one more occurrence on the open one.

    Returns the alert and whether it was opened now. ``value`` is the number of events folded into
    the alert, ``summary`` and ``details`` are the newest event's, and the severity only ever rises,
    so a burst of the same event is one alert with a count, not a page per event.
    """
    if not f.rule.startswith(EVENT_RULE_PREFIX):
        raise ValueError(f"event alert rule {f.rule!r} must start with {EVENT_RULE_PREFIX!r}: the evaluator owns the others")
    rank = {"info": 0, "warning": 1, "critical": 2}
    with Session(engine) as s, s.begin():
        found = s.scalars(select(AlertRecord).where(AlertRecord.key == f.key, AlertRecord.state == "firing")).first()
        opened = found is None
        if found is None:
            row = AlertRecord(key=f.key, rule=f.rule, shop_id=f.shop, node_id=f.node, source=f.source, severity=f.severity,
                              summary=f.summary, value=1.0, state="firing", started_at=min(f.since or now, now),
                              updated_at=now, details=f.details, runbook=f.runbook, flaps=0)
            s.add(row)
            s.flush()
        else:
            row = found
            row.value = (row.value or 0.0) + 1.0
            row.summary, row.details, row.updated_at = f.summary, f.details or row.details, now
            if rank.get(f.severity, 0) > rank.get(row.severity, 0):
                row.severity = f.severity
        sil = _silences(s, now, [row.key])
        return _view(row, sil.get(row.key)), opened


def active_keys(engine: Engine) -> frozenset[str]:
    """Return the keys of open alerts (the evaluator's hysteresis input)."""
    with Session(engine) as s:
        return frozenset(s.scalars(select(AlertRecord.key).where(AlertRecord.state == "firing")))


def load_pending(engine: Engine) -> dict[str, float]:
    """Return since when each "for N seconds" condition holds, as stored by :func:`save_pending`."""
    with Session(engine) as s:
        return {k: since for k, since in s.execute(select(PendingCondition.key, PendingCondition.since))}


def save_pending(engine: Engine, pending: Mapping[str, float], previous: Mapping[str, float]) -> None:
    """Store ``pending`` (writing only what changed since ``previous``), so the timers survive a restart."""
    gone = [k for k in previous if k not in pending]
    new = {k: v for k, v in pending.items() if previous.get(k) != v}
    if not gone and not new:
        return
    with Session(engine) as s, s.begin():
        if gone:
            s.execute(delete(PendingCondition).where(PendingCondition.key.in_(gone)))
        for k, v in new.items():
            s.merge(PendingCondition(key=k, since=v))


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


def history(engine: Engine, now: float, *, shop: str | None = None, rule: str | None = None, start: float | None = None,
            end: float | None = None, limit: int = 500) -> list[AlertView]:
    """Return alerts active at any time in [``start``, ``end``] (open ones included), newest start first.

    ``rule`` matches exactly, or every ``node:*`` alert with ``node:*``.
    """
    with Session(engine) as s:
        q = select(AlertRecord)
        if shop:
            q = q.where(AlertRecord.shop_id == shop)
        if rule:
            q = q.where(AlertRecord.rule.like("node:%")) if rule == "node:*" else q.where(AlertRecord.rule == rule)
        if end is not None:
            q = q.where(AlertRecord.started_at <= end)
        if start is not None:
            q = q.where(or_(AlertRecord.resolved_at.is_(None), AlertRecord.resolved_at >= start))
        rows = s.scalars(q.order_by(AlertRecord.started_at.desc(), AlertRecord.id.desc()).limit(limit)).all()
        sil = _silences(s, now, [r.key for r in rows])
        return [_view(r, sil.get(r.key)) for r in rows]


def rules_seen(engine: Engine) -> list[str]:
    """Return every rule name that ever alerted (for the history filter)."""
    with Session(engine) as s:
        return sorted(s.scalars(select(AlertRecord.rule).distinct()))


def acknowledge(engine: Engine, alert_id: int, username: str, now: float) -> AlertView:
    """Mark an alert acknowledged by ``username`` (idempotent: the first acknowledgement stays)."""
    with Session(engine) as s, s.begin():
        row = s.get(AlertRecord, alert_id)
        if row is None:
            raise AlertNotFound(f"no alert {alert_id}")
        if row.acked_by is None:
            row.acked_by, row.acked_at = username, now
        return _view(row, _silences(s, now, [row.key]).get(row.key))


# ----- silences ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SilenceView:
    """A silence as the silences page and API show it."""

    id: int
    key: str
    rule: str
    shop: str
    node: str
    source: str
    until: float
    created_by: str
    created_at: float
    comment: str
    expired_by: str | None
    expired_at: float | None
    active: bool

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def split_key(key: str) -> tuple[str, str, str, str]:
    """Return (rule, shop, node, source) of an alert key (a source may itself contain '/')."""
    parts = [*key.split("/", 3), "", "", "", ""]
    return parts[0], parts[1], parts[2], parts[3]


def _silence_view(r: Silence, now: float) -> SilenceView:
    rule, shop, node, source = split_key(r.key)
    return SilenceView(r.id, r.key, rule, shop, node, source, r.until, r.created_by, r.created_at, r.comment or "",
                       r.expired_by, r.expired_at, r.until > now)


def silence_key(engine: Engine, key: str, username: str, duration_s: float, now: float, comment: str = "") -> SilenceView:
    """Mute alerts with ``key`` for ``duration_s`` seconds (they stay listed, marked silenced, and notify no channel)."""
    with Session(engine) as s, s.begin():
        row = Silence(key=key, until=now + duration_s, created_by=username, created_at=now, comment=comment)
        s.add(row)
        s.flush()
        return _silence_view(row, now)


def silence(engine: Engine, alert_id: int, username: str, duration_s: float, now: float, comment: str = "") -> AlertView:
    """Mute an alert's key for ``duration_s`` seconds (it stays listed, marked silenced)."""
    with Session(engine) as s:
        row = s.get(AlertRecord, alert_id)
        if row is None:
            raise AlertNotFound(f"no alert {alert_id}")
        key = row.key
    silence_key(engine, key, username, duration_s, now, comment)
    with Session(engine) as s:
        row = s.get(AlertRecord, alert_id)
        assert row is not None
        return _view(row, _silences(s, now, [key]).get(key))


def expire_silence(engine: Engine, silence_id: int, username: str, now: float) -> SilenceView:
    """End a silence now (undo); an already ended one is left as it was (idempotent)."""
    with Session(engine) as s, s.begin():
        row = s.get(Silence, silence_id)
        if row is None:
            raise AlertNotFound(f"no silence {silence_id}")
        if row.until > now:
            row.until, row.expired_by, row.expired_at = now, username, now
        return _silence_view(row, now)


def list_silences(engine: Engine, now: float, *, recent_s: float = 7 * 86400, limit: int = 500) -> list[SilenceView]:
    """Return active silences and those that ended within ``recent_s``, active first, newest first."""
    with Session(engine) as s:
        rows = s.scalars(select(Silence).where(Silence.until > now - recent_s)
                         .order_by(Silence.created_at.desc(), Silence.id.desc()).limit(limit)).all()
        views = [_silence_view(r, now) for r in rows]
    return sorted(views, key=lambda v: not v.active)
