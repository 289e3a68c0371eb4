"""Benchmark: frames per second the serial codec and the driver sustain, against the line rate.

Figures, all measured in the same run:

* codec: encode + parse + decode of a 4-channel READINGS frame in a loop (pure CPU), and the
  receive side alone on a recorded stream: the reference (``FrameReceiver.receive``, a frame
  and a message object per frame) against the batch decoder (``receive_batch``);
* driver: the whole host path (pyserial read from a real pty, COBS split, CRC, decode,
  sequence tracking, readings in physical units, stability detector and events) while a child
  process writes frames into the pty as fast as the pty accepts them. The output callback
  only counts what it gets (the consumer's own work, e.g. JSON lines, is not the driver's);
* reference driver: the same, through the driver's reference path (frame and message objects,
  a checked Reading per channel fed one by one to the state machines: the code before the
  batch fast path), so ``speedup`` is the fast path against it on the same machine and load;
* bare read: a pyserial loop that reads the same stream from the same kind of pty and only
  counts delimiters: what the pty and the writer can deliver at all, so ``driver / bare``
  says how much of the transport the host path uses.

The scale is the line rate: how many such frames a 115200-baud line carries per second (10
bits per byte on the wire); ``ratio`` is the driver's multiple of it (the target is 100x). The
driver's CPU per frame (process CPU time over frames, this process only: the writer is a
child) times the line rate is the share of one core a board sending at full line rate costs;
its inverse, ``cpu_capacity_ratio``, is the multiple of the line rate one free core would
sustain, which varies less than the wall-clock rate on a machine shared with other work.
The load average is printed with the figures (the machine may be shared). Last line: a JSON summary.

Usage: .venv/bin/python bench/serial.py [--frames N] [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

# This file is named serial.py, so its own directory must not shadow pyserial's ``serial``.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import serial  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from hardware.driver import (  # noqa: E402
    BoardConnection,
    Driver,
    DriverMetrics,
    DriverSettings,
    FrameReceiver,
    Output,
)
from hardware.events import Reading  # noqa: E402
from hardware.frames import (  # noqa: E402
    ChannelInfo,
    ChannelKind,
    ChannelValue,
    Hello,
    Readings,
    SensorFrame,
    Unit,
    decode_message,
    encode_message,
)
from hardware.planogram import Planogram, Slot  # noqa: E402

BAUD = 115200
BITS_PER_BYTE = 10  # start + 8 data + stop
HELLO = Hello(
    "bench-board",
    1,
    0,
    (
        ChannelInfo(0, ChannelKind.LOAD_CELL, Unit.DECIGRAM),
        ChannelInfo(1, ChannelKind.LOAD_CELL, Unit.DECIGRAM),
        ChannelInfo(2, ChannelKind.DOOR, Unit.STATE),
        ChannelInfo(3, ChannelKind.TEMPERATURE, Unit.CENTI_CELSIUS),
    ),
)

WRITER = r"""
import os, sys
fd = int(sys.argv[1]); data = sys.stdin.buffer.read()
os.set_blocking(fd, True)
view = memoryview(data)
while view:
    n = os.write(fd, view[:4096])
    view = view[n:]
