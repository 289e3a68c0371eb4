"""The shopfleet wire protocol: every MQTT topic and message between shops and the controller.

This is the one module the controller imports from the agent side (an import-linter contract
enforces it), so the two can never disagree about a topic or a field. It is shaped by three
decisions of the architecture (docs/architecture.md):

* **Broker-agnostic.** Everything a message needs (schema version, correlation id, expiry,
  sender identity, sequence number) lives in the JSON payload, so the protocol works on any
  MQTT 3.1.1 broker; MQTT 5 properties are an optimisation, never a requirement.
* **Nothing lost, nothing doubled.** Every uplink message that goes through the agent's outbox
  carries the node's ``epoch`` (a random id fixed when the outbox database is created) and a
  ``seq`` that increases by one per message within that epoch. The controller dedupes on
  ``(shop, node, epoch, seq)`` and counts gaps.
* **Honest presence.** Birth and Last Will carry a ``session`` number that increases with every
  connection of a node, so a late Will of an older session never marks a newer session offline.

Parsing is strict (``extra="forbid"``) and total: :func:`parse_message` either returns a typed,
frozen message or raises :class:`ProtocolError` whose ``reason`` is a short, stable code that
callers use as a Prometheus label.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

SCHEMA_VERSION: Final = 1
"""Version of every payload defined here. A receiver refuses versions it does not know."""

TOPIC_ROOT = "fleet/v1"
CONTROLLER_SEGMENT = "_controller"
"""Reserved second segment for the controller's own topics (shop ids cannot start with ``_``)."""
LOCAL_ROOT = "local/v1"
"""Root of the shop-local streams: outside ``fleet/v1``, so a shop bridge (an explicit list of
``fleet/v1`` topics) never forwards them to the central broker."""

MAX_PAYLOAD_BYTES = 256 * 1024
"""Largest payload either side accepts. Big enough for a rendered desired state of a shop
(a few dozen Kubernetes objects); small enough that a runaway sender cannot exhaust memory."""

ERROR_MAX_CHARS = 2000
"""Longest ``error`` of a CommandResult or ReportedState; senders cut longer texts to this."""

DETAIL_MAX_CHARS = 500
"""Longest ``detail`` of a PipelineHealth; senders cut longer texts to this."""

INT64_MAX: Final = 2**63 - 1
"""Largest ``seq`` (and any other count the registry keeps in a BIGINT column)."""
INT32_MAX: Final = 2**31 - 1
"""Largest ``session``, ``revision`` and ``outbox_depth``: the registry keeps them in INTEGER columns."""

Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


@dataclass(frozen=True)
class FreeFormLimits:
    """Bounds on a free-form JSON value (an event's ``data``, a command's ``args``, ...).

    Free-form values are stored as JSON, pickled back from the registry writer and rendered by the
    API, so an unbounded one is a weapon: 900 levels of nesting in 5.6 KB once stopped the whole
    fleet's intake (Python's pickler and pydantic's serialiser both give up around 1,000 levels).
    The defaults leave generous room for real event data and refuse what no pipeline sends.
    """

    max_depth: int
    max_nodes: int
    max_keys: int
    max_key_chars: int
    max_str_chars: int
    max_list: int


FREE_FORM = FreeFormLimits(max_depth=8, max_nodes=2_000, max_keys=256, max_key_chars=128, max_str_chars=8_192, max_list=1_000)
"""Limits of ``Event.data``, ``Alert.data``, ``CommandResult.result``, ``Command.args`` and ``DesiredState.model``:
8 levels below the field, 2,000 values in all, 256 keys per object (128 characters each), strings of 8 KiB,
lists of 1,000 items, 64-bit integers, finite numbers."""

OBJECT_LIMITS = FreeFormLimits(
    max_depth=24, max_nodes=50_000, max_keys=1_000, max_key_chars=253, max_str_chars=MAX_PAYLOAD_BYTES, max_list=10_000,
)
"""Limits of each rendered Kubernetes object of a ``DesiredState`` (deeper and larger than event data)."""


