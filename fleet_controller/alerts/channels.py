"""Notification channels admins manage in the UI: a webhook, email through SMTP, a chat webhook.

Each channel chooses which severities and shops it hears about (empty: all) and whether it also
hears resolutions. Delivery retries a temporary failure (timeouts, refused connections, HTTP 5xx,
408, 429, SMTP 4xx) with doubling delay and gives up at once on a permanent one (HTTP 4xx, SMTP
5xx, a refused login); every attempt's outcome is counted in
``shopfleet_controller_alert_notifications_total{channel,outcome}`` (``sent``, ``retry``,
``failed``) and the last outcome and error are kept on the channel for the channels page.

Secrets (an SMTP password, header values, webhook URLs, which carry tokens) are stored whole but
never sent back whole: :func:`ChannelView.as_dict` masks them, and an update that leaves a secret
out (or sends the masked text back) keeps the stored one.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet_controller.alerts.models import Channel
from fleet_controller.alerts.store import AlertView
from shopfleet.errors import PermanentError, TemporaryError

log = logging.getLogger(__name__)

Kind = Literal["webhook", "email", "chat"]
SEVERITIES = ("info", "warning", "critical")
MASK = "••••••"


class ChannelError(PermanentError):
    """A channel request an admin must fix (bad or duplicate name, unknown id); the message says how."""

    default_reason = "channel"


class DeliveryTemporary(TemporaryError):
    """A delivery that may succeed if tried again (timeout, refused connection, HTTP 5xx/408/429, SMTP 4xx)."""


class DeliveryPermanent(PermanentError):
    """A delivery that fails the same way until the channel is fixed (HTTP 4xx, SMTP 5xx, bad login)."""


# ----- what an admin sends -------------------------------------------------------------------------


class WebhookConfig(BaseModel):
    """A JSON POST per alert change (Alertmanager-like body)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http(s) URL; shown back masked (it often carries a token).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers, e.g. Authorization; values shown masked.")
    timeout_s: float = Field(5.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v


class ChatConfig(WebhookConfig):
    """A Slack- or Mattermost-compatible incoming webhook: ``{"text": ...}``."""

    username: str = Field("shopfleet", max_length=64, description="Name the message is posted as (Mattermost honours it).")


class EmailConfig(BaseModel):
    """Email through an SMTP server."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = Field("starttls", description="starttls (587), ssl (465) or none (a local relay).")
    username: str = Field("", max_length=255)
    password: str = Field("", max_length=255, description="Shown back masked.")
    from_addr: str = Field(min_length=3, max_length=255)
    to: list[str] = Field(min_length=1, max_length=50)
    timeout_s: float = Field(10.0, gt=0, le=60)

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            if "@" not in a:
                raise ValueError(f"{a!r} is not an email address")
        return v


CONFIGS: dict[str, type[BaseModel]] = {"webhook": WebhookConfig, "chat": ChatConfig, "email": EmailConfig}
SECRET_KEYS = {"webhook": ("url", "headers"), "chat": ("url", "headers"), "email": ("password",)}


class ChannelSpec(BaseModel):
    """A channel as an admin creates or replaces it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w .\-]+$")
    kind: Kind
    config: dict[str, Any] = Field(description="Kind-specific: see WebhookConfig, ChatConfig, EmailConfig.")
    severities: list[Literal["info", "warning", "critical"]] = Field(default_factory=list, description="Empty: every severity.")
    shops: list[str] = Field(default_factory=list, description="Empty: every shop.")
    send_resolved: bool = True
    enabled: bool = True
    retries: int = Field(3, ge=0, le=10, description="Retries after a temporary failure, with doubling delay.")

    @model_validator(mode="after")
    def _config(self) -> ChannelSpec:
        CONFIGS[self.kind].model_validate(self.config)
        return self


# ----- what is shown -------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """Return ``url`` with everything after the host hidden but its last 4 characters."""
    parts = urlsplit(url)
    rest = url[len(f"{parts.scheme}://{parts.netloc}"):]
    return f"{parts.scheme}://{parts.netloc}" + (f"/{MASK}{rest[-4:]}" if len(rest) > 1 else rest)