"""


def sample(i: int) -> Readings:
    """Return the i-th reading: a noisy shelf with a pick or put-back every 2 s of board time, so the detector works."""
    grams_dg = 34500 - 3450 * ((i // 200) % 3) + (i * 7919) % 31 - 15
    return Readings(i * 10, (ChannelValue(grams_dg), ChannelValue(10000), ChannelValue((i // 400) % 2), ChannelValue(412)))


def bench_codec(seconds: float) -> float:
    """Return frames/s of encode + parse + decode."""
    msgs = [sample(i) for i in range(256)]
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i, m in enumerate(msgs):
            decode_message(SensorFrame.parse(encode_message(m, i)))
        n += len(msgs)
    return n / (time.perf_counter() - start)


class ReferenceDriver(Driver):
    """The driver on its reference path: every frame a SensorFrame and a Readings object, every
    reading a checked Reading fed to the processor on its own (what the driver did before the
    batch fast path; it still takes messages a command wait kept aside this way)."""

    def _serve(self, conn: BoardConnection, stop: threading.Event, emit: Callable[[Output], None]) -> None:
        hello = conn.wait_hello(self.settings.hello_timeout_s)
        self._announce(conn, hello, emit)
        while not stop.is_set():
            self._run_commands(conn)
            hello = self._dispatch(conn, hello, list(conn.poll()), emit)


def bench_receive(frames: int, repeat: int = 3) -> tuple[float, float]:
    """Return CPU seconds per frame of (reference receive, batch receive) over a recorded stream in 4095-byte reads."""
    stream = bench_stream(frames)
    chunks = [stream[i : i + 4095] for i in range(0, len(stream), 4095)]
    best = [float("inf"), float("inf")]
    for _ in range(repeat):  # interleaved, so a change of load hits both
        for k, batch in enumerate((False, True)):
            rx = FrameReceiver("bench", DriverMetrics(CollectorRegistry()))
            t0 = time.process_time()
            for c in chunks:
                rx.receive_batch(c) if batch else rx.receive(c)
            best[k] = min(best[k], (time.process_time() - t0) / frames)
    return best[0], best[1]


def bench_stream(frames: int) -> bytes:
    """Return HELLO followed by frames READINGS, as a board sends them."""
    return encode_message(HELLO, 0) + b"".join(encode_message(sample(i), (i + 1) & 0xFFFF) for i in range(frames))


def start_writer(master: int, stream: bytes) -> subprocess.Popen[bytes]:
    """Start the child that pushes stream into the pty master as fast as it is read."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(master)], stdin=subprocess.PIPE, pass_fds=(master,))
    assert writer.stdin is not None
    writer.stdin.write(stream)
    writer.stdin.close()
    return writer


def bench_bare(frames: int) -> float:
    """Return frames/s of a bare pyserial reader draining the driver's stream from a pty (the reference)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    stream = bench_stream(frames)
    port = serial.Serial(os.ttyname(slave), 115200, timeout=0.05)
    try:
        t0 = time.perf_counter()
        writer = start_writer(master, stream)
        seen, deadline = 0, t0 + 300
        while seen < frames + 1 and time.perf_counter() < deadline:
            seen += port.read(max(1, port.in_waiting)).count(b"\x00")
        elapsed = time.perf_counter() - t0
        writer.wait(10)
    finally:
        port.close()
        os.close(master)
        os.close(slave)
    if seen < frames + 1:
        raise SystemExit(f"the bare reader got only {seen} of {frames + 1} frames in 300 s")
    return frames / elapsed


def bench_driver(frames: int, driver_class: type[Driver] = Driver) -> tuple[float, float, int]:
    """Return (frames/s, CPU seconds per frame, events) of the driver reading a flooded pty."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    stream = bench_stream(frames)
    planogram = Planogram(slots=(Slot(board="bench-board", channel=0, slot="A1", product="cola", unit_weight_g=345),))
    registry = CollectorRegistry()
    driver = driver_class(DriverSettings(port=path, hello_timeout_s=10), registry, planogram)
    stop = threading.Event()
    counts = {"readings": 0, "events": 0}

    def emit(item) -> None:
        if type(item) is Reading:
            counts["readings"] += 1
            if counts["readings"] >= frames * 4:
                stop.set()
        elif item.type not in ("board_connected", "board_disconnected"):
            counts["events"] += 1

    thread = threading.Thread(target=driver.run, args=(stop, emit), daemon=True)
    thread.start()
    # Wait until the driver has opened the port (which flushes it) and asked for HELLO.
    ready, _, _ = select.select([master], [], [], 10)
    if not ready:
        raise SystemExit("the driver did not open the pty within 10 s")
    os.read(master, 64)
    cpu0, t0 = time.process_time(), time.perf_counter()
    writer = start_writer(master, stream)
    if not stop.wait(300):
        raise SystemExit(f"driver got only {counts['readings']} of {frames * 4} readings in 300 s")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    thread.join(5)
    writer.wait(10)
    os.close(master)
    os.close(slave)
    lost = registry.get_sample_value("shopfleet_hardware_frames_lost_total", {"board": "bench-board"}) or 0
    if lost:
        raise SystemExit(f"{lost} frames lost: the pty writer should block, not drop")
    return frames / elapsed, cpu / frames, counts["events"]


