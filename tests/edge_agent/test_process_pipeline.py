"""``type: process``: the stdout line parser, and a real child process under supervision."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.pipelines import (
    build_pipeline,
    pipeline_config,
    pipeline_types,
    validate_pipeline_entry,
)
from edge_agent.pipelines.process import (
    AlertLine,
    Config,
    EventLine,
    LineError,
    ReadingsLine,
    parse_line,
)
from edge_agent.supervisor import PipelineRunner
from tests.support.recorder import wait_for
from tests.support.sink import RecordingSink


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        pytest.param(b'{"kind":"event","type":"door_opened","data":{"door":"front"}}', EventLine, id="event"),
        pytest.param(b'{"kind":"alert","name":"fridge_warm","severity":"critical","message":"9C"}', AlertLine, id="alert"),
        pytest.param(b'{"kind":"readings","readings":[{"name":"temperature_c","value":4.5}]}', ReadingsLine, id="readings"),
    ],
)
def test_parse_valid_lines(line: bytes, kind: type) -> None:
    assert isinstance(parse_line(line), kind)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param(b"hello", "bad_json", id="not-json"),
        pytest.param(b"\xff\xfe", "bad_json", id="not-utf8"),
        pytest.param(b"[1,2]", "bad_json", id="json-array"),
        pytest.param(b'{"kind":"banana"}', "schema", id="unknown-kind"),
        pytest.param(b'{"type":"door_opened"}', "schema", id="no-kind"),
        pytest.param(b'{"kind":"event"}', "schema", id="event-without-type"),
        pytest.param(b'{"kind":"event","type":"x","colour":1}', "schema", id="extra-field"),
        pytest.param(b'{"kind":"alert","name":"x","state":"burning"}', "schema", id="bad-alert-state"),
        pytest.param(b'{"kind":"readings","readings":[]}', "schema", id="empty-readings"),
        pytest.param(b'{"kind":"readings","readings":[{"name":"t","value":"warm"}]}', "schema", id="reading-not-number"),
        pytest.param(b'{"kind":"event","type":"' + b"x" * 300 + b'"}', "too_long", id="too-long"),
    ],
)
def test_parse_rejects_with_reason(line: bytes, reason: str) -> None:
    with pytest.raises(LineError) as err:
        parse_line(line, max_bytes=256)
    assert err.value.reason == reason


@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_parse_line_is_total(raw: bytes) -> None:
    try:
        parse_line(raw, max_bytes=256)
    except LineError as exc:
        assert exc.reason in ("too_long", "bad_json", "schema")


@given(
    obj=st.dictionaries(
        st.sampled_from(["kind", "type", "name", "data", "readings", "state", "severity", "source", "at", "x"]),
        st.one_of(st.sampled_from(["event", "alert", "readings", "firing"]), st.integers(), st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    )
)
def test_parse_line_json_objects_are_total(obj: dict) -> None:
    try:
        parse_line(json.dumps(obj).encode())
    except LineError as exc:
        assert exc.reason == "schema"


def test_registry_lists_process_type_and_builds_it() -> None:
    assert "process" in pipeline_types()
    assert pipeline_config("process") is Config
    entry = validate_pipeline_entry({"type": "process", "name": "x", "command": ["true"]})
    assert isinstance(entry, Config) and entry.command == ["true"]
    p = build_pipeline(Config(type="process", name="x", command=["true"]))
    assert p.name == "x" and p.kind == "process"


SCRIPT = r"""
import json, sys
print(json.dumps({"kind": "event", "type": "door_opened", "data": {"door": "front"}}))
print(json.dumps({"kind": "alert", "name": "fridge_warm", "source": "fridge-1"}))
print(json.dumps({"kind": "readings", "readings": [{"name": "temperature_c", "value": 9.5}]}))
print("not json")
print("x" * 5000)
print(json.dumps({"kind": "event", "type": "after_garbage"}))
print("oops", file=sys.stderr)
sys.stdout.flush()
sys.exit(3)
"""


def test_child_output_becomes_events_and_exit_is_a_failure() -> None:
    cfg = Config(type="process", name="script", command=[sys.executable, "-c", SCRIPT], max_line_bytes=1024)
    p = build_pipeline(cfg)
    sink = RecordingSink()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        p.run(threading.Event(), sink)
    assert sink.events == [("door_opened", "script", {"door": "front"}), ("after_garbage", "script", {})]
    assert sink.alerts == [("fridge_warm", "firing", "warning", "fridge-1", "")]
    assert [(r.name, r.value, r.source) for r in sink.read] == [("temperature_c", 9.5, "script")]
    h = p.health()
    assert h["errors_by_reason"] == {"bad_json": 1, "too_long": 1} and h["errors"] == 2
    assert "exited with code 3" in h["detail"]


def test_missing_command_names_it() -> None:
    p = build_pipeline(Config(type="process", name="x", command=["/nonexistent/tool"]))
    with pytest.raises(RuntimeError, match="/nonexistent/tool"):
        p.run(threading.Event(), RecordingSink())


def test_stop_terminates_and_kills_a_stubborn_child() -> None:
    stubborn = "import signal, time, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('{\"kind\":\"event\",\"type\":\"up\"}', flush=True)\ntime.sleep(60)"
    cfg = Config(type="process", name="stubborn", command=[sys.executable, "-c", stubborn], stop_timeout_s=0.5)
    sink = RecordingSink()
    runner = PipelineRunner(build_pipeline(cfg), cfg, sink)
    runner.start()
    wait_for(lambda: sink.events, 10, "the child's first line")
    t0 = time.monotonic()
    runner.stop(timeout=10)
    assert time.monotonic() - t0 < 5
    assert runner.state == "stopped"
    assert "exited with code -9" in runner.pipeline.health()["detail"]


def test_supervisor_restarts_exiting_child() -> None:
    cfg = Config(
        type="process",
        name="flaky",
        command=[sys.executable, "-c", "print('{\"kind\":\"event\",\"type\":\"hello\"}')"],
        restart_backoff_s=0.01,
        restart_backoff_max_s=0.05,
        restart_budget=2,
    )
    sink = RecordingSink()
    runner = PipelineRunner(build_pipeline(cfg), cfg, sink)
    runner.start()
    wait_for(lambda: runner.state == "failed", 20, "the restart budget to run out")
    assert len(sink.events) == 3 and runner.restarts == 2
