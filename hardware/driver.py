"""The host side of a sensor board: find it, keep talking to it, turn its frames into events.

Shaped by what goes wrong with USB serial boards in a shop:

* **Ports move.** A board is found by an explicit path (a ``/dev/serial/by-id/...`` link, which
  udev re-points when the board comes back) or by USB VID:PID, and is only trusted once it
  says HELLO with its id and sensor inventory.
* **Cables get pulled.** Any read or write failure closes the port; the driver re-resolves the
  path and reopens it with exponential backoff, counting reconnects.
* **Lines carry garbage.** Bytes are cut into frames at the COBS delimiter; a bad frame is
  counted by reason (Prometheus) and dropped, and the next delimiter resynchronises.
* **Boards reboot and lose frames.** Sequence numbers reveal lost frames (counted); a HELLO with
  sequence 0 or an uptime that went backwards is a reboot (counted, not a loss).

:class:`FrameReceiver` turns received bytes into counted messages (a reference path of objects
and a batch fast path of rows for the common READINGS); :class:`BoardConnection` is one open
port used from one thread; :class:`Driver` is the loop that owns connections, reconnects and
feeds :class:`~hardware.events.BoardProcessor`. Its
output goes to a callback, so the CLI prints JSON lines and the edge agent's pipeline forwards
to its outbox with the same code. Metrics live on a registry passed in (so tests pass a private one).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import queue
import struct
import threading
import time
from binascii import crc_hqx
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import serial
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hardware.events import BoardProcessor, Event, Reading, TemperatureSettings
from hardware.frames import (
    HEADER,
    PROTOCOL_VERSION,
    READINGS_ROW,
    UNIT_NAME,
    UNIT_SCALE,
    Ack,
    AckStatus,
    ChannelKind,
    ChannelValue,
    Command,
    FrameError,
    FrameSplitter,
    FrameType,
    Hello,
    Readings,
    SensorFrame,
    ValueStatus,
    cobs_skeleton,
    decode_message,
    encode_message,
)
from hardware.planogram import Planogram
from hardware.stability import StabilitySettings
from shopfleet.errors import PermanentError, ShopfleetError, TemporaryError

log = logging.getLogger(__name__)

DEFAULT_USB_IDS = ("2341:0043", "2341:0001", "2341:0243", "2a03:0043", "1a86:7523", "0403:6001")
"""VID:PID of Arduino Uno/Nano boards and their common USB-serial chips (CH340, FT232)."""

DRIVER_REJECT_REASONS = ("no_hello", "channel_mismatch", "unexpected_type")
"""Reasons a valid frame is dropped, besides the codec's (hardware.frames.REJECT_REASONS)."""

_OK = ValueStatus.OK  # an Enum member looked up once: ValueStatus.OK costs ~70 ns per access
_READINGS = int(FrameType.READINGS)
_MAX_STATUS = max(int(s) for s in ValueStatus)
_STATUS_NAME = {int(s): s.name.lower() for s in ValueStatus}
_KIND_NAME = {ChannelKind.LOAD_CELL: "load_cell", ChannelKind.DOOR: "door", ChannelKind.TEMPERATURE: "temperature"}


class BoardError(ShopfleetError):
    """Base of driver errors; retry semantics come from the shared classes in :mod:`shopfleet.errors`."""

    default_reason = "board"


class TemporaryBoardError(BoardError, TemporaryError):
    """Retry after a delay: the port vanished, the board did not answer in time."""

    default_reason = "io"


class PortNotFound(TemporaryBoardError):
    """No port matches the configured path or USB ids (the board is unplugged)."""

    default_reason = "port_not_found"


class SensorTimeout(TemporaryBoardError):
    """The board did not send HELLO or an ACK in time."""

    default_reason = "timeout"


class CommandRejected(BoardError, PermanentError):
    """The board answered a command with an error status; do not retry unchanged."""

    default_reason = "rejected"

    def __init__(self, cmd: Command, ack: Ack) -> None:
        super().__init__(f"board rejected {cmd.type.name} on channel {cmd.channel}: {ack.status.name}")
        self.ack = ack


