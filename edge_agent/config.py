"""Configuration of the node agent: one YAML file, flags overriding single keys.

Shaped for the person who writes the file on a Pi at 2 a.m.: every key has a description
(docs/agent.md lists the same words, and a test checks it names every key), unknown keys are refused (``extra="forbid"``,
so a typo never silently falls back to a default), cross-field rules are checked at load time,
and every error names the file, the dotted key and what to write instead. Topics are derived
from shop and node, so validating those ids here means every topic the agent uses is valid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge_agent.apply.plugin import ApplyConfig
from edge_agent.pipelines import PIPELINE_MODULES, PipelineEntry
from edge_agent.protocol import NodeFacts, validate_id


class ConfigError(ValueError):
    """The agent config is invalid; the message names file, key and fix, one problem per line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    """TLS towards the broker. Setting any file turns TLS on."""

    ca_file: str | None = Field(None, description="CA bundle that signed the broker's certificate (PEM). Unset: the system CAs.")
    cert_file: str | None = Field(None, description="Client certificate (PEM) for brokers that require mutual TLS.")
    key_file: str | None = Field(None, description="Private key (PEM) of cert_file.")
    insecure: bool = Field(False, description="Skip the host name check of the broker certificate. Testing only.")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together: set both for mutual TLS, or neither")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ValueError(f"{key} {path!r} does not exist: point it at a readable PEM file")
        return self