def main() -> None:
    """Run the benchmarks and print figures and the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000, help="frames pushed through the driver (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the codec loop (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two drivers; the best of each counts (default: %(default)s)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    frame_bytes = len(encode_message(sample(0), 1))
    line_rate = BAUD / BITS_PER_BYTE / frame_bytes
    print(f"frame: 4-channel READINGS, {frame_bytes} bytes on the wire; 115200-baud line rate: {line_rate:.0f} frames/s")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    codec = bench_codec(args.seconds)
    print(f"codec (encode+parse+decode): {codec:,.0f} frames/s = {codec / line_rate:.1f}x the line rate")
    rx_ref, rx_batch = bench_receive(args.frames)
    print(f"receive (split, COBS, CRC, decode, sequence): reference {rx_ref * 1e6:.2f} us/frame, batch {rx_batch * 1e6:.2f} us/frame"
          f" ({rx_ref / rx_batch:.1f}x)")
    print(f"bare read (reference): pushing {args.frames} frames through a pty ...", flush=True)
    bare = bench_bare(args.frames)
    print(f"bare read (pty -> pyserial -> count delimiters): {bare:,.0f} frames/s = {bare / line_rate:.1f}x the line rate")
    # The two drivers alternate, best of --rounds each, so a change of the machine's load during
    # the run does not favour the one that happened to run at the quieter moment.
    ref_fps, ref_cpu, fps, cpu_per_frame = 0.0, float("inf"), 0.0, float("inf")
    ref_events = events = -1
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}: reference driver (frame, message and Reading objects), {args.frames} frames through a pty ...", flush=True)
        r_fps, r_cpu, ref_events = bench_driver(args.frames, ReferenceDriver)
        print(f"  {r_fps:,.0f} frames/s = {r_fps / line_rate:.1f}x the line rate; {r_cpu * 1e6:.1f} us CPU per frame; {ref_events} events")
        print(f"round {round_}: driver, {args.frames} frames through a pty ...", flush=True)
        f_fps, f_cpu, events = bench_driver(args.frames)
        print(f"  {f_fps:,.0f} frames/s = {f_fps / line_rate:.1f}x the line rate; {f_cpu * 1e6:.1f} us CPU per frame; {events} events")
        ref_fps, ref_cpu, fps, cpu_per_frame = max(ref_fps, r_fps), min(ref_cpu, r_cpu), max(fps, f_fps), min(cpu_per_frame, f_cpu)
    print(f"reference driver (best of {args.rounds}): {ref_fps:,.0f} frames/s = {ref_fps / line_rate:.1f}x the line rate;"
          f" {ref_cpu * 1e6:.1f} us CPU per frame")
    if events != ref_events:
        raise SystemExit(f"the driver emitted {events} events, the reference driver {ref_events}")
    share = cpu_per_frame * line_rate
    load_after = os.getloadavg()[0]
    print(f"driver (pty -> readings -> events, best of {args.rounds}): {fps:,.0f} frames/s = {fps / line_rate:.1f}x the line rate; {events} events")
    print(f"driver CPU per frame: {cpu_per_frame * 1e6:.1f} us; CPU share at line rate: {share:.1%} of one core"
          f" (one free core: {1 / share:.0f}x the line rate)")
    print(f"speedup against the reference driver: {ref_cpu / cpu_per_frame:.1f}x CPU per frame, {fps / ref_fps:.1f}x frames/s")
    print(f"driver / bare read: {fps / bare:.2f}; driver / codec: {fps / codec:.2f}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}")
    print(json.dumps({
        "frames_per_s": round(fps, 1),
        "codec_frames_per_s": round(codec, 1),
        "bare_read_frames_per_s": round(bare, 1),
        "reference_frames_per_s": round(ref_fps, 1),
        "line_rate_frames_per_s": round(line_rate, 1),
        "ratio": round(fps / line_rate, 2),
        "reference_ratio": round(ref_fps / line_rate, 2),
        "codec_ratio": round(codec / line_rate, 2),
        "ratio_to_bare_read": round(fps / bare, 3),
        "cpu_us_per_frame": round(cpu_per_frame * 1e6, 2),
        "reference_cpu_us_per_frame": round(ref_cpu * 1e6, 2),
        "speedup_cpu": round(ref_cpu / cpu_per_frame, 2),
        "receive_us_per_frame": round(rx_batch * 1e6, 2),
        "reference_receive_us_per_frame": round(rx_ref * 1e6, 2),
        "cpu_share_at_line_rate": round(share, 4),
        "cpu_capacity_ratio": round(1 / share, 1),
        "events": events,
        "frame_bytes": frame_bytes,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "machine": f"{os.cpu_count()} cores {os.uname().machine}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
