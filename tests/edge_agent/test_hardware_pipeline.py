"""``type: hardware`` under the agent: a simulated board on a real pty -> pipeline -> sink / outbox -> MQTT."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from edge_agent.config import validate_config
from edge_agent.pipelines import build_pipeline, pipeline_types
from edge_agent.pipelines.hardware import Config
from edge_agent.protocol import Channel, Event, Telemetry
from edge_agent.supervisor import PipelineRunner
from hardware.simulator import SimulatedBoard
from tests.support.inproc import uplinks
from tests.support.recorder import wait_for
from tests.support.sink import RecordingSink

PLANOGRAM = {"slots": [{"board": "shelf-a", "channel": 0, "slot": "A1", "product": "cola-330", "unit_weight_g": 345}]}


@pytest.fixture
def board(tmp_path: Path) -> Iterator[SimulatedBoard]:
    b = SimulatedBoard("shelf-a", link=tmp_path / "shelf-a", seed=3)
    b.set_value(0, 10 * 345)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def planogram(tmp_path: Path) -> str:
    path = tmp_path / "planogram.yaml"
    path.write_text(yaml.safe_dump(PLANOGRAM))
    return str(path)


def _config(port: str, planogram: str | None, **kw) -> Config:
    base = {"type": "hardware", "name": "shelf-board", "serial": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
            "planogram": planogram, "readings_interval_s": 0.5}  # fmt: skip
    return Config.model_validate({**base, **kw})


def _settled(sink: RecordingSink, n: int = 1) -> bool:
    with sink.lock:
        return sum(1 for r in sink.read if r.name == "shelf_weight_g" and r.labels["channel"] == "0") >= n


def test_hardware_is_a_pipeline_type_and_config_is_strict(board: SimulatedBoard, planogram: str) -> None:
    assert pipeline_types()["hardware"].__name__ == "edge_agent.pipelines.hardware"
    with pytest.raises(ValidationError, match="serial.baud"):
        _config(board.path, planogram, serial={"baud": 9600})
    with pytest.raises(ValidationError, match="min_change_g"):
        _config(board.path, planogram, serial={"stability": {"tolerance_g": 80}})


def test_pick_door_and_temperature_reach_the_sink_and_readings_are_downsampled(board: SimulatedBoard, planogram: str) -> None:
    pipe = build_pipeline(_config(board.path, planogram))
    sink = RecordingSink()
    runner = PipelineRunner(pipe, pipe.config, sink)
    runner.start()
    try:
        wait_for(lambda: _settled(sink, 5), 20, "readings for two seconds")
        board.pick(0, 2, 345)
        board.set_door(True)
        board.set_value(3, 9.5)
        wait_for(lambda: [e for e in sink.events if e[0] == "shelf_change"], 20, "the pick")
        wait_for(lambda: [a for a in sink.alerts if a[0] == "temperature_high"], 20, "the warm fridge")
        shelf = [e for e in sink.events if e[0] == "shelf_change"]
        assert [(e[2]["slot"], e[2]["quantity"], e[2]["product"]) for e in shelf] == [("A1", -2, "cola-330")]
        assert ("door_opened", "shelf-a", {"board": "shelf-a", "channel": 2}) in sink.events
        assert sink.alerts[-1][1:3] == ("firing", "critical")
        health = pipe.health()
        assert health["fps"] > 1 and health["last_frame_age_s"] < 2 and "shelf-a" in health["detail"]
        with sink.lock:
            weights = [r for r in sink.read if r.name == "shelf_weight_g" and r.labels["channel"] == "0"]
        assert weights[0].labels["slot"] == "A1" and weights[0].labels["product"] == "cola-330"
        with sink.lock:
            temps = [r for r in sink.read if r.name == "temperature_c"]
        assert temps and temps[0].labels["sensor"] == "fridge-thermometer"  # what the fridge_warm rule and page key on
        exported = CollectorRegistry()
        exported.register(pipe)  # the pipeline is a collector of the driver's metrics
        frames = exported.get_sample_value("shopfleet_hardware_frames_total", {"board": "shelf-a"})
        assert exported.get_sample_value("shopfleet_hardware_last_reading_age_seconds", {"board": "shelf-a", "channel": "0"}) < 2
        # the board sends 10 readings/s per channel; the pipeline forwards at most 2/s
        assert 0 < len(weights) * 3 < frames
    finally:
        runner.stop()


def test_unplug_raises_and_resolves_an_alert_and_counts_errors(board: SimulatedBoard, planogram: str) -> None:
    pipe = build_pipeline(_config(board.path, planogram, gate_interval_s=0.2))
    sink = RecordingSink()
    runner = PipelineRunner(pipe, pipe.config, sink)
    runner.start()
    try:
        wait_for(lambda: _settled(sink), 20, "readings")
        # the gate metrics rollouts judge: the board's frame rate and its share of bad frames
        wait_for(lambda: sink.gates.get("hardware_fps", (0.0, ""))[0] > 1, 20, "hardware_fps as a gate metric")
        assert sink.gates["hardware_fps"][1] == "lower" and sink.gates["hardware_bad_frame_ratio"] == (0.0, "higher")
        board.inject(b"\x07\x01\x02\x03\x04\x05\x06\x00")
        board.unplug()
        wait_for(lambda: [a for a in sink.alerts if a[0] == "sensor_board_disconnected" and a[1] == "firing"], 20, "the disconnect alert")
        assert sink.gates["hardware_fps"][0] == 0.0  # reported at once: a board that went away delivers nothing
        board.replug()
        wait_for(lambda: [a for a in sink.alerts if a[0] == "sensor_board_disconnected" and a[1] == "resolved"], 20, "the resolve")
        errors = wait_for(lambda: pipe.health()["errors_by_reason"].get("reconnect"), 20, "the reconnect counted")
        assert errors == 1
        wait_for(lambda: sink.gates["hardware_fps"][0] > 0, 20, "hardware_fps back above 0")
        assert 0 <= sink.gates["hardware_bad_frame_ratio"][0] < 0.5
        assert runner.state == "running"  # an unplug is handled by the driver, not a pipeline failure
    finally:
        runner.stop()


def test_a_bad_planogram_fails_the_pipeline_with_the_fix(board: SimulatedBoard, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("slots: [{board: shelf-a, channel: 0, slot: A1, product: p}]")
    pipe = build_pipeline(_config(board.path, str(bad), restart_budget=0))
    runner = PipelineRunner(pipe, pipe.config, RecordingSink())
    runner.start()
    try:
        wait_for(lambda: runner.state == "failed", 20, "the pipeline to fail")
        assert "unit_weight_g" in runner.last_error and str(bad) in runner.last_error
    finally:
        runner.stop()


def test_agent_sends_shelf_events_through_the_outbox(make_agent, recorder, board: SimulatedBoard, planogram: str, tmp_path: Path) -> None:
    pipelines = [
        {"type": "hardware", "name": "shelf-board", "serial": {"port": board.path}, "planogram": planogram, "telemetry_interval_s": 0.5}
    ]
    validate_config({"shop": "shop-a", "node": "pi-1", "pipelines": pipelines, "outbox": {"path": str(tmp_path / "o.db")}})
    agent = make_agent(config={"pipelines": pipelines})
    def weights() -> list:
        return [r for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Telemetry) for r in m.readings if r.name == "shelf_weight_g"]

    tel = wait_for(lambda: len({r.source for r in weights()}) and len(weights()) >= 8, 30, "two seconds of shelf weight telemetry")
    assert tel and weights()[0].source.startswith("shelf-a/") and agent is not None
    board.put_back(0, 1, 345)
    events = wait_for(lambda: [m for m in uplinks(recorder, Channel.EVENTS) if isinstance(m, Event) and m.type == "shelf_change"], 30, "shelf_change")
    assert events[0].data["quantity"] == 1 and events[0].data["slot"] == "A1" and events[0].source == "shelf-a"
    # the agent's own registry (its /metrics) carries the driver's metrics per pipeline, and the health gauges
    reg = agent.registry
    assert reg.get_sample_value("shopfleet_hardware_frames_total", {"board": "shelf-a", "pipeline": "shelf-board"}) > 0
    assert reg.get_sample_value("shopfleet_agent_pipeline_fps", {"pipeline": "shelf-board"}) > 0
    assert reg.get_sample_value("shopfleet_agent_pipeline_last_frame_age_seconds", {"pipeline": "shelf-board"}) < 5
