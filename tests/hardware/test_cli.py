"""``shopfleet hw``: simulate, read and calibrate, as a user runs them, plus scenario files."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from hardware.scenario import ScenarioError, build_boards, load_scenario, play
from hardware.simulator import SimulatedBoard
from shopfleet.cli import main
from tests.hardware.conftest import wait_for

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
        {"at": 3.0, "action": "pick", "channel": 0, "count": 2},
        {"at": 3.5, "action": "door", "channel": 1, "open": True},
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
    sim = subprocess.Popen(
        [*SHOPFLEET, "hw", "simulate", "--scenario", str(scenario), "--link-dir", str(links), "--duration", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = sim.stdout.readline().split()
        assert first[0] == "shelf-x" and first[1] == str(links / "shelf-x")
        read = subprocess.run(
            [*SHOPFLEET, "hw", "read", "--port", first[1], "--events-only", "--count", "3", "--planogram", str(planogram)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert read.returncode == 0, read.stderr
        lines = [json.loads(line) for line in read.stdout.splitlines()]
        assert [line["type"] for line in lines] == ["board_connected", "shelf_change", "door_opened"]
        assert (lines[1]["slot"], lines[1]["quantity"], lines[1]["product"]) == ("C3", -2, "cola")
    finally:
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
