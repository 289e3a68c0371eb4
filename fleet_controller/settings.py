"""Settings of the fleet controller: one pydantic model, loaded from YAML, environment and flags.

Precedence is file < environment < flags, the usual order for a daemon that runs under
systemd or Kubernetes (file in a ConfigMap, secrets in the environment, one-off overrides on the
command line). Every field has a description (``docs/controller.md`` lists them) and unknown keys
are refused, so a typo in a config file is an error naming the file, the key and the fix rather
than a silently ignored setting.

Environment variables are ``SHOPFLEET_CONTROLLER_<SECTION>__<KEY>`` (double underscore between
levels), e.g. ``SHOPFLEET_CONTROLLER_BROKER__PASSWORD``; top-level keys drop the section, e.g.
``SHOPFLEET_CONTROLLER_DB_URL``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SHOPFLEET_CONTROLLER_"
_TOPIC_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the source, the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Section):
    """How the controller reaches the MQTT broker."""

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port (8883 is usual with TLS).")
    username: str | None = Field(None, description="MQTT username of the controller; None connects anonymously.")
    password: str | None = Field(None, description="MQTT password; prefer the environment or a password file over the YAML file.")
    client_id: str = Field(
        "shopfleet-controller",
        min_length=1,
        max_length=64,
        description="Stable client id: the broker keeps the persistent session (queued QoS 1 messages) under it, "
        "so it must stay the same across restarts and differ between controller replicas. A broker written by "
        "'shopfleet broker-config' replaces it with the username (use_username_as_clientid), so each replica "
        "needs its own username there.",
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, description="How long start-up waits for the first connection before giving up with an error."
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; lower notices a dead link sooner but costs more pings.")
    tls: bool = Field(False, description="Connect with TLS.")
    tls_ca_file: Path | None = Field(None, description="CA bundle to verify the broker with (system CAs when unset).")
    tls_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for a broker listener with require_certificate, e.g. one issued by 'shopfleet pki issue controller NAME'."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT version; '5' is needed for shared_group.")
    shared_group: str | None = Field(
        None,
        description="MQTT 5 shared-subscription group ($share/<group>/...), so several controller replicas split one "
        "stream. Unset: every controller gets every message.",
    )

    @field_validator("shared_group")
    @classmethod
    def _group_ok(cls, v: str | None) -> str | None:
        if v is not None and not _TOPIC_GROUP_RE.match(v):
            raise ValueError("use 1-64 letters, digits, '_' or '-' (no '/', '+' or '#')")
        return v

    @model_validator(mode="after")
    def _shared_needs_v5(self) -> BrokerSettings:
        if self.shared_group and self.protocol != "5":
            raise ValueError("shared_group needs protocol: '5' (shared subscriptions are an MQTT 5 feature)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both (a client certificate and its key), or neither")
        if self.tls_cert_file is not None and not self.tls:
            raise ValueError("tls_cert_file is set but tls is false: set tls: true to connect to the TLS listener")
        return self


class ApiSettings(_Section):
    """Where the REST API listens."""

    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 to serve other machines.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free one (tests, demo).")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the API; with tls_key_file the API serves HTTPS only. Needed for "
        "node enrollment, which sends credentials (e.g. 'shopfleet pki issue server NAME').",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (mode 0600).")
    trusted_proxies: tuple[str, ...] = Field(
        (),
        description="Addresses or CIDRs of reverse proxies whose X-Forwarded-For (and -Proto) the API believes. Empty "
        "(default): the header is ignored and the client address is the TCP peer, so nobody can pick the address "
        "login throttling counts against. List only your own proxies.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"api.trusted_proxies entry {item!r} is not an address or CIDR (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("api.tls_cert_file and api.tls_key_file go together: set both for HTTPS, or neither")
        return self

    def uvicorn_options(self) -> dict[str, Any]:
        """Return the uvicorn.Config options for TLS and proxy headers.

        uvicorn trusts X-Forwarded-For from 127.0.0.1 by default, so anything on the controller
        host could pick the address login throttling counts; here proxy headers are off unless
        trusted_proxies names the proxies.
        """
        opts: dict[str, Any] = {"proxy_headers": bool(self.trusted_proxies)}
        if self.trusted_proxies:
            opts["forwarded_allow_ips"] = ",".join(self.trusted_proxies)
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            opts["ssl_certfile"] = str(self.tls_cert_file)
            opts["ssl_keyfile"] = str(self.tls_key_file)
        return opts


class PresenceSettings(_Section):
    """How long silence may last before a node counts as stale, then offline."""

    stale_after_intervals: float = Field(
        2.5,
        gt=1,
        description="A node is stale after this many heartbeat intervals without a message. Lower flags trouble "
        "sooner but turns one lost heartbeat into a false alarm.",
    )
    offline_after_intervals: float = Field(
        6.0, gt=1, description="A node without a Will is offline after this many silent intervals."
    )
    default_interval_s: float = Field(10.0, gt=0, description="Heartbeat interval assumed before a node's first heartbeat says its own.")
    sweep_interval_s: float = Field(1.0, gt=0, description="How often presence is recomputed; lower is more exact but costs a query each time.")
    sweep_max_changes: int = Field(
        2000, ge=1, le=1_000_000,
        description="Most nodes one sweep marks stale or offline, the longest silent first; the rest follow in the next sweeps. "
        "Bounds the writer's stall and the burst of presence events when a whole region goes dark at once "
        "(100,000 nodes at 2,000 per 1 s sweep take 50 s); higher marks a mass outage sooner, lower stalls the intake less.",
    )

    @model_validator(mode="after")
    def _order(self) -> PresenceSettings:
        if self.offline_after_intervals <= self.stale_after_intervals:
            raise ValueError("offline_after_intervals must be larger than stale_after_intervals")
        return self


class SeriesSettings(_Section):
    """Time series for the dashboard's charts (``retention.series``): how long each resolution is kept.

    Raw samples are folded into 1-minute and 1-hour buckets (count, sum, min, max) every time
    retention runs (``retention.interval_s``); a chart reads the coarsest tier that still shows
    the range it asks for. Longer ages keep more history at the cost of database size, roughly
    (series per node) x (samples per interval) rows per tier.
    """

    raw_max_age_s: float = Field(86400.0, gt=0, description="Raw samples (every heartbeat and reading) are kept this long; 1-hour charts read them.")
    minute_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="1-minute buckets are kept this long; 24-hour and 7-day charts read them."
    )
    hour_max_age_s: float = Field(90 * 86400.0, gt=0, description="1-hour buckets are kept this long; longer ranges read them.")
    max_points: int = Field(
        600, ge=10, le=10_000, description="Most buckets per line the series API answers with; the bucket width grows with the range to fit."
    )

    @model_validator(mode="after")
    def _order(self) -> SeriesSettings:
        if not self.raw_max_age_s <= self.minute_max_age_s <= self.hour_max_age_s:
            raise ValueError("keep raw_max_age_s <= minute_max_age_s <= hour_max_age_s (coarser tiers cover longer ranges)")
        return self


class RetentionSettings(_Section):
    """Bounds on history, so the registry stays small on a fleet that runs for years."""

    heartbeats_per_node: int = Field(360, ge=1, description="Heartbeats kept per node (360 = one hour at 10 s).")
    heartbeat_max_age_s: float = Field(86400.0, gt=0, description="Heartbeats older than this are deleted.")
    events_per_shop: int = Field(5000, ge=1, description="Events and alerts kept per shop.")
    event_max_age_s: float = Field(30 * 86400.0, gt=0, description="Events older than this are deleted.")
    interval_s: float = Field(60.0, gt=0, description="How often retention runs and series are rolled up (a large roll-up is written in parts over half of it).")
    series: SeriesSettings = Field(default_factory=SeriesSettings, description="Time series tiers and their ages.")


class IntakeSettings(_Section):
    """Batching of the intake: one transaction per batch."""

    batch_max_messages: int = Field(
        500, ge=1, le=100_000, description="Largest batch; larger is faster on SQLite but holds more unacknowledged messages."
    )
    batch_max_delay_s: float = Field(
        0.1, gt=0, le=10, description="Longest a message waits for its batch to be written; lower cuts latency, costs throughput."
    )
    writer: Literal["process", "thread"] = Field(
        "process",
        description="Where parsing and storing run: 'process' (a child process, uses a second core; the default) or "
        "'thread' (in the controller process; simpler to debug, shares one core with the MQTT thread).",
    )
    log_every_s: float = Field(60.0, gt=0, description="A rejected message of a given reason is logged at most once per this many seconds.")
    max_seq_jump: int = Field(
        100_000, ge=1, le=2**62,
        description="A seq this far above a node's watermark is refused (reason seq_jump) instead of counting a huge gap; "
        "larger tolerates longer outbox evictions, smaller refuses absurd seqs sooner.",
    )
    seq_resync_after: int = Field(
        3, ge=1, le=1000,
        description="Consecutive seqs beyond max_seq_jump after which the node's stream is rebased there (it really continues there).",
    )
    max_session_jump: int = Field(
        10_000, ge=1, le=2**31,
        description="A birth or Will whose session is this far above the held one is refused (reason session_jump).",
    )
    max_queue: int = Field(
        20_000, ge=10, le=10_000_000,
        description="Received messages the intake holds before it stops reading from the broker (flow control): the "
        "MQTT thread waits until the queue is below half of it, so memory stays bounded while a backlog drains; "
        "lower bounds memory tighter, higher rides out slow batches without pausing.",
    )
    node_burst: int = Field(
        120_000, ge=1, le=100_000_000,
        description="Messages one node may send at once before intake.node_rate_per_s limits it: a full agent outbox "
        "(outbox.max_messages, 100,000) drains whole. Beyond the budget a node's messages are acknowledged and dropped "
        "(rejected_total{reason=rate_limited}), so one flooding node cannot stall the others.",
    )
    node_rate_per_s: float = Field(
        100.0, ge=0, le=1_000_000,
        description="Messages per second that refill a node's budget (intake.node_burst); 0 turns the limit off. A node "
        "sends a heartbeat every 10 s and its events: 100/s is far above any honest node's steady rate.",
    )
    ack_nodes: bool = Field(
        False,
        description="After each commit, publish a stored-ack to every node of the batch on fleet/v1/{shop}/{node}/ack, so "
        "agents with uplink.ack: controller delete messages only once they are stored (see docs/protocol.md). Off by "
        "default, like the agents' uplink.ack: broker: it costs about one MQTT publish per node per batch "
        "(docs/benchmarks.md); turn both on together.",
    )
    partitions: int = Field(
        0, ge=0, le=1024,
        description="Replicas split the fleet by shop: each shop belongs to one of this many partitions, which the "
        "replicas sharing a database hold by lease and subscribe to shop by shop, so a node's messages reach one "
        "replica (docs/controller.md, Several controllers). 0 (default): no partitions (one controller, or "
        "broker.shared_group's round-robin). Needs broker.shared_group; the same value on every replica; a few "
        "times the most replicas you will run (16 for up to 4).",
    )
    lease_ttl_s: float = Field(
        6.0, gt=0.5, le=300,
        description="With partitions: a replica's leases expire this long after its last renewal (renewed every "
        "ttl/3, at most every second); a dead replica's shops move to the others after about this long. Lower fails "
        "over sooner; a replica whose database stalls longer than this loses its partitions.",
    )


class ExecutorSettings(BaseModel):
    """Settings of the rollout executor (the ``rollout:`` section of the controller config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    signing_key: Path = Field(description="PEM ed25519 private key that signs desired states ('shopfleet release keygen' makes one).")
    tick_interval_s: float = Field(2.0, gt=0, le=60, description="Seconds between executor steps; lower reacts faster, costs more queries.")
    lease_ttl_s: float = Field(15.0, gt=0, description="Seconds a controller stays executor without renewing; another takes over after it.")
    republish_after_s: float = Field(30.0, gt=0, description="Re-publish a shop's desired state if it has not reported on it after this long.")
    publish_concurrency: int = Field(
        16, ge=1, le=256, description="Desired states published at once, each waiting for its broker acknowledgement; higher starts a large wave sooner, costs threads."
    )


class DashboardSettings(_Section):
    """Dashboard, logins and what stays open without one."""

    public_metrics: bool = Field(
        True, description="Serve /metrics without a login (Prometheus scrapers carry no cookie); false requires a token."
    )
    secure_cookies: bool | None = Field(
        None, description="Mark session cookies Secure; unset: only when the request came over https."
    )
    url: str = Field("", description="External address of the dashboard, used in alert webhooks' links.")


class EnrollmentSettings(_Section):
    """Node enrollment and credential rotation/revocation (``enrollment:``; docs/security.md, "Enrollment").

    The controller signs enrolling nodes' certificates with the fleet CA in ``pki_dir``, so it
    holds the CA key: run it where the CA may live. Revocations rewrite ``pki_dir/crl.pem`` (and
    remove the node from ``password_file`` and ``acl_file``) and then make the broker reload, by
    ``reload_command`` or a SIGHUP to the process in ``reload_pid_file``.
    """

    pki_dir: Path = Field(description="The fleet CA directory made by 'shopfleet pki init' (the same the broker's crlfile and cafile come from).")
    broker_address: str | None = Field(
        None, description="HOST:PORT of the broker's mutual-TLS listener, returned to enrolling nodes (their broker.host/port); "
        "unset: nodes are told nothing and configure it themselves.",
    )
    cert_days: int = Field(825, ge=1, le=3650, description="Validity of an enrolled node's certificate, in days.")
    token_ttl_s: float = Field(3600.0, ge=60, le=7 * 86400, description="Default lifetime of a new enrollment token.")
    allow_plain_http: bool = Field(
        False, description="Serve POST /api/v1/enroll over plain http too. For tests and local development only: the "
        "response carries the node's certificate and the token crosses in clear.",
    )
    password_file: Path | None = Field(
        None, description="The broker's password file (broker-config's OUT/passwd): a revoked node's entry is removed "
        "from it, so its password stops working too. Unset: passwords are left alone.",
    )
    acl_file: Path | None = Field(
        None, description="The broker's ACL file (broker-config's OUT/acl): a revoked node's 'user' block is removed from "
        "it, so after the reload the connection it already has open may neither publish nor receive anything. Unset: the "
        "ACL is left alone and that connection keeps its rights until the broker restarts.",
    )
    reload_command: tuple[str, ...] = Field(
        (), description="Command (argv list) run after a revocation changed the CRL or password file, to make the broker "
        "re-read them, e.g. [systemctl, reload, mosquitto]. Mosquitto re-reads both on SIGHUP.",
    )
    reload_pid_file: Path | None = Field(
        None, description="Pid file of a broker on this host (Mosquitto's pid_file): it gets SIGHUP after a revocation. "
        "Used when reload_command is empty.",
    )
    max_failures_per_address: int = Field(
        10, ge=1, le=10_000, description="Failed enrollments one client address may make per 10 minutes before it is "
        "answered 429 for the rest of that window (token guessing is hopeless anyway; this caps the noise).",
    )

    @field_validator("broker_address")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"enrollment.broker_address {v!r}: use HOST:PORT of the broker's TLS listener, e.g. broker.example.com:8883")
        return v


