"""Presence while the controller lags (both engines): silence is judged by message time, so nothing flaps.

A controller that falls behind its stream commits every heartbeat late. Judged by the time of
the commit, every node then looked silent for longer than ``stale_after_intervals`` x interval:
the sweep marked it stale and its late heartbeat revived it, a presence change and an event row
per node per heartbeat period, which made every message dearer exactly when the controller was
behind (docs/benchmarks.md, Scale). These tests drive the writer as the service does (batches,
and the presence sweep in between), with the clock under the test's control.
"""

from __future__ import annotations

import pytest

from edge_agent.protocol import Topics, encode
from fleet_controller.intake.core import IntakeCore
from fleet_controller.settings import PresenceSettings
from tests.support.controller import T0, heartbeat

PS = PresenceSettings(stale_after_intervals=2.5, offline_after_intervals=6, default_interval_s=10)
INTERVAL = 10.0
NODES = [f"pi-{i}" for i in range(12)]


def beat(node: str, seq: int, sent: float) -> tuple[str, bytes, float]:
    """Heartbeat ``seq`` of ``node`` sent at ``sent``, as a raw message (received at ``sent``; the caller moves that)."""
    return Topics.node("shop-a", node, "telemetry"), encode(heartbeat(node=node, seq=seq, interval=INTERVAL, ts=sent)), sent


def run_fleet(core: IntakeCore, *, lag: float, where: str, seconds: int, silent_from: dict[str, float] | None = None,
              skew: dict[str, float] | None = None) -> list[tuple[float, str, str, str]]:
    """Play ``NODES`` (one heartbeat each per 10 s, phases spread) for ``seconds`` while the writer lags ``lag`` seconds.

    ``where`` is where the backlog waits: ``"intake"`` (received on time, committed late) or
    ``"broker"`` (received late too). Each simulated second the writer commits what was sent
    ``lag`` seconds before (with ``lag`` < 0: it stores a third of the stream's pace, falling
    further behind every second, ``-lag`` seconds at most), then the sweep runs. A node of ``silent_from`` sends nothing from that
    time on; ``skew`` shifts a node's clock (its ``ts``). Return the presence changes ``(at, node, old, new)``.
    """
    silent_from = silent_from or {}
    skew = skew or {}
    changes: list[tuple[float, str, str, str]] = []
    sent_log: list[tuple[float, tuple[str, bytes, float]]] = []
    seqs = dict.fromkeys(NODES, 0)
    for tick in range(seconds):
        now = T0 + tick
        for k, node in enumerate(NODES):  # node k sends at phase k/len(NODES) of each period
            if tick % INTERVAL == k * INTERVAL // len(NODES) and now < silent_from.get(node, float("inf")):
                seqs[node] += 1
                topic, payload, _ = beat(node, seqs[node], now + skew.get(node, 0.0))
                sent_log.append((now, (topic, payload, now)))
        upto = now - lag if lag >= 0 else max(T0 + tick / 3, now + lag)
        due = [m for t, m in sent_log if t <= upto]
        sent_log = [(t, m) for t, m in sent_log if t > upto]
        if due:
            if where == "broker":
                due = [(topic, payload, now) for topic, payload, _ in due]  # received only now
            out = core.process_batch(due, now)
            changes += [(now, e.node, e.data["old"], e.data["new"]) for e in out.events if e.topic == "presence"]
        changes += [(now, e.node, e.data["old"], e.data["new"]) for e in core.registry.sweep_presence(PS, now)]
    return changes


def after_first_sight(changes: list[tuple[float, str, str, str]]) -> list[tuple[float, str, str, str]]:
    return [c for c in changes if c[2] != "unknown"]


@pytest.mark.parametrize(("lag", "where"), [(40, "intake"), (40, "broker"), (-120, "broker")],
                         ids=["intake-backlog", "broker-backlog", "broker-backlog-growing"])
def test_a_lagging_controller_does_not_flap_presence(registry, reader, lag, where):
    """40 s behind (more than 2.5 heartbeat intervals), or falling ever further behind, for 3 minutes: every node stays
    online, no presence change at all."""
    core = IntakeCore(registry)
    changes = run_fleet(core, lag=lag, where=where, seconds=180)
    assert {(n, new) for _, n, old, new in changes if old == "unknown"} == {(n, "online") for n in NODES}
    assert after_first_sight(changes) == []
    assert reader.presence_counts().get("online") == len(NODES)


@pytest.mark.parametrize("where", ["intake", "broker"])
def test_a_silent_node_is_still_found_while_the_controller_lags(registry, reader, where):
    """The sweep is not switched off by lag: a node that stops sending goes stale once the stream shows it silent.

    Its last heartbeat was sent before ``T0 + 60``; the stream shows 2.5 intervals of silence 25 s
    after that, and the controller, 40 s behind, learns it 40 s later: stale by ``T0 + 60 + 25 + 40``
    (give or take a heartbeat period's phase), never earlier than 25 s of real silence; offline after 60 s.
    """
    core = IntakeCore(registry)
    changes = run_fleet(core, lag=40, where=where, seconds=200, silent_from={"pi-3": T0 + 60})
    late = after_first_sight(changes)
    assert [(n, old, new) for _, n, old, new in late] == [("pi-3", "online", "stale"), ("pi-3", "stale", "offline")]
    last_sent = T0 + 50 + 3 * INTERVAL // len(NODES)  # pi-3's phase in the period that started at T0 + 50
    (stale_at, *_), (offline_at, *_) = late
    assert last_sent + 25 + 40 <= stale_at <= last_sent + 25 + 40 + 2
    assert last_sent + 60 + 40 <= offline_at <= last_sent + 60 + 40 + 2
    assert reader.get_node("shop-a", "pi-3").presence == "offline"


def test_a_caught_up_controller_marks_silence_on_time_and_ignores_slow_clocks(registry, reader):
    """No lag: a silent node goes stale 25 s after its last heartbeat as before; a node whose clock is an hour behind
    (its ts far in the past) but whose messages arrive on time is never marked stale."""
    core = IntakeCore(registry)
    changes = run_fleet(core, lag=0, where="intake", seconds=80, silent_from={"pi-5": T0 + 30}, skew={"pi-7": -3600.0})
    late = after_first_sight(changes)
    assert [(n, old, new) for _, n, old, new in late] == [("pi-5", "online", "stale")]
    last_sent = T0 + 20 + 5 * INTERVAL // len(NODES)
    assert last_sent + 25 <= late[0][0] <= last_sent + 25 + 2


def test_replayed_old_messages_do_not_hold_the_sweep_back(registry, reader):
    """A node draining an hour-old outbox (old ts, received now) does not move the stream back: silence elsewhere still counts."""
    core = IntakeCore(registry)
    core.process_batch([beat("pi-0", 1, T0), beat("pi-1", 1, T0)], T0)
    for k in range(2, 40):  # pi-1 replays old messages for a minute; pi-0 is silent from T0 on
        now = T0 + 1.5 * k
        topic, payload, _ = beat("pi-1", k, T0 - 3600 + k)
        core.process_batch([(topic, payload, now)], now)
        swept = core.registry.sweep_presence(PS, now)
        if swept:
            break
    assert [(e.node, e.data["new"]) for e in swept] == [("pi-0", "stale")]
    assert T0 + 25 < now <= T0 + 27
