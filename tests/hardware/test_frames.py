"""The frame codec: known vectors, round trips, and totality on arbitrary bytes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardware.frames import (
    MAX_ENCODED,
    REJECT_REASONS,
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
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    decode_message,
    encode_message,
)


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        pytest.param(b"123456789", 0x29B1, id="standard-check-value"),
        pytest.param(b"", 0xFFFF, id="empty-is-init"),
        pytest.param(b"\x00", 0xE1F0, id="one-zero-byte"),
    ],
)
def test_crc16_ccitt_false_vectors(data: bytes, crc: int) -> None:
    assert crc16_ccitt_false(data) == crc


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        pytest.param(b"", b"\x01", id="empty"),
        pytest.param(b"\x00", b"\x01\x01", id="one-zero"),
        pytest.param(b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33", id="zero-inside"),
        pytest.param(bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01", id="254-nonzero"),
    ],
)
def test_cobs_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"\x00", "empty", id="just-delimiter"),
        pytest.param(b"\x05\x01\x02", "cobs", id="code-past-end"),
        pytest.param(b"\x02\x01", "too_short", id="too-short"),
        pytest.param(b"\x07" + b"\x01\x02\x03\x04\x05\x06", "crc", id="bad-crc"),
        pytest.param(b"\x41" * (MAX_ENCODED + 1), "too_long", id="too-long"),
    ],
)
def test_parse_rejects_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        SensorFrame.parse(raw)
    assert info.value.reason == reason


def test_the_protocol_docs_example_frame() -> None:
    """docs/serial-protocol.md's example, byte for byte, both ways."""
    wire = bytes.fromhex("04 01 02 07 02 05 01 01 06 01 fd ff ff ff 03 4e 45 00")
    msg = Readings(5, (ChannelValue(-3),))
    assert encode_message(msg, 7) == wire
    frame = SensorFrame.parse(wire)
    assert (frame.seq, decode_message(frame)) == (7, msg)


def _frame_with_header(version: int, ftype: int) -> bytes:
    payload = bytes([version, ftype, 0, 0])
    return cobs_encode(payload + crc16_ccitt_false(payload).to_bytes(2, "big"))


@pytest.mark.parametrize(
    ("version", "ftype", "reason"),
    [
        pytest.param(2, FrameType.PING, "version", id="newer-version"),
        pytest.param(0, FrameType.PING, "version", id="version-zero"),
        pytest.param(1, 0x7F, "unknown_type", id="unknown-type"),
    ],
)
def test_header_checks(version: int, ftype: int, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        SensorFrame.parse(_frame_with_header(version, ftype))
    assert info.value.reason == reason


hellos = st.builds(
    Hello,
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=32),
    st.integers(0, 255),
    st.integers(0, 255),
    st.lists(st.tuples(st.sampled_from(ChannelKind), st.sampled_from(Unit)), max_size=16).map(
        lambda cs: tuple(ChannelInfo(i, k, u) for i, (k, u) in enumerate(cs))
    ),
)
readings = st.builds(
    Readings,
    st.integers(0, 0xFFFFFFFF),
    st.lists(st.builds(ChannelValue, st.integers(-(2**31), 2**31 - 1), st.sampled_from(ValueStatus)), max_size=16).map(tuple),
)
acks = st.builds(Ack, st.integers(0, 0xFFFF), st.sampled_from(AckStatus), st.integers(-(2**31), 2**31 - 1))
commands = st.one_of(
    st.builds(Command, st.sampled_from([FrameType.PING, FrameType.HELLO_REQUEST])),
    st.builds(Command, st.sampled_from([FrameType.TARE, FrameType.CALIBRATE, FrameType.SIM_SET]), st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)),
    st.builds(Command, st.just(FrameType.SET_RATE), st.just(0), st.integers(10, 60000)),
)


