"""Virtual sensor boards that speak the serial protocol on real pseudo-terminals.

A :class:`SimulatedBoard` behaves like the firmware in ``hardware/firmware`` seen from the
host: it sends HELLO at boot, READINGS at its own rate with a sequence number, answers PING,
TARE, CALIBRATE, SET_RATE and HELLO_REQUEST with ACKs, and keeps its calibration in an
"EEPROM" dict that survives reboots and replugs. Its load cells have noise, drift and the
transient of a hand on the shelf, so the driver and the stability detector are exercised as by
a real shelf. Because it sits on a pty, the driver under test opens a real serial device
through pyserial, exactly as it opens ``/dev/ttyACM0``.

Cable faults are modelled at the pty: :meth:`unplug` removes the board's ``link`` (if it was
given one) and closes the master side (the driver's reads fail like a vanished USB device), and
:meth:`replug` creates a new pty and points the link at it again, the way udev removes and
re-creates ``/dev/serial/by-id/...``. When the driver stops reading, the pty buffer fills and frames are
dropped, as a flooding board loses bytes; the sequence numbers then show the gap.

Used as a library by tests and the demo (``SimulatedBoard(...).start() -> pty path``,
``.stop()``) and by ``shopfleet hw simulate``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import select
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hardware.frames import (
    Ack,
    AckStatus,
    ChannelInfo,
    ChannelKind,
    ChannelValue,
    Command,
    FrameError,
    FrameSplitter,
    FrameType,
    Hello,
    Readings,
    SensorFrame,
    Unit,
    ValueStatus,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)

COUNTS_PER_G = 420.0
"""Raw HX711 counts per gram of the simulated load cells (a 5 kg cell at gain 128 is close)."""
RAW_ZERO = 84_000
"""Raw counts of an empty simulated load cell."""
TRANSIENT_S = 0.4
"""How long a hand on the shelf disturbs the weight when an item is taken or put back."""

_UNITS = {"load_cell": Unit.DECIGRAM, "door": Unit.STATE, "temperature": Unit.CENTI_CELSIUS}
_KINDS = {"load_cell": ChannelKind.LOAD_CELL, "door": ChannelKind.DOOR, "temperature": ChannelKind.TEMPERATURE}


@dataclass
class _Channel:
    kind: str
    value: float = 0.0  # true grams on the cell, door 0/1, degC
    previous: float = 0.0
    changed_at: float = -1e9
    drift_g_per_s: float = 0.0
    drift_g: float = 0.0
    missing: bool = False


@dataclass
class _Calibration:
    offset: float = RAW_ZERO
    scale: float = COUNTS_PER_G


@dataclass
class SimulatedBoard:
    """A virtual sensor board on a pseudo-terminal."""

    board_id: str = "sim-1"
    channels: Sequence[str] = ("load_cell", "load_cell", "door", "temperature")
    interval_ms: int = 100
    noise_g: float = 2.0
    seed: int = 0
    link: Path | None = None
    firmware: tuple[int, int] = (1, 0)
    eeprom: dict[int, _Calibration] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        for kind in self.channels:
            if kind not in _KINDS:
                raise ValueError(f"unknown channel kind {kind!r}: use one of {sorted(_KINDS)}")
        self._hello = Hello(
            self.board_id,
            *self.firmware,
            tuple(ChannelInfo(i, _KINDS[k], _UNITS[k]) for i, k in enumerate(self.channels)),
        )
        self._rng = random.Random(self.seed)
        self._ch = [_Channel(k, 4.0 if k == "temperature" else 0.0) for k in self.channels]
        self._lock = threading.RLock()
        self._master: int | None = None
        self._slave: int | None = None
        self._path = ""
        self._seq = 0
        self._booted_at = 0.0
        self._drop_next = 0
        self._garbage = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self.commands: list[Command] = []

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Return the path the host should open: the link if one was given, else the pty."""
        return str(self.link) if self.link else self._path

    @property
    def next_seq(self) -> int:
        """Return the sequence number of the board's next frame."""
        return self._seq

    @property
    def pty_path(self) -> str:
        """Return the current pty's own path (changes on every replug)."""
        return self._path

    def start(self) -> str:
        """Plug the board in and start it; return the path to open."""
        self._stop.clear()
        self._plug()
        self._thread = threading.Thread(target=self._loop, name=f"simboard-{self.board_id}", daemon=True)
        self._thread.start()
        return self.path

    def stop(self) -> None:
        """Stop the board and close its pty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.unplug()

    def unplug(self) -> None:
        """Pull the cable: remove the link (as udev removes a vanished device's by-id link) and close
        the pty, so the host's reads fail.

        The link must not be left dangling: pty numbers are shared by the whole machine and the
        kernel hands a freed one to the next pty opened anywhere, so a driver retrying a dangling
        link would open that stranger's pty, flush its input and read its frames.
        """
        with self._lock:
            if self.link is not None and self.link.is_symlink() and os.readlink(self.link) == self._path:
                self.link.unlink()
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = None

    def replug(self) -> str:
        """Plug the cable back in: a new pty (and re-pointed link); the board boots again."""
        with self._lock:
            if self._stop.is_set():
                return self.path  # stopped meanwhile (a scheduled replug): stay unplugged
            self.unplug()
            self._plug()
        return self.path

    def reboot(self) -> None:
        """Restart the board's firmware without unplugging: sequence and uptime restart at 0."""
        with self._lock:
            self._boot()

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._path = os.ttyname(slave)
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self._path)
            tmp.replace(self.link)
        self._boot()

    def _boot(self) -> None:
        self._seq = 0
        self._booted_at = self.clock()
        self._send(encode_message(self._hello, self._next_seq()))

    # -- scripted activity -------------------------------------------------------------------
    def set_value(self, channel: int, value: float) -> None:
        """Set a channel's true value (grams on the cell, door 0/1, degC); load cells get a transient."""
        with self._lock:
            ch = self._ch[channel]
            ch.previous = self._true(ch, self.clock())
            ch.value = value
            ch.changed_at = self.clock()

    def weight(self, channel: int) -> float:
        """Return the true settled grams on a load cell (without noise, with drift)."""
        ch = self._ch[channel]
        return ch.value + ch.drift_g

    def pick(self, channel: int, count: int, unit_weight_g: float) -> None:
        """Take count items of unit_weight_g from a load cell."""
        self.set_value(channel, self._ch[channel].value - count * unit_weight_g)

    def put_back(self, channel: int, count: int, unit_weight_g: float) -> None:
        """Put count items of unit_weight_g back on a load cell."""
        self.set_value(channel, self._ch[channel].value + count * unit_weight_g)

    def set_door(self, is_open: bool, channel: int | None = None) -> None:
        """Open or close the door contact (the first door channel by default)."""
        self.set_value(self.channels.index("door") if channel is None else channel, 1.0 if is_open else 0.0)

    def set_drift(self, channel: int, g_per_s: float) -> None:
        """Let a load cell drift by g_per_s grams per second (creep, temperature)."""
        with self._lock:
            self._ch[channel].drift_g_per_s = g_per_s

    def set_missing(self, channel: int, missing: bool) -> None:
        """Make a sensor stop answering (status MISSING) or come back."""
        with self._lock:
            self._ch[channel].missing = missing

    def drop_next(self, frames: int) -> None:
        """Lose the next frames on the line (their sequence numbers are used up)."""
        with self._lock:
            self._drop_next += frames

    def flood(self, frames: int) -> None:
        """Send frames READINGS frames back to back, as a board stuck in a tight loop would."""
        with self._lock:
            now = self.clock()
            for _ in range(frames):
                self._send(encode_message(self._sample(now, 0.0), self._next_seq()))

    def inject(self, garbage: bytes) -> None:
        """Put raw bytes on the line before the next frame (noise, a half frame)."""
        with self._lock:
            self._garbage += garbage

    # -- the board's loop --------------------------------------------------------------------
    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        return s

    def _send(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            if os.write(self._master, data) < len(data):
                self.frames_dropped += 1  # truncated by a full buffer: the host sees a damaged frame
            else:
                self.frames_sent += 1
        except BlockingIOError:
            self.frames_dropped += 1  # the host is not reading: like a full USB buffer
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise

    def _true(self, ch: _Channel, now: float) -> float:
        if ch.kind != "load_cell":
            return ch.value
        t = now - ch.changed_at
        if 0 <= t < TRANSIENT_S:
            step = ch.value - ch.previous
            frac = t / TRANSIENT_S
            return ch.previous + step * frac + 0.3 * abs(step) * math.sin(math.pi * frac) + ch.drift_g
        return ch.value + ch.drift_g

    def _sample(self, now: float, dt: float) -> Readings:
        values = []
        for i, ch in enumerate(self._ch):
            ch.drift_g += ch.drift_g_per_s * dt
            if ch.missing:
                values.append(ChannelValue(0, ValueStatus.MISSING))
            elif ch.kind == "load_cell":
                raw = (self._true(ch, now) + self._rng.gauss(0, self.noise_g)) * COUNTS_PER_G + RAW_ZERO
                cal = self.eeprom.setdefault(i, _Calibration())
                values.append(ChannelValue(round((raw - cal.offset) / cal.scale * 10)))
            elif ch.kind == "door":
                values.append(ChannelValue(int(ch.value)))
            else:
                values.append(ChannelValue(round((ch.value + self._rng.gauss(0, 0.02)) * 100)))
        return Readings(int((now - self._booted_at) * 1000) & 0xFFFFFFFF, tuple(values))

    def _handle(self, raw: bytes) -> None:
        try:
            frame = SensorFrame.parse(raw)
            cmd = decode_message(frame)
        except FrameError as exc:
            log.debug("simulated board %s ignores a bad command frame: %s", self.board_id, exc)
            return
        if not isinstance(cmd, Command):
            return
        self.commands.append(cmd)
        status, value = AckStatus.OK, 0
        if cmd.type == FrameType.HELLO_REQUEST:
            self._send(encode_message(self._hello, self._next_seq()))
        elif cmd.type == FrameType.SET_RATE:
            self.interval_ms = cmd.value
            value = cmd.value
        elif cmd.type in (FrameType.TARE, FrameType.CALIBRATE):
            if cmd.channel >= len(self._ch) or self._ch[cmd.channel].kind != "load_cell":
                status = AckStatus.BAD_ARGUMENT
            else:
                # The firmware averages 8 conversions; model that as the settled weight.
                counts = self.weight(cmd.channel) * COUNTS_PER_G + RAW_ZERO
                cal = self.eeprom.setdefault(cmd.channel, _Calibration())
                if cmd.type == FrameType.TARE:
                    cal.offset = counts
                elif cmd.value <= 0 or counts - cal.offset < 100:
                    status = AckStatus.BAD_ARGUMENT  # no mass on the cell, or a nonsense mass
                else:
                    cal.scale = (counts - cal.offset) / (cmd.value / 10)
                    value = round(cal.scale)
        elif cmd.type != FrameType.PING:
            status = AckStatus.UNKNOWN_COMMAND
        self._send(encode_message(Ack(frame.seq, status, value), self._next_seq()))

    def _loop(self) -> None:
        splitter = FrameSplitter()
        last = next_tick = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now >= next_tick:
                with self._lock:
                    sample = self._sample(now, now - last)
                    seq = self._next_seq()
                    if self._garbage:
                        self._send(self._garbage)
                        self._garbage = b""
                    if self._drop_next:
                        self._drop_next -= 1
                    else:
                        self._send(encode_message(sample, seq))
                last = now
                next_tick += self.interval_ms / 1000
                if now - next_tick > 1.0:
                    next_tick = now  # fell far behind (suspended): do not burst
            with self._lock:
                master = self._master
            if master is None:
                self._stop.wait(0.02)
                continue
            try:
                ready, _, _ = select.select([master], [], [], max(0.0, min(next_tick - self.clock(), 0.05)))
                data = os.read(master, 4096) if ready else b""
            except (OSError, ValueError):
                data = b""  # unplugged meanwhile, or the host has not opened the port yet
                self._stop.wait(0.01)
            for item in splitter.feed(data):
                if isinstance(item, bytes):
                    with self._lock:
                        self._handle(item)
