"""The serial frame codec: bytes on the wire to typed frames and back (docs/serial-protocol.md).

A sensor board and the host exchange frames over a 115200-baud USB serial line. Each frame is
``COBS(payload || CRC-16/CCITT-FALSE(payload), big-endian) || 0x00``: the zero byte delimits
frames, so a receiver that starts mid-stream, or meets garbage, resynchronises at the next zero
(COBS guarantees no zero inside a frame); the CRC catches flipped or dropped bytes. The payload
is ``version u8 | type u8 | seq u16 LE | body``.

Everything here is pure and total: :meth:`SensorFrame.parse` turns any byte string into a frame
or raises :class:`FrameError` with a short ``reason`` code (a Prometheus label), never another
exception; :func:`decode_message` does the same for a frame's body. Decoders read the fields
they know and ignore trailing bytes, so a newer board that appends fields still talks to an
older host (see "Versioning" in the protocol doc).
"""

from __future__ import annotations

import struct
from binascii import crc_hqx
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from operator import itemgetter
from typing import Any

from shopfleet.errors import ShopfleetError

PROTOCOL_VERSION = 1
"""Highest payload version this host understands; boards send the version they speak."""

MAX_PAYLOAD = 250
"""Largest payload (header and body, without CRC). Keeps the firmware's buffers small."""

MAX_ENCODED = MAX_PAYLOAD + 2 + 2
"""Largest encoded frame without its delimiter: payload, CRC and COBS overhead."""

HEADER = struct.Struct("<BBH")

REJECT_REASONS = (
    "empty",  # two delimiters in a row (harmless, still counted)
    "too_long",  # no delimiter within MAX_ENCODED bytes: garbage or a lost delimiter
    "cobs",  # not valid COBS: a zero inside or a code pointing past the end
    "too_short",  # shorter than a header and CRC
    "crc",  # CRC mismatch: corrupted or truncated on the line
    "version",  # payload version 0 or newer than PROTOCOL_VERSION
    "unknown_type",  # a frame type this host does not know
    "bad_body",  # body too short or with invalid values for its type
)


class FrameError(ShopfleetError, ValueError):
    """Bytes that are not a valid frame; ``reason`` is one of :data:`REJECT_REASONS`.

    Neither temporary nor permanent: the frame is dropped and counted, and reading goes on.
    It stays a ``ValueError`` because it is a parse failure of untrusted input.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason)
        self.detail = detail


class FrameType(IntEnum):
    """Frame types. 0x0_ go board to host, 0x1_ host to board, 0x2_ only SIMULATION builds."""

    HELLO = 0x01
    READINGS = 0x02
    ACK = 0x03
    PING = 0x10
    TARE = 0x11
    CALIBRATE = 0x12
    SET_RATE = 0x13
    HELLO_REQUEST = 0x14
    SIM_SET = 0x20


class ChannelKind(IntEnum):
    """What a board channel measures."""

    LOAD_CELL = 1
    DOOR = 2
    TEMPERATURE = 3


class Unit(IntEnum):
    """Unit and scale of a channel's integer value on the wire."""

    DECIGRAM = 1  # 0.1 g
    STATE = 2  # 0 closed, 1 open
    CENTI_CELSIUS = 3  # 0.01 degC


UNIT_SCALE = {Unit.DECIGRAM: 0.1, Unit.STATE: 1.0, Unit.CENTI_CELSIUS: 0.01}
UNIT_NAME = {Unit.DECIGRAM: "g", Unit.STATE: "state", Unit.CENTI_CELSIUS: "C"}


class ValueStatus(IntEnum):
    """Per-channel status in a READINGS frame."""

    OK = 0
    MISSING = 1  # sensor did not answer (HX711 not ready, no DS18B20 presence pulse)
    SATURATED = 2  # ADC at its rail: overload or a broken wire


class AckStatus(IntEnum):
    """Result of a command."""

    OK = 0
    BAD_ARGUMENT = 1
    UNKNOWN_COMMAND = 2
    SENSOR_ERROR = 3