class DriverSettings(BaseModel):
    """How to find a board and judge its readings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    port: str | None = Field(
        None,
        description="Serial device or link to open, e.g. /dev/serial/by-id/usb-Arduino...-if00 (preferred: "
        "stable across replugs). Unset: discover by usb_ids.",
    )
    usb_ids: tuple[str, ...] = Field(DEFAULT_USB_IDS, description="USB VID:PID pairs (hex) tried when port is unset.")
    baudrate: int = Field(115200, description="Line speed; the firmware uses 115200.")
    hello_timeout_s: float = Field(
        5.0, gt=0, le=120, description="How long to wait for HELLO after opening. An Uno resets on open and boots in ~2 s; "
        "raise it for emulated boards.",
    )
    command_timeout_s: float = Field(2.0, gt=0, le=60, description="How long to wait for a command's ACK.")
    reconnect_min_s: float = Field(0.2, gt=0, le=60, description="First delay before reopening a lost port.")
    reconnect_max_s: float = Field(
        10.0, gt=0, le=600, description="Longest delay between reopen attempts. Lower recovers sooner; higher spares the log."
    )
    noise_g: float = Field(2.0, ge=0, description="Load-cell noise (1 sigma, grams); widens the quantity confidence.")
    stability: StabilitySettings = Field(default_factory=StabilitySettings, description="Stability detector tuning.")
    temperature: TemperatureSettings = Field(default_factory=TemperatureSettings, description="Temperature alert limits.")

    @field_validator("usb_ids")
    @classmethod
    def _ids(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            parts = item.split(":")
            if len(parts) != 2 or not all(len(p) == 4 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
                raise ValueError(f"usb id {item!r} must be VID:PID in hex, e.g. '2341:0043'")
        return v


class DriverMetrics:
    """Prometheus metrics of the serial driver, on a registry the caller owns."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self.frames = Counter("shopfleet_hardware_frames", "Valid frames received, by board.", ["board"], registry=registry)
        self.rejected = Counter(
            "shopfleet_hardware_frames_rejected", "Frames dropped, by reason (crc, cobs, too_long, no_hello...).", ["reason"], registry=registry
        )
        self.lost = Counter("shopfleet_hardware_frames_lost", "Frames missing from the sequence, by board.", ["board"], registry=registry)
        self.reconnects = Counter("shopfleet_hardware_reconnects", "Times a port was reopened after a failure.", ["port"], registry=registry)
        self.reboots = Counter("shopfleet_hardware_board_reboots", "Board reboots seen (sequence restart).", ["board"], registry=registry)
        self.events = Counter("shopfleet_hardware_events", "Events emitted, by type.", ["type"], registry=registry)
        self.sensor_errors = Counter(
            "shopfleet_hardware_sensor_errors", "Readings with a non-OK status, by board, channel and status.", ["board", "channel", "status"], registry=registry
        )
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def reading_seen(self, board: str, channel: int) -> None:
        """Note that a channel just delivered a reading."""
        self.channels_seen(((board, str(channel)),))

    def channels_seen(self, keys: tuple[tuple[str, str], ...]) -> None:
        """Note that the (board, channel) keys just delivered readings: one clock read and one lock per frame."""
        now = self._clock()
        with self._lock:
            for key in keys:
                self._last[key] = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the age of each channel's last reading (grows while a board is silent)."""
        g = GaugeMetricFamily(
            "shopfleet_hardware_last_reading_age_seconds", "Seconds since each channel's last reading.", labels=["board", "channel"]
        )
        now = self._clock()
        with self._lock:
            for (board, ch), t in sorted(self._last.items()):
                g.add_metric([board, ch], now - t)
        yield g

    def describe(self) -> list[Any]:
        """Return nothing, so registering does not call collect() early."""
        return []