def check_free_form(value: Any, limits: FreeFormLimits = FREE_FORM, what: str = "value") -> Any:
    """Return ``value`` if it is JSON data within ``limits``, else raise ``ValueError`` naming the limit and the fix.

    Iterative (never recursive), so it cannot itself run out of stack on a hostile value.
    """
    nodes = 0
    stack: list[tuple[Any, int, str]] = [(value, 1, what)]
    while stack:
        v, depth, path = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise ValueError(f"{what} has more than {limits.max_nodes} values: send less data per message")
        if isinstance(v, dict):
            if depth > limits.max_depth:
                raise ValueError(f"{path} nests deeper than {limits.max_depth} levels: flatten the data")
            if len(v) > limits.max_keys:
                raise ValueError(f"{path} has {len(v)} keys, more than {limits.max_keys}: send less data per message")
            for k, item in v.items():
                if not isinstance(k, str) or len(k) > limits.max_key_chars:
                    raise ValueError(f"{path} has a key longer than {limits.max_key_chars} characters: shorten it")
                stack.append((item, depth + 1, f"{path}.{k[:32]}"))
        elif isinstance(v, list | tuple):
            if depth > limits.max_depth:
                raise ValueError(f"{path} nests deeper than {limits.max_depth} levels: flatten the data")
            if len(v) > limits.max_list:
                raise ValueError(f"{path} is a list of {len(v)} items, more than {limits.max_list}: send fewer")
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, str):
            if len(v) > limits.max_str_chars:
                raise ValueError(f"{path} is a string of {len(v)} characters, more than {limits.max_str_chars}: shorten it")
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ValueError(f"{path} is an integer outside 64 bits: send it as a string")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{path} is {v}: only finite numbers are allowed (send null for 'unknown')")
        else:
            raise ValueError(f"{path} is a {type(v).__name__}, not JSON data")
    return value


def _free_form(limits: FreeFormLimits, what: str) -> AfterValidator:
    return AfterValidator(lambda v: check_free_form(v, limits, what))


Data = Annotated[dict[str, Any], _free_form(FREE_FORM, "data")]
Result = Annotated[dict[str, Any], _free_form(FREE_FORM, "result")]
Args = Annotated[dict[str, Any], _free_form(FREE_FORM, "args")]
ModelRef = Annotated[dict[str, Any], _free_form(FREE_FORM, "model")]
KubeObject = Annotated[dict[str, Any], _free_form(OBJECT_LIMITS, "object")]

PipelineState = Literal["starting", "running", "backoff", "failed", "stopped"]
"""Supervisor state of a local pipeline (``edge_agent.supervisor``), as heartbeats report it."""

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""Shop and node ids: DNS-label shaped, so they are valid as MQTT topic levels, Kubernetes label
values and usernames at the same time."""

_ID_RE = re.compile(ID_PATTERN)

EPOCH_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""An outbox epoch: 1-64 letters, digits, '.', '_' or '-' (agents use a uuid4 hex)."""
TOKEN_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
"""A correlation id: 1-64 letters, digits, '.', '_', ':' or '-' (the controller uses a uuid4 hex)."""


