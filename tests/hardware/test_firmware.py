"""Firmware in the loop: the real sketch, built with Debian's Arduino toolchain, under simavr.

The production build (SIMULATION=0) runs unmodified in our libsimavr harness, which puts UART0
on a pty, drives the HX711 and reed pins and answers the 1-wire line as a DS18B20; the Python
driver talks to it as to /dev/ttyACM0.
Both the sketch and the harness are built into a cache directory keyed by a hash of their
sources (~/.cache/shopfleet/firmware-tests/), never into the tree.
The emulator may run slower than real time, so every wait is on the firmware's own clock
(board_time) with generous wall-clock deadlines.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hardware.driver import BoardConnection, CommandRejected, DriverMetrics, DriverSettings
from hardware.frames import AckStatus, ChannelKind, Command, FrameType, Readings, ValueStatus
from hardware.planogram import Planogram, Slot
from tests.support.metrics import metric
from tests.support.wait import wait_for

pytestmark = [pytest.mark.firmware, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SKETCH = ROOT / "hardware" / "firmware" / "shelf_board"
HARNESS = ROOT / "hardware" / "simavr"
PACKAGES = "gcc-avr avr-libc arduino-core-avr arduino-mk simavr libsimavr-dev libsimavrparts1 libelf-dev pkg-config"
SLOW = {"hello_timeout_s": 60.0, "command_timeout_s": 60.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
COUNTS_PER_G = 420
ZERO = 100_000


def _missing_tools() -> str | None:
    needed = {
        "avr-gcc": shutil.which("avr-gcc"),
        "make": shutil.which("make"),
        "cc": shutil.which("cc"),
        "pkg-config": shutil.which("pkg-config"),
        "/usr/share/arduino/Arduino.mk": Path("/usr/share/arduino/Arduino.mk").exists(),
        "/usr/share/arduino/hardware/arduino/avr": Path("/usr/share/arduino/hardware/arduino/avr/cores").exists(),
    }
    missing = [k for k, v in needed.items() if not v]
    if not missing and subprocess.run(["pkg-config", "--exists", "simavr"]).returncode != 0:
        missing.append("simavr.pc (libsimavr-dev)")
    if missing:
        return f"firmware toolchain missing ({', '.join(missing)}): sudo apt-get install {PACKAGES}"
    return None


def _make(args: list[str], what: str) -> None:
    proc = subprocess.run(["make", "-s", *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"building the {what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _cache_dir() -> Path:
    """Return the build cache for these sources: rebuilt only when the sketch or the harness changes."""
    digest = hashlib.sha256()
    for path in sorted([*SKETCH.iterdir(), *HARNESS.iterdir()]):
        if path.is_file() and path.name in ("Makefile", "shelf_board.ino", "harness.c"):
            digest.update(path.name.encode() + path.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shopfleet" / "firmware-tests"
    return base / digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> dict[str, Path]:
    """Build the production and SIMULATION firmware and the harness into a cache directory (never the tree)."""
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    out = _cache_dir()
    paths = {"prod": out / "prod" / "shelf_board_.elf", "sim": out / "sim" / "shelf_board_.elf", "harness": out / "harness"}
    if all(p.exists() for p in paths.values()):
        return paths
    work = tmp_path_factory.mktemp("firmware-build")
    _make(["-C", str(SKETCH), f"OBJDIR={work / 'prod'}"], "production firmware")
    _make(["-C", str(SKETCH), f"OBJDIR={work / 'sim'}", "SIMULATION=1", "BOARD_ID=sim-board"], "SIMULATION firmware")
    _make(["-C", str(HARNESS), f"OUT={work / 'harness'}"], "simavr harness")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.rename(out)  # atomic: a concurrent session either sees a complete build or none
    except OSError:
        return {k: work / v.relative_to(out) for k, v in paths.items()}  # another session won the race
    return paths


class EmulatedBoard:
    """The harness process: a firmware under simavr on a pty, with sensor values set by control lines."""

    def __init__(self, harness: Path, elf: Path, eeprom: Path) -> None:
        self.proc = subprocess.Popen(
            [str(harness), "-e", str(eeprom), str(elf)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.path = self._read_pty()

    def _read_pty(self) -> str:
        buf = ""
        fd = self.proc.stdout.fileno()
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 4096).decode()
                if not chunk:
                    break
                buf += chunk
                for line in buf.splitlines():
                    if line.startswith("pty "):
                        return line.split()[1]
        self.proc.kill()
        pytest.fail(f"the harness printed no 'pty' line: {buf!r}")

    def set(self, line: str) -> None:
        """Send a control line (hx CH VALUE|none, door 0|1, temp DEGC|none)."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def power_off(self) -> None:
        """Quit the emulator (saving its EEPROM)."""
        if self.proc.poll() is None:
            self.set("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def emulate(builds, tmp_path) -> Iterator:
    boards: list[EmulatedBoard] = []

    def start(kind: str = "prod", eeprom: Path | None = None) -> EmulatedBoard:
        b = EmulatedBoard(builds["harness"], builds[kind], eeprom or tmp_path / "eeprom.bin")
        boards.append(b)
        return b

    yield start
    for b in boards:
        b.power_off()


def _connect(board: EmulatedBoard, registry: CollectorRegistry | None = None) -> BoardConnection:
    conn = BoardConnection(board.path, DriverMetrics(registry or CollectorRegistry()), DriverSettings(port=board.path, **SLOW))
    conn.wait_hello(60)
    return conn


def _next_readings(conn: BoardConnection, after_ms: int = 0) -> Readings:
    found: list[Readings] = []
    wait_for(lambda: found.extend(m for _, m in conn.poll() if isinstance(m, Readings) and m.uptime_ms > after_ms) or found, timeout=60, what="READINGS")
    return found[-1]


def test_production_firmware_says_hello_and_reports_sensors(emulate) -> None:
    board = emulate()
    board.set(f"hx 0 {ZERO}")
    board.set("door 1")
    conn = _connect(board)
    try:
        hello = conn.hello
        assert hello.board_id == "shelf-board" and hello.firmware == "1.0"
        assert [c.kind for c in hello.channels] == [ChannelKind.LOAD_CELL, ChannelKind.LOAD_CELL, ChannelKind.DOOR, ChannelKind.TEMPERATURE]
        r = _next_readings(conn, after_ms=1200)  # > 1 s: a silent HX711 is declared missing
        assert r.values[0].status == ValueStatus.OK
        assert r.values[1].status == ValueStatus.MISSING  # no value set for the second HX711
        assert r.values[2].value == 1  # door open
        assert r.values[3].status == ValueStatus.MISSING  # no DS18B20 on the bus: no presence pulse
        assert conn.command(Command(FrameType.PING), 60).status == AckStatus.OK
        with pytest.raises(CommandRejected, match="UNKNOWN_COMMAND"):
            conn.command(Command(FrameType.SIM_SET, 0, 5), 60)  # production build has no simulation inputs
    finally:
        conn.close()


def test_tare_and_calibration_survive_a_power_cycle_in_eeprom(emulate, tmp_path) -> None:
    eeprom = tmp_path / "board1.eeprom"
    board = emulate(eeprom=eeprom)
    board.set(f"hx 0 {ZERO}")
    conn = _connect(board)
    try:
        assert conn.command(Command(FrameType.TARE, 0), 60).value == ZERO
        board.set(f"hx 0 {ZERO + 500 * COUNTS_PER_G}")  # 500 g on the slot
        ack = conn.command(Command(FrameType.CALIBRATE, 0, 5000), 60)
        assert ack.value == COUNTS_PER_G
        with pytest.raises(CommandRejected, match="BAD_ARGUMENT"):
            conn.command(Command(FrameType.CALIBRATE, 0, -5), 60)
    finally:
        conn.close()
    board.power_off()

    again = emulate(eeprom=eeprom)
    again.set(f"hx 0 {ZERO + 250 * COUNTS_PER_G}")
    conn = _connect(again)
    try:
        r = _next_readings(conn, after_ms=300)
        assert r.values[0].value == 2500  # 250.0 g in decigrams, with the calibration from EEPROM
    finally:
        conn.close()


def test_driver_reports_a_pick_and_the_door_from_the_real_firmware(emulate, running_driver) -> None:
    board = emulate()
    board.set("hx 0 0")
    conn = _connect(board)
    try:  # a blank EEPROM: zero offset, nominal 420 counts/g; tare to be explicit
        conn.command(Command(FrameType.TARE, 0), 60)
    finally:
        conn.close()
    board.set(f"hx 0 {10 * 345 * COUNTS_PER_G}")
    board.set("temp 9.5")  # a warm fridge: the emulated DS18B20 answers the firmware's 1-wire reads
    planogram = Planogram(slots=(Slot(board="shelf-board", channel=0, slot="A1", product="cola-330", unit_weight_g=345),))
    rd = running_driver(DriverSettings(port=board.path, **SLOW), planogram)
    board.set("door 0")
    wait_for(lambda: [r for r in rd.of_type("reading") if r.board_time > 1.5 and r.channel == 2 and r.value == 0],
             timeout=60, what="a settled shelf and a closed door")
    board.set(f"hx 0 {7 * 345 * COUNTS_PER_G}")
    board.set("door 1")
    wait_for(lambda: rd.of_type("shelf_change") and rd.of_type("door_opened") and rd.of_type("alert"), timeout=60, what="pick, door and alert")
    [change] = rd.of_type("shelf_change")
    assert (change.slot, change.quantity, change.delta_g) == ("A1", -3, -1035.0)
    [alert] = rd.of_type("alert")
    assert (alert.name, alert.state, alert.value_c) == ("temperature_high", "firing", 9.5)
    assert metric(rd.registry, "shopfleet_hardware_frames_lost_total", board="shelf-board") == 0
    # the second HX711 never got a value: its channel is reported missing, and counted
    assert metric(rd.registry, "shopfleet_hardware_sensor_errors_total", board="shelf-board", channel="1", status="missing") > 0


def test_firmware_ignores_garbage_and_keeps_answering(emulate) -> None:
    board = emulate()
    conn = _connect(board)
    try:
        conn._serial.write(b"\x13\x37\xff" * 40 + b"\x00\x05\x01\x00")  # line noise, an overlong run, half a frame
        assert conn.command(Command(FrameType.PING), 60).status == AckStatus.OK
        assert conn.command(Command(FrameType.SET_RATE, 0, 50), 60).value == 50
    finally:
        conn.close()


def test_simulation_build_takes_sensor_values_over_the_serial_line(emulate) -> None:
    board = emulate("sim")
    conn = _connect(board)
    try:
        assert conn.hello.board_id == "sim-board"
        for channel, value in ((0, 420 * 100), (2, 1), (3, 512)):
            conn.command(Command(FrameType.SIM_SET, channel, value), 60)
        r = _next_readings(conn, after_ms=0)
        found: list[Readings] = [r]
        wait_for(lambda: found.extend(m for _, m in conn.poll() if isinstance(m, Readings)) or found[-1].values[3].status == ValueStatus.OK,
                 timeout=60, what="simulated values")
        values = found[-1].values
        assert (values[0].value, values[2].value, values[3].value) == (1000, 1, 512)  # 100.0 g, door open, 5.12 C
    finally:
        conn.close()