@dataclass(frozen=True)
class BoardStatus:
    """A board came online (with its HELLO) or went away."""

    port: str
    state: Literal["connected", "disconnected"]
    board: str = ""
    firmware: str = ""
    channels: tuple[str, ...] = ()
    detail: str = ""
    at: float = 0.0

    @property
    def type(self) -> str:
        """Return the event type used in JSON output."""
        return "board_" + self.state

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a 'type' key."""
        return {"type": self.type, "port": self.port, "board": self.board, "firmware": self.firmware,
                "channels": list(self.channels), "detail": self.detail, "at": self.at}


Output = Reading | Event | BoardStatus


def discover_ports(usb_ids: tuple[str, ...] = DEFAULT_USB_IDS, by_id_dir: str = "/dev/serial/by-id") -> list[str]:
    """Return serial devices whose USB VID:PID is in usb_ids, by-id links first."""
    from serial.tools import list_ports

    wanted = {tuple(int(p, 16) for p in i.split(":")) for i in usb_ids}
    devices = [p.device for p in list_ports.comports() if p.vid is not None and (p.vid, p.pid) in wanted]
    links = [link for link in sorted(glob.glob(os.path.join(by_id_dir, "*"))) if os.path.realpath(link) in devices]
    return links + [d for d in devices if d not in {os.path.realpath(x) for x in links}]


def resolve_port(settings: DriverSettings) -> str:
    """Return the port to open now, or raise PortNotFound saying what to check."""
    if settings.port:
        if os.path.exists(settings.port):  # follows links: a dangling by-id link means unplugged
            return settings.port
        raise PortNotFound(f"{settings.port} does not exist: is the board plugged in? (check 'ls -l /dev/serial/by-id')")
    found = discover_ports(settings.usb_ids)
    if not found:
        raise PortNotFound(f"no serial device with USB id {', '.join(settings.usb_ids)}: plug a board in or set 'port'")
    return found[0]


@dataclass(frozen=True)
class ReadingsRun:
    """Consecutive READINGS frames of one board, decoded in one pass and kept as rows, not objects.

    Each row is ``(version, type, seq, uptime_ms, count, value0, status0, value1, status1, ...)``
    (:data:`hardware.frames.READINGS_ROW`), with ``count`` equal to the channels of ``hello``. The
    frames are already checked (COBS, CRC, version, type, count, statuses) and their sequence
    numbers tracked and counted; :meth:`messages` rebuilds what the reference path returns.
    """

    hello: Hello
    rows: list[tuple[int, ...]]

    def messages(self) -> list[tuple[SensorFrame, Readings]]:
        """Return the frames as (SensorFrame, Readings) pairs, equal to what :meth:`FrameReceiver.receive` returns."""
        out = []
        for row in self.rows:
            values = tuple(ChannelValue(v, ValueStatus(st)) for v, st in zip(row[5::2], row[6::2], strict=True))
            msg = Readings(row[3], values)
            body = encode_message(msg, row[2])  # the exact body: same fields, no trailing bytes
            out.append((SensorFrame.parse(body), msg))
        return out


Received = tuple[SensorFrame, Hello | Readings | Ack]
"""A valid frame and its message, as the reference receive path returns them."""


class FrameReceiver:
    """The receiving half of a board connection, without the port: bytes in, messages out, all counted.

    :meth:`receive` is the reference path: every frame parsed into a :class:`SensorFrame` and
    decoded into a message object. :meth:`receive_batch` returns the same frames with the same
    counting, but takes the common one, a READINGS of the announced shape after HELLO, through a
    batch decoder: its COBS code chain checked against the last frame of the same shape in one C
    call and decoded as one integer AND (:class:`~hardware.frames.CobsSkeleton`), CRC residue and
    one ``struct`` unpack, and consecutive ones gathered into a :class:`ReadingsRun` of rows.
    Anything else (another type or shape, a bad CRC, a version, an odd status, garbage) goes
    through the reference path, so rejections keep their reasons and details.
    """

    def __init__(self, port: str, metrics: DriverMetrics) -> None:
        self.port = port
        self.metrics = metrics
        self.hello: Hello | None = None
        self._splitter = FrameSplitter()
        self._last_seq: int | None = None
        self._last_uptime: int | None = None
        self._frames_counted: dict[str, Counter] = {}  # labelled children, so a frame costs no labels() lookup
        self._shape: tuple[Hello, int, struct.Struct] | None = None  # (HELLO, encoded length, row unpacker) of the fast path
        # (codes_of, codes, mask, decoded length) of a CobsSkeleton, by first code byte, for the current shape
        self._skeletons: dict[int, tuple[Callable[[bytes], Any], Any, int, int]] = {}
        self.rebooted = False

    def _reject(self, reason: str, detail: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.debug("port %s: dropped a frame (%s): %s", self.port, reason, detail)

    def receive(self, data: bytes) -> list[Received]:
        """Return the valid messages in data (with what earlier calls left incomplete), in order."""
        out: list[Received] = []
        hello = self.hello
        counted = 0  # READINGS of this board taken by the fast path, not yet added to its frames counter
        for item in self._splitter.feed(data):
            if type(item) is not bytes:
                self._reject(item.reason, item.detail)  # type: ignore[union-attr]
                continue
            try:
                frame = SensorFrame.parse(item)
                msg = decode_message(frame)
            except FrameError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            if type(msg) is Readings and hello is not None and self._last_seq is not None:
                counted += 1
                self._track_readings(hello.board_id, frame.seq, msg.uptime_ms)
                out.append((frame, msg))
                continue
            if counted:
                self._count_frames(hello.board_id, counted)  # type: ignore[union-attr]  # counted > 0 needs a hello
                counted = 0
            if isinstance(msg, Command):
                self._reject("unexpected_type", f"command {msg.type.name} sent by the board")
                continue
            self._track_sequence(frame, msg)
            if isinstance(msg, Hello):
                self.hello = hello = msg
            out.append((frame, msg))
        if counted:
            self._count_frames(hello.board_id, counted)  # type: ignore[union-attr]
        return out

    def receive_batch(self, data: bytes) -> list[Received | ReadingsRun]:
        """Return what :meth:`receive` would, with runs of ordinary READINGS as :class:`ReadingsRun` rows."""
        out: list[Received | ReadingsRun] = []
        rows: list[tuple[int, ...]] = []
        hello = self.hello
        shape = self._fast_shape()
        counted = 0
        skeletons = self._skeletons
        from_bytes = int.from_bytes
        version, readings, max_status = PROTOCOL_VERSION, _READINGS, _MAX_STATUS
        last_seq, last_uptime = self._last_seq, self._last_uptime  # in locals while on the fast path
        for item in self._splitter.feed(data):
            if shape is not None and type(item) is bytes and len(item) == shape[1]:
                # The fast path, all of it C calls but the few comparisons: a READINGS of the
                # announced shape. Whatever it does not accept goes on to the reference path below.
                sk = skeletons.get(item[0])
                if sk is None or sk[0](item) != sk[1]:
                    found = cobs_skeleton(item)
                    sk = None if found is None else (found.codes_of, found.codes, found.mask, found.length - 1)
                    if sk is not None:
                        skeletons[item[0]] = sk
                if sk is not None:
                    decoded = (from_bytes(item, "big") & sk[2]).to_bytes(sk[3], "big")
                    if not crc_hqx(decoded, 0xFFFF):
                        row = shape[2].unpack_from(decoded)
                        if row[0] == version and row[1] == readings and row[4] == shape[3] and max(row[6::2]) <= max_status:
                            # sequence tracking as _track_readings does it
                            seq, uptime = row[2], row[3]
                            if last_uptime is not None and uptime < last_uptime:
                                self._seq_restarted(shape[0].board_id, seq)
                            elif (seq - last_seq - 1) & 0xFFFF:  # _fast_shape checked it
                                self._seq_gap(shape[0].board_id, seq, (seq - last_seq - 1) & 0xFFFF)
                            last_seq, last_uptime = seq, uptime
                            rows.append(row)
                            counted += 1
                            continue
            self._last_seq, self._last_uptime = last_seq, last_uptime
            # The reference path, exactly as receive() takes a frame.
            if rows:
                out.append(ReadingsRun(shape[0], rows))  # type: ignore[index]
                rows = []
            if type(item) is not bytes:
                self._reject(item.reason, item.detail)  # type: ignore[union-attr]
                continue
            try:
                frame = SensorFrame.parse(item)
                msg = decode_message(frame)
            except FrameError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            if type(msg) is Readings and hello is not None and self._last_seq is not None:
                counted += 1
                self._track_readings(hello.board_id, frame.seq, msg.uptime_ms)
                last_seq, last_uptime = self._last_seq, self._last_uptime
                out.append((frame, msg))
                continue
            if counted:
                self._count_frames(hello.board_id, counted)  # type: ignore[union-attr]
                counted = 0
            if isinstance(msg, Command):
                self._reject("unexpected_type", f"command {msg.type.name} sent by the board")
                continue
            self._track_sequence(frame, msg)
            last_seq, last_uptime = self._last_seq, self._last_uptime
            if isinstance(msg, Hello):
                self.hello = hello = msg
            out.append((frame, msg))
            shape = self._fast_shape()
        self._last_seq, self._last_uptime = last_seq, last_uptime
        if rows:
            out.append(ReadingsRun(shape[0], rows))  # type: ignore[index]
        if counted:
            self._count_frames(hello.board_id, counted)  # type: ignore[union-attr]
        return out

    def _fast_shape(self) -> tuple[Hello, int, struct.Struct, int] | None:
        """Return (HELLO, encoded length, row unpacker, channels) of the READINGS the fast path takes, or None before HELLO."""
        hello = self.hello
        if hello is None or self._last_seq is None or not hello.channels:
            return None
        cached = self._shape
        if cached is None or cached[0] is not hello:
            n = len(hello.channels)
            if cached is None or len(cached[0].channels) != n:
                self._skeletons.clear()
            # payload (header 4, uptime 4, count 1, n x 5) + CRC 2, plus one COBS code byte (< 254 bytes)
            cached = self._shape = (hello, HEADER.size + 5 + 5 * n + 2 + 1, READINGS_ROW[n])
        return (*cached, len(hello.channels))

    def _count_frames(self, board: str, n: int) -> None:
        """Add n to the board's frames counter: once per read, not per frame (each inc takes a lock)."""
        counter = self._frames_counted.get(board)
        if counter is None:
            counter = self._frames_counted[board] = self.metrics.frames.labels(board)
        counter.inc(n)

    def _track_readings(self, board: str, seq: int, uptime_ms: int) -> None:
        """Sequence tracking of the common case, a READINGS frame after HELLO: the same checks as
        _track_sequence, with the frame counted by the caller in one batch per read."""
        if self._last_uptime is not None and uptime_ms < self._last_uptime:
            self._last_uptime = uptime_ms
            self._seq_restarted(board, seq)
        else:
            self._last_uptime = uptime_ms
            gap = (seq - self._last_seq - 1) & 0xFFFF  # type: ignore[operator]  # the caller checked it
            if gap:
                self._seq_gap(board, seq, gap)
        self._last_seq = seq

    def _seq_restarted(self, board: str, seq: int) -> None:
        self.metrics.reboots.labels(board).inc()
        self.rebooted = True
        log.warning("board %s on %s rebooted (sequence restarted at %d)", board, self.port, seq)

    def _seq_gap(self, board: str, seq: int, gap: int) -> None:
        self.metrics.lost.labels(board).inc(gap)
        log.warning("board %s on %s: %d frame(s) lost before seq %d", board, self.port, gap, seq)

    def _track_sequence(self, frame: SensorFrame, msg: Hello | Readings | Ack) -> None:
        board = self.hello.board_id if self.hello else (msg.board_id if isinstance(msg, Hello) else "unknown")
        self.metrics.frames.labels(board).inc()
        reboot = isinstance(msg, Hello) and frame.seq == 0 and self._last_seq is not None
        if isinstance(msg, Readings):
            if self._last_uptime is not None and msg.uptime_ms < self._last_uptime:
                reboot = True
            self._last_uptime = msg.uptime_ms
        if reboot:
            self._seq_restarted(board, frame.seq)
        elif self._last_seq is not None:
            gap = (frame.seq - self._last_seq - 1) & 0xFFFF
            if gap:
                self._seq_gap(board, frame.seq, gap)
        if isinstance(msg, Hello) and frame.seq == 0:
            self._last_uptime = None
        self._last_seq = frame.seq


