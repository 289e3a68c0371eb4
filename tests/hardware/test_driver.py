"""The serial driver against simulated boards on real pseudo-terminals."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from prometheus_client import CollectorRegistry, generate_latest

from hardware.driver import (
    BoardConnection,
    CommandRejected,
    DriverMetrics,
    DriverSettings,
    PortNotFound,
    SensorTimeout,
    resolve_port,
)
from hardware.frames import (
    MAX_ENCODED,
    AckStatus,
    ChannelInfo,
    ChannelKind,
    ChannelValue,
    Command,
    FrameType,
    Hello,
    Readings,
    Unit,
    encode_message,
)
from hardware.simulator import SimulatedBoard
from shopfleet.errors import PermanentError, TemporaryError
from tests.support.metrics import metric
from tests.support.wait import wait_for

FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5}


def settled(rd, board_time: float = 2.0) -> None:
    """Wait until the board has run long enough since its last boot for the shelf to have a settled baseline."""
    def ok() -> bool:
        readings = rd.of_type("reading")
        return bool(readings) and readings[-1].board_time >= board_time
    wait_for(ok, what=f"{board_time}s of board time")


@pytest.fixture
def board(tmp_path: Path) -> Iterator[SimulatedBoard]:
    b = SimulatedBoard("shelf-a", link=tmp_path / "by-id" / "usb-shopfleet-shelf-a", seed=7)
    b.link.parent.mkdir()
    b.set_value(0, 10 * 345)
    b.set_value(1, 20 * 50)
    b.start()
    yield b
    b.stop()


def test_readings_and_events_flow_with_metrics(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: rd.of_type("board_connected"), what="HELLO")
    settled(rd)
    board.pick(0, 1, 345)
    wait_for(lambda: rd.of_type("shelf_change"), what="the pick")
    board.put_back(0, 3, 345)
    wait_for(lambda: len(rd.of_type("shelf_change")) == 2, what="the put-back")
    board.set_door(True)
    wait_for(lambda: rd.of_type("door_opened"), what="door event")
    changes = rd.of_type("shelf_change")
    assert [(e.slot, e.quantity) for e in changes] == [("A1", -1), ("A1", 3)]
    r = rd.registry
    assert metric(r, "shopfleet_hardware_frames_total", board="shelf-a") >= 20
    assert metric(r, "shopfleet_hardware_events_total", type="shelf_change") == 2
    assert metric(r, "shopfleet_hardware_frames_lost_total", board="shelf-a") == 0
    age = metric(r, "shopfleet_hardware_last_reading_age_seconds", board="shelf-a", channel="0")
    assert 0 <= age < 2


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        pytest.param(b"\x55" * 600, "too_long", id="line-noise-without-delimiter"),
        pytest.param(b"\x05\x01\x00", "cobs", id="half-a-frame"),
        pytest.param(b"\x07\x01\x02\x03\x04\x05\x06\x00", "crc", id="bit-flips"),
    ],
)
def test_garbage_is_counted_by_reason_and_the_stream_resyncs(board: SimulatedBoard, running_driver, garbage: bytes, reason: str) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 8, what="readings")
    board.inject(garbage)
    wait_for(lambda: metric(rd.registry, "shopfleet_hardware_frames_rejected_total", reason=reason) >= 1, what=f"a '{reason}' rejection")
    before = len(rd.of_type("reading"))
    wait_for(lambda: len(rd.of_type("reading")) >= before + 8, what="readings after the garbage")
    assert rd.of_type("board_disconnected") == []


def test_lost_frames_are_counted_from_sequence_gaps(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 8, what="readings")
    board.drop_next(5)
    wait_for(lambda: metric(rd.registry, "shopfleet_hardware_frames_lost_total", board="shelf-a") >= 5, what="the gap")
    wait_for(lambda: len(rd.of_type("reading")) >= 40, what="more readings")
    assert metric(rd.registry, "shopfleet_hardware_frames_lost_total", board="shelf-a") == 5


def test_a_flooding_board_overflows_the_pty_and_the_loss_is_seen(board: SimulatedBoard) -> None:
    registry = CollectorRegistry()
    conn = BoardConnection(board.path, DriverMetrics(registry), DriverSettings(port=board.path))
    try:
        conn.wait_hello(5)
        board.flood(3000)  # ~120 KB while nobody reads: about half fits in the pty buffer
        assert board.frames_dropped > 0
        after_flood = board.next_seq  # the first sequence number sent after the flood
        seen: list[int] = []
        wait_for(lambda: seen.extend(f.seq for f, _ in conn.poll()) or any(s >= after_flood for s in seen), timeout=20, what="a frame after the flood")
        lost = metric(registry, "shopfleet_hardware_frames_lost_total", board="shelf-a")
        # Only this connection may have read the pty: a second reader (once, a driver retrying the
        # dangling link of another test's unplugged board, whose freed pts number this board got)
        # flushes the buffer on opening and takes frames, which then count as lost, not dropped.
        assert board.commands == [Command(FrameType.HELLO_REQUEST)], "another program opened this board's pty"
        # a frame truncated by the full buffer swallows the next whole frame: at most one more
        assert board.frames_dropped <= lost <= board.frames_dropped + 1
    finally:
        conn.close()


def test_a_driver_retrying_an_unplugged_board_never_opens_a_pty_that_reuses_its_number(
    board: SimulatedBoard, running_driver, caplog: pytest.LogCaptureFixture
) -> None:
    """The cause of a flaky flood test: pty numbers are machine-wide and the kernel hands a freed one
    to the next pty opened anywhere. The link of an unplugged board goes away (as udev removes a
    by-id link), so the driver retrying it finds nothing, instead of another board on the old number."""
    caplog.set_level(logging.INFO, logger="hardware.driver")
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 4, what="readings")
    old_pty = board.pty_path
    board.unplug()
    wait_for(lambda: rd.of_type("board_disconnected"), what="the disconnect")
    assert not os.path.lexists(board.path)
    wait_for(lambda: not os.path.exists(old_pty), what="the driver to close the old pty, freeing its number")
    stranger = _board_on(old_pty)
    try:
        attempts = lambda: sum("board not available" in r.getMessage() for r in caplog.records)  # noqa: E731
        before = attempts()
        hijacked = lambda: bool(stranger.commands) or len(rd.of_type("board_connected")) > 1  # noqa: E731
        wait_for(lambda: attempts() >= before + 3 or hijacked(), what="three more attempts to reopen the board")
        assert stranger.commands == []  # nothing asked the stranger for its HELLO
        assert [s.board for s in rd.of_type("board_connected")] == ["shelf-a"]
    finally:
        stranger.stop()
    board.replug()
    wait_for(lambda: len(rd.of_type("board_connected")) == 2, what="the reconnect after the replug")


def _board_on(pty: str, timeout: float = 3.0) -> SimulatedBoard:
    """Start a board, on the given pty number if the kernel hands it out again within timeout (it
    reuses the lowest free number as soon as the old pty is released; another program on this
    machine may take it first, and then the board gets another number)."""
    deadline = time.monotonic() + timeout
    while True:
        b = SimulatedBoard("stranger")
        b.start()
        if b.pty_path == pty or time.monotonic() > deadline:
            return b
        b.stop()


def test_a_board_in_use_cannot_be_opened_a_second_time(board: SimulatedBoard) -> None:
    """Two programs reading one board would each get part of its frames; the second is refused."""
    conn = BoardConnection(board.path, DriverMetrics(CollectorRegistry()), DriverSettings(port=board.path))
    try:
        with pytest.raises(serial.SerialException, match="exclusively lock"):
            BoardConnection(board.path, DriverMetrics(CollectorRegistry()), DriverSettings(port=board.path))
        assert conn.wait_hello(5).board_id == "shelf-a"  # the first is undisturbed
    finally:
        conn.close()
    again = BoardConnection(board.path, DriverMetrics(CollectorRegistry()), DriverSettings(port=board.path))
    again.close()  # once closed, the port can be opened again


def test_a_burst_with_garbage_is_read_in_chunks_counted_by_reason_and_loses_no_frame() -> None:
    """The receive path at full speed: one write of HELLO, 600 READINGS and garbage of every kind
    between them, read in whatever chunks the pty returns. Every READINGS comes through in order,
    each garbage run is one rejection with its reason, and the frames counter is exact."""
    hello = Hello("burst", 1, 0, (ChannelInfo(0, ChannelKind.LOAD_CELL, Unit.DECIGRAM), ChannelInfo(1, ChannelKind.DOOR, Unit.STATE)))
    garbage = {
        "too_long": b"\x55" * (MAX_ENCODED + 40) + b"\x00",
        "cobs": b"\x05\x01\x00",
        "crc": b"\x07\x01\x02\x03\x04\x05\x06\x00",
        "empty": b"\x00",
    }
    kinds = list(garbage)
    stream = encode_message(hello, 0)
    for i in range(1, 601):
        stream += encode_message(Readings(i * 10, (ChannelValue(i), ChannelValue(i % 2))), i)
        if i % 50 == 0:
            stream += garbage[kinds[(i // 50) % len(kinds)]]
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        registry = CollectorRegistry()
        conn = BoardConnection(path, DriverMetrics(registry), DriverSettings(port=path))
        writer = threading.Thread(target=_write_all, args=(master, stream), daemon=True)
        writer.start()
        got: list[tuple[int, object]] = []
        wait_for(lambda: got.extend((f.seq, m) for f, m in conn.poll()) or len(got) >= 601, timeout=20, what="601 frames")
        writer.join(5)
        conn.close()
    finally:
        os.close(master)
        os.close(slave)
    assert got[0] == (0, hello)
    assert [seq for seq, _ in got[1:]] == list(range(1, 601))
    assert [m.values[0].value for _, m in got[1:]] == list(range(1, 601))  # type: ignore[attr-defined]
    assert metric(registry, "shopfleet_hardware_frames_total", board="burst") == 601
    assert metric(registry, "shopfleet_hardware_frames_lost_total", board="burst") == 0
    for reason in kinds:
        assert metric(registry, "shopfleet_hardware_frames_rejected_total", reason=reason) == 3, reason


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:4096]) :]


def test_board_reboot_restarts_the_sequence_without_counting_loss(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 10, what="readings")
    board.reboot()
    wait_for(lambda: metric(rd.registry, "shopfleet_hardware_board_reboots_total", board="shelf-a") == 1, what="the reboot")
    before = len(rd.of_type("reading"))
    wait_for(lambda: len(rd.of_type("reading")) >= before + 8, what="readings after the reboot")
    assert metric(rd.registry, "shopfleet_hardware_frames_lost_total", board="shelf-a") == 0
    assert len(rd.of_type("board_connected")) == 2  # the boot HELLO is announced again


def test_unplug_and_replug_reconnects_with_backoff_and_events_continue(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 10, what="readings")
    old_pty = board.pty_path
    board.unplug()
    wait_for(lambda: rd.of_type("board_disconnected"), what="the disconnect")
    assert not os.path.exists(board.path)  # the by-id link is gone while unplugged
    new_path = board.replug()  # the kernel may hand out the same pts number again
    assert new_path == board.path and os.path.realpath(new_path) == board.pty_path and old_pty
    wait_for(lambda: len(rd.of_type("board_connected")) == 2, what="the reconnect")
    wait_for(lambda: rd.of_type("reading")[-1].board_time < 1.0, what="readings of the new boot")
    settled(rd)
    board.pick(1, 3, 50)
    wait_for(lambda: rd.of_type("shelf_change"), what="a pick after the replug")
    assert [(e.slot, e.quantity) for e in rd.of_type("shelf_change")] == [("A2", -3)]
    assert sum(
        s.value for m in rd.registry.collect() if m.name == "shopfleet_hardware_reconnects" for s in m.samples if s.name.endswith("_total")
    ) == 1


def test_tare_and_calibrate_through_the_driver(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: rd.of_type("board_connected"), what="HELLO")
    board.set_value(0, 0)
    assert rd.driver.request(Command(FrameType.TARE, 0)).result(5).status == AckStatus.OK
    assert rd.driver.request(Command(FrameType.PING)).result(5).status == AckStatus.OK
    board.set_value(0, 1000)
    ack = rd.driver.request(Command(FrameType.CALIBRATE, 0, 10000)).result(5)
    assert ack.status == AckStatus.OK
    t = rd.of_type("reading")[-1].board_time
    wait_for(lambda: rd.of_type("reading")[-1].board_time > t + 1.0, what="settled readings after calibration")
    last = [r for r in rd.of_type("reading") if r.channel == 0][-1]
    assert abs(last.value - 1000) < 10
    with pytest.raises(CommandRejected, match="BAD_ARGUMENT") as caught:
        rd.driver.request(Command(FrameType.CALIBRATE, 2, 10000)).result(5)
    # Sending the same command again would be rejected the same way.
    assert isinstance(caught.value, PermanentError) and not isinstance(caught.value, TemporaryError)


def test_a_port_that_never_says_hello_times_out_with_a_hint() -> None:
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        conn = BoardConnection(path, DriverMetrics(CollectorRegistry()), DriverSettings(port=path))
        with pytest.raises(SensorTimeout, match="no HELLO .* shopfleet board") as caught:
            conn.wait_hello(0.5)
        # A silent board is worth retrying: the shared retry class says so, with a metric label.
        assert isinstance(caught.value, TemporaryError)
        assert caught.value.reason == "timeout"
        conn.close()
    finally:
        os.close(master)
        os.close(slave)


def test_missing_port_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PortNotFound, match="plugged in") as caught:
        resolve_port(DriverSettings(port=str(tmp_path / "nope")))
    assert isinstance(caught.value, TemporaryError) and caught.value.reason == "port_not_found"
    with pytest.raises(PortNotFound, match="2341:0043"):
        resolve_port(DriverSettings(usb_ids=("2341:0043",)))  # no USB boards on a test machine


@pytest.mark.parametrize("bad", ["2341", "zzzz:0001", "2341:43"], ids=["no-pid", "not-hex", "short-pid"])
def test_usb_ids_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="VID:PID"):
        DriverSettings(usb_ids=(bad,))


def test_metrics_use_conventional_names(board: SimulatedBoard, running_driver) -> None:
    rd = running_driver(DriverSettings(port=board.path, **FAST))
    wait_for(lambda: len(rd.of_type("reading")) >= 4, what="readings")
    text = generate_latest(rd.registry).decode()
    for name in ("shopfleet_hardware_frames_total", "shopfleet_hardware_last_reading_age_seconds"):
        assert name in text