def masked(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Return ``config`` with its secrets masked."""
    out = dict(config)
    if kind in ("webhook", "chat"):
        out["url"] = mask_url(str(config.get("url", "")))
        out["headers"] = {k: MASK for k in (config.get("headers") or {})}
    if kind == "email":
        out["password"] = MASK if config.get("password") else ""
    return out


@dataclass(frozen=True)
class ChannelView:
    """A channel with its delivery record; :meth:`as_dict` masks the secrets."""

    id: int
    name: str
    kind: str
    config: dict[str, Any]
    severities: tuple[str, ...]
    shops: tuple[str, ...]
    send_resolved: bool
    enabled: bool
    retries: int
    created_by: str
    created_at: float
    updated_at: float
    last_outcome: str | None
    last_error: str | None
    last_attempt_at: float | None
    sent_total: int
    failed_total: int

    def wants(self, alert: AlertView) -> bool:
        """Return whether this channel hears about ``alert`` (enabled, severity, shop, resolved)."""
        return (self.enabled and (not self.severities or alert.severity in self.severities)
                and (not self.shops or alert.shop in self.shops)
                and (alert.state != "resolved" or self.send_resolved))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with secrets masked."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["config"] = masked(self.kind, self.config)
        d["severities"], d["shops"] = list(self.severities), list(self.shops)
        return d


def _split(v: str) -> tuple[str, ...]:
    return tuple(x for x in v.split(",") if x)


def _view(r: Channel) -> ChannelView:
    cfg = dict(r.config)
    retries = int(cfg.pop("_retries", 3))  # type: ignore[call-overload]
    return ChannelView(r.id, r.name, r.kind, cfg, _split(r.severities), _split(r.shops), r.send_resolved, r.enabled, retries,
                       r.created_by, r.created_at, r.updated_at, r.last_outcome, r.last_error, r.last_attempt_at,
                       r.sent_total or 0, r.failed_total or 0)


# ----- store ---------------------------------------------------------------------------------------


def list_channels(engine: Engine) -> list[ChannelView]:
    """Return every channel, by name."""
    with Session(engine) as s:
        return [_view(r) for r in s.scalars(select(Channel).order_by(Channel.name))]


def get_channel(engine: Engine, channel_id: int) -> ChannelView:
    """Return one channel or raise ``ChannelError``."""
    with Session(engine) as s:
        r = s.get(Channel, channel_id)
        if r is None:
            raise ChannelError(f"no channel {channel_id}: list them at GET /api/v1/alert-channels", reason="not_found")
        return _view(r)


def _keep_secrets(kind: str, new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Return ``new`` with secrets left out or sent back masked replaced by the stored ones."""
    out = dict(new)
    for key in SECRET_KEYS[kind]:
        if key == "headers":
            old_h, new_h = old.get("headers") or {}, out.get("headers")
            if new_h is None:
                out["headers"] = old_h
            else:
                out["headers"] = {k: (old_h.get(k, "") if v in ("", MASK) else v) for k, v in new_h.items()}
        elif key in old and (key not in out or out[key] in ("", MASK) or (key == "url" and MASK in str(out[key]))):
            out[key] = old[key]
    return out


def save_channel(engine: Engine, spec: ChannelSpec, username: str, now: float, channel_id: int | None = None) -> ChannelView:
    """Create a channel (``channel_id`` None) or replace one; secrets left out or masked keep their stored value."""
    with Session(engine) as s, s.begin():
        if channel_id is None:
            row = Channel(created_by=username, created_at=now, sent_total=0, failed_total=0)
            config = spec.config
        else:
            found = s.get(Channel, channel_id)
            if found is None:
                raise ChannelError(f"no channel {channel_id}: list them at GET /api/v1/alert-channels", reason="not_found")
            row = found
            old = {k: v for k, v in dict(row.config).items() if k != "_retries"}
            config = _keep_secrets(spec.kind, spec.config, old) if row.kind == spec.kind else spec.config
        try:
            clean = CONFIGS[spec.kind].model_validate(config).model_dump()
        except ValueError as exc:
            raise ChannelError(f"channel {spec.name!r}: {exc}", reason="invalid") from None
        row.name, row.kind, row.config = spec.name, spec.kind, {**clean, "_retries": spec.retries}
        row.severities, row.shops = ",".join(spec.severities), ",".join(spec.shops)
        row.send_resolved, row.enabled, row.updated_at = spec.send_resolved, spec.enabled, now
        s.add(row)
        try:
            s.flush()
        except IntegrityError:
            raise ChannelError(f"a channel named {spec.name!r} exists already: pick another name", reason="duplicate") from None
        return _view(row)


def delete_channel(engine: Engine, channel_id: int) -> None:
    """Delete a channel (``ChannelError`` if there is none)."""
    with Session(engine) as s, s.begin():
        row = s.get(Channel, channel_id)
        if row is None:
            raise ChannelError(f"no channel {channel_id}", reason="not_found")
        s.delete(row)


def record_outcome(engine: Engine, channel_id: int, ok: bool, error: str, now: float) -> None:
    """Keep the last outcome of a delivery on the channel (a deleted channel is ignored)."""
    with Session(engine) as s, s.begin():
        row = s.get(Channel, channel_id)
        if row is None:
            return
        row.last_outcome, row.last_error, row.last_attempt_at = ("sent" if ok else "failed"), (None if ok else error[:1000]), now
        if ok:
            row.sent_total = (row.sent_total or 0) + 1
        else:
            row.failed_total = (row.failed_total or 0) + 1


# ----- messages ------------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


def _human_duration(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def title(alert: AlertView) -> str:
    """Return a one-line title: ``[CRITICAL] fridge warm: fridge 1 on shop-a/pi-1 at 9.4 °C``."""
    prefix = "RESOLVED" if alert.state == "resolved" else alert.severity.upper()
    return f"[{prefix}] {alert.summary}"


def text(alert: AlertView, dashboard_url: str = "", now: float | None = None) -> str:
    """Return the message body: what and where, since when, how long, flaps, what to do, link, raw details."""
    lines = [title(alert), f"Since: {_iso(alert.started_at)}"]
    if alert.state == "resolved" and alert.resolved_at is not None:
        lines.append(f"Resolved: {_iso(alert.resolved_at)} after {_human_duration(alert.resolved_at - alert.started_at)}")
    if alert.flaps:
        lines.append(f"Came and went {alert.flaps} times")
    if alert.runbook and alert.state != "resolved":
        lines.append(f"What to do: {alert.runbook}")
    if dashboard_url:
        lines.append(f"{dashboard_url.rstrip('/')}/shops/{alert.shop}")
    if alert.details:
        lines.append(f"Details: {alert.details}")
    return "\n".join(lines)


def webhook_payload(alert: AlertView, dashboard_url: str = "") -> dict[str, Any]:
    """Return the JSON body of a webhook channel: Alertmanager-like, with the human parts in annotations."""
    return {
        "version": 1,
        "status": alert.state,
        "labels": {"alertname": alert.rule, "shop": alert.shop, "node": alert.node, "source": alert.source,
                   "severity": alert.severity},
        "annotations": {"summary": alert.summary, "runbook": alert.runbook, "details": alert.details},
        "startsAt": _iso(alert.started_at),
        "endsAt": _iso(alert.resolved_at),
        "value": alert.value,
        "flaps": alert.flaps,
        "id": alert.id,
        "key": alert.key,
        "generatorURL": f"{dashboard_url.rstrip('/')}/shops/{alert.shop}" if dashboard_url else "",
    }


# ----- delivery ------------------------------------------------------------------------------------


class NotificationMetrics:
    """``shopfleet_controller_alert_notifications_total{channel,outcome}``: sent, retry, failed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter("shopfleet_controller_alert_notifications_total",
                             "Alert notification attempts by channel name and outcome (sent, retry, failed).",
                             ["channel", "outcome"], registry=registry)


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> None:
    try:
        resp = await client.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise DeliveryTemporary("timed out", reason="timeout") from None
    except httpx.HTTPError as exc:
        raise DeliveryTemporary(f"cannot connect: {exc}", reason="connect") from None
    if resp.status_code < 300:
        return
    msg = f"HTTP {resp.status_code}: {resp.text[:200]}"
    if resp.status_code >= 500 or resp.status_code in (408, 429):
        raise DeliveryTemporary(msg, reason="http_status")
    raise DeliveryPermanent(msg + " (the receiver refuses it: check the URL and token)", reason="http_status")


def _send_email(cfg: EmailConfig, subject: str, body: str) -> None:
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, cfg.from_addr, ", ".join(cfg.to)
    msg.set_content(body)
    try:
        smtp: smtplib.SMTP
        if cfg.security == "ssl":
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_s, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
        with smtp:
            if cfg.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if cfg.username:
                smtp.login(cfg.username, cfg.password)
            smtp.send_message(msg)
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryPermanent(f"SMTP login refused ({exc.smtp_code}): check username and password", reason="smtp_auth") from None
    except smtplib.SMTPResponseException as exc:
        cls = DeliveryTemporary if 400 <= exc.smtp_code < 500 else DeliveryPermanent
        err = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        raise cls(f"SMTP {exc.smtp_code}: {err[:200]}", reason="smtp") from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryPermanent(f"SMTP refused the recipients {sorted(exc.recipients)}", reason="smtp") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryTemporary(f"SMTP {cfg.host}:{cfg.port}: {exc}", reason="connect") from None


async def deliver_once(client: httpx.AsyncClient, ch: ChannelView, alert: AlertView, dashboard_url: str = "") -> None:
    """Send ``alert`` to ``ch`` once; raise ``DeliveryTemporary`` or ``DeliveryPermanent`` on failure."""
    if ch.kind == "webhook":
        w = WebhookConfig.model_validate(ch.config)
        await _post(client, w.url, webhook_payload(alert, dashboard_url), w.headers, w.timeout_s)
    elif ch.kind == "chat":
        c = ChatConfig.model_validate(ch.config)
        await _post(client, c.url, {"text": text(alert, dashboard_url), "username": c.username}, c.headers, c.timeout_s)
    else:
        e = EmailConfig.model_validate(ch.config)
        await asyncio.to_thread(_send_email, e, title(alert), text(alert, dashboard_url))


async def deliver(client: httpx.AsyncClient, engine: Engine, ch: ChannelView, alert: AlertView, metrics: NotificationMetrics, *,
                  dashboard_url: str = "", base_delay_s: float = 0.5, clock: Callable[[], float] | None = None) -> str:
    """Send with retries and doubling delay; count every attempt, keep the outcome on the channel.

    Returns "" when delivered, else the last error (never raises into the worker).
    """
    import time

    error = ""
    for attempt in range(ch.retries + 1):
        try:
            await deliver_once(client, ch, alert, dashboard_url)
        except DeliveryTemporary as exc:
            error = str(exc)
            if attempt < ch.retries:
                metrics.total.labels(ch.name, "retry").inc()
                log.warning("channel %s: delivery of alert %s failed (attempt %d), retrying: %s", ch.name, alert.key, attempt + 1, exc)
                await asyncio.sleep(base_delay_s * 2 ** attempt)
                continue
        except DeliveryPermanent as exc:
            error = str(exc)
        except Exception as exc:  # a bug in a channel must not stop the others
            log.exception("channel %s: delivery of alert %s failed", ch.name, alert.key)
            error = f"unexpected error: {exc}"
        else:
            metrics.total.labels(ch.name, "sent").inc()
            await asyncio.to_thread(record_outcome, engine, ch.id, True, "", (clock or time.time)())
            return ""
        break
    metrics.total.labels(ch.name, "failed").inc()
    log.warning("channel %s: gave up on alert %s: %s", ch.name, alert.key, error)
    await asyncio.to_thread(record_outcome, engine, ch.id, False, error, (clock or time.time)())
    return error


def sample_alert(ch: ChannelView, username: str, now: float) -> AlertView:
    """Return the made-up alert a "send test" button sends."""
    return AlertView(0, f"test/{ch.name}", "test", "test-shop", "test-node", "", "info",
                     f"test message from shopfleet for channel {ch.name!r}, sent by {username}", None, "firing", now, now,
                     None, None, None, runbook="Nothing to do: this is a test.")
