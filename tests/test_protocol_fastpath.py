"""The msgspec fast path of parse_message agrees with the pydantic reference parser.

The contract (edge_agent/fastwire.py): the fast path either returns exactly what the reference
returns (same model types, same values, same Python types of the values, so what the registry
stores is byte for byte the same) or returns None and leaves the answer, and every error text, to
the reference. Checked on generated valid messages of every fast kind (which the fast path must
take: otherwise it is not a fast path) and on generated invalid ones: out-of-bounds numbers
(seq, session, counts, interval), over-long strings and collections, ids and epochs with a trailing
newline, unknown and missing fields, wrong types, non-finite and over-large numbers, free-form
data beyond its depth, size and integer limits, and mangled bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

msgspec = pytest.importorskip("msgspec", reason="the fast path needs msgspec (pip install -c constraints.txt '.[controller]')")

from edge_agent import fastwire  # noqa: E402
from edge_agent import protocol as p  # noqa: E402

INT64_MAX = p.INT64_MAX
INT32_MAX = p.INT32_MAX

ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")
epochs = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")
finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


def text(n: int) -> st.SearchStrategy[str]:
    return st.text(max_size=n)


def json_leaf() -> st.SearchStrategy[Any]:
    return st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | st.text(max_size=20)


free_form = st.dictionaries(
    st.text(max_size=10), st.recursive(json_leaf(), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4), max_leaves=12),
    max_size=5,
)

facts = st.fixed_dictionaries(
    {
        "arch": text(32), "cpu_count": st.integers(1, INT32_MAX), "cpu_load_1m": nonneg,
        "mem_total_bytes": st.integers(0, INT64_MAX), "mem_available_bytes": st.integers(0, INT64_MAX),
        "disk_total_bytes": st.integers(0, INT64_MAX), "disk_free_bytes": st.integers(0, INT64_MAX),
    },
    optional={
        "hostname": text(255), "os": text(200), "kernel": text(200), "node_class": text(64), "cpu_percent": nonneg | st.none(),
        "cpu_temp_c": finite | st.none(), "onnx_providers": st.lists(text(64), max_size=4), "gpu": text(200) | st.none(),
        "clock_offset_s": finite | st.none(), "uptime_s": nonneg | st.integers(0, 10**6), "agent_version": text(64),
    },
)
pipeline = st.fixed_dictionaries(
    {"kind": text(32), "state": st.sampled_from(["starting", "running", "backoff", "failed", "stopped"])},
    optional={
        "restarts": st.integers(0, INT64_MAX), "fps": nonneg | st.none(), "latency_ms": nonneg | st.none(),
        "dropped_frames": st.integers(0, INT64_MAX) | st.none(), "last_frame_age_s": nonneg | st.none(),
        "errors": st.integers(0, INT64_MAX), "detail": text(p.DETAIL_MAX_CHARS),
    },
)
reading = st.fixed_dictionaries(
    {"name": text(64), "value": finite | st.integers(-(10**15), 10**15)},
    optional={"unit": text(16), "source": text(128), "labels": st.dictionaries(text(64), text(256), max_size=3)},
)


def envelope(kind: str | None) -> st.SearchStrategy[dict[str, Any]]:
    base = {"v": st.just(1), "ts": finite | st.integers(0, 2**40), "shop": ids, "node": ids, "epoch": epochs, "seq": st.integers(1, INT64_MAX)}
    if kind is not None:
        base["kind"] = st.just(kind)
    return st.fixed_dictionaries(base)


def merged(kind: str | None, required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(envelope(kind), st.fixed_dictionaries(required, optional=optional)).map(lambda t: {**t[0], **t[1]})


heartbeats = merged(
    "heartbeat", {"interval_s": st.floats(min_value=0, max_value=86_400, exclude_min=True) | st.integers(1, 86_400), "facts": facts},
    {"pipelines": st.dictionaries(text(64), pipeline, max_size=3), "metrics": st.dictionaries(text(128), finite, max_size=5),
     "outbox_depth": st.integers(0, INT32_MAX), "release": text(128) | st.none(),
     "evicted": st.lists(st.tuples(st.integers(1, INT64_MAX), st.integers(0, 1000), st.sampled_from(["telemetry", "keeper", "important"]))
                         .filter(lambda t: t[0] + t[1] <= INT64_MAX)
                         .map(lambda t: {"first": t[0], "last": t[0] + t[1], "priority": t[2]}), max_size=3)},
)
telemetries = merged("telemetry", {"readings": st.lists(reading, min_size=1, max_size=4)}, {})
events = merged("event", {"type": text(64)}, {"source": text(128), "at": finite | st.none(), "data": free_form})
alerts = merged(
    "alert", {"name": text(64)},
    {"state": st.sampled_from(["firing", "resolved"]), "severity": st.sampled_from(["info", "warning", "critical"]),
     "source": text(128), "message": text(1000), "data": free_form},
)
presences = st.tuples(
    envelope(None).map(lambda d: {k: v for k, v in d.items() if k not in ("epoch", "seq")}),
    st.fixed_dictionaries(
        {"state": st.sampled_from(["online", "offline"]), "session": st.integers(1, INT32_MAX)},
        optional={"kind": st.just("presence"), "agent_version": text(64), "reason": text(200)},
    ),
).map(lambda t: {**t[0], **t[1]})

LEAF = {"heartbeat": "telemetry", "telemetry": "telemetry", "event": "events", "alert": "events"}
valid = heartbeats | telemetries | events | alerts | presences


def topic_of(msg: dict[str, Any]) -> str:
    leaf = LEAF.get(msg.get("kind", "presence"), "presence")
    return f"fleet/v1/{msg['shop']}/{msg['node']}/{leaf}"


def typed(x: Any) -> Any:
    """A value with the Python type of every part spelled out (10 and 10.0 differ here; -0.0 and 0.0 too).

    A wire view (a fastwire Struct) reads as the model it stands for, through its attributes;
    a flat part's :func:`~edge_agent.protocol.wire_fields` must list the model's fields in order.
    """
    if isinstance(x, p.BaseModel):
        return (type(x).__name__, {k: typed(v) for k, v in x.__dict__.items()})
    if isinstance(x, msgspec.Struct):
        model = fastwire.STRUCTS[type(x)]
        if model in (p.NodeFacts, p.PipelineHealth):
            assert list(p.wire_fields(x)) == list(model.model_fields)
            # What the registry stores of it: the same keys in the same order, the same values and types.
            text = p.wire_json(x)
            assert text is not None and list(json.loads(text)) == list(model.model_fields)
            assert typed(json.loads(text)) == typed(json.loads(json.dumps(p.wire_fields(x))))
        return (model.__name__, {k: typed(getattr(x, k)) for k in model.model_fields})
    if isinstance(x, dict):
        return ("dict", [(k, typed(v)) for k, v in x.items()])
    if isinstance(x, list | tuple):
        return (type(x).__name__, [typed(v) for v in x])
    if isinstance(x, float):
        return ("float", x.hex())
    return (type(x).__name__, x)


def outcome(f: Any, topic: str, payload: bytes) -> Any:
    try:
        return typed(f(topic, payload))
    except p.ProtocolError as exc:
        return ("error", exc.reason, exc.detail)


def check(topic: str, payload: bytes) -> Any:
    """Assert the fast path's contract on one payload; return what the fast path said (None: left to the reference)."""
    ref = outcome(p.parse_message_reference, topic, payload)
    fast = fastwire.fast_parse(topic, payload)
    if fast is not None:
        assert ref[0] != "error", f"the fast path accepted what the reference refuses ({ref})"
        assert typed(fast) == ref
        assert type(fast).model_validate(fast.model_dump()) == fast  # a well-formed model, valid as built
    view = outcome(p.parse_message_view, topic, payload)
    got = outcome(p.parse_message, topic, payload)
    if b'"ts"' not in payload and got[0] != "error":  # pydantic stamps a missing ts with the time of parsing
        got, ref, view = ((o[0], {k: v for k, v in o[1].items() if k != "ts"}) for o in (got, ref, view))
    assert got == ref
    assert view == ref  # the writer's wire view: the same attributes, values and types as the model (or the same error)
    return fast