class ProtocolError(ValueError):
    """A payload or topic that does not follow the protocol.

    ``reason`` is one of :data:`REJECT_REASONS` and is safe to use as a metric label;
    ``detail`` says what exactly was wrong, for the log line.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


REJECT_REASONS = (
    "too_large",  # payload above MAX_PAYLOAD_BYTES
    "bad_json",  # not UTF-8 JSON, not a JSON object, or nested too deep to parse
    "not_finite",  # NaN, Infinity or a number too large for a float
    "bad_topic",  # topic outside the fleet/v1 tree or with an invalid shop/node id
    "version",  # schema version this side does not understand
    "schema",  # fields missing, of the wrong type, or unexpected
    "kind_mismatch",  # message kind not allowed on this topic
    "identity_mismatch",  # shop/node in the payload differ from the topic
)


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid shop or node id, else raise ``ValueError`` naming the fix."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-63 characters of lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return value


ShopId = Annotated[str, Field(pattern=ID_PATTERN, description="Shop id (DNS label).")]
NodeId = Annotated[str, Field(pattern=ID_PATTERN, description="Node id (DNS label), unique in its shop.")]


# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------


class Channel(StrEnum):
    """Per-node topic leaves, ``fleet/v1/{shop}/{node}/{channel}``."""

    PRESENCE = "presence"  # node -> controller, retained: birth and Last Will
    TELEMETRY = "telemetry"  # node -> controller: heartbeats, readings
    EVENTS = "events"  # node -> controller: shop events and node alerts
    COMMANDS = "commands"  # controller -> node: commands with correlation id and expiry
    REPLIES = "replies"  # node -> controller: command results
    STATE = "state"  # node -> controller, retained: the node's own reported state (ReportedState)
    ACK = "ack"  # controller -> node: what the controller has stored of the node's stream (StoredAck)


class LocalStream(StrEnum):
    """Kinds of shop-local stream, ``local/v1/{shop}/{kind}/{node}/{stream}``."""

    TRACKS = "tracks"  # a camera's or a merged view's tracks, for fusion
    DETECTIONS = "detections"  # a camera's detections, for the floor pipeline


class Topics:
    """Build and parse every topic of the protocol. All functions validate the ids they get."""

    root = TOPIC_ROOT

    @staticmethod
    def node(shop: str, node: str, channel: Channel | str) -> str:
        """Return ``fleet/v1/{shop}/{node}/{channel}``."""
        return f"{TOPIC_ROOT}/{validate_id(shop, 'shop id')}/{validate_id(node, 'node id')}/{Channel(channel).value}"

    @staticmethod
    def desired(shop: str) -> str:
        """Return the retained desired-state topic of a shop (controller -> shop)."""
        return f"{TOPIC_ROOT}/{validate_id(shop, 'shop id')}/state/desired"

    @staticmethod
    def reported(shop: str, node: str) -> str:
        """Return the retained reported-state topic of one node, ``fleet/v1/{shop}/{node}/state``.

        Per node, not per shop: the broker's ACL lets a node write only its own, so one node can
        never speak for another, and the controller decides a shop's state from the one node the
        shop declares as its applier. (The shop-wide ``fleet/v1/{shop}/state/reported`` of older
        versions is refused.)
        """
        return Topics.node(shop, node, Channel.STATE)

    @staticmethod
    def local(shop: str, kind: LocalStream | str, node: str, stream: str) -> str:
        """Return the shop-local stream topic ``local/v1/{shop}/{kind}/{node}/{stream}`` a publisher writes.

        ``node`` is the node part of the publisher's broker user ``<shop>.<node>``: the shop
        broker's ACL lets each node user write only under its own node, so the topic names its
        publisher. ``stream`` is the camera (or merged view, e.g. ``floor``).
        """
        return Topics._local(validate_id(shop, "shop id"), kind, validate_id(node, "node id"), validate_id(stream, "camera name"))

    @staticmethod
    def local_filter(shop: str, kind: LocalStream | str, node: str | None = None) -> str:
        """Return the filter ``local/v1/{shop}/{kind}/{node}/+`` of one node's streams, or of every node's (``node`` None: ``+``).

        For a subscription and for the shop broker's ACL patterns.
        """
        return Topics._local(validate_id(shop, "shop id"), kind, "+" if node is None else validate_id(node, "node id"), "+")

    @staticmethod
    def _local(shop: str, kind: LocalStream | str, node: str, stream: str) -> str:
        """The one shape of the shop-local topics; ``shop``, ``node`` and ``stream`` come checked (or ``+``)."""
        return f"{LOCAL_ROOT}/{shop}/{LocalStream(kind).value}/{node}/{stream}"

    @staticmethod
    def parse_local(topic: str) -> tuple[str, str] | None:
        """Return (node, stream) of a shop-local stream topic, or None for another shape."""
        parts = topic.split("/")
        if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != LOCAL_ROOT:
            return None
        return parts[4], parts[5]

    controller_presence = f"{TOPIC_ROOT}/{CONTROLLER_SEGMENT}/presence"
    """Retained presence of the controller (online/offline with its instance id)."""
    controller_clock = f"{TOPIC_ROOT}/{CONTROLLER_SEGMENT}/clock"
    """Periodic clock beacon; agents estimate their clock offset from it."""

    # Subscriptions the controller needs (everything nodes and shops send).
    controller_subscriptions = (
        f"{TOPIC_ROOT}/+/+/{Channel.PRESENCE.value}",
        f"{TOPIC_ROOT}/+/+/{Channel.TELEMETRY.value}",
        f"{TOPIC_ROOT}/+/+/{Channel.EVENTS.value}",
        f"{TOPIC_ROOT}/+/+/{Channel.REPLIES.value}",
        f"{TOPIC_ROOT}/+/+/{Channel.STATE.value}",
    )

    @staticmethod
    def agent_subscriptions(shop: str, node: str) -> tuple[str, ...]:
        """Topics an agent subscribes to: its commands and stored-acks, its shop's desired state, the controller clock."""
        return (
            Topics.node(shop, node, Channel.COMMANDS),
            Topics.node(shop, node, Channel.ACK),
            Topics.desired(shop),
            Topics.controller_presence,
            Topics.controller_clock,
        )


class TopicInfo(BaseModel):
    """What a topic says about its sender: shop, node (``None`` for shop-wide) and leaf."""

    model_config = ConfigDict(frozen=True)
    shop: str | None
    node: str | None
    leaf: str  # a Channel value, "state/desired", or a controller leaf


