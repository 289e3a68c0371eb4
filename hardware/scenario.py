"""Scripted shelf activity for simulated boards: the YAML scenario format and its player.

A scenario names the boards (id, channels, noise, rate, starting stock) and a timeline of steps
(pick, put_back, set, door, temperature, drift, unplug, garbage, reboot) at seconds from the
start. It drives ``shopfleet hw simulate --scenario FILE``, the demo and tests alike, so a demo
run is reproducible. The format is documented in docs/hardware.md; validation is strict
(``extra="forbid"``) and errors name the file, the key and the fix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hardware.simulator import SimulatedBoard
from shopfleet.errors import PermanentError

log = logging.getLogger(__name__)


class ScenarioError(PermanentError, ValueError):
    """A scenario file that cannot be used; the message names the file, the key and the fix."""

    default_reason = "scenario_invalid"


class ChannelSpec(BaseModel):
    """One channel of a simulated board."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["load_cell", "door", "temperature"] = Field(description="What the channel measures.")
    unit_weight_g: float = Field(0.0, ge=0, description="Load cells: weight of one item, used by pick/put_back steps.")
    items: int = Field(0, ge=0, description="Load cells: items on the slot at the start.")
    start_c: float = Field(4.0, description="Temperature channels: starting value in degC.")


class BoardSpec(BaseModel):
    """A simulated board."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=32, description="Board id announced in HELLO.")
    channels: tuple[ChannelSpec, ...] = Field(
        (ChannelSpec(kind="load_cell", unit_weight_g=345, items=10), ChannelSpec(kind="load_cell", unit_weight_g=50, items=20),
         ChannelSpec(kind="door"), ChannelSpec(kind="temperature")),
        min_length=1,
        max_length=16,
        description="Channels in order; their index is the channel number.",
    )
    noise_g: float = Field(2.0, ge=0, le=100, description="Load-cell noise, 1 sigma in grams.")
    interval_ms: int = Field(100, ge=10, le=60000, description="Time between READINGS frames.")


class Step(BaseModel):
    """One scripted action at ``at`` seconds from the start."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at: float = Field(ge=0, description="Seconds from the start of the scenario (or of each loop).")
    board: str | None = Field(None, description="Board id; may be omitted when the scenario has one board.")
    action: Literal["pick", "put_back", "set", "door", "temperature", "drift", "unplug", "garbage", "reboot"] = Field(
        description="What happens: pick/put_back 'count' items on 'channel'; set 'value'; door open/close "
        "('open'); temperature 'value' degC; drift 'value' g/s; unplug for 'duration_s'; garbage bytes; reboot."
    )
    channel: int = Field(0, ge=0, le=15, description="Channel index the action applies to.")
    count: int = Field(1, ge=1, le=1000, description="Items picked or put back.")
    value: float = Field(0.0, description="Grams (set), degC (temperature) or g/s (drift).")
    open: bool = Field(True, description="door: true opens, false closes.")
    duration_s: float = Field(3.0, gt=0, le=3600, description="unplug: seconds until the cable is plugged back in.")