class BoardConnection(FrameReceiver):
    """One open serial port to one board; use from one thread at a time.

    The port is opened exclusively (an advisory ``flock``, as pyserial's ``exclusive``): a second
    program reading the same board would silently take half of its frames (and flush its input
    on opening), so it gets a clear error instead.
    """

    def __init__(self, port: str, metrics: DriverMetrics, settings: DriverSettings) -> None:
        super().__init__(port, metrics)
        self.settings = settings
        self._serial = serial.Serial(port, settings.baudrate, timeout=0.05, write_timeout=1.0, exclusive=True)
        self._pending: list[Received] = []
        self._cmd_seq = 0

    def close(self) -> None:
        """Close the port (never raises)."""
        with contextlib.suppress(OSError, serial.SerialException):
            self._serial.close()

    def _read(self) -> bytes:
        try:
            return self._serial.read(max(1, self._serial.in_waiting))
        except (OSError, serial.SerialException) as exc:
            raise TemporaryBoardError(f"read from {self.port} failed: {exc}") from exc

    def poll(self) -> list[Received]:
        """Read what arrived (waiting up to ~50 ms) and return the valid messages, in order."""
        out, self._pending = self._pending, []
        out += self.receive(self._read())
        return out

    def poll_batch(self) -> list[Received | ReadingsRun]:
        """Like :meth:`poll`, with runs of ordinary READINGS as :class:`ReadingsRun` rows (the driver's fast path)."""
        out: list[Received | ReadingsRun] = list(self._pending)
        self._pending = []
        out += self.receive_batch(self._read())
        return out

    def send(self, cmd: Command) -> int:
        """Send a command; return its sequence number (the ACK refers to it)."""
        seq = self._cmd_seq
        self._cmd_seq = (self._cmd_seq + 1) & 0xFFFF
        try:
            self._serial.write(encode_message(cmd, seq))
        except (OSError, serial.SerialException) as exc:
            raise TemporaryBoardError(f"write to {self.port} failed: {exc}") from exc
        return seq

    def wait_hello(self, timeout: float) -> Hello:
        """Ask for HELLO and wait for it; keep later messages for poll()."""
        self.send(Command(FrameType.HELLO_REQUEST))
        deadline = time.monotonic() + timeout
        kept: list[tuple[SensorFrame, Hello | Readings | Ack]] = []
        while time.monotonic() < deadline:
            for frame, msg in self.poll():
                if isinstance(msg, Hello):
                    kept = []
                elif self.hello is None:
                    self._reject("no_hello", f"{type(msg).__name__} before HELLO")
                    continue
                else:
                    kept.append((frame, msg))
            if self.hello is not None:
                self._pending = kept + self._pending
                return self.hello
        raise SensorTimeout(f"no HELLO from {self.port} within {timeout:.1f}s: is it a shopfleet board at {self.settings.baudrate} baud?")

    def command(self, cmd: Command, timeout: float) -> Ack:
        """Send a command and return its ACK (raising CommandRejected if not OK); keep other messages."""
        seq = self.send(cmd)
        deadline = time.monotonic() + timeout
        kept: list[tuple[SensorFrame, Hello | Readings | Ack]] = []
        while time.monotonic() < deadline:
            for frame, msg in self.poll():
                if isinstance(msg, Ack) and msg.cmd_seq == seq:
                    self._pending = kept + self._pending
                    if msg.status != AckStatus.OK:
                        raise CommandRejected(cmd, msg)
                    return msg
                kept.append((frame, msg))
        self._pending = kept + self._pending
        raise SensorTimeout(f"no ACK for {cmd.type.name} from {self.port} within {timeout:.1f}s")