def test_structs_mirror_the_models_field_for_field():
    for struct, model in fastwire.STRUCTS.items():
        fields = set(struct.__struct_fields__) | ({"kind"} if struct.__struct_config__.tag else set())
        assert fields == set(model.model_fields), model.__name__
        for f in msgspec.structs.fields(struct):
            info = model.model_fields[f.name]
            if f.required:
                assert f.name in ("v", "ts") or info.is_required(), f"{model.__name__}.{f.name} has a default there"
                continue
            assert not info.is_required(), f"{model.__name__}.{f.name} is required there"
            expected = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
            actual = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            assert typed(actual) == typed(expected), f"{model.__name__}.{f.name}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=valid)
def test_valid_messages_take_the_fast_path_with_the_reference_values(msg):
    payload = json.dumps(msg).encode()
    assume(len(payload) <= p.MAX_PAYLOAD_BYTES)
    assert check(topic_of(msg), payload) is not None, p.parse_message_reference(topic_of(msg), payload)


def paths(x: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(x, dict):
        for k, v in x.items():
            out += paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out += paths(v, (*prefix, i))
    return out


def deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = {"a": v}
    return v


bad_values = (
    st.sampled_from([
        0, -1, 2**31, 2**31 - 1, 2**63, 2**63 - 1, -(2**63) - 1, 10**30, 86_400, 86_400.5, 0.0, -0.0, 1.5, 3.0, True, False, None,
        "", "x" * 33, "x" * 65, "x" * 129, "x" * 257, "x" * 1001, "x" * 9000, "node-1\n", "Shop", "a_b", "-a", "1", "1e3",
        [], {}, [1], {"a": 1}, deep(8), deep(9), deep(30), list(range(1001)), {f"k{i}": i for i in range(257)}, {"k" * 129: 1},
        "online", "firing", "heartbeat", "event", "presence", "reported_state",
    ])
    | json_leaf()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
)


@st.composite
def invalid(draw: st.DrawFn) -> tuple[str, bytes]:
    msg = draw(valid)
    topic = topic_of(msg)
    how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "text", "bytes", "topic"]))
    if how in ("replace", "delete"):
        path = draw(st.sampled_from(paths(msg)))
        parent = msg
        for k in path[:-1]:
            parent = parent[k]
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(bad_values)
    elif how == "add":
        target = draw(st.sampled_from([msg] + [v for v in (msg.get("facts"), *(msg.get("pipelines") or {}).values()) if v]))
        target[draw(st.text(max_size=12))] = draw(json_leaf())
    payload = json.dumps(msg).encode()
    if how == "text":  # non-finite or over-large literals, other JSON numbers, in place of a value
        lit = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" + b"0" * 400, b"1E5", b"5e-324", b"2.5e-308",
                                    b"0.1000000000000000055511151231257827", b"123456789012345678901234567890"]))
        spots = [i for i in range(len(payload)) if payload[i:i + 1] == b":"]
        i = draw(st.sampled_from(spots))
        j = i + 1
        while j < len(payload) and payload[j:j + 1] not in (b",", b"}"):
            j += 1
        if payload[i + 1:i + 2] not in (b"{", b"["):
            payload = payload[: i + 1] + lit + payload[j:]
    elif how == "bytes":
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + draw(st.binary(min_size=0, max_size=3)) + payload[i + draw(st.integers(0, 3)):]
    elif how == "topic":
        topic = draw(st.sampled_from([
            topic.replace("/telemetry", "/events") if "telemetry" in topic else topic.replace(topic.rsplit("/", 1)[1], "telemetry"),
            topic.replace(msg["node"], msg["node"] + "x", 1) if False else f"fleet/v1/{msg['shop']}/other-node/{topic.rsplit('/', 1)[1]}",
            f"fleet/v1/{msg['shop']}/{msg['node']}/replies", f"fleet/v1/{msg['shop']}/{msg['node']}/state",
            f"fleet/v1/{msg['shop']}/{msg['node']}/commands", f"fleet/v1/{msg['shop']}\n/{msg['node']}/telemetry",
            "fleet/v1/_controller/presence", f"fleet/v2/{msg['shop']}/{msg['node']}/telemetry",
        ]))
    return topic, payload


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=invalid())
@example(case=("fleet/v1/s/n/telemetry", b'{"v":1,"ts":1,"shop":"s","node":"n","epoch":"e\\n","seq":1,"kind":"telemetry","readings":[{"name":"x","value":1}]}'))
@example(case=("fleet/v1/s/n/telemetry", b'{"v":1,"ts":1e999,"shop":"s","node":"n","epoch":"e","seq":1,"kind":"telemetry","readings":[{"name":"x","value":1}]}'))
@example(case=("fleet/v1/s/n/events", b'{"v":1,"ts":1,"shop":"s","node":"n","epoch":"e","seq":1,"kind":"event","type":"t","data":{"a":' + b"[" * 3000 + b"]" * 3000 + b"}}"))
@example(case=("fleet/v1/s/n/events", b'{"v":1,"ts":1,"shop":"s","node":"n","epoch":"e","seq":1,"kind":"event","type":"t","data":{"a":123456789012345678901234567890}}'))
@example(case=("fleet/v1/s/n/telemetry", b'{"v":1,"ts":1,"shop":"s","node":"n","epoch":"e","seq":1,"kind":"telemetry","readings":[{"name":"x","value":1,"value":2}]}'))
@example(case=("fleet/v1/s/n/telemetry", b'{"v":1,"ts":1,"shop":"s","node":"n","epoch":"e","seq":1,"kind":"heartbeat","interval_s":10,'
                b'"facts":{"arch":"a","cpu_count":1,"cpu_load_1m":0,"mem_total_bytes":1,"mem_available_bytes":1,"disk_total_bytes":1,'
                b'"disk_free_bytes":1},"evicted":[{"first":5,"last":4,"priority":"keeper"}]}'))