def parse_topic(topic: str) -> TopicInfo:
    """Split a topic of the fleet/v1 tree into shop, node and leaf, or raise ``ProtocolError``."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "fleet" or parts[1] != "v1":
        raise ProtocolError("bad_topic", f"{topic!r} is not under {TOPIC_ROOT}/")
    if parts[2] == CONTROLLER_SEGMENT:
        if len(parts) == 4 and parts[3] in ("presence", "clock"):
            return TopicInfo(shop=None, node=None, leaf=f"controller/{parts[3]}")
        raise ProtocolError("bad_topic", f"unknown controller topic {topic!r}")
    shop = parts[2]
    if not _ID_RE.match(shop):
        raise ProtocolError("bad_topic", f"invalid shop id {shop!r} in topic {topic!r}")
    if len(parts) == 5 and parts[3] == "state" and parts[4] == "desired":
        return TopicInfo(shop=shop, node=None, leaf="state/desired")
    if len(parts) == 5:
        node, leaf = parts[3], parts[4]
        if not _ID_RE.match(node):
            raise ProtocolError("bad_topic", f"invalid node id {node!r} in topic {topic!r}")
        if leaf in Channel._value2member_map_:
            return TopicInfo(shop=shop, node=node, leaf=leaf)
    raise ProtocolError("bad_topic", f"unknown topic {topic!r}")


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version of the payload.")
    ts: float = Field(default_factory=time.time, description="Sender's clock, Unix seconds.")


class Uplink(_Msg):
    """Fields every message sent through a node's outbox carries."""

    shop: ShopId
    node: NodeId
    epoch: str = Field(
        pattern=EPOCH_PATTERN,
        description="Random id of the node's outbox database; a new epoch restarts seq at 1.",
    )
    seq: int = Field(ge=1, le=INT64_MAX, description="Per-node sequence number, +1 per message within an epoch.")


class Presence(_Msg):
    """Birth (``online``) and Last Will (``offline``) of a node; retained."""

    kind: Literal["presence"] = "presence"
    shop: ShopId
    node: NodeId
    state: Literal["online", "offline"]
    session: int = Field(ge=1, le=INT32_MAX, description="Increases with every connection of the node.")
    agent_version: str = Field("", max_length=64)
    reason: str = Field("", max_length=200, description="Why offline: 'will', 'shutdown', ...")


class PipelineHealth(BaseModel):
    """Health of one local pipeline (a camera, a sensor board) as the agent supervises it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str = Field(max_length=32, description="'vision', 'hardware', ...")
    state: PipelineState
    restarts: int = Field(0, ge=0, le=INT64_MAX)
    fps: float | None = Field(None, ge=0)
    latency_ms: float | None = Field(None, ge=0)
    dropped_frames: int | None = Field(None, ge=0, le=INT64_MAX)
    last_frame_age_s: float | None = Field(None, ge=0)
    errors: int = Field(0, ge=0, le=INT64_MAX, description="Errors since the pipeline started.")
    detail: str = Field("", max_length=DETAIL_MAX_CHARS)


class NodeFacts(BaseModel):
    """Facts about a node that the controller keeps as its latest known state."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    hostname: str = Field("", max_length=255)
    arch: str = Field(max_length=32, description="'amd64', 'arm64', ... (Go/Kubernetes naming).")
    os: str = Field("", max_length=200)
    kernel: str = Field("", max_length=200)
    node_class: str = Field("", max_length=64, description="'pi', 'gpu', ... as configured.")
    cpu_count: int = Field(ge=1, le=INT32_MAX)
    cpu_load_1m: float = Field(ge=0)
    cpu_percent: float | None = Field(None, ge=0)
    mem_total_bytes: Count
    mem_available_bytes: Count
    disk_total_bytes: Count
    disk_free_bytes: Count
    cpu_temp_c: float | None = None
    onnx_providers: tuple[Annotated[str, Field(max_length=64)], ...] = Field((), max_length=32)
    gpu: str | None = Field(None, max_length=200)
    clock_offset_s: float | None = Field(
        None, description="Controller clock minus node clock, estimated from the clock beacon."
    )
    uptime_s: float = Field(0, ge=0)
    agent_version: str = Field("", max_length=64)


MAX_EVICTED_RANGES = 64
"""Evicted runs one heartbeat carries at most; more wait for the next heartbeat."""