@dataclass(frozen=True)
class ChannelLayout:
    """What a board's HELLO says about its channels, looked up once per HELLO instead of per reading."""

    board: str
    channels: tuple[tuple[int, str, float, str], ...]  # (index, kind name, unit scale, unit name)
    seen_keys: tuple[tuple[str, str], ...]  # (board, channel) keys of the last-reading gauge

    @classmethod
    def of(cls, hello: Hello) -> ChannelLayout:
        """Return the layout announced by a HELLO."""
        return cls(
            hello.board_id,
            tuple((c.index, _KIND_NAME[c.kind], UNIT_SCALE[c.unit], UNIT_NAME[c.unit]) for c in hello.channels),
            tuple((hello.board_id, str(c.index)) for c in hello.channels),
        )


def readings_from(hello: Hello | ChannelLayout, msg: Readings, at: float) -> list[Reading]:
    """Return one Reading per channel of a READINGS message, in physical units."""
    layout = hello if isinstance(hello, ChannelLayout) else ChannelLayout.of(hello)
    if len(msg.values) != len(layout.channels):
        raise FrameError("channel_mismatch", f"{len(msg.values)} values but HELLO announced {len(layout.channels)} channels")
    board, board_time, ok = layout.board, msg.uptime_ms / 1000, _OK
    return [
        Reading(board, index, kind, v.value * scale, unit, at, board_time, v.status == ok)  # type: ignore[arg-type]
        for (index, kind, scale, unit), v in zip(layout.channels, msg.values, strict=True)
    ]