@given(msg=st.one_of(hellos, readings, acks, commands), seq=st.integers(0, 0xFFFF))
def test_encode_decode_round_trip(msg, seq: int) -> None:
    wire = encode_message(msg, seq)
    assert wire.endswith(b"\x00") and b"\x00" not in wire[:-1]
    frame = SensorFrame.parse(wire)
    assert frame.seq == seq
    assert decode_message(frame) == msg


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_frame_or_a_frame_error(raw: bytes) -> None:
    try:
        frame = SensorFrame.parse(raw)
    except FrameError as exc:
        assert exc.reason in REJECT_REASONS
        return
    try:
        decode_message(frame)
    except FrameError as exc:
        assert exc.reason in REJECT_REASONS


@settings(max_examples=300)
@given(ftype=st.sampled_from(FrameType), body=st.binary(max_size=120))
def test_any_body_of_a_known_type_gives_a_message_or_bad_body(ftype: FrameType, body: bytes) -> None:
    frame = SensorFrame.parse(SensorFrame(ftype, 1, body).encode())
    try:
        decode_message(frame)
    except FrameError as exc:
        assert exc.reason == "bad_body"


@given(
    msgs=st.lists(st.one_of(readings, acks), min_size=1, max_size=8),
    garbage=st.lists(st.binary(max_size=40), min_size=1, max_size=8),
    cut=st.integers(1, 50),
)
def test_splitter_resyncs_after_garbage_in_any_chunking(msgs, garbage, cut: int) -> None:
    """Valid frames between garbage all come through, however the stream is chunked."""
    stream = b""
    for i, m in enumerate(msgs):
        stream += garbage[i % len(garbage)] + b"\x00" + encode_message(m, i)
    splitter = FrameSplitter()
    decoded = []
    for start in range(0, len(stream), cut):
        for item in splitter.feed(stream[start : start + cut]):
            if isinstance(item, bytes):
                with contextlib.suppress(FrameError):
                    decoded.append(decode_message(SensorFrame.parse(item)))
    assert decoded == msgs