class EvictedRun(BaseModel):
    """Seqs ``first``..``last`` (inclusive) that the node's outbox evicted before sending them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    first: int = Field(ge=1, le=INT64_MAX)
    last: int = Field(ge=1, le=INT64_MAX)
    priority: Literal["telemetry", "keeper", "important"] = Field(description="Eviction class of the evicted messages.")

    @model_validator(mode="after")
    def _ordered(self) -> EvictedRun:
        if self.last < self.first:
            raise ValueError(f"evicted run {self.first}..{self.last}: last is below first")
        return self


class Heartbeat(Uplink):
    """Periodic node health: facts, pipelines, outbox depth and any numeric metric for gates."""

    kind: Literal["heartbeat"] = "heartbeat"
    interval_s: float = Field(gt=0, le=86_400, description="Seconds until the next heartbeat is due (at most a day).")
    facts: NodeFacts
    pipelines: dict[Annotated[str, Field(max_length=64)], PipelineHealth] = Field(default_factory=dict, max_length=64)
    metrics: dict[Annotated[str, Field(max_length=128)], float] = Field(
        default_factory=dict, max_length=500, description="Numeric health metrics (e.g. cart_review_rate) for gates."
    )
    outbox_depth: int = Field(0, ge=0, le=INT32_MAX)
    release: str | None = Field(None, max_length=128, description="Release the node runs.")
    evicted: tuple[EvictedRun, ...] = Field(
        (), max_length=MAX_EVICTED_RANGES,
        description="Seqs of this epoch the outbox evicted unsent (reported until this heartbeat is stored), so the "
        "controller counts them as evicted, not missing.",
    )


class Reading(BaseModel):
    """One sampled value: a shelf weight, a fridge temperature, occupancy..."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(max_length=64, description="'shelf_weight_g', 'temperature_c', 'occupancy', ...")
    value: float
    unit: str = Field("", max_length=16)
    source: str = Field("", max_length=128, description="Board/channel or camera it came from.")
    labels: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] = Field(default_factory=dict, max_length=32)


class Telemetry(Uplink):
    """Downsampled readings of a node's pipelines."""

    kind: Literal["telemetry"] = "telemetry"
    readings: tuple[Reading, ...] = Field(min_length=1, max_length=1000)


class EventFields(BaseModel):
    """The payload of an :class:`Event`, without the envelope; what a pipeline says about one.

    Defined once: the wire message adds the envelope, and the ``process`` pipeline's stdout line
    (``edge_agent.pipelines.process.EventLine``) adds its ``kind`` tag.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    type: str = Field(max_length=64, description="'shelf_change', 'door_opened', 'person_entered', ...")
    source: str = Field("", max_length=128, description="Pipeline, camera or board that saw it.")
    at: float | None = Field(None, description="When it happened (node clock), if not ts.")
    data: Data = Field(default_factory=dict, description="Free-form JSON object, within the free-form limits.")


class AlertFields(BaseModel):
    """The payload of an :class:`Alert`, without the envelope (see :class:`EventFields`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(max_length=64)
    state: Literal["firing", "resolved"] = "firing"
    severity: Literal["info", "warning", "critical"] = "warning"
    source: str = Field("", max_length=128)
    message: str = Field("", max_length=1000)
    data: Data = Field(default_factory=dict, description="Free-form JSON object, within the free-form limits.")


class Event(EventFields, Uplink):
    """Something that happened in the shop: a pick, a door opening, a shopper entering..."""

    kind: Literal["event"] = "event"


class Alert(AlertFields, Uplink):
    """A condition a node raised itself (fridge warm, camera dark); cleared by ``state='resolved'``."""

    kind: Literal["alert"] = "alert"


class CommandResult(Uplink):
    """A node's answer to a :class:`Command`, matched by ``correlation_id``."""

    kind: Literal["command_result"] = "command_result"
    correlation_id: str = Field(pattern=TOKEN_PATTERN)
    ok: bool
    result: Result = Field(default_factory=dict, description="Free-form JSON object, within the free-form limits.")
    error: str = Field("", max_length=ERROR_MAX_CHARS)


class ObjectStatus(BaseModel):
    """Apply status of one Kubernetes object of a desired state."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    api_version: str = Field(max_length=253)
    kind: str = Field(max_length=253)
    namespace: str | None = Field(None, max_length=253)
    name: str = Field(max_length=253)
    status: Literal["applied", "ready", "pending", "failed", "pruned"]
    message: str = Field("", max_length=1000)


class ReportedState(Uplink):
    """What a node applied (or refused) of its shop's desired state, and per-object status.

    Sent retained on the node's own ``state`` topic (:meth:`Topics.reported`); its ``node`` must
    be the topic's. Only the shop's declared applier node's report counts for the shop.
    """

    kind: Literal["reported_state"] = "reported_state"
    release: str | None = Field(None, max_length=128)
    revision: int = Field(ge=0, le=INT32_MAX, description="Revision of the desired state this report is about.")
    status: Literal["applying", "retrying", "applied", "failed", "refused"] = Field(
        description="'retrying': the cluster API is unavailable (429, 5xx, timeouts); the agent keeps retrying, nothing failed."
    )
    error: str = Field("", max_length=ERROR_MAX_CHARS)
    objects: tuple[ObjectStatus, ...] = Field((), max_length=1000)


UplinkMessage = Annotated[
    Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState,
    Field(discriminator="kind"),
]

# ----- controller -> node / shop ------------------------------------------------------------


class Signature(BaseModel):
    """Detached ed25519 signature over :func:`canonical_bytes` of the rest of the message."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(max_length=64, description="Fingerprint of the signing key.")
    sig: str = Field(max_length=512, description="Base64 signature.")


class Command(_Msg):
    """A request to one node. ``expires_at`` is in the payload so any 3.1.1 broker works.

    Signed like a desired state (``signature`` over :meth:`signing_bytes`, the controller's
    ed25519 key): ``shop`` and ``node`` bind a signed command to the one node it was made for (a
    copy published to another node's topic does not verify there), ``counter`` increases per node
    with every command the controller signs, so the agent refuses a replayed command even within
    its expiry. The agent accepts only an unsigned ``ping`` (docs/agent.md says why).
    """

    kind: Literal["command"] = "command"
    correlation_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=TOKEN_PATTERN)
    name: str = Field(max_length=64, description="'ping', 'restart_pipeline', 'tare', ...")
    args: Args = Field(default_factory=dict, description="Free-form JSON object, within the free-form limits.")
    expires_at: float = Field(description="Unix seconds after which the node must ignore it.")
    shop: ShopId | None = Field(None, description="Shop the command is for; required in a signed command.")
    node: NodeId | None = Field(None, description="Node the command is for; required in a signed command.")
    counter: int | None = Field(None, ge=1, le=2**62, description="Per-node counter, +1 per signed command; a node refuses one not above the last.")
    signature: Signature | None = None

    def expired(self, now: float | None = None) -> bool:
        """Return whether the command is past its expiry."""
        return (time.time() if now is None else now) > self.expires_at

    def signing_bytes(self) -> bytes:
        """Return the canonical bytes the signature covers (everything but the signature)."""
        return canonical_bytes(self.model_dump(mode="json", exclude={"signature"}))