def crc16_ccitt_false(data: bytes) -> int:
    """Return CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no xorout) of data.

    ``binascii.crc_hqx`` is exactly this CRC (the non-reflected CCITT polynomial) when started
    from 0xFFFF, and runs in C instead of a Python loop over every byte.
    """
    return crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Return data COBS-encoded (no zero bytes; delimiter not included).

    Each zero-free run between zeros becomes ``len(run) + 1`` followed by the run; a run of 254
    non-zero bytes is cut with code 0xFF (which implies no zero). ``bytes.split`` finds the runs
    in C, so the Python loop turns once per zero in the data, not once per byte.
    """
    out = bytearray()
    for run in data.split(b"\x00"):
        while len(run) >= 254:
            out.append(255)
            out += run[:254]
            run = run[254:]
        out.append(len(run) + 1)
        out += run
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Return the COBS-decoded data, or raise FrameError('cobs') if it is not valid COBS.

    Decoding is done in place on a copy: every code byte but the first becomes the zero it
    stands for, and the first is dropped. The loop hops from code to code (once per zero in the
    decoded data); only a 0xFF code, which stands for no zero and cannot occur in a frame of at
    most MAX_PAYLOAD + 2 bytes, needs the block-by-block path.
    """
    if b"\x00" in data:
        raise FrameError("cobs", f"zero byte at offset {data.index(0)} inside a frame")
    n = len(data)
    out = bytearray(data)
    i = last = 0
    while i < n:
        code = data[i]
        if code == 255:
            return _cobs_decode_blocks(data)
        out[i] = 0
        last = i
        i += code
    if i > n:
        raise FrameError("cobs", f"code {data[last]} at offset {last} points past the end ({n} bytes)")
    del out[:1]
    return bytes(out)


def _cobs_decode_blocks(data: bytes) -> bytes:
    """Decode COBS block by block (handles 0xFF codes); data holds no zero byte."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        end = i + code
        if end > n:
            raise FrameError("cobs", f"code {code} at offset {i} points past the end ({n} bytes)")
        out += data[i + 1 : end]
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


@dataclass(frozen=True)
class SensorFrame:
    """One frame: header fields and the raw body, checked on construction."""

    type: int
    seq: int
    body: bytes = b""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 255:
            raise FrameError("unknown_type", f"type {self.type} is not a byte")
        if not 0 <= self.seq <= 0xFFFF:
            raise FrameError("bad_body", f"seq {self.seq} is outside 0..65535")
        if not 1 <= self.version <= 255:
            raise FrameError("version", f"version {self.version} is outside 1..255")
        if len(self.body) > MAX_PAYLOAD - HEADER.size:
            raise FrameError("too_long", f"body of {len(self.body)} bytes exceeds {MAX_PAYLOAD - HEADER.size}")

    def encode(self) -> bytes:
        """Return the frame as sent on the line, delimiter included."""
        payload = HEADER.pack(self.version, self.type, self.seq) + self.body
        return cobs_encode(payload + crc16_ccitt_false(payload).to_bytes(2, "big")) + b"\x00"

    @classmethod
    def parse(cls, raw: bytes) -> SensorFrame:
        """Return the frame encoded in raw (delimiter optional), or raise FrameError."""
        if raw[-1:] == b"\x00":
            raw = raw[:-1]
        if not raw:
            raise FrameError("empty", "no bytes between two delimiters")
        if len(raw) > MAX_ENCODED:
            raise FrameError("too_long", f"{len(raw)} encoded bytes exceed {MAX_ENCODED}")
        data = cobs_decode(raw)
        if len(data) < HEADER.size + 2:
            raise FrameError("too_short", f"{len(data)} decoded bytes, need at least {HEADER.size + 2}")
        # A CRC without reflection or final xor leaves 0 over data followed by its own big-endian
        # CRC, so one C call over the whole frame checks it without slicing the payload out.
        if crc_hqx(data, 0xFFFF):
            crc, want = int.from_bytes(data[-2:], "big"), crc_hqx(data[:-2], 0xFFFF)
            raise FrameError("crc", f"CRC {crc:#06x} does not match payload ({want:#06x})")
        version, ftype, seq = HEADER.unpack_from(data)
        if version == 0 or version > PROTOCOL_VERSION:
            raise FrameError("version", f"payload version {version}; this host speaks 1..{PROTOCOL_VERSION}: upgrade shopfleet")
        if ftype not in _KNOWN_TYPES:
            raise FrameError("unknown_type", f"frame type {ftype:#04x}")
        return cls(type=ftype, seq=seq, body=data[HEADER.size : -2], version=version)


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True)
class ChannelInfo:
    """One entry of a board's sensor inventory."""

    index: int
    kind: ChannelKind
    unit: Unit


