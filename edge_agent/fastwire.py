"""The fast path of :func:`edge_agent.protocol.parse_message` for the messages a fleet sends most.

Heartbeats, telemetry, events, alerts and presence make up nearly all of a fleet's uplink; the
controller's registry writer spent about a third of its time validating them with pydantic
(``json.loads`` with a Python float hook, then the discriminated union). Here msgspec decodes and
validates them in one pass over the bytes, against Structs that mirror the pydantic models field
for field with the same bounds, and the result is built as the very same frozen pydantic model
(``model_construct``: the values are already validated), so nothing downstream can tell the paths
apart.

The controller's registry writer skips even that: :func:`fast_decode` returns the validated Struct
itself (a *wire view*: the same attribute names, values and Python types as the model, a ``kind``
class attribute, nested parts as Structs), and the writer only reads attributes. Building the
models was 12 % of its time (docs/benchmarks.md, Ingest). :func:`wire_fields` gives a flat part
(facts, a pipeline's health) as the dict of its fields in the model's order, whichever form it has.

The contract is one-sided on purpose: :func:`fast_parse` either returns a message the reference
parser would return too (equal, field for field), or ``None``. It never raises and never words an
error: whenever it is not sure (a field of the wrong type that pydantic's lax mode would coerce, a
missing ``ts`` that pydantic would default to now, non-UTF-8, a reply or a reported state, any
validation failure), the caller runs the pydantic reference parser, which then gives the exact
``ProtocolError(reason, detail)`` it always gave. ``tests/test_protocol_fastpath.py`` checks the
two agree on generated valid and invalid payloads.

Differences it must respect, and how:

* Patterns: pydantic's (Rust) ``$`` matches only at the very end, Python's also before a final
  newline; the Structs use ``\\Z``.
* Numbers: msgspec refuses a number out of float range (``1e999``) and any NaN/Infinity literal,
  and never turns an integer field's ``3.0`` into 3 (strict), so those take the reference path.
* Free-form values (``data``) go through the same :func:`~edge_agent.protocol.check_free_form`.

Needs msgspec (the ``controller`` extra); without it :mod:`edge_agent.protocol` uses pydantic alone.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct
from pydantic import BaseModel

from edge_agent.protocol import (
    CONTROLLER_SEGMENT,
    DETAIL_MAX_CHARS,
    FREE_FORM,
    INT32_MAX,
    INT64_MAX,
    MAX_EVICTED_RANGES,
    MAX_PAYLOAD_BYTES,
    TOPIC_ROOT,
    Alert,
    Channel,
    Event,
    EvictedRun,
    Heartbeat,
    NodeFacts,
    PipelineHealth,
    Presence,
    Reading,
    Telemetry,
    check_free_form,
)

# ``\Z``, not ``$``: see the module docstring.
_ID = Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}\Z")
_EPOCH = Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")

ShopId = Annotated[str, _ID]
Epoch = Annotated[str, _EPOCH]
Seq = Annotated[int, Meta(ge=1, le=INT64_MAX)]
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
NonNegFloat = Annotated[float, Meta(ge=0)]


def _s(n: int) -> Any:
    return Annotated[str, Meta(max_length=n)]


class _Struct(Struct, forbid_unknown_fields=True, gc=False):
    """Unknown fields are refused, like the models' ``extra="forbid"``.

    ``gc=False``: the collector does not track decoded messages (a decoded value holds no reference
    cycle), so the writer's many short-lived messages do not trigger collections.
    """


class _NodeFacts(_Struct, kw_only=True):
    # In the model's field order (kw_only allows a required field after a default): wire_json
    # encodes the Struct as it is, and the registry's facts JSON then reads as the model's.
    hostname: _s(255) = ""  # type: ignore[valid-type]
    arch: _s(32)  # type: ignore[valid-type]
    os: _s(200) = ""  # type: ignore[valid-type]
    kernel: _s(200) = ""  # type: ignore[valid-type]
    node_class: _s(64) = ""  # type: ignore[valid-type]
    cpu_count: Annotated[int, Meta(ge=1, le=INT32_MAX)]
    cpu_load_1m: NonNegFloat
    cpu_percent: NonNegFloat | None = None
    mem_total_bytes: Count
    mem_available_bytes: Count
    disk_total_bytes: Count
    disk_free_bytes: Count
    cpu_temp_c: float | None = None
    onnx_providers: Annotated[tuple[_s(64), ...], Meta(max_length=32)] = ()  # type: ignore[valid-type]
    gpu: _s(200) | None = None  # type: ignore[valid-type]
    clock_offset_s: float | None = None
    uptime_s: NonNegFloat = 0  # the pydantic default is the int 0 too
    agent_version: _s(64) = ""  # type: ignore[valid-type]


class _PipelineHealth(_Struct):
    kind: _s(32)  # type: ignore[valid-type]
    state: Literal["starting", "running", "backoff", "failed", "stopped"]
    restarts: Count = 0
    fps: NonNegFloat | None = None
    latency_ms: NonNegFloat | None = None
    dropped_frames: Count | None = None
    last_frame_age_s: NonNegFloat | None = None
    errors: Count = 0
    detail: _s(DETAIL_MAX_CHARS) = ""  # type: ignore[valid-type]


class _Reading(_Struct):
    name: _s(64)  # type: ignore[valid-type]
    value: float
    unit: _s(16) = ""  # type: ignore[valid-type]
    source: _s(128) = ""  # type: ignore[valid-type]
    labels: Annotated[dict[_s(64), _s(256)], Meta(max_length=32)] = {}  # type: ignore[valid-type]


class _EvictedRun(_Struct):
    first: Seq
    last: Seq
    priority: Literal["telemetry", "keeper", "important"]


class _Uplink(_Struct, tag_field="kind"):
    # ``v`` and ``ts`` are required here (pydantic defaults them): a message without them takes the reference path.
    v: Literal[1]
    ts: float
    shop: ShopId
    node: ShopId
    epoch: Epoch
    seq: Seq


class _Heartbeat(_Uplink, tag="heartbeat"):
    kind: ClassVar[str] = "heartbeat"  # not a field (the tag): what the writer dispatches on, like the model's
    interval_s: Annotated[float, Meta(gt=0, le=86_400)]
    facts: _NodeFacts
    pipelines: Annotated[dict[_s(64), _PipelineHealth], Meta(max_length=64)] = {}  # type: ignore[valid-type]
    metrics: Annotated[dict[_s(128), float], Meta(max_length=500)] = {}  # type: ignore[valid-type]
    outbox_depth: Annotated[int, Meta(ge=0, le=INT32_MAX)] = 0
    release: _s(128) | None = None  # type: ignore[valid-type]
    evicted: Annotated[tuple[_EvictedRun, ...], Meta(max_length=MAX_EVICTED_RANGES)] = ()


class _Telemetry(_Uplink, tag="telemetry"):
    kind: ClassVar[str] = "telemetry"  # not a field (the tag): what the writer dispatches on, like the model's
    readings: Annotated[tuple[_Reading, ...], Meta(min_length=1, max_length=1000)]


class _Event(_Uplink, tag="event"):
    kind: ClassVar[str] = "event"  # not a field (the tag): what the writer dispatches on, like the model's
    type: _s(64)  # type: ignore[valid-type]
    source: _s(128) = ""  # type: ignore[valid-type]
    at: float | None = None
    data: dict[str, Any] = {}


class _Alert(_Uplink, tag="alert"):
    kind: ClassVar[str] = "alert"  # not a field (the tag): what the writer dispatches on, like the model's
    name: _s(64)  # type: ignore[valid-type]
    state: Literal["firing", "resolved"] = "firing"
    severity: Literal["info", "warning", "critical"] = "warning"
    source: _s(128) = ""  # type: ignore[valid-type]
    message: _s(1000) = ""  # type: ignore[valid-type]
    data: dict[str, Any] = {}


class _Presence(_Struct):
    v: Literal[1]
    ts: float
    shop: ShopId
    node: ShopId
    state: Literal["online", "offline"]
    session: Annotated[int, Meta(ge=1, le=INT32_MAX)]
    kind: Literal["presence"] = "presence"
    agent_version: _s(64) = ""  # type: ignore[valid-type]
    reason: _s(200) = ""  # type: ignore[valid-type]


STRUCTS: dict[type[Any], type[Any]] = {
    _NodeFacts: NodeFacts, _PipelineHealth: PipelineHealth, _Reading: Reading, _Heartbeat: Heartbeat,
    _Telemetry: Telemetry, _Event: Event, _Alert: Alert, _Presence: Presence, _EvictedRun: EvictedRun,
}
"""Each Struct and the pydantic model it mirrors (the test checks they have the same fields and defaults)."""

_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    Channel.TELEMETRY.value: msgspec.json.Decoder(_Heartbeat | _Telemetry),
    Channel.EVENTS.value: msgspec.json.Decoder(_Event | _Alert),
    Channel.PRESENCE.value: msgspec.json.Decoder(_Presence),
}
_PREFIX = TOPIC_ROOT + "/"


_set = object.__setattr__


def _builder(model: type[BaseModel], struct: type[Any], kind: str | None = None) -> Callable[[Any, dict[str, Any]], Any]:
    """Return a function that builds ``model`` from a validated ``struct`` (plus overrides): its fields in the model's order, a tag ``kind`` last.

    What ``model_construct`` does, without its per-field alias and default handling (48 of the
    60 us a heartbeat took): every field is present in the Struct, so there is nothing to default.
    All fields count as set (``model_fields_set``; nothing here reads it). Models with a post-init
    hook or private attributes are built with ``model_construct`` itself.
    """
    names = tuple(model.model_fields)
    missing = set(names) - set(struct.__struct_fields__) - ({"kind"} if kind else set())
    if missing:  # a field the Struct lacks: a programming error, caught by the tests
        raise TypeError(f"{struct.__name__} lacks {sorted(missing)} of {model.__name__}")
    if model.__pydantic_post_init__ or model.__private_attributes__:  # pragma: no cover - none of the mirrored models
        def construct(s: Any, over: dict[str, Any]) -> Any:
            values = {n: over[n] if n in over else (kind if n == "kind" else getattr(s, n)) for n in names}
            return model.model_construct(None, **values)

        return construct
    attrs = tuple(n for n in names if kind is None or n != "kind")  # a tagged Struct has no "kind" attribute
    get = operator.attrgetter(*attrs)
    fields_set = frozenset(names)

    def build(s: Any, over: dict[str, Any]) -> Any:
        values = dict(zip(attrs, get(s), strict=True))
        if kind is not None:
            values["kind"] = kind  # last in __dict__ (equality and dumps go by the fields, not this order)
        if over:
            values.update(over)
        obj = model.__new__(model)
        _set(obj, "__dict__", values)
        _set(obj, "__pydantic_fields_set__", set(fields_set))
        _set(obj, "__pydantic_extra__", None)
        _set(obj, "__pydantic_private__", None)
        return obj

    return build


_NO: dict[str, Any] = {}
_build_facts = _builder(NodeFacts, _NodeFacts)
_build_pipeline = _builder(PipelineHealth, _PipelineHealth)
_build_reading = _builder(Reading, _Reading)
_build_evicted = _builder(EvictedRun, _EvictedRun)
_build_heartbeat = _builder(Heartbeat, _Heartbeat, "heartbeat")
_build_telemetry = _builder(Telemetry, _Telemetry, "telemetry")
_build_event = _builder(Event, _Event, "event")
_build_alert = _builder(Alert, _Alert, "alert")
_build_presence = _builder(Presence, _Presence, "presence")


def _check(s: Any) -> None:
    """Run what the models check beyond their field types (raises; the reference then words the error)."""
    if isinstance(s, _Heartbeat):
        if s.evicted and any(r.last < r.first for r in s.evicted):  # EvictedRun's own check
            raise ValueError("evicted run out of order")
    elif isinstance(s, _Event | _Alert):
        check_free_form(s.data, FREE_FORM, "data")


def _to_model(s: Any) -> Any:
    """Build the pydantic message of a validated, checked Struct (no second validation)."""
    if isinstance(s, _Heartbeat):
        over = {"facts": _build_facts(s.facts, _NO), "pipelines": {k: _build_pipeline(p, _NO) for k, p in s.pipelines.items()}}
        if s.evicted:
            over["evicted"] = tuple(_build_evicted(r, _NO) for r in s.evicted)
        return _build_heartbeat(s, over)
    if isinstance(s, _Telemetry):
        return _build_telemetry(s, {"readings": tuple(_build_reading(r, _NO) for r in s.readings)})
    if isinstance(s, _Event):
        return _build_event(s, _NO)
    if isinstance(s, _Alert):
        return _build_alert(s, _NO)
    return _build_presence(s, _NO)


def _field_getter(model: type[BaseModel]) -> Callable[[Any], dict[str, Any]]:
    """Return a function giving a Struct's fields as a dict in ``model``'s field order."""
    names = tuple(model.model_fields)
    get = operator.attrgetter(*names)
    return lambda s: dict(zip(names, get(s), strict=True))


_FIELDS: dict[type[Any], Callable[[Any], dict[str, Any]]] = {
    _NodeFacts: _field_getter(NodeFacts), _PipelineHealth: _field_getter(PipelineHealth),
}


def wire_fields(part: Any) -> dict[str, Any]:
    """Return the fields of a flat message part (facts, a pipeline's health; model or Struct) as a dict in the model's order.

    For a model its ``__dict__`` (do not modify it), for a Struct the same keys and values: the
    JSON the registry stores of either is the same text.
    """
    get = _FIELDS.get(type(part))
    return part.__dict__ if get is None else get(part)


_ENCODER = msgspec.json.Encoder()


def wire_json(part: Any) -> str | None:
    """Return the JSON text of a wire view of a flat part (facts, a pipeline's health) or of a dict of them; ``None`` for anything else.

    The fields in the model's order (the flat Structs declare them so), the values those of the
    model: what encoding :func:`wire_fields` gives, in a fifth of the time.
    """
    if isinstance(part, _NodeFacts | _PipelineHealth):
        return _ENCODER.encode(part).decode()
    if isinstance(part, dict) and part and all(isinstance(v, _PipelineHealth) for v in part.values()):
        return _ENCODER.encode(part).decode()
    return None


VIEWS: dict[type[BaseModel], type[Any]] = {Heartbeat: _Heartbeat, Telemetry: _Telemetry, Event: _Event, Alert: _Alert, Presence: _Presence}
"""Each message model and the Struct :func:`fast_decode` returns in its place (for ``isinstance`` checks)."""


def fast_parse(topic: str, payload: bytes) -> Any:
    """Return the message of ``payload`` on ``topic`` when it is a valid heartbeat, telemetry, event, alert or presence; else ``None``.

    ``None`` means "ask the reference parser" (it may still accept, or it words the rejection).
    """
    s = fast_decode(topic, payload)
    if s is None:
        return None
    try:
        return _to_model(s)
    except Exception:  # never raises (see the module docstring)
        return None


def fast_decode(topic: str, payload: bytes) -> Any:
    """Return the validated Struct (wire view) of ``payload`` on ``topic``, under the same contract as :func:`fast_parse`.

    Whenever it returns a view, :func:`fast_parse` returns that view built as the model, and the
    reference parser returns the same model.
    """
    if len(payload) > MAX_PAYLOAD_BYTES or not topic.startswith(_PREFIX):
        return None
    parts = topic.split("/")
    if len(parts) != 5 or parts[2] == CONTROLLER_SEGMENT:
        return None
    decoder = _DECODERS.get(parts[4])
    if decoder is None:
        return None
    try:
        s = decoder.decode(payload)
        # Identity: the Structs check the ids' shape; the topic must name the same shop and node.
        if s.shop != parts[2] or s.node != parts[3]:
            return None
        _check(s)
        return s
    except Exception:  # any doubt (msgspec's errors, RecursionError, a free-form limit): the reference decides
        return None