class DesiredState(_Msg):
    """What a shop should run; retained per shop, signed by the controller."""

    kind: Literal["desired_state"] = "desired_state"
    shop: ShopId
    release: str = Field(max_length=128)
    revision: int = Field(ge=1, le=INT32_MAX, description="Increases with every new desired state of the shop.")
    objects: tuple[KubeObject, ...] = Field(max_length=1000, description="Rendered Kubernetes objects.")
    model: ModelRef | None = Field(None, description="Model package reference (name, sha256, archive_sha256, archive_bytes, token; docs/models.md).")
    signature: Signature | None = None

    def signing_bytes(self) -> bytes:
        """Return the canonical bytes the signature covers (everything but the signature)."""
        return canonical_bytes(self.model_dump(mode="json", exclude={"signature"}))


MAX_ACK_MISSING = 64
"""Missing ranges one stored-ack lists at most (the ack's ``seq`` is lowered to stay below the ones left out)."""


class StoredAck(_Msg):
    """The controller's end-to-end acknowledgement to one node, on ``fleet/v1/{shop}/{node}/ack`` (QoS 1, not retained).

    Every seq of ``epoch`` up to ``seq`` is stored in the registry (or reported evicted) except the
    ``missing`` ranges; the agent deletes those messages from its outbox and keeps (and re-sends)
    the rest. Cumulative: a later ack supersedes an earlier one, a lost one costs only a re-send.
    """

    kind: Literal["stored_ack"] = "stored_ack"
    shop: ShopId
    node: NodeId
    epoch: str = Field(pattern=EPOCH_PATTERN)
    seq: int = Field(ge=0, le=INT64_MAX, description="Highest seq the ack speaks for.")
    missing: tuple[tuple[Annotated[int, Field(ge=1, le=INT64_MAX)], Annotated[int, Field(ge=1, le=INT64_MAX)]], ...] = Field(
        (), max_length=MAX_ACK_MISSING, description="Inclusive [first, last] ranges at or below seq not stored (yet).",
    )

    def covers(self, seq: int) -> bool:
        """Return whether ``seq`` is stored according to this ack."""
        return seq <= self.seq and not any(a <= seq <= b for a, b in self.missing)


class ControllerPresence(_Msg):
    """Retained presence of the controller; agents show whether it is reachable."""

    kind: Literal["controller_presence"] = "controller_presence"
    state: Literal["online", "offline"]
    instance: str = Field(max_length=64)


