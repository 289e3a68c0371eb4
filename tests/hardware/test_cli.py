"""``shopfleet hw``: simulate, read and calibrate, as a user runs them, plus scenario files."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.planogram import PlanogramError, load_planogram
from hardware.scenario import ScenarioError, build_boards, load_scenario, play
from hardware.simulator import SimulatedBoard
from shopfleet.cli import main
from tests.support.wait import wait_for

SHOPFLEET = [sys.executable, "-m", "shopfleet.cli"]

SCENARIO = {
    "boards": [
        {
            "id": "shelf-x",
            "channels": [{"kind": "load_cell", "unit_weight_g": 345, "items": 10}, {"kind": "door"}, {"kind": "temperature"}],
            "noise_g": 2.0,
        }
    ],
    "steps": [
        {"at": 5.0, "action": "pick", "channel": 0, "count": 2},
        {"at": 7.5, "action": "door", "channel": 1, "open": True},  # after the pick has settled
    ],
}


def test_help_explains_every_subcommand_and_option(capsys) -> None:
    for argv, words in (
        (["hw", "--help"], ["simulate", "read", "calibrate"]),
        (["hw", "simulate", "--help"], ["--boards", "--scenario", "--link-dir", "--duration", "--seed"]),
        (["hw", "read", "--help"], ["--port", "--count", "--events-only", "--planogram", "--hello-timeout"]),
        (["hw", "calibrate", "--help"], ["--port", "--channel", "--mass", "--tare", "--timeout"]),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out, f"{' '.join(argv)} does not mention {w}"


def test_simulate_and_read_end_to_end(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    planogram = tmp_path / "planogram.yaml"
    planogram.write_text(yaml.safe_dump({"slots": [{"board": "shelf-x", "channel": 0, "slot": "C3", "product": "cola", "unit_weight_g": 345}]}))
    links = tmp_path / "by-id"
    link = links / "shelf-x"
    # The reader starts first and waits for the board's by-id link to appear, as on a shop node at boot.
    read = subprocess.Popen(
        [*SHOPFLEET, "hw", "read", "--port", str(link), "--events-only", "--count", "3", "--planogram", str(planogram)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sim = subprocess.Popen(
        [*SHOPFLEET, "hw", "simulate", "--scenario", str(scenario), "--link-dir", str(links), "--duration", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sim.stdout.readline().split() == ["shelf-x", str(link)]
        out, err = read.communicate(timeout=60)
        assert read.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["type"] for line in lines] == ["board_connected", "shelf_change", "door_opened"]
        assert (lines[1]["slot"], lines[1]["quantity"], lines[1]["product"]) == ("C3", -2, "cola")
    finally:
        read.kill()
        sim.terminate()
        sim.wait(10)


def test_read_prints_readings_as_json_lines(tmp_path: Path) -> None:
    board = SimulatedBoard("shelf-r", channels=("load_cell", "temperature"))
    board.set_value(1, 5.5)
    path = board.start()
    try:
        read = subprocess.run([*SHOPFLEET, "hw", "read", "--port", path, "--count", "5"], capture_output=True, text=True, timeout=60)
        lines = [json.loads(line) for line in read.stdout.splitlines()]
        assert len(lines) == 5 and lines[0]["type"] == "board_connected"
        temps = [x for x in lines if x["type"] == "reading" and x["kind"] == "temperature"]
        assert temps and abs(temps[0]["value"] - 5.5) < 0.2 and temps[0]["unit"] == "C"
    finally:
        board.stop()


@pytest.fixture
def sim_board():
    board = SimulatedBoard("shelf-c", seed=1)
    board.start()
    yield board
    board.stop()


def test_calibrate_tare_then_mass(sim_board: SimulatedBoard, capsys) -> None:
    sim_board.set_value(0, 0)
    assert main(["hw", "calibrate", "--port", sim_board.path, "--channel", "0", "--tare"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "tared"
    sim_board.set_value(0, 500)
    assert main(["hw", "calibrate", "--port", sim_board.path, "--channel", "0", "--mass", "500"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"type": "calibrated", "board": "shelf-c", "channel": 0, "value": 420}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["--channel", "2", "--mass", "100"], 2, "not a load cell; load cells: [0, 1]", id="door-channel"),
        pytest.param(["--channel", "9", "--tare"], 2, "not a load cell", id="no-such-channel"),
        pytest.param(["--channel", "0", "--mass", "-5"], 2, "--mass must be positive", id="negative-mass"),
        pytest.param(["--channel", "0", "--mass", "100"], 1, "tare the empty slot first", id="no-mass-on-the-cell"),
    ],
)
def test_calibrate_errors_say_what_to_do(sim_board: SimulatedBoard, capsys, args: list[str], code: int, message: str) -> None:
    sim_board.set_value(0, 0)
    assert main(["hw", "calibrate", "--port", sim_board.path, *args, "--timeout", "5"]) == code
    assert message in capsys.readouterr().err


def test_calibrate_on_a_missing_port(tmp_path: Path, capsys) -> None:
    assert main(["hw", "calibrate", "--port", str(tmp_path / "ttyACM9"), "--channel", "0", "--tare"]) == 1
    assert "check the path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param({"boards": []}, "boards", id="no-boards"),
        pytest.param({"boards": [{"id": "a"}], "steps": [{"at": 1, "action": "explode"}]}, r"steps\.0\.action", id="unknown-action"),
        pytest.param({"boards": [{"id": "a"}], "steps": [{"at": 1, "board": "b", "action": "reboot"}]}, "'b' is not one of the boards", id="unknown-board"),
        pytest.param({"boards": [{"id": "a"}], "steps": [{"at": 1, "action": "pick", "channel": 2}]}, "needs unit_weight_g", id="pick-on-door"),
        pytest.param({"boards": [{"id": "a", "colour": "red"}]}, "colour", id="unknown-key"),
        pytest.param({"boards": [{"id": "a"}], "loop_s": 5, "steps": [{"at": 6, "action": "reboot"}]}, "loop_s", id="step-after-loop"),
    ],
)
def test_bad_scenarios_name_the_key_and_the_fix(tmp_path: Path, data: dict, match: str, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match=match):
        load_scenario(path)
    assert main(["hw", "simulate", "--scenario", str(path), "--duration", "1"]) == 2
    assert str(path) in capsys.readouterr().err


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=False), st.sampled_from(["pick", "door", "load_cell", "a"])),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["boards", "steps", "id", "at", "action", "channels", "kind", "loop_s", "slots", "board", "channel", "slot", "product", "unit_weight_g"]), inner, max_size=5)),
        max_leaves=20,
    ).map(yaml.safe_dump),
))
def test_scenario_and_planogram_loaders_are_total(tmp_path_factory, text: str) -> None:
    """Any file content gives a valid object or the loader's own error naming the file, never another exception."""
    path = tmp_path_factory.mktemp("prop") / "f.yaml"
    path.write_text(text)
    for load, error in ((load_scenario, ScenarioError), (load_planogram, PlanogramError)):
        try:
            load(path)
        except error as exc:
            assert str(path) in str(exc)


def test_scenario_player_drives_the_boards(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "boards": [{"id": "a", "channels": [{"kind": "load_cell", "unit_weight_g": 50, "items": 4}, {"kind": "door"}]}],
        "steps": [{"at": 0.1, "action": "pick", "count": 3}, {"at": 0.2, "action": "door", "channel": 1, "open": True},
                  {"at": 0.3, "action": "drift", "value": 1.5}, {"at": 0.4, "action": "unplug", "duration_s": 0.3}],
    }))  # fmt: skip
    scenario = load_scenario(path)
    boards = build_boards(scenario, tmp_path)
    board = boards["a"]
    board.start()
    try:
        done: list = []
        stop = threading.Event()
        play(scenario, boards, stop, on_step=done.append)
        assert [s.action for s in done] == ["pick", "door", "drift", "unplug"]
        assert board.weight(0) == pytest.approx(50.0, abs=1.0)  # 4 items, 3 picked, a little drift
        wait_for(lambda: (tmp_path / "a").exists(), 5, "the replug to re-point the link")
    finally:
        board.stop()