def _reference_crc(data: bytes) -> int:
    """CRC-16/CCITT-FALSE bit by bit, straight from its definition (the firmware's loop)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _reference_cobs_encode(data: bytes) -> bytes:
    """COBS byte by byte, as the firmware encodes."""
    out, block = bytearray(), bytearray()
    for byte in data:
        if byte == 0:
            out += bytes([len(block) + 1]) + block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out += b"\xff" + block
                block.clear()
    return bytes(out + bytes([len(block) + 1]) + block)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_crc_is_ccitt_false_from_its_definition(data: bytes) -> None:
    assert crc16_ccitt_false(data) == _reference_crc(data)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=700), st.lists(st.sampled_from([b"\x00", b"\x01" * 253, b"\x02" * 254, b"\x03" * 255, b"\xff"]), max_size=6).map(b"".join)))
def test_cobs_matches_the_bytewise_encoder_and_round_trips(data: bytes) -> None:
    """Includes runs of 253-255 non-zero bytes, where code 0xFF (no implied zero) appears."""
    encoded = cobs_encode(data)
    assert encoded == _reference_cobs_encode(data)
    assert b"\x00" not in encoded
    assert cobs_decode(encoded) == data


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"\x03\x01\x00\x01", "zero byte at offset 2", id="zero-inside"),
        pytest.param(b"\x02\x01\x05\x01", "code 5 at offset 2 points past the end", id="last-code-past-end"),
        pytest.param(b"\xff" + b"\x01" * 10, "code 255 at offset 0 points past the end", id="ff-code-past-end"),
        pytest.param(b"\xff" + b"\x01" * 254 + b"\x09\x01", "code 9 at offset 255 points past the end", id="past-end-after-ff"),
    ],
)
def test_cobs_decode_names_the_bad_code(raw: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match) as info:
        cobs_decode(raw)
    assert info.value.reason == "cobs"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(b"\x01\x02", "ends before uptime", id="no-uptime"),
        pytest.param(b"\x01\x02\x03\x04", "ends before value count", id="no-count"),
        pytest.param(b"\x01\x02\x03\x04\x02" + b"\x05\x00\x00\x00\x00", "ends inside value 1 of 2", id="truncated-values"),
        pytest.param(b"\x01\x02\x03\x04\x11", "17 values; at most 16", id="too-many-values"),
        pytest.param(b"\x01\x02\x03\x04\x02" + b"\x05\x00\x00\x00\x00" + b"\x05\x00\x00\x00\x07", "value 1: unknown status 7", id="bad-status"),
    ],
)
def test_bad_readings_bodies_name_the_problem(body: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match) as info:
        decode_message(SensorFrame(FrameType.READINGS, 1, body))
    assert info.value.reason == "bad_body"


def _receive(stream: bytes, cut: int) -> tuple[list, list[str]]:
    """Run stream through the splitter, parser and decoder in chunks of cut bytes: (messages, reject reasons)."""
    splitter = FrameSplitter()
    msgs, reasons = [], []
    for start in range(0, len(stream), cut):
        for item in splitter.feed(stream[start : start + cut]):
            try:
                if isinstance(item, FrameError):
                    raise item
                msgs.append(decode_message(SensorFrame.parse(item)))
            except FrameError as exc:
                reasons.append(exc.reason)
    return msgs, reasons


def _not_a_frame(segment: bytes) -> bool:
    try:
        decode_message(SensorFrame.parse(segment))
    except FrameError:
        return True
    return False


garbage_runs = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=MAX_ENCODED - 5, max_size=MAX_ENCODED * 3),  # lost delimiters: too_long
    st.sampled_from([b"", b"\x05\x01", b"\x07\x01\x02\x03\x04\x05\x06", b"\xff\x01"]),  # empty, cobs, crc
)


@settings(max_examples=300, deadline=None)  # byte-at-a-time chunking of kilobytes is slow on a loaded machine, not wrong
@given(
    msgs=st.lists(st.one_of(readings, acks, hellos), min_size=1, max_size=10),
    garbage=st.lists(garbage_runs, min_size=1, max_size=10),
    cut=st.one_of(st.integers(1, 64), st.just(4096)),
)
def test_garbage_between_frames_is_counted_and_loses_no_frame(msgs, garbage, cut: int) -> None:
    """Every good frame is decoded in order; every delimited run of garbage is one rejection, by reason."""
    stream, segments = b"", []
    for i, m in enumerate(msgs):
        junk = garbage[i % len(garbage)]
        segments += junk.split(b"\x00")
        stream += junk + b"\x00" + encode_message(m, i)
    assume(all(_not_a_frame(seg) for seg in segments))  # a random run that happens to be a valid frame is one
    decoded, reasons = _receive(stream, cut)
    assert decoded == msgs
    assert len(reasons) == len(segments)
    assert set(reasons) <= set(REJECT_REASONS)
    long_runs = sum(len(seg) > MAX_ENCODED for seg in segments)
    assert reasons.count("too_long") == long_runs


def test_splitter_drops_an_overlong_run_and_recovers() -> None:
    splitter = FrameSplitter()
    out = list(splitter.feed(b"\x55" * (MAX_ENCODED * 3)))
    assert [type(o) for o in out] == [FrameError] and out[0].reason == "too_long"
    frame = encode_message(Ack(7, AckStatus.OK), 3)
    out = list(splitter.feed(b"\x55\x00" + frame))
    assert out == [frame[:-1]]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda: Hello("", 1, 0, ()), "bad_body", id="empty-board-id"),
        pytest.param(lambda: Hello("bad id\n", 1, 0, ()), "bad_body", id="unprintable-board-id"),
        pytest.param(lambda: Command(FrameType.SET_RATE, 0, 5), "bad_body", id="rate-too-fast"),
        pytest.param(lambda: Command(FrameType.HELLO), "unknown_type", id="hello-is-no-command"),
        pytest.param(lambda: SensorFrame(FrameType.PING, 70000), "bad_body", id="seq-overflow"),
    ],
)
def test_typed_values_are_checked_on_construction(make, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        make()
    assert info.value.reason == reason


def test_newer_board_with_appended_fields_still_decodes() -> None:
    """Versioning rule: decoders ignore trailing bytes, so fields appended in a minor revision are harmless."""
    base = encode_message(Ack(9, AckStatus.OK, 42), 1)
    frame = SensorFrame.parse(base)
    longer = SensorFrame(frame.type, frame.seq, frame.body + b"\x01\x02\x03")
    assert decode_message(SensorFrame.parse(longer.encode())) == Ack(9, AckStatus.OK, 42)