class ControllerSettings(_Section):
    """Everything ``shopfleet controller`` needs."""

    data_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "shopfleet",
        description="Directory for the default SQLite database.",
    )
    db_url: str | None = Field(None, description="SQLAlchemy URL; unset means SQLite at <data_dir>/controller.db.")
    instance: str = Field(
        default_factory=lambda: f"controller-{uuid.uuid4().hex[:8]}",
        max_length=64,
        description="Name of this controller instance in its presence and clock messages.",
    )
    clock_interval_s: float = Field(5.0, gt=0, description="Period of the clock beacon agents estimate their offset from.")
    broker: BrokerSettings = Field(default_factory=BrokerSettings, description="MQTT broker connection.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="REST API listener.")
    presence: PresenceSettings = Field(default_factory=PresenceSettings, description="Presence timing.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="History bounds.")
    intake: IntakeSettings = Field(default_factory=IntakeSettings, description="Intake batching.")
    alert_rules: Path | None = Field(
        None, description="Alert rules YAML (docs/alerts.md); unset: the built-in defaults an operator would want."
    )
    rollout: ExecutorSettings | None = Field(
        None,
        description="Rollout executor (docs/rollouts.md); unset: the releases/rollouts API is served but no rollout "
        "advances (a replica without the signing key).",
    )
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings, description="Dashboard and logins.")
    enrollment: EnrollmentSettings | None = Field(
        None, description="Node enrollment with one-time tokens, credential rotation and revocation (docs/security.md); "
        "unset: the enrollment endpoints answer 503.",
    )

    @model_validator(mode="after")
    def _partitions_need_group(self) -> ControllerSettings:
        if self.intake.partitions and not self.broker.shared_group:
            raise ValueError(
                "intake.partitions needs broker.shared_group (and broker.protocol: '5'): replicas find new shops through "
                "a shared presence subscription; set e.g. broker.shared_group: controllers, or intake.partitions: 0"
            )
        return self

    def database_url(self) -> str:
        """Return the registry URL, defaulting to SQLite in ``data_dir``."""
        return self.db_url or f"sqlite:///{self.data_dir / 'controller.db'}"


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the settings given by ``SHOPFLEET_CONTROLLER_*`` variables as a nested dict."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        cur = out
        for p in path[:-1]:
            cur = cur.setdefault(p, {})
        cur[path[-1]] = value
    return out


def _split_hostport(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingsError(f"{flag} {value!r}: use HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def overrides_from_args(args: Any) -> dict[str, Any]:
    """Return the settings given by the ``shopfleet controller`` flags as a nested dict."""
    out: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    if getattr(args, "db_url", None):
        out["db_url"] = args.db_url
    if getattr(args, "broker", None):
        broker["host"], broker["port"] = _split_hostport(args.broker, "--broker")
    if getattr(args, "mqtt_username", None):
        broker["username"] = args.mqtt_username
    if getattr(args, "mqtt_password_file", None):
        try:
            broker["password"] = Path(args.mqtt_password_file).read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise SettingsError(f"--mqtt-password-file {args.mqtt_password_file}: cannot read a password from it ({exc})") from None
    if getattr(args, "client_id", None):
        broker["client_id"] = args.client_id
    if getattr(args, "shared_group", None):
        broker["shared_group"] = args.shared_group
        broker["protocol"] = "5"
    if broker:
        out["broker"] = broker
    if getattr(args, "api", None):
        host, port = _split_hostport(args.api, "--api")
        out["api"] = {"host": host, "port": port}
    return out


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid controller settings ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            fix = "remove it or check its spelling against docs/controller.md"
        else:
            fix = "fix the value"
        lines.append(f"  {key}: {err['msg']} ({fix})")
    return "\n".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ControllerSettings:
    """Load settings from a YAML file, the environment and overrides; raise ``SettingsError`` naming the problem."""
    data: dict[str, Any] = {}
    sources = []
    if path is not None:
        p = Path(path)
        sources.append(f"file {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {p}: {exc.strerror}; pass an existing file to --config") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"settings file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"settings file {p} must hold a mapping of keys (e.g. 'broker:'), not {type(loaded).__name__}")
        data = loaded
    env = env_overrides(os.environ if environ is None else environ)
    if env:
        sources.append(f"environment {ENV_PREFIX}*")
        data = _deep_merge(data, env)
    if overrides:
        sources.append("command-line flags")
        data = _deep_merge(data, overrides)
    try:
        return ControllerSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, ", ".join(sources) or "defaults")) from None