class BrokerConfig(_Model):
    """The MQTT broker the agent reports to."""

    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (1883 plain, 8883 usually TLS).")
    username: str | None = Field(None, description="This node's MQTT user name, as written by 'shopfleet broker-config'.")
    password: SecretStr | None = Field(None, description="This node's MQTT password.")
    password_file: str | None = Field(None, description="File holding the password (first line); alternative to password.")
    tls: TLSConfig | None = Field(None, description="TLS settings; omit for a plain connection.")
    keepalive_s: int = Field(
        30, ge=5, le=3600, description="MQTT keepalive. Lower detects a dead link (and fires the Will) sooner; higher saves traffic."
    )
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First delay before reconnecting; doubles per failed attempt.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest delay between reconnect attempts.")
    protocol: Literal["3.1.1", "5"] = Field(
        "3.1.1",
        description="MQTT protocol version. '5' lets the agent see a publish the broker refuses (PUBACK reason code 0x87, "
        "e.g. its ACL), count it and drop it from the outbox; with '3.1.1' the broker acknowledges it like any other. "
        "Mosquitto 2 speaks both; the demo's broker only 3.1.1.",
    )

    @model_validator(mode="after")
    def _checks(self) -> BrokerConfig:
        if self.password is not None and self.password_file:
            raise ValueError("set either password or password_file, not both")
        if self.password_file and not os.path.isfile(self.password_file):
            raise ValueError(f"password_file {self.password_file!r} does not exist: point it at a file holding the password")
        if (self.password is not None or self.password_file) and not self.username:
            raise ValueError("a password needs a username: set broker.username")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s is larger than reconnect_max_s: lower reconnect_min_s")
        return self

    def secret(self) -> str | None:
        """Return the password from ``password`` or ``password_file``."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file:
            lines = Path(self.password_file).read_text().splitlines()
            return lines[0] if lines else ""
        return None


class OutboxConfig(_Model):
    """The durable outbox (SQLite, WAL) every uplink message passes through."""

    path: str = Field("shopfleet-outbox.db", description="SQLite file; its directory must be writable. Keep it on persistent storage.")
    max_messages: int = Field(
        100_000, ge=10, description="Most messages kept while the broker is unreachable; the oldest telemetry goes first."
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="Most payload bytes kept; the oldest telemetry goes first."
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode. 'full' survives power loss (fsync per message); 'normal' survives a "
        "crash or SIGKILL but may lose the last messages on power loss, and wears an SD card less.",
    )
    inflight: int = Field(
        50, ge=1, le=1000, description="Messages handed to the broker before their acknowledgement; higher is faster on a slow link."
    )


class UplinkConfig(_Model):
    """When a sent message may leave the outbox."""

    ack: Literal["controller", "broker"] = Field(
        "broker",
        description="'controller': keep a message until the controller's stored-ack says it is in the registry (no broker "
        "setting can lose it; needs a controller with intake.ack_nodes). 'broker': delete it on the broker's PUBACK "
        "(for controllers that send no stored-acks; a broker that drops queued messages then loses data).",
    )
    ack_timeout_s: float = Field(
        30.0, gt=0, le=3600,
        description="With ack 'controller': messages sent but not acknowledged by the controller for this long are sent again.",
    )


class MetricsConfig(_Model):
    """The Prometheus endpoint of the agent."""

    port: int = Field(0, ge=0, le=65535, description="Port of /metrics; 0 turns the endpoint off.")
    host: str = Field(
        "127.0.0.1",
        description="Address the endpoint binds to. Loopback by default: the agent runs on the host network, and "
        "0.0.0.0 would show the node's metrics to the whole shop LAN. Set the node's own address for a Prometheus "
        "elsewhere (and firewall it to that Prometheus).",
    )
    host_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding the address to bind, overriding host: in Kubernetes, "
        "NODE_IP set from the Downward API's status.hostIP, so a host-network agent serves the node's own address "
        "(where the kubelet's probes and Prometheus reach it) and not the whole shop LAN's 0.0.0.0. The variable must "
        "be set and non-empty when the agent starts.",
    )

    @model_validator(mode="after")
    def _host_env_is_set(self) -> MetricsConfig:
        if self.host_env is not None and not os.environ.get(self.host_env, "").strip():
            raise ValueError(
                f"metrics.host_env names {self.host_env}, which is not set in the environment; set it (in Kubernetes: "
                f"env {self.host_env} from fieldRef status.hostIP) or remove metrics.host_env to bind metrics.host"
            )
        return self

    @property
    def bind_host(self) -> str:
        """The address the endpoint binds to: the variable ``host_env`` names, else ``host``."""
        if self.host_env is not None:
            return os.environ[self.host_env].strip()
        return self.host


class CommandsConfig(_Model):
    """Remote actions: which keys may sign the commands this node runs (see docs/agent.md)."""

    public_keys: tuple[str, ...] = Field(
        (), description="PEM ed25519 public key file(s) of the controller (the .pub of rollout.signing_key, the same files as "
        "apply.public_keys). Empty: the node runs no remote action, only an unsigned ping.",
    )
    state_path: str | None = Field(
        None, description="File keeping the highest command counter accepted (replay protection across restarts). "
        "Unset: beside the outbox, <outbox.path>.commands.json.",
    )
    max_ttl_s: float = Field(3600.0, gt=0, le=86400, description="Refuse a signed command that expires further ahead than this.")

    @field_validator("public_keys")
    @classmethod
    def _exist(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for path in v:
            if not os.path.isfile(path):
                raise ValueError(f"public key file {path!r} does not exist: copy the controller's .pub file to the node")
        return v

    def counter_path(self, outbox_path: str) -> str:
        """Return where the highest accepted counter is kept."""
        return self.state_path or f"{outbox_path}.commands.json"


class AgentConfig(_Model):
    """Configuration of the node agent (one YAML file)."""

    shop: str = Field(description="Shop id (DNS label such as 'berlin-01') this node belongs to.")
    node: str = Field(description="Node id (DNS label such as 'pi-2'), unique in its shop.")
    node_class: str = Field("", max_length=64, description="Kind of node, as rollouts target it: 'pi', 'gpu', ...")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT broker connection.")
    heartbeat_interval_s: float = Field(
        10.0, ge=0.05, le=3600, description="Seconds between heartbeats. The controller calls a node stale after a few missed ones."
    )
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable outbox.")
    uplink: UplinkConfig = Field(default_factory=UplinkConfig, description="End-to-end acknowledgement of sent messages.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics endpoint.")
    apply: ApplyConfig = Field(default_factory=ApplyConfig, description="Whether and how this node applies the shop's desired state; see docs/rollouts.md.")
    commands: CommandsConfig = Field(default_factory=CommandsConfig, description="Signed remote actions (restart a pipeline, ...): the keys that may sign them.")
    facts_override: dict[str, Any] = Field(
        default_factory=dict,
        description="Node facts to report instead of the measured ones (keys of NodeFacts), e.g. {arch: arm64} to look like a Pi.",
    )
    shutdown_timeout_s: float = Field(10.0, ge=0, le=600, description="On SIGTERM: longest wait for the outbox to drain.")
    pipelines: list[PipelineEntry] = Field(
        default_factory=list,
        description="Local pipelines the agent supervises, each chosen by its 'type' key; see docs/agent.md.",
    )

    @field_validator("shop", "node")
    @classmethod
    def _id(cls, value: str, info: ValidationInfo) -> str:
        return validate_id(value, f"{info.field_name} id")

    @model_validator(mode="after")
    def _facts(self) -> AgentConfig:
        unknown = sorted(set(self.facts_override) - set(NodeFacts.model_fields))
        if unknown:
            raise ValueError(f"facts_override has unknown keys {unknown}: use keys of NodeFacts ({', '.join(NodeFacts.model_fields)})")
        return self

    @model_validator(mode="after")
    def _pipeline_names_unique(self) -> AgentConfig:
        names = [p.name for p in self.pipelines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipelines: names {dupes} are used twice: give each pipeline a unique name")
        return self


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _fix_for(err: Mapping[str, Any], model_doc: str | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "remove it or correct its spelling (docs/agent.md lists every key)"
    if kind == "missing":
        return f"add it{': ' + model_doc if model_doc else ''}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"set type to one of: {', '.join(sorted(PIPELINE_MODULES))}"
    if kind in ("value_error", "assertion_error"):
        return "change the value as the message says"
    if model_doc:
        return f"give a valid value ({model_doc.rstrip('.')})"
    return "see docs/agent.md"


def _describe(loc: tuple[Any, ...]) -> str | None:
    """Return the description of the field at ``loc`` in AgentConfig, if one is found."""
    from edge_agent.pipelines import pipeline_types

    models: list[Any] = [AgentConfig]
    desc = None
    for part in loc:
        if isinstance(part, int):
            continue
        info = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if info is None:
            return None
        desc = info.description
        if part == "pipelines" and models == [AgentConfig]:
            models = [m.Config for m in pipeline_types().values()]
            continue
        ann = info.annotation
        models = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
    return desc


def _strip_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the union tag pydantic puts after a pipeline's index (``pipelines.0.process.x``)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i >= 2 and loc[0] == "pipelines" and isinstance(loc[i - 1], int) and part in PIPELINE_MODULES:
            continue
        out.append(part)
    return tuple(out)


def format_errors(source: str, exc: ValidationError) -> str:
    """Render validation errors as 'FILE: key K: problem; fix: ...' lines."""
    lines = []
    for err in exc.errors():
        loc = _strip_tags(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: key '{key}': {msg}; fix: {_fix_for(err, _describe(loc))}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read the YAML file (if any), apply dotted-key overrides and validate; raise ConfigError."""
    source = str(path) if path else "(flags)"
    data: Any = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file ({exc.strerror}); fix: check the --config path") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}; fix: correct the YAML syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level is a {type(data).__name__}; fix: write a mapping of keys such as 'shop: berlin-01'")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
        source = f"{source} (with flags)" if "with flags" not in source and path else source
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "(config)") -> AgentConfig:
    """Validate a config mapping, or raise ConfigError naming source, key and fix."""
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc)) from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config