class ClockBeacon(_Msg):
    """Controller time, published every few seconds; ``ts`` is the controller's clock."""

    kind: Literal["clock"] = "clock"
    instance: str = Field(max_length=64)


# --------------------------------------------------------------------------------------------
# Encoding and parsing
# --------------------------------------------------------------------------------------------


def canonical_bytes(obj: Any) -> bytes:
    """Return a deterministic JSON encoding (sorted keys, no spaces) for signing and hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(msg: BaseModel) -> bytes:
    """Serialise a message to its JSON payload, refusing one larger than MAX_PAYLOAD_BYTES."""
    data = msg.model_dump_json(exclude_none=False).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{type(msg).__name__} is {len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    return data


_UPLINK: TypeAdapter[Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState] = TypeAdapter(UplinkMessage)
_LEAF_KINDS: dict[str, tuple[str, ...]] = {
    Channel.TELEMETRY.value: ("heartbeat", "telemetry"),
    Channel.EVENTS.value: ("event", "alert"),
    Channel.REPLIES.value: ("command_result",),
    Channel.STATE.value: ("reported_state",),
    Channel.ACK.value: (),  # a downlink topic: nothing a node sends may arrive there
}


class _NotFinite(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


def _refuse_constant(literal: str) -> float:
    # json.loads accepts NaN, Infinity and -Infinity by default (they are not JSON); no field may hold one.
    raise _NotFinite(literal)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # e.g. 1e999: valid JSON, but no float holds it
        raise _NotFinite(text[:40])
    return value


def _load_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload is {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise ProtocolError(
            "not_finite", f"payload holds the number {exc.literal}: only finite numbers are allowed (send null for 'unknown')"
        ) from None
    except RecursionError:
        raise ProtocolError(
            "bad_json", f"payload nests too deep to parse: free-form values may nest {FREE_FORM.max_depth} levels"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_json", f"payload is not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", f"payload is JSON {type(data).__name__}, expected an object")
    v = data.get("v")
    if v != SCHEMA_VERSION:
        raise ProtocolError("version", f"schema version {v!r} is not supported (this side speaks {SCHEMA_VERSION})")
    return data


def _validation_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_message(topic: str, payload: bytes) -> Presence | Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState:
    """Parse an uplink (node -> controller) message and check it against its topic.

    Raises ``ProtocolError`` with one of :data:`REJECT_REASONS`; never any other exception.
    Heartbeats, telemetry, events, alerts and presence are tried first on the msgspec fast path
    (:mod:`edge_agent.fastwire`, when msgspec is installed), which returns the same message the
    reference parser would, or nothing; everything else, and every rejection, is the reference
    parser's (:func:`parse_message_reference`), so the error reasons and texts are unchanged.
    """
    if _fast_parse is not None:
        msg = _fast_parse(topic, payload)
        if msg is not None:
            return msg  # type: ignore[no-any-return]
    return parse_message_reference(topic, payload)


def parse_message_view(topic: str, payload: bytes) -> Any:
    """Parse like :func:`parse_message`, but return the fast path's *wire view* instead of building its model.

    For the controller's registry writer, which only reads a message's attributes: a heartbeat,
    telemetry, event, alert or presence the fast path accepts comes back as its validated msgspec
    Struct (same attribute names, values and types as the model, ``kind`` included; nested parts as
    Structs, read :func:`wire_fields` of a flat one); anything else exactly as :func:`parse_message`
    returns it, and every rejection is its ``ProtocolError``. Check types with :data:`HEARTBEAT_TYPES`
    and friends, never with the model class alone.
    """
    if _fast_decode is not None:
        view = _fast_decode(topic, payload)
        if view is not None:
            return view
    return parse_message_reference(topic, payload)


def wire_fields(part: Any) -> dict[str, Any]:
    """Return the fields of a flat message part (:class:`NodeFacts`, :class:`PipelineHealth`, or a wire view of one) in the model's order."""
    if _wire_fields is not None:
        return _wire_fields(part)
    return part.__dict__  # type: ignore[no-any-return]


def wire_json(part: Any) -> str | None:
    """Return the JSON text of a wire view of a flat part or of a dict of them (see :func:`wire_fields`); ``None`` for a model or anything else."""
    return None if _wire_json is None else _wire_json(part)


