"""The wire protocol: topics, message models, strict and total parsing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import protocol as p
from tests.support.payloads import nested

FACTS = p.NodeFacts(
    arch="arm64", cpu_count=4, cpu_load_1m=0.3, mem_total_bytes=4 << 30, mem_available_bytes=2 << 30,
    disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
)


def hb(**kw):
    base = dict(shop="box-1", node="pi-1", epoch="e1", seq=1, interval_s=10, facts=FACTS)
    base.update(kw)
    return p.Heartbeat(**base)


def test_round_trip_every_uplink_kind():
    msgs = [
        hb(),
        p.Telemetry(shop="box-1", node="pi-1", epoch="e1", seq=2, readings=(p.Reading(name="shelf_weight_g", value=412.5, unit="g", source="b1/3"),)),
        p.Event(shop="box-1", node="pi-1", epoch="e1", seq=3, type="shelf_change", data={"slot": "A3", "delta_g": -330}),
        p.Alert(shop="box-1", node="pi-1", epoch="e1", seq=4, name="fridge_warm", severity="critical"),
        p.CommandResult(shop="box-1", node="pi-1", epoch="e1", seq=5, correlation_id="c1", ok=True),
        p.ReportedState(shop="box-1", node="pi-1", epoch="e1", seq=6, revision=3, status="applied"),
    ]
    topics = ["telemetry", "telemetry", "events", "events", "replies"]
    for msg, leaf in zip(msgs, [*topics, None], strict=False):
        topic = p.Topics.node("box-1", "pi-1", leaf) if leaf else p.Topics.reported("box-1", "pi-1")
        assert p.parse_message(topic, p.encode(msg)) == msg


def test_presence_round_trip_and_downlinks():
    pres = p.Presence(shop="box-1", node="gpu-1", state="offline", session=7, reason="will")
    assert p.parse_message(p.Topics.node("box-1", "gpu-1", "presence"), p.encode(pres)) == pres
    cmd = p.Command(name="ping", expires_at=time.time() + 30)
    assert p.parse_downlink(p.Topics.node("box-1", "gpu-1", "commands"), p.encode(cmd)) == cmd
    ds = p.DesiredState(shop="box-1", release="r1", revision=1, objects=({"kind": "Namespace"},))
    assert p.parse_downlink(p.Topics.desired("box-1"), p.encode(ds)) == ds
    assert p.parse_downlink(p.Topics.controller_clock, p.encode(p.ClockBeacon(instance="c"))).kind == "clock"


def test_signing_bytes_exclude_signature_and_are_stable():
    ds = p.DesiredState(shop="s1", release="r", revision=2, objects=({"b": 1, "a": 2},), ts=1.0)
    signed = ds.model_copy(update={"signature": p.Signature(key_id="k", sig="AAAA")})
    assert ds.signing_bytes() == signed.signing_bytes()
    assert b'{"a":2,"b":1}' in ds.signing_bytes()


@pytest.mark.parametrize(
    "topic,payload,reason",
    [
        ("other/v1/s/n/telemetry", b"{}", "bad_topic"),
        ("fleet/v1/Shop/n/telemetry", b"{}", "bad_topic"),
        ("fleet/v1/s/n/unknown", b"{}", "bad_topic"),
        ("fleet/v1/s/n/telemetry", b"\xff\xfe", "bad_json"),
        ("fleet/v1/s/n/telemetry", b"[1,2]", "bad_json"),
        ("fleet/v1/s/n/telemetry", b'{"v": 2, "kind": "heartbeat"}', "version"),
        ("fleet/v1/s/n/telemetry", b'{"v": 1, "kind": "heartbeat"}', "schema"),
        ("fleet/v1/s/n/telemetry", b"x" * (p.MAX_PAYLOAD_BYTES + 1), "too_large"),
        ("fleet/v1/s/n/commands", b"{}", "kind_mismatch"),
    ],
    ids=["foreign-root", "uppercase-shop", "unknown-leaf", "not-utf8", "json-array", "future-version",
         "missing-fields", "huge", "downlink-topic"],
)
def test_bad_input_is_a_typed_error(topic, payload, reason):
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message(topic, payload)
    assert err.value.reason == reason
    assert err.value.reason in p.REJECT_REASONS


def test_identity_and_kind_mismatch():
    data = p.encode(hb())
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message(p.Topics.node("box-1", "pi-2", "telemetry"), data)
    assert err.value.reason == "identity_mismatch"
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message(p.Topics.node("box-1", "pi-1", "events"), data)
    assert err.value.reason == "kind_mismatch"


def test_unknown_field_is_refused():
    data = json.loads(p.encode(hb()))
    data["surprise"] = 1
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message(p.Topics.node("box-1", "pi-1", "telemetry"), json.dumps(data).encode())
    assert err.value.reason == "schema" and "surprise" in err.value.detail


def test_topic_builders_validate_ids():
    with pytest.raises(ValueError, match="invalid shop id"):
        p.Topics.node("Bad Shop", "n", "telemetry")
    assert p.parse_topic(p.Topics.desired("s-1")).leaf == "state/desired"
    assert p.parse_topic(p.Topics.controller_presence).leaf == "controller/presence"


def test_local_stream_topics_name_their_publisher_and_only_filters_have_wildcards():
    topic = p.Topics.local("s-1", p.LocalStream.TRACKS, "gpu-1", "floor")
    assert topic == "local/v1/s-1/tracks/gpu-1/floor" and p.Topics.parse_local(topic) == ("gpu-1", "floor")
    assert p.Topics.local_filter("s-1", "detections", "pi-2") == "local/v1/s-1/detections/pi-2/+"
    assert p.Topics.local_filter("s-1", "tracks") == "local/v1/s-1/tracks/+/+"
    for bad in ("+", "#", "a/b", "Bad"):
        with pytest.raises(ValueError, match="invalid node id"):
            p.Topics.local("s-1", "tracks", bad, "floor")
        with pytest.raises(ValueError, match="invalid node id"):
            p.Topics.local_filter("s-1", "tracks", bad)
        with pytest.raises(ValueError, match="invalid camera name"):
            p.Topics.local("s-1", "tracks", "gpu-1", bad)
    with pytest.raises(ValueError):
        p.Topics.local_filter("s-1", "heartbeats", "pi-1")
    assert p.Topics.parse_local(p.Topics.node("s-1", "pi-1", "events")) is None
    assert p.Topics.parse_local("local/v1/s-1/tracks/gpu-1") is None


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from([p.Topics.node("s", "n", c) for c in p.Channel] + ["fleet/v1/s/state/reported", "x/y"]),
       payload=st.binary(max_size=2048))
def test_any_bytes_parse_or_raise_protocol_error(topic, payload):
    try:
        p.parse_message(topic, payload)
    except p.ProtocolError as exc:
        assert exc.reason in p.REJECT_REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["v", "kind", "shop", "node", "epoch", "seq", "ts", "facts", "interval_s", "readings", "type", "state", "session"]), json_values))
def test_any_json_object_parses_or_raises_protocol_error(obj):
    obj.setdefault("v", 1)
    for topic in (p.Topics.node("s", "n", "telemetry"), p.Topics.node("s", "n", "presence"), p.Topics.node("s", "n", "events")):
        try:
            p.parse_message(topic, json.dumps(obj).encode())
        except p.ProtocolError as exc:
            assert exc.reason in p.REJECT_REASONS


# ----- bounds (every field has one; see docs/protocol.md "Limits") ---------------------------------

EVENTS = p.Topics.node("box-1", "pi-1", "events")
EVENT = {"v": 1, "shop": "box-1", "node": "pi-1", "epoch": "e1", "seq": 1, "kind": "event", "type": "x"}


def _reason(topic: str, payload: bytes | str) -> str:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_message(topic, payload.encode() if isinstance(payload, str) else payload)
    return info.value.reason + ": " + info.value.detail


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"data": nested(9)}, "schema: event.data: Value error, data.a.a.a.a.a.a.a.a nests deeper than 8 levels", id="deep-data"),
        pytest.param({"data": {f"k{i}": i for i in range(257)}}, "has 257 keys, more than 256", id="many-keys"),
        pytest.param({"data": {"k" * 129: 1}}, "key longer than 128 characters", id="long-key"),
        pytest.param({"data": {"s": "x" * 8193}}, "data.s is a string of 8193 characters, more than 8192", id="long-string"),
        pytest.param({"data": {"l": [0] * 1001}}, "data.l is a list of 1001 items, more than 1000", id="long-list"),
        pytest.param({"data": {f"k{i}": [0] * 10 for i in range(200)}}, "more than 2000 values", id="many-values"),
        pytest.param({"data": {"n": 2**64}}, "data.n is an integer outside 64 bits", id="huge-int-in-data"),
        pytest.param({"seq": 2**63}, "event.seq: Input should be less than or equal to 9223372036854775807", id="seq-beyond-bigint"),
        pytest.param({"epoch": "e\x00"}, "event.epoch: String should match pattern", id="epoch-charset"),
        pytest.param({"epoch": "e" * 65}, "event.epoch: String should match pattern", id="epoch-length"),
    ],
)
def test_event_bounds_are_refused_naming_field_and_limit(fields, expected):
    assert expected in _reason(EVENTS, json.dumps({**EVENT, **fields}))


def test_data_within_every_limit_is_accepted():
    data = {**nested(8), "s": "x" * 8192, "l": list(range(1000)), "n": -(2**63), "f": 1.5}
    msg = p.parse_message(EVENTS, json.dumps({**EVENT, "data": data}).encode())
    assert msg.data["s"] == "x" * 8192


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_refused_anywhere(literal):
    for payload in (
        json.dumps({**EVENT, "data": {"x": 0}}).replace('"x": 0', f'"x": {literal}'),
        json.dumps({**EVENT, "ts": 0}).replace('"ts": 0', f'"ts": {literal}'),
        p.encode(hb()).decode().replace('"cpu_load_1m":0.3', f'"cpu_load_1m":{literal}'),
    ):
        topic = EVENTS if '"event"' in payload else p.Topics.node("box-1", "pi-1", "telemetry")
        reason = _reason(topic, payload)
        assert reason.startswith("not_finite: payload holds the number ") and literal.lstrip("-") in reason


def test_models_refuse_non_finite_numbers_at_construction():
    with pytest.raises(ValueError, match="finite"):
        p.Event(shop="box-1", node="pi-1", epoch="e1", seq=1, type="x", data={"x": float("nan")})
    with pytest.raises(ValueError, match="finite number"):
        hb(metrics={"cart_review_rate": float("inf")})


def test_json_nested_beyond_the_parser_is_bad_json_not_unstorable():
    deep = '{"v": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert _reason(EVENTS, deep).startswith("bad_json: payload nests too deep to parse")


@pytest.mark.parametrize(
    ("topic", "msg", "expected"),
    [
        pytest.param(p.Topics.node("box-1", "pi-1", "presence"), {"kind": "presence", "state": "online", "session": 2**31},
                     "session: Input should be less than or equal to 2147483647", id="session-beyond-integer"),
        pytest.param(p.Topics.reported("box-1", "pi-1"), {"kind": "reported_state", "epoch": "e", "seq": 1, "revision": 2**31, "status": "applied"},
                     "reported_state.revision: Input should be less than or equal to 2147483647", id="revision-beyond-integer"),
        pytest.param(p.Topics.node("box-1", "pi-1", "replies"), {"kind": "command_result", "epoch": "e", "seq": 1, "correlation_id": "a b", "ok": True},
                     "command_result.correlation_id: String should match pattern", id="correlation-id-charset"),
    ],
)
def test_counters_and_keys_are_bounded_by_their_columns(topic, msg, expected):
    assert expected in _reason(topic, json.dumps({"v": 1, "shop": "box-1", "node": "pi-1", **msg}))


def test_heartbeat_maps_and_interval_are_bounded():
    too_many = {f"m{i}": 1.0 for i in range(501)}
    with pytest.raises(ValueError, match="at most 500 items"):
        hb(metrics=too_many)
    with pytest.raises(ValueError, match="less than or equal to 86400"):
        hb(interval_s=1e12)
    with pytest.raises(ValueError, match="at most 32 items"):
        p.Reading(name="w", value=1.0, labels={f"l{i}": "v" for i in range(33)})


def test_desired_state_objects_have_their_own_looser_limits():
    deep_but_fine = nested(20)
    ds = p.DesiredState(shop="box-1", release="r", revision=1, objects=(deep_but_fine,))
    assert p.parse_downlink(p.Topics.desired("box-1"), p.encode(ds)) == ds
    with pytest.raises(ValueError, match="object.a.* nests deeper than 24 levels"):
        p.DesiredState(shop="box-1", release="r", revision=1, objects=(nested(25),))
