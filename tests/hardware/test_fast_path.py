"""The serial driver's batch fast path against its reference, on generated streams.

The driver takes a read of the port in one pass (``FrameReceiver.receive_batch``,
``Driver._readings_run``, ``BoardProcessor.feed_batch``, ``StabilityDetector.update_many``)
instead of building a frame, a message and a Reading per channel and feeding them one by one.
Every test here runs the reference path and the fast path on the same input and requires the
same result: the same outputs in the same order, the same metrics (frames, losses, reboots,
rejections by reason, sensor errors, events) and the same state afterwards. The streams mix
valid frames with garbage, corrupted and truncated frames, sequence gaps, reboots and frames
the fast path does not take (other shapes, statuses, versions), cut into arbitrary reads.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from hardware.driver import (
    Driver,
    DriverMetrics,
    DriverSettings,
    FrameReceiver,
    ReadingsRun,
    Received,
)
from hardware.events import BoardProcessor, Reading, TemperatureSettings
from hardware.frames import (
    MAX_ENCODED,
    Ack,
    AckStatus,
    ChannelInfo,
    ChannelKind,
    ChannelValue,
    FrameType,
    Hello,
    Readings,
    SensorFrame,
    Unit,
    ValueStatus,
    cobs_decode,
    cobs_skeleton,
    encode_message,
)
from hardware.planogram import Planogram, Slot
from hardware.stability import StabilityDetector, StabilitySettings

# -- the stability detector: update_many against update, reading by reading ------------------------

detector_settings = st.builds(
    StabilitySettings,
    window_s=st.sampled_from([0.05, 0.3, 0.8, 2.0]),
    tolerance_g=st.sampled_from([3.0, 12.0, 40.0]),
    min_change_g=st.sampled_from([25.0, 45.0, 100.0]),
    min_samples=st.integers(2, 12),
)


@st.composite
def shelf_signal(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    """A load cell's (board time, grams): noisy plateaus, steps, transients, drift, clock resets, repeats."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 900))
    dt = draw(st.sampled_from([0.01, 0.05, 0.1]))
    noise = draw(st.sampled_from([0.0, 0.5, 2.0, 8.0]))
    quantum = draw(st.sampled_from([None, 0.1, 1.0]))  # decigram readings repeat values exactly
    level, t, drift = rng.uniform(-500, 5000), rng.uniform(0, 100), 0.0
    times, grams = [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.01:
            level += rng.choice([-1, 1]) * rng.choice([5.0, 20.0, 50.0, 345.0])
        elif r < 0.012:
            t = rng.uniform(0, t)  # a reboot: the board's clock starts again
        elif r < 0.015:
            drift = rng.uniform(-1, 1)
        value = level + rng.gauss(0, noise) + (rng.uniform(-100, 100) if rng.random() < 0.01 else 0.0)
        level += drift * dt
        if quantum:
            value = round(value / quantum) * quantum
        times.append(round(t, 3))
        grams.append(value)
        t += dt if rng.random() > 0.05 else 0.0  # sometimes the same time twice
    return times, grams


def _state(d: StabilityDetector) -> tuple[object, ...]:
    if d._chains_stale:
        d._rebuild_chains()
    return (list(d._times), list(d._grams), list(d._hi), list(d._lo), d.baseline, d.stable)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=detector_settings, signal=shelf_signal(), cuts=st.lists(st.integers(1, 300), max_size=30))
def test_update_many_reports_and_leaves_exactly_what_update_does(s: StabilitySettings, signal, cuts: list[int]) -> None:
    times, grams = signal
    ref, fast = StabilityDetector(s), StabilityDetector(s)
    expected = [(k, c) for k, (t, g) in enumerate(zip(times, grams, strict=True)) if (c := ref.update(t, g)) is not None]
    got = []
    k = 0
    for size in [*cuts, len(times)]:  # batches of any size, as reads of the port come
        part = slice(k, k + size)
        got += [(k + i, c) for i, c in fast.update_many(times[part], grams[part])]
        k += size
        if k >= len(times):
            break
    assert got == expected
    assert _state(fast) == _state(ref)
    # and it goes on identically, one reading at a time, from the state a block left
    for t, g in zip(times[-5:], grams[-5:], strict=True):
        assert fast.update(t + 1000, g) == ref.update(t + 1000, g)
    assert _state(fast) == _state(ref)