def parse_message_reference(
    topic: str, payload: bytes,
) -> Presence | Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState:
    """Parse an uplink message with pydantic alone: the definition of what the protocol accepts, and of its error texts."""
    info = parse_topic(topic)
    if info.leaf in ("state/desired", "controller/presence", "controller/clock", Channel.COMMANDS.value):
        raise ProtocolError("kind_mismatch", f"{topic!r} is a downlink topic")
    data = _load_json(payload)
    try:
        if info.leaf == Channel.PRESENCE.value:
            msg: Presence | Heartbeat | Telemetry | Event | Alert | CommandResult | ReportedState = Presence.model_validate(data)
        else:
            msg = _UPLINK.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("schema", _validation_detail(exc)) from None
    except RecursionError:  # defence in depth: the free-form limits should stop deep values first
        raise ProtocolError("bad_json", "payload nests too deep to validate") from None
    if info.leaf != Channel.PRESENCE.value and msg.kind not in _LEAF_KINDS[info.leaf]:
        raise ProtocolError("kind_mismatch", f"a {msg.kind!r} message cannot be sent on {topic!r}")
    if msg.shop != info.shop or (info.node is not None and msg.node != info.node):
        raise ProtocolError(
            "identity_mismatch",
            f"payload says {msg.shop}/{msg.node} but topic {topic!r} belongs to {info.shop}/{info.node}",
        )
    return msg


_DOWNLINK: dict[str, type[_Msg]] = {
    Channel.COMMANDS.value: Command,
    Channel.ACK.value: StoredAck,
    "state/desired": DesiredState,
    "controller/presence": ControllerPresence,
    "controller/clock": ClockBeacon,
}


def parse_downlink(topic: str, payload: bytes) -> Command | DesiredState | ControllerPresence | ClockBeacon | StoredAck:
    """Parse a controller -> node message; raises ``ProtocolError`` like :func:`parse_message`."""
    info = parse_topic(topic)
    model = _DOWNLINK.get(info.leaf)
    if model is None:
        raise ProtocolError("kind_mismatch", f"{topic!r} is an uplink topic")
    data = _load_json(payload)
    try:
        msg = model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError("schema", _validation_detail(exc)) from None
    except RecursionError:
        raise ProtocolError("bad_json", "payload nests too deep to validate") from None
    if isinstance(msg, DesiredState) and msg.shop != info.shop:
        raise ProtocolError("identity_mismatch", f"desired state for {msg.shop!r} on {topic!r}")
    return msg  # type: ignore[return-value]


def b64(data: bytes) -> str:
    """Return standard base64 text of ``data`` (signatures, keys)."""
    return base64.b64encode(data).decode()


# The fast path needs msgspec (the controller's extra); an agent-only install parses with pydantic alone.
# Imported last: edge_agent.fastwire builds on the models above.
_fast_parse: Callable[[str, bytes], Any] | None
_fast_decode: Callable[[str, bytes], Any] | None
_wire_fields: Callable[[Any], dict[str, Any]] | None
_wire_json: Callable[[Any], str | None] | None
# Typed as the models' classes: a wire view has the model's attributes, so code narrowed by these
# reads a view as the model (and the type checker holds it to the model's fields).
HEARTBEAT_TYPES: tuple[type[Heartbeat], ...] = (Heartbeat,)
"""What ``isinstance`` checks a message of :func:`parse_message_view` against: the model, and its wire view when there is a fast path."""
TELEMETRY_TYPES: tuple[type[Telemetry], ...] = (Telemetry,)
EVENT_TYPES: tuple[type[Event], ...] = (Event,)
ALERT_TYPES: tuple[type[Alert], ...] = (Alert,)
PRESENCE_TYPES: tuple[type[Presence], ...] = (Presence,)
try:
    from edge_agent.fastwire import VIEWS as _VIEWS
    from edge_agent.fastwire import fast_decode as _fast_decode
    from edge_agent.fastwire import fast_parse as _fast_parse
    from edge_agent.fastwire import wire_fields as _wire_fields
    from edge_agent.fastwire import wire_json as _wire_json

    HEARTBEAT_TYPES = (Heartbeat, _VIEWS[Heartbeat])
    TELEMETRY_TYPES = (Telemetry, _VIEWS[Telemetry])
    EVENT_TYPES = (Event, _VIEWS[Event])
    ALERT_TYPES = (Alert, _VIEWS[Alert])
    PRESENCE_TYPES = (Presence, _VIEWS[Presence])
except ImportError:  # pragma: no cover - depends on the install
    _fast_parse = _fast_decode = _wire_fields = _wire_json = None
except TypeError as _exc:  # pragma: no cover - a model gained a field its Struct lacks (tests/test_protocol_fastpath.py fails)
    logging.getLogger(__name__).warning("wire protocol fast path off, every message parsed by pydantic: %s", _exc)
    _fast_parse = _fast_decode = _wire_fields = _wire_json = None