@example(case=("fleet/v1/s/n/presence", b'{"v":1.0,"ts":1,"shop":"s","node":"n","state":"online","session":1}'))
def test_invalid_and_odd_payloads_get_the_reference_answer(case):
    fast = check(*case)
    event("fast path took it" if fast is not None else "left to the reference")


def test_odd_but_valid_payloads_are_the_reference_s_whichever_path_takes_them():
    # Lax-mode coercions pydantic applies (a numeric string, an integral float for an int) are left to it.
    cases = [
        ("fleet/v1/s/n/presence", b'{"v":1,"ts":"5","shop":"s","node":"n","state":"online","session":1}'),
        ("fleet/v1/s/n/presence", b'{"v":1,"ts":5,"shop":"s","node":"n","state":"online","session":1.0}'),
        ("fleet/v1/s/n/presence", b'\xef\xbb\xbf{"v":1,"ts":5,"shop":"s","node":"n","state":"online","session":1}'),
    ]
    for topic, payload in cases:
        assert check(topic, payload) is None
        p.parse_message(topic, payload)  # accepted by the reference
    # No ts: pydantic stamps the time of parsing; the fast path requires ts, so it leaves this one alone.
    no_ts = b'{"v":1,"shop":"s","node":"n","state":"online","session":1}'
    assert fastwire.fast_parse("fleet/v1/s/n/presence", no_ts) is None
    assert p.parse_message("fleet/v1/s/n/presence", no_ts).ts > 1e9


def test_the_fast_path_is_the_one_parse_message_takes():
    msg = {"v": 1, "ts": 1.5, "shop": "s", "node": "n", "epoch": "e", "seq": 7, "kind": "event", "type": "door", "data": {"x": [1, 2.5]}}
    payload = json.dumps(msg).encode()
    assert fastwire.fast_parse("fleet/v1/s/n/events", payload) is not None
    got = p.parse_message("fleet/v1/s/n/events", payload)
    assert isinstance(got, p.Event) and got.data == {"x": [1, 2.5]} and got.seq == 7 and not math.isnan(got.ts)
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message("fleet/v1/s/n/events", payload.replace(b'"seq": 7', b'"seq": 0'))
    assert err.value.reason == "schema" and "seq" in err.value.detail