@dataclass(frozen=True)
class Hello:
    """A board introducing itself: id, firmware version and sensor inventory."""

    board_id: str
    fw_major: int
    fw_minor: int
    channels: tuple[ChannelInfo, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.board_id) <= 32 or not self.board_id.isascii() or not self.board_id.isprintable():
            raise FrameError("bad_body", f"board id {self.board_id!r} must be 1-32 printable ASCII characters")
        if len(self.channels) > 16:
            raise FrameError("bad_body", f"{len(self.channels)} channels; at most 16")

    @property
    def firmware(self) -> str:
        """Return the firmware version as 'major.minor'."""
        return f"{self.fw_major}.{self.fw_minor}"


@dataclass(frozen=True)
class ChannelValue:
    """One channel's raw integer value and status in a READINGS frame."""

    value: int
    status: ValueStatus = ValueStatus.OK


@dataclass(frozen=True)
class Readings:
    """One sample of every channel, stamped with the board's uptime."""

    uptime_ms: int
    values: tuple[ChannelValue, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.uptime_ms <= 0xFFFFFFFF:
            raise FrameError("bad_body", f"uptime {self.uptime_ms} ms is not a u32")
        if len(self.values) > 16:
            raise FrameError("bad_body", f"{len(self.values)} values; at most 16")


@dataclass(frozen=True)
class Ack:
    """A board's answer to the command with sequence number ``cmd_seq``."""

    cmd_seq: int
    status: AckStatus
    value: int = 0


@dataclass(frozen=True)
class Command:
    """A host-to-board command: PING, TARE, CALIBRATE, SET_RATE, HELLO_REQUEST, SIM_SET."""

    type: FrameType
    channel: int = 0
    value: int = 0

    def __post_init__(self) -> None:
        if self.type < 0x10:
            raise FrameError("unknown_type", f"{self.type!r} is not a command")
        if not 0 <= self.channel <= 255:
            raise FrameError("bad_body", f"channel {self.channel} is not a byte")
        if self.type == FrameType.SET_RATE and not 10 <= self.value <= 60000:
            raise FrameError("bad_body", f"SET_RATE interval {self.value} ms outside 10..60000")


Message = Hello | Readings | Ack | Command


def _u8(body: bytes, off: int, what: str) -> int:
    if off >= len(body):
        raise FrameError("bad_body", f"body ends before {what} (offset {off})")
    return body[off]


def _unpack(fmt: struct.Struct, body: bytes, off: int, what: str) -> tuple[Any, ...]:
    if off + fmt.size > len(body):
        raise FrameError("bad_body", f"body ends before {what} (offset {off}, {len(body)} bytes)")
    return fmt.unpack_from(body, off)


_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_VAL = struct.Struct("<iB")
_ACK = struct.Struct("<HBi")
_CMD = struct.Struct("<Bi")
_READINGS_BODY = tuple(struct.Struct("<IB" + "iB" * n) for n in range(17))
"""A READINGS body with 0..16 channels (uptime, count, then value i32 / status u8 pairs), unpacked in one call."""
_STATUS = {int(s): s for s in ValueStatus}
_READINGS = int(FrameType.READINGS)  # an Enum attribute lookup costs ~70 ns; this is a plain int


def decode_message(frame: SensorFrame) -> Message:
    """Return the typed message in a frame's body, or raise FrameError('bad_body')."""
    body = frame.body
    t = frame.type
    if t == _READINGS:  # first, and an int: the frame a board sends all the time
        # The hot path (a board sends these at up to the line rate): one struct call for the
        # whole body, status codes looked up in a dict, values built by map() in C.
        if len(body) < 5:
            raise FrameError("bad_body", f"body of {len(body)} bytes ends before {'uptime' if len(body) < 4 else 'value count'}")
        count = body[4]
        if count > 16:
            raise FrameError("bad_body", f"{count} values; at most 16")
        fmt = _READINGS_BODY[count]
        if fmt.size > len(body):
            raise FrameError("bad_body", f"body of {len(body)} bytes ends inside value {(len(body) - 5) // _VAL.size} of {count}")
        flat = fmt.unpack_from(body)
        statuses = [_STATUS.get(s) for s in flat[3::2]]
        if None in statuses:
            i = statuses.index(None)
            raise FrameError("bad_body", f"value {i}: unknown status {flat[3 + 2 * i]}")
        return Readings(flat[0], tuple(map(ChannelValue, flat[2::2], statuses)))  # type: ignore[arg-type]
    if t == FrameType.HELLO:
        fw_major, fw_minor = _u8(body, 0, "fw_major"), _u8(body, 1, "fw_minor")
        n = _u8(body, 2, "board id length")
        raw_id = body[3 : 3 + n]
        if len(raw_id) != n:
            raise FrameError("bad_body", f"board id of {n} bytes truncated")
        board_id = raw_id.decode("ascii", errors="replace")
        off = 3 + n
        count = _u8(body, off, "channel count")
        channels = []
        for i in range(count):
            kind, unit = _u8(body, off + 1 + 2 * i, "channel kind"), _u8(body, off + 2 + 2 * i, "channel unit")
            try:
                channels.append(ChannelInfo(i, ChannelKind(kind), Unit(unit)))
            except ValueError:
                raise FrameError("bad_body", f"channel {i}: unknown kind {kind} or unit {unit}") from None
        return Hello(board_id, fw_major, fw_minor, tuple(channels))
    if t == FrameType.ACK:
        cmd_seq, status, value = _unpack(_ACK, body, 0, "ack")
        try:
            return Ack(cmd_seq, AckStatus(status), value)
        except ValueError:
            raise FrameError("bad_body", f"unknown ack status {status}") from None
    if t in (FrameType.PING, FrameType.HELLO_REQUEST):
        return Command(FrameType(t))
    if t == FrameType.SET_RATE:
        (ms,) = _unpack(_U16, body, 0, "interval")
        return Command(FrameType(t), 0, ms)
    channel, value = _unpack(_CMD, body, 0, "channel and value")
    return Command(FrameType(t), channel, value)


def encode_message(msg: Message, seq: int) -> bytes:
    """Return the wire bytes of a message with sequence number seq."""
    if isinstance(msg, Hello):
        raw_id = msg.board_id.encode("ascii")
        body = bytes([msg.fw_major, msg.fw_minor, len(raw_id)]) + raw_id + bytes([len(msg.channels)])
        body += b"".join(bytes([c.kind, c.unit]) for c in msg.channels)
        return SensorFrame(FrameType.HELLO, seq, body).encode()
    if isinstance(msg, Readings):
        body = _U32.pack(msg.uptime_ms) + bytes([len(msg.values)])
        body += b"".join(_VAL.pack(v.value, v.status) for v in msg.values)
        return SensorFrame(FrameType.READINGS, seq, body).encode()
    if isinstance(msg, Ack):
        return SensorFrame(FrameType.ACK, seq, _ACK.pack(msg.cmd_seq, msg.status, msg.value)).encode()
    if msg.type in (FrameType.PING, FrameType.HELLO_REQUEST):
        return SensorFrame(msg.type, seq).encode()
    if msg.type == FrameType.SET_RATE:
        return SensorFrame(msg.type, seq, _U16.pack(msg.value)).encode()
    return SensorFrame(msg.type, seq, _CMD.pack(msg.channel, msg.value)).encode()


@dataclass(frozen=True)
class CobsSkeleton:
    """Where the code bytes sit in a COBS-encoded frame, so that frames of the same shape decode in C.

    Two encoded frames of the same length whose code bytes are equal at these positions have the
    same code chain, so decoding either is the same operation: zero those positions and drop the
    first byte. :func:`cobs_skeleton` finds the chain by walking it once; afterwards ``codes_of``
    (an ``itemgetter``) checks another frame against it and ``mask`` decodes it as one integer
    AND, all without a Python loop over the frame. A board's frames mostly share a few shapes (the
    zero bytes sit in the same fields), so the walk is rare.
    """

    length: int
    codes_of: Callable[[bytes], Any]
    codes: Any
    mask: int

    def decode(self, data: bytes) -> bytes | None:
        """Return data COBS-decoded if it has this shape (length and code bytes), else None."""
        if len(data) != self.length or self.codes_of(data) != self.codes:
            return None
        return (int.from_bytes(data, "big") & self.mask).to_bytes(self.length - 1, "big")


def cobs_skeleton(data: bytes) -> CobsSkeleton | None:
    """Return the code chain of a zero-free encoded frame, or None if it is not valid COBS or uses a
    0xFF code (a block without a zero, which the reference decoder handles)."""
    n = len(data)
    positions = []
    i = 0
    while i < n:
        code = data[i]
        if code == 255 or code == 0:
            return None
        positions.append(i)
        i += code
    if i != n or not positions:
        return None
    getter = itemgetter(*positions)
    mask = (1 << (8 * n)) - 1
    for pos in positions:
        mask ^= 0xFF << (8 * (n - 1 - pos))
    return CobsSkeleton(n, getter, getter(data), mask)


READINGS_ROW = tuple(struct.Struct("<BBHIB" + "iB" * n) for n in range(17))
"""A whole READINGS payload with n channels as one flat row: version, type, seq, uptime_ms, count,
then value/status pairs (the batch decoder's unit; the CRC that follows is checked, not unpacked)."""


class FrameSplitter:
    """Cut a byte stream into encoded frames at 0x00, resynchronising after garbage.

    Feed it whatever the serial port returned; it returns each complete frame's bytes, or a
    :class:`FrameError` ('too_long') for a run of bytes that never met a delimiter, after which
    it discards until the next delimiter. It holds at most MAX_ENCODED bytes. A chunk is cut
    with one ``bytes.split`` (in C), so reading the port in large chunks costs no per-byte
    Python work; only the incomplete tail is carried to the next call.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        """Return the complete frames (or overflow errors) found after adding data, in order."""
        parts: list[bytes | FrameError] = data.split(b"\x00")  # type: ignore[assignment]
        tail: bytes = parts.pop()  # type: ignore[assignment]  # after the last delimiter: incomplete
        out: list[bytes | FrameError] = []
        if parts:
            if self._discarding:
                # the end of an overlong run, already reported when it overflowed
                self._discarding = False
                del parts[0]
            elif self._buf:
                parts[0] = self._buf + parts[0]  # type: ignore[operator]
                self._buf = b""
            if parts and max(map(len, parts)) > MAX_ENCODED:  # type: ignore[arg-type]
                parts = [
                    FrameError("too_long", f"frame longer than {MAX_ENCODED} encoded bytes") if len(p) > MAX_ENCODED else p  # type: ignore[arg-type]
                    for p in parts
                ]
            out = parts
        if not self._discarding:
            if len(self._buf) + len(tail) > MAX_ENCODED:
                self._buf = b""
                self._discarding = True
                out.append(FrameError("too_long", f"no delimiter within {MAX_ENCODED} bytes; discarding to the next"))
            else:
                self._buf += tail
        return out
