"""Alert rules: which conditions alert, after how long, how loud; loaded from YAML.

Every rule has defaults an operator would pick on day one, so an empty file (or none) gives a
working set; a file only overrides what it names. Loading is strict (``extra="forbid"``) and a
mistake is reported with the file, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Severity = Literal["info", "warning", "critical"]


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file, the key and the fix."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="Set false to switch the rule off.")
    resolve_after_s: float | None = Field(
        None, ge=0, description="Seconds the condition must stay clear before the alert resolves; coming back sooner "
        "counts a flap of the same alert. Unset: the top-level resolve_after_s.")
    runbook: str | None = Field(None, max_length=1000, description="What to do, shown with the alert. Unset: the built-in line.")


class NodeOffline(_Rule):
    """A node not heard from (offline or stale) for longer than ``after_s``."""

    after_s: float = Field(300, gt=0, description="Seconds since last seen before alerting; lower pages sooner on a flaky uplink.")
    severity: Severity = Field("critical", description="Severity of the alert.")


class CameraFpsLow(_Rule):
    """A vision pipeline below ``min_fps`` (or not running) for ``for_s`` seconds."""

    min_fps: float = Field(5.0, ge=0, description="Frames per second below which a camera counts as degraded.")
    for_s: float = Field(120, ge=0, description="How long fps must stay low; longer ignores brief stalls.")
    pipeline_kind: str = Field("vision", description="Pipeline kind (from heartbeats) that is a camera.")
    severity: Severity = Field("warning", description="Severity of the alert.")


class FridgeWarm(_Rule):
    """A fridge reading above ``max_c`` for ``for_s``; it clears only below ``clear_below_c`` (hysteresis)."""

    reading: str = Field("temperature_c", description="Reading name of a fridge thermometer.")
    source_contains: str = Field("fridge", description="A reading counts as a fridge when its source or a label value contains this.")
    max_c: float = Field(8.0, description="Temperature above which the fridge is warm (°C).")
    clear_below_c: float = Field(7.0, description="Temperature below which a firing alert clears (°C); keep it under max_c so a fridge hovering at the limit does not flap.")
    for_s: float = Field(600, ge=0, description="How long it must stay warm; door openings warm a fridge briefly.")
    severity: Severity = Field("critical", description="Severity of the alert.")

    @model_validator(mode="after")
    def _hysteresis(self) -> FridgeWarm:
        if self.clear_below_c > self.max_c:
            raise ValueError("clear_below_c must be at most max_c (it is the lower edge of the hysteresis band)")
        return self


class DiskLow(_Rule):
    """A node whose free disk is below ``min_free_percent``."""

    min_free_percent: float = Field(10.0, gt=0, lt=100, description="Free space (% of total) below which to alert.")
    severity: Severity = Field("warning", description="Severity of the alert.")


class ClockSkew(_Rule):
    """A node whose clock differs from the controller's by more than ``max_abs_s``."""

    max_abs_s: float = Field(2.0, gt=0, description="Largest tolerated |controller - node| clock offset in seconds.")
    severity: Severity = Field("warning", description="Severity of the alert.")


class CartReviewRateHigh(_Rule):
    """A shop whose fusion sends more than ``max_rate`` of its carts to review (over ``window_s``).

    Reviews cost staff time, and a rising rate is the first sign of a camera or a shelf board
    going bad (or of a release that made fusion worse), before anyone checks a receipt.
    """

    max_rate: float = Field(0.15, gt=0, le=1, description="Share of carts sent to review above which to alert.")
    window_s: float = Field(3600, gt=0, description="Carts received in this window count; shorter reacts sooner but is noisier.")
    min_carts: int = Field(20, ge=1, description="Fewer carts than this in the window never alert (a quiet shop's rate means little).")
    severity: Severity = Field("warning", description="Severity of the alert.")


class NodeAlerts(_Rule):
    """Alerts the nodes raise themselves (protocol ``Alert`` messages), shown like the others."""


class Webhook(BaseModel):
    """Where to POST alert changes (JSON); off when ``url`` is empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field("", description="http(s) URL to POST to; empty disables the webhook.")
    timeout_s: float = Field(5.0, gt=0, description="Per-request timeout.")
    retries: int = Field(3, ge=0, le=10, description="Retries after a failure, with doubling delay.")
    send_resolved: bool = Field(True, description="Also send when an alert resolves.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers, e.g. Authorization.")

    @model_validator(mode="after")
    def _scheme(self) -> Webhook:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class AlertRules(BaseModel):
    """Every alert rule and the webhook; the top level of the rules YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    interval_s: float = Field(15.0, gt=0, description="Seconds between evaluations; lower reacts faster but costs a DB scan each time.")
    resolve_after_s: float = Field(
        300.0, ge=0, description="Default seconds a condition must stay clear before its alert resolves (hysteresis in "
        "time); a condition that comes back sooner reopens the same alert and counts a flap.")
    node_offline: NodeOffline = Field(default_factory=NodeOffline, description="Node offline rule.")
    camera_fps_low: CameraFpsLow = Field(default_factory=CameraFpsLow, description="Camera fps rule.")
    fridge_warm: FridgeWarm = Field(default_factory=FridgeWarm, description="Fridge temperature rule.")
    disk_low: DiskLow = Field(default_factory=DiskLow, description="Disk space rule.")
    clock_skew: ClockSkew = Field(default_factory=ClockSkew, description="Clock skew rule.")
    cart_review_rate_high: CartReviewRateHigh = Field(default_factory=CartReviewRateHigh, description="Cart review rate rule.")
    node_alerts: NodeAlerts = Field(default_factory=NodeAlerts, description="Pass through alerts raised by nodes.")
    webhook: Webhook = Field(default_factory=Webhook, description="Webhook receiver.")

    def rule(self, name: str) -> _Rule:
        """Return the rule that produces alerts named ``name`` (``node:<x>`` alerts belong to ``node_alerts``)."""
        attr = "node_alerts" if name.startswith("node:") else name
        r = getattr(self, attr, None)
        if not isinstance(r, _Rule):
            raise KeyError(name)
        return r

    def resolve_after(self, name: str) -> float:
        """Return how long the condition of alerts named ``name`` must stay clear before they resolve."""
        try:
            r = self.rule(name)
        except KeyError:
            return self.resolve_after_s
        return self.resolve_after_s if r.resolve_after_s is None else r.resolve_after_s


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            fix = "remove it or check its spelling (see docs/alerts.md for the keys)"
        else:
            fix = err["msg"]
        lines.append(f"{source}: key {key!r}: {fix}")
    return "\n".join(lines)


def parse_rules(text: str, source: str = "<rules>") -> AlertRules:
    """Parse rules YAML text; raise ``RulesError`` naming the source, the key and the fix."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML ({exc}); fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RulesError(f"{source}: the top level must be a mapping of rule names, not {type(data).__name__}")
    try:
        return AlertRules.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_describe(exc, source)) from None


def load_rules(path: Path | str | None) -> AlertRules:
    """Load rules from ``path`` (defaults when ``None``); raise ``RulesError`` on any problem."""
    if path is None:
        return AlertRules()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RulesError(f"{p}: cannot read the rules file ({exc.strerror}); check the path") from None
    return parse_rules(text, str(p))