def test_a_calm_shelf_is_taken_in_blocks_and_a_pick_still_found() -> None:
    """The fast case is really taken (not only the loop), and a step inside a batch is still reported."""
    s = StabilitySettings()
    times = [i / 100 for i in range(1000)]
    grams = [3450.0 + (i * 7919) % 31 / 10 - 1.5 - (345.0 if i >= 600 else 0.0) for i in range(1000)]
    ref, fast = StabilityDetector(s), StabilityDetector(s)
    expected = [(k, c) for k, (t, g) in enumerate(zip(times, grams, strict=True)) if (c := ref.update(t, g)) is not None]
    blocks = []
    original = fast._calm_block

    def counting(*args: object) -> int:
        taken = original(*args)  # type: ignore[arg-type]
        blocks.append(taken)
        return taken

    fast._calm_block = counting  # type: ignore[method-assign]
    got = [(k + 500 * part, c) for part in (0, 1) for k, c in fast.update_many(times[500 * part : 500 * part + 500], grams[500 * part : 500 * part + 500])]
    assert got == expected and len(got) == 1 and round(got[0][1].delta_g) == -345
    assert sum(blocks) > 500  # most readings went through calm blocks
    assert _state(fast) == _state(ref)


# -- the board processor: feed_batch against feed ----------------------------------------------------

