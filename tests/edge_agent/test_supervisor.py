"""Supervision: the restart policy as a pure function, and runners with real threads."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol import PipelineHealth
from edge_agent.supervisor import (
    EventSink,
    Pipeline,
    PipelineConfigBase,
    PipelineRunner,
    Supervisor,
    health_to_model,
    next_restart,
)
from tests.support.recorder import wait_for
from tests.support.sink import RecordingSink

POLICY = PipelineConfigBase(name="p", restart_backoff_s=1, restart_backoff_max_s=8, restart_budget=3, restart_window_s=60)


@pytest.mark.parametrize(
    ("failures", "consecutive", "now", "give_up", "delay"),
    [
        pytest.param([100.0], 1, 100.0, False, 1.0, id="first-failure-initial-backoff"),
        pytest.param([98.0, 99.0, 100.0], 3, 100.0, False, 4.0, id="doubles-per-consecutive-failure"),
        pytest.param([100.0], 10, 100.0, False, 8.0, id="capped-at-max"),
        pytest.param([97.0, 98.0, 99.0, 100.0], 4, 100.0, True, 0.0, id="budget-exceeded-gives-up"),
        pytest.param([10.0, 20.0, 99.0, 100.0], 2, 100.0, False, 2.0, id="failures-outside-window-forgotten"),
    ],
)
def test_next_restart(failures, consecutive, now, give_up, delay) -> None:
    d = next_restart(POLICY, failures, consecutive, now)
    assert (d.give_up, d.delay_s) == (give_up, delay)


class Crashing:
    kind = "test"

    def __init__(self, name: str = "crash") -> None:
        self.name = name
        self.runs = 0

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        self.runs += 1
        raise OSError("camera unplugged")

    def health(self) -> dict[str, Any]:
        return {"errors": self.runs}


class Steady:
    kind = "test"
    name = "steady"

    def __init__(self) -> None:
        self.started = threading.Event()

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        self.started.set()
        sink.event("tick", self.name, {})
        stop.wait()

    def health(self) -> dict[str, Any]:
        raise RuntimeError("broken health")


def test_protocols_are_satisfied_by_adapters() -> None:
    assert isinstance(Steady(), Pipeline)
    assert isinstance(RecordingSink(), EventSink)


def test_crashing_pipeline_restarts_then_fails_within_budget() -> None:
    states: list[str] = []
    restarts: list[str] = []
    policy = PipelineConfigBase(name="crash", restart_backoff_s=0.01, restart_backoff_max_s=0.02, restart_budget=2)
    p = Crashing()
    runner = PipelineRunner(p, policy, RecordingSink(), on_state=lambda n, s: states.append(s), on_restart=restarts.append)
    runner.start()
    wait_for(lambda: runner.state == "failed", 10, "the runner to give up")
    assert p.runs == 3 and runner.restarts == 2 and restarts == ["crash", "crash"]
    assert states[0] == "starting" and states[-1] == "failed" and "backoff" in states
    h = runner.health()
    assert h.state == "failed" and h.restarts == 2 and "camera unplugged" in h.detail and h.errors == 3


def test_steady_pipeline_runs_and_stops_and_survives_broken_health() -> None:
    sink = RecordingSink()
    p = Steady()
    sup = Supervisor()
    sup.add(PipelineRunner(p, PipelineConfigBase(name="steady"), sink))
    sup.start()
    wait_for(p.started.is_set, 5, "the pipeline to start")
    assert sup.health()["steady"].state == "running"
    assert "broken health" in sup.health()["steady"].detail
    sup.stop(timeout=5)
    assert sup.health()["steady"].state == "stopped"
    assert sink.events == [("tick", "steady", {})]


def test_a_restart_racing_the_agents_shutdown_leaves_no_pipeline_running() -> None:
    # A signed restart command (stop, then start, on the command thread) may run while the agent
    # shuts down: the shutdown must neither trip over a thread not yet started nor leave the
    # restarted pipeline running after it.
    p = Steady()
    runner = PipelineRunner(p, PipelineConfigBase(name="steady"), RecordingSink())
    sup = Supervisor()
    sup.add(runner)
    sup.start()
    wait_for(p.started.is_set, 5, "the pipeline to start")
    restarts = 0
    refused: list[BaseException] = []

    def restarter() -> None:
        nonlocal restarts
        while True:
            runner.stop(5)
            try:
                runner.start()
            except RuntimeError as exc:
                refused.append(exc)
                return
            restarts += 1

    t = threading.Thread(target=restarter, daemon=True)
    t.start()
    wait_for(lambda: restarts >= 20, 10, "the restarter to get going")
    sup.stop(timeout=5)
    t.join(10)
    assert not t.is_alive(), "the restarter kept starting the pipeline after the shutdown"
    assert refused and "shut down" in str(refused[0])
    assert runner._thread is not None and not runner._thread.is_alive()
    assert sup.health()["steady"].state == "stopped"


def test_returning_early_is_a_failure() -> None:
    class Quitter(Steady):
        def run(self, stop, sink) -> None:
            self.started.set()

    runner = PipelineRunner(Quitter(), PipelineConfigBase(name="steady", restart_budget=0, restart_backoff_s=0.01), RecordingSink())
    runner.start()
    wait_for(lambda: runner.state == "failed", 5, "failed state")
    assert "returned before stop" in runner.last_error


def test_duplicate_names_refused() -> None:
    sup = Supervisor()
    sup.add(PipelineRunner(Crashing("a"), POLICY, RecordingSink()))
    with pytest.raises(ValueError, match="unique name"):
        sup.add(PipelineRunner(Crashing("a"), POLICY, RecordingSink()))


values = st.one_of(st.none(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=600), st.booleans())


@given(raw=st.dictionaries(st.sampled_from(["fps", "latency_ms", "dropped_frames", "last_frame_age_s", "errors", "detail", "other"]), values))
def test_health_to_model_accepts_any_raw_health(raw: dict) -> None:
    h = health_to_model("vision", "running", 1, raw)
    assert isinstance(h, PipelineHealth)
    assert h.fps is None or h.fps >= 0
    assert len(h.detail) <= 500