class Driver:
    """Keep one board connected and turn its frames into readings and events."""

    def __init__(
        self,
        settings: DriverSettings,
        registry: CollectorRegistry,
        planogram: Planogram | None = None,
        *,
        metrics: DriverMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.planogram = planogram or Planogram()
        self.metrics = metrics or DriverMetrics(registry)
        self._wall = wall_clock
        self._commands: queue.Queue[tuple[Command, Future[Ack]]] = queue.Queue()
        self._processors: dict[str, BoardProcessor] = {}
        self._layout: tuple[Hello, ChannelLayout] | None = None  # of the HELLO being served (by identity: hashing a Hello per frame costs)
        self.connected: BoardStatus | None = None
        self.last_reading_at: float | None = None

    def request(self, cmd: Command) -> Future[Ack]:
        """Queue a command for the connected board; the future resolves with its ACK."""
        fut: Future[Ack] = Future()
        self._commands.put((cmd, fut))
        return fut

    def run(self, stop: threading.Event, emit: Callable[[Output], None]) -> None:
        """Connect, read and emit until stop is set, reconnecting with backoff after failures."""
        delay = self.settings.reconnect_min_s
        lost = False
        while not stop.is_set():
            port = ""
            try:
                port = resolve_port(self.settings)
                conn = BoardConnection(port, self.metrics, self.settings)
                if lost:
                    self.metrics.reconnects.labels(port).inc()
                    lost = False
            except (TemporaryBoardError, OSError, serial.SerialException) as exc:
                log.info("board not available (%s); retrying in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            try:
                self._serve(conn, stop, emit)
                delay = self.settings.reconnect_min_s
            except TemporaryBoardError as exc:
                lost = True
                log.warning("board on %s lost: %s; reopening in %.1fs", port, exc, delay)
                if self.connected is not None:
                    emit(BoardStatus(port, "disconnected", self.connected.board, self.connected.firmware, detail=str(exc), at=self._wall()))
                    delay = self.settings.reconnect_min_s
                self.connected = None
                stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            finally:
                conn.close()
        self.connected = None

    def _serve(self, conn: BoardConnection, stop: threading.Event, emit: Callable[[Output], None]) -> None:
        hello = conn.wait_hello(self.settings.hello_timeout_s)
        self._announce(conn, hello, emit)
        while not stop.is_set():
            self._run_commands(conn)
            hello = self._dispatch(conn, hello, conn.poll_batch(), emit)

    def _dispatch(self, conn: FrameReceiver, hello: Hello, items: list[Received | ReadingsRun], emit: Callable[[Output], None]) -> Hello:
        """Turn what a connection received into outputs; return the HELLO in force afterwards."""
        for item in items:
            if type(item) is ReadingsRun:
                self._readings_run(hello, item, emit)
                continue
            msg = item[1]  # type: ignore[index]
            if isinstance(msg, Hello):  # the board rebooted, or re-announced itself
                hello = msg
                self._announce(conn, msg, emit)
            elif isinstance(msg, Readings):
                self._readings(hello, msg, emit)
            # unsolicited ACKs (a command whose caller gave up) are ignored
        return hello

    def _announce(self, conn: FrameReceiver, hello: Hello, emit: Callable[[Output], None]) -> None:
        processor = self._processors.get(hello.board_id)
        if processor is None:
            processor = BoardProcessor(hello.board_id, self.planogram, self.settings.stability, self.settings.temperature, self.settings.noise_g)
            self._processors[hello.board_id] = processor
        else:
            processor.reset()  # after a reconnect the shelf must settle again before a change counts
        self.connected = BoardStatus(
            conn.port, "connected", hello.board_id, hello.firmware, tuple(_KIND_NAME[c.kind] for c in hello.channels), at=self._wall()
        )
        log.info("board %s (firmware %s, %d channels) on %s", hello.board_id, hello.firmware, len(hello.channels), conn.port)
        emit(self.connected)

    def _layout_of(self, hello: Hello) -> ChannelLayout:
        cached = self._layout
        if cached is None or cached[0] is not hello:
            cached = self._layout = (hello, ChannelLayout.of(hello))
        return cached[1]

    def _readings(self, hello: Hello, msg: Readings, emit: Callable[[Output], None]) -> None:
        """The reference path: one READINGS message to Reading objects, fed one by one to the processor."""
        layout = self._layout_of(hello)
        now = self._wall()
        try:
            readings = readings_from(layout, msg, now)
        except FrameError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("board %s: %s", hello.board_id, exc.detail)
            return
        processor = self._processors[hello.board_id]
        self.metrics.channels_seen(layout.seen_keys)
        for r in readings:
            if not r.ok:
                self.metrics.sensor_errors.labels(r.board, str(r.channel), ValueStatus(msg.values[r.channel].status).name.lower()).inc()
            emit(r)
            events = processor.feed(r)
            if events:
                for event in events:
                    self.metrics.events.labels(event.type).inc()
                    emit(event)
        self.last_reading_at = now

    def _readings_run(self, hello: Hello, run: ReadingsRun, emit: Callable[[Output], None]) -> None:
        """The fast path: a run of READINGS rows, fed to the processor column by column, then emitted.

        Emits exactly what :meth:`_readings` would for each frame in turn (each reading, then the
        events it completed), except that the host clock is read once per run (the frames came in
        one read of the port) instead of once per frame. The state machines get plain numbers
        (:meth:`BoardProcessor.feed_batch`); a :class:`Reading` is built only to be emitted, without
        re-running its checks (index, kind and a finite value hold by construction here).
        """
        if run.hello is not hello:  # decoded for another HELLO than the one in force: take the reference path
            for _frame, msg in run.messages():
                self._readings(hello, msg, emit)
            return
        layout = self._layout_of(hello)
        now = self._wall()
        processor = self._processors[hello.board_id]
        self.metrics.channels_seen(layout.seen_keys)
        rows = run.rows
        columns = list(zip(*rows, strict=True))
        times = [u / 1000 for u in columns[3]]
        events: dict[int, list[tuple[int, Event]]] = {}  # frame index -> (channel position, event), in emit order
        bad: set[int] = set()  # frames with a reading whose status is not OK
        for pos, (index, kind, scale, _unit) in enumerate(layout.channels):
            statuses = columns[6 + 2 * pos]
            values = [v * scale for v in columns[5 + 2 * pos]]
            if statuses.count(0) == len(statuses):
                found = processor.feed_batch(index, kind, times, values, now)  # type: ignore[arg-type]
            else:  # readings that are not OK go to no state machine, as feed() skips them
                keep = [k for k, st in enumerate(statuses) if st == 0]
                bad.update(k for k, st in enumerate(statuses) if st != 0)
                found = [(keep[k], e) for k, e in processor.feed_batch(index, kind, [times[k] for k in keep], [values[k] for k in keep], now)]  # type: ignore[arg-type]
            for k, event in found:
                events.setdefault(k, []).append((pos, event))
        board = layout.board
        chans = [(index, kind, scale, unit, 5 + 2 * pos) for pos, (index, kind, scale, unit) in enumerate(layout.channels)]
        new, set_dict = object.__new__, object.__setattr__
        for f, row in enumerate(rows):
            board_time = row[3] / 1000
            if f not in events and f not in bad:
                for index, kind, scale, unit, vi in chans:
                    r = new(Reading)
                    set_dict(r, "__dict__", {"board": board, "channel": index, "kind": kind, "value": row[vi] * scale,
                                             "unit": unit, "at": now, "board_time": board_time, "ok": True})  # fmt: skip
                    emit(r)
                continue
            for pos, (index, kind, scale, unit, vi) in enumerate(chans):
                status = row[vi + 1]
                if status:
                    self.metrics.sensor_errors.labels(board, str(index), _STATUS_NAME[status]).inc()
                r = new(Reading)
                set_dict(r, "__dict__", {"board": board, "channel": index, "kind": kind, "value": row[vi] * scale,
                                         "unit": unit, "at": now, "board_time": board_time, "ok": status == 0})  # fmt: skip
                emit(r)
                for p, event in events.get(f, ()):
                    if p == pos:
                        self.metrics.events.labels(event.type).inc()
                        emit(event)
        self.last_reading_at = now

    def _run_commands(self, conn: BoardConnection) -> None:
        while True:
            try:
                cmd, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                ack = conn.command(cmd, self.settings.command_timeout_s)
            except TemporaryBoardError as exc:
                fut.set_exception(exc)
                raise
            except CommandRejected as exc:
                fut.set_exception(exc)
                continue
            if cmd.type in (FrameType.TARE, FrameType.CALIBRATE) and conn.hello is not None:
                self._processors[conn.hello.board_id].reset_channel(cmd.channel)
            fut.set_result(ack)