PLANOGRAM = Planogram(slots=(Slot(board="b", channel=0, slot="A1", product="cola", unit_weight_g=345, unit_weight_sd_g=3),))


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["load_cell", "door", "temperature"]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    cuts=st.lists(st.integers(1, 120), max_size=10),
)
def test_feed_batch_returns_the_events_feed_returns(kind: str, seed: int, n: int, cuts: list[int]) -> None:
    rng = random.Random(seed)
    if kind == "door":
        values = [float(rng.random() < 0.5) if rng.random() < 0.1 else 0.0 for _ in range(n)]
    elif kind == "temperature":
        values = [round(rng.choice([4.0, 7.5, 8.5, 12.0, -29.5, -31.0]) + rng.gauss(0, 0.5), 2) for _ in range(n)]
    else:
        values = [round(3450 - 345 * (i // 150 % 3) + rng.gauss(0, 2), 1) for i in range(n)]
    times = [i / 100 for i in range(n)]
    ref = BoardProcessor("b", PLANOGRAM, StabilitySettings(), TemperatureSettings())
    fast = BoardProcessor("b", PLANOGRAM, StabilitySettings(), TemperatureSettings())
    expected = []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        expected += [(i, e) for e in ref.feed(Reading("b", 0, kind, v, "g", 5.0, t))]  # type: ignore[arg-type]
    got = []
    k = 0
    for size in [*cuts, n]:
        got += [(k + i, e) for i, e in fast.feed_batch(0, kind, times[k : k + size], values[k : k + size], 5.0)]  # type: ignore[arg-type]
        k += size
        if k >= n:
            break
    assert got == expected
    assert (fast._door, fast._alerts) == (ref._door, ref._alerts)


# -- frames in, outputs out: the whole receive and dispatch path ---------------------------------------

KINDS = [(ChannelKind.LOAD_CELL, Unit.DECIGRAM), (ChannelKind.DOOR, Unit.STATE), (ChannelKind.TEMPERATURE, Unit.CENTI_CELSIUS)]


@st.composite
def board_stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """What a board (and a bad cable) puts on the line: HELLO, READINGS with steps, door edges and
    alerts, ACKs, re-announcements, reboots, lost frames, garbage and damaged frames; and the
    sizes of the reads the host makes of it."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 700))
    channels = tuple(ChannelInfo(i, *rng.choice(KINDS)) for i in range(draw(st.integers(1, 5))))
    hello = Hello("b", 1, 0, channels)
    other = Hello("b", 1, 1, channels[:-1] or channels + channels[:1])  # the board re-announces itself with another inventory
    out = [encode_message(hello, 0)]
    seq, uptime, level, door, temp = 1, 0, 3450, 0, 400
    inventory = hello
    for i in range(n):
        r = rng.random()
        if r < 0.005:  # reboot: HELLO with seq 0, uptime from 0
            seq, uptime = 0, 0
            inventory = hello if rng.random() < 0.7 else other
            out.append(encode_message(inventory, seq))
            seq += 1
            continue
        if r < 0.01:
            out.append(encode_message(inventory, seq))  # re-announced (a HELLO_REQUEST answered)
            seq = (seq + 1) & 0xFFFF
            continue
        if r < 0.015:
            out.append(encode_message(Ack(rng.randrange(65536), AckStatus.OK, 7), seq))
            seq = (seq + 1) & 0xFFFF
            continue
        if r < 0.03:
            seq = (seq + rng.randrange(1, 40)) & 0xFFFF  # lost on the line
        if rng.random() < 0.01:
            level += rng.choice([-345, 345, -690, 30])
        if rng.random() < 0.01:
            door ^= 1
        if rng.random() < 0.01:
            temp = rng.choice([400, 750, 850, 1200, -2950, -3100])
        uptime += rng.choice([10, 10, 10, 100, 0])
        values = []
        for c in inventory.channels:
            status = ValueStatus.OK if rng.random() > 0.02 else rng.choice([ValueStatus.MISSING, ValueStatus.SATURATED])
            raw = {ChannelKind.LOAD_CELL: level + rng.randrange(-20, 21), ChannelKind.DOOR: door, ChannelKind.TEMPERATURE: temp + rng.randrange(-5, 6)}[c.kind]
            if rng.random() < 0.003:
                raw = rng.choice([0, 256, 65536, -1, 2**31 - 1, -(2**31)])  # zero bytes and extremes move the COBS codes
            values.append(ChannelValue(raw, status))
        if rng.random() < 0.01:  # a reading of another shape: one channel more or less (channel_mismatch)
            values = values[:-1] if len(values) > 1 and rng.random() < 0.5 else [*values, ChannelValue(1)]
        frame = encode_message(Readings(uptime & 0xFFFFFFFF, tuple(values)), seq)
        seq = (seq + 1) & 0xFFFF
        r = rng.random()
        if r < 0.01:  # a flipped bit (crc, or cobs if it hits a code byte)
            i = rng.randrange(len(frame) - 1)
            frame = frame[:i] + bytes([frame[i] ^ (1 << rng.randrange(8)) or 1]) + frame[i + 1 :]
        elif r < 0.015:  # truncated: the rest of the frame lost, it merges with the next
            frame = frame[: rng.randrange(1, len(frame) - 1)]
        elif r < 0.02:  # valid COBS and CRC but something the host must refuse or skip
            body = SensorFrame.parse(frame).body
            tweak = rng.choice(["version", "status", "trailing", "type", "command"])
            if tweak == "version":
                frame = SensorFrame(FrameType.READINGS, seq, body, version=2).encode()
            elif tweak == "status":
                frame = SensorFrame(FrameType.READINGS, seq, body[:9] + b"\x07" + body[10:]).encode()
            elif tweak == "trailing":  # a newer board's extra field: decoded, takes the reference path
                frame = SensorFrame(FrameType.READINGS, seq, body + b"\x01\x02").encode()
            elif tweak == "type":
                frame = SensorFrame(0x7E, seq, body).encode()
            else:
                frame = SensorFrame(FrameType.PING, seq).encode()
        elif r < 0.025:
            frame += rng.choice([b"\x00", b"\x55" * (MAX_ENCODED + 10), bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 60)))])
        out.append(frame)
    stream = b"".join(out)
    cuts, pos = [], 0
    while pos < len(stream):
        size = rng.choice([1, 7, 33, 500, 4095, 4095, rng.randrange(1, 5000)])
        cuts.append(size)
        pos += size
    return stream, cuts


def _metrics(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}


def _run(stream: bytes, cuts: list[int], fast: bool) -> tuple[list[object], dict, FrameReceiver]:
    registry = CollectorRegistry()
    metrics = DriverMetrics(registry, clock=lambda: 99.0)  # the last-reading gauge is compared too
    driver = Driver(DriverSettings(port="/dev/null"), registry, PLANOGRAM, metrics=metrics, wall_clock=lambda: 1234.5)
    rx = FrameReceiver("/dev/null", driver.metrics)
    out: list[object] = []
    hello: Hello | None = None
    pos = 0
    for size in cuts:
        chunk = stream[pos : pos + size]
        pos += size
        items: list[Received | ReadingsRun] = list(rx.receive_batch(chunk) if fast else rx.receive(chunk))
        if hello is None:  # as wait_hello: nothing before the first HELLO
            while items and not (isinstance(items[0], tuple) and isinstance(items[0][1], Hello)):
                items.pop(0)
            if not items:
                continue
            hello = items.pop(0)[1]  # type: ignore[index, assignment]
            driver._announce(rx, hello, out.append)  # type: ignore[arg-type]
        hello = driver._dispatch(rx, hello, items, out.append)  # type: ignore[arg-type]
    return out, _metrics(registry), rx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(board_stream())
def test_the_fast_path_emits_counts_and_rejects_exactly_as_the_reference(stream_and_cuts: tuple[bytes, list[int]]) -> None:
    stream, cuts = stream_and_cuts
    ref_out, ref_metrics, ref_rx = _run(stream, cuts, fast=False)
    fast_out, fast_metrics, fast_rx = _run(stream, cuts, fast=True)
    assert fast_out == ref_out
    assert [type(o) for o in fast_out] == [type(o) for o in ref_out]
    assert fast_metrics == ref_metrics
    assert (fast_rx._last_seq, fast_rx._last_uptime, fast_rx.rebooted, fast_rx.hello) == (ref_rx._last_seq, ref_rx._last_uptime, ref_rx.rebooted, ref_rx.hello)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(board_stream())
def test_receive_batch_returns_every_frame_receive_returns(stream_and_cuts: tuple[bytes, list[int]]) -> None:
    """Frame for frame: the runs, unfolded, are the reference's (SensorFrame, Readings) pairs, so no
    good frame is lost or reordered around the bad ones."""
    stream, cuts = stream_and_cuts
    ref, fast = FrameReceiver("p", _metrics_of()), FrameReceiver("p", _metrics_of())
    pos = 0
    taken_fast = 0
    for size in cuts:
        chunk = stream[pos : pos + size]
        pos += size
        expected = ref.receive(chunk)
        got: list[Received] = []
        for item in fast.receive_batch(chunk):
            if isinstance(item, ReadingsRun):
                got += item.messages()
                taken_fast += len(item.rows)
            else:
                got.append(item)
        assert got == expected


def _metrics_of() -> DriverMetrics:
    return DriverMetrics(CollectorRegistry())


def test_an_ordinary_stream_is_taken_by_the_fast_path() -> None:
    """The fast path is not only correct but used: a plain board stream comes out as runs of rows."""
    hello = Hello("b", 1, 0, (ChannelInfo(0, *KINDS[0]), ChannelInfo(1, *KINDS[1]), ChannelInfo(2, *KINDS[2])))
    stream = encode_message(hello, 0) + b"".join(
        encode_message(Readings(10 * i, (ChannelValue(3450 + i % 7), ChannelValue(i // 100 % 2), ChannelValue(400 + i))), i) for i in range(1, 2001)
    )
    rx = FrameReceiver("p", _metrics_of())
    items = [item for k in range(0, len(stream), 4095) for item in rx.receive_batch(stream[k : k + 4095])]
    assert isinstance(items[0], tuple) and items[0][1] == hello
    assert all(isinstance(item, ReadingsRun) for item in items[1:])
    assert sum(len(item.rows) for item in items[1:]) == 2000  # type: ignore[union-attr]


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=MAX_ENCODED).filter(lambda b: 0 not in b), st.binary(min_size=1, max_size=MAX_ENCODED).filter(lambda b: 0 not in b))
def test_a_cobs_skeleton_decodes_exactly_the_frames_of_its_shape(shape_of: bytes, data: bytes) -> None:
    sk = cobs_skeleton(shape_of)
    if sk is None:  # not valid COBS (or a 0xFF block): the reference decoder refuses it or takes the block path
        return
    assert sk.decode(shape_of) == cobs_decode(shape_of)
    decoded = sk.decode(data)
    if decoded is not None:
        assert decoded == cobs_decode(data)