class Scenario(BaseModel):
    """Boards and their timeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    boards: tuple[BoardSpec, ...] = Field(min_length=1, max_length=64, description="Simulated boards.")
    steps: tuple[Step, ...] = Field((), description="Timeline of actions, in any order (sorted by 'at').")
    loop_s: float | None = Field(None, gt=0, description="Repeat the timeline every loop_s seconds (demo); unset: play once.")

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        ids = [b.id for b in self.boards]
        if len(set(ids)) != len(ids):
            raise ValueError(f"board ids must be unique, got {ids}")
        for i, s in enumerate(self.steps):
            board = s.board or (ids[0] if len(ids) == 1 else None)
            if board not in ids:
                raise ValueError(f"steps.{i}.board: {s.board!r} is not one of the boards {ids}; name a board of this scenario")
            spec = next(b for b in self.boards if b.id == board)
            if s.action in ("pick", "put_back", "set", "drift", "temperature", "door") and s.channel >= len(spec.channels):
                raise ValueError(f"steps.{i}.channel: board {board} has {len(spec.channels)} channels; use 0..{len(spec.channels) - 1}")
            if s.action in ("pick", "put_back") and spec.channels[s.channel].unit_weight_g <= 0:
                raise ValueError(f"steps.{i}: {s.action} on channel {s.channel} needs unit_weight_g on that channel of board {board}")
            if self.loop_s is not None and s.at >= self.loop_s:
                raise ValueError(f"steps.{i}.at: {s.at} is not before loop_s ({self.loop_s}); move the step or lengthen the loop")
        return self


def default_scenario(boards: int) -> Scenario:
    """Return the built-in demo scenario: picks, put-backs, a door, drift and a pulled cable on N boards."""
    specs = tuple(BoardSpec(id=f"shelf-{i + 1}") for i in range(boards))
    steps: list[Step] = []
    for i, b in enumerate(specs):
        o = i * 0.7
        steps += [
            Step(at=2 + o, board=b.id, action="door", open=True),
            Step(at=4 + o, board=b.id, action="pick", channel=0, count=1),
            Step(at=7 + o, board=b.id, action="pick", channel=1, count=3),
            Step(at=10 + o, board=b.id, action="put_back", channel=0, count=1),
            Step(at=12 + o, board=b.id, action="door", open=False),
            Step(at=14 + o, board=b.id, action="put_back", channel=1, count=3),
        ]
    steps.append(Step(at=17, board=specs[0].id, action="unplug", duration_s=3))
    return Scenario(boards=specs, steps=tuple(steps), loop_s=25)


def load_scenario(path: Path) -> Scenario:
    """Load and validate a scenario YAML file, raising ScenarioError naming file, key and fix."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror}; check the path") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}; fix the syntax") from exc
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: invalid scenario: {problems} (format: docs/hardware.md, 'Scenario files')") from exc


def build_boards(scenario: Scenario, link_dir: Path | None = None, seed: int = 0) -> dict[str, SimulatedBoard]:
    """Create (not start) the simulated boards of a scenario, stocked with their starting items."""
    boards = {}
    for i, spec in enumerate(scenario.boards):
        b = SimulatedBoard(
            board_id=spec.id,
            channels=tuple(c.kind for c in spec.channels),
            interval_ms=spec.interval_ms,
            noise_g=spec.noise_g,
            seed=seed + i,
            link=(link_dir / spec.id) if link_dir else None,
        )
        for ch, c in enumerate(spec.channels):
            if c.kind == "load_cell":
                b.set_value(ch, c.items * c.unit_weight_g)
            elif c.kind == "temperature":
                b.set_value(ch, c.start_c)
        boards[spec.id] = b
    return boards


def apply_step(step: Step, board: SimulatedBoard, spec: BoardSpec) -> None:
    """Perform one step on a running board (unplug returns at once; replug is scheduled)."""
    unit = spec.channels[step.channel].unit_weight_g if step.channel < len(spec.channels) else 0.0
    if step.action == "pick":
        board.pick(step.channel, step.count, unit)
    elif step.action == "put_back":
        board.put_back(step.channel, step.count, unit)
    elif step.action in ("set", "temperature"):
        board.set_value(step.channel, step.value)
    elif step.action == "door":
        board.set_door(step.open, step.channel if spec.channels[step.channel].kind == "door" else None)
    elif step.action == "drift":
        board.set_drift(step.channel, step.value)
    elif step.action == "garbage":
        board.inject(b"\x13\x37garbage\xff\xfe\x00\x42")
    elif step.action == "reboot":
        board.reboot()
    elif step.action == "unplug":
        board.unplug()
        timer = threading.Timer(step.duration_s, board.replug)
        timer.daemon = True
        timer.start()


def play(
    scenario: Scenario,
    boards: dict[str, SimulatedBoard],
    stop: threading.Event,
    on_step: Callable[[Step], None] = lambda step: None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Play the timeline on running boards until it ends (or forever with loop_s) or stop is set."""
    specs = {b.id: b for b in scenario.boards}
    default = scenario.boards[0].id
    steps = sorted(scenario.steps, key=lambda s: s.at)
    start = clock()
    while not stop.is_set():
        for step in steps:
            if stop.wait(max(0.0, start + step.at - clock())):
                return
            board_id = step.board or default
            log.info("scenario: %s on %s channel %d", step.action, board_id, step.channel)
            apply_step(step, boards[board_id], specs[board_id])
            on_step(step)
        if scenario.loop_s is None:
            return
        start += scenario.loop_s
        stop.wait(max(0.0, start - clock()))
