"""``shopfleet agent`` as a real subprocess: zero loss through broker restarts and SIGKILL, and
presence through the Last Will. A plain paho subscriber with a persistent session (QoS 1) is the
witness; it may see duplicates (the controller dedupes) but must see every seq."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.protocol import Channel, Topics, parse_message
from shopfleet.broker import BrokerProcess
from tests.support.agent import NODE, SHOP, AgentProcess
from tests.support.recorder import Recorder
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def agent_proc(tmp_path: Path, broker: BrokerProcess) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path, broker, ticker=True)
    yield a
    a.cleanup()


def test_zero_loss_through_broker_restarts_and_sigkill(agent_proc: AgentProcess, broker: BrokerProcess) -> None:
    rec = Recorder(broker.port, (f"fleet/v1/{SHOP}/{NODE}/+",), persistent=True)
    try:
        agent_proc.start()
        wait_for(lambda: len(rec.seqs()) >= 50, 30, "the first 50 messages")

        # 1. broker outage while the agent keeps producing
        broker.stop()
        wait_for(lambda: agent_proc.stored() >= 100, 30, "100 messages stored during the outage")
        seen = len(rec.seqs())
        broker.start()
        wait_for(lambda: len(rec.seqs()) >= seen + 100, 30, "the backlog to arrive after the broker came back")

        # 2. SIGKILL while connected and sending, then restart
        agent_proc.kill()
        seen = len(rec.seqs())
        agent_proc.start()
        wait_for(lambda: len(rec.seqs()) >= seen + 50, 30, "messages from the restarted agent")

        # 3. SIGKILL during an outage with a backlog on disk, broker back, agent back
        broker.stop()
        wait_for(lambda: agent_proc.stored() >= 50, 30, "a backlog during the second outage")
        agent_proc.kill()
        backlog = agent_proc.stored()
        assert backlog >= 50
        broker.start()
        agent_proc.start()
        wait_for(lambda: agent_proc.stored() < backlog, 30, "the replay of the killed agent's backlog")

        # 4. graceful stop drains the outbox
        seen = len(rec.seqs())
        wait_for(lambda: len(rec.seqs()) >= seen + 30, 30, "more messages")
        assert agent_proc.terminate() == 0, agent_proc.log.read_text()[-3000:]
        assert agent_proc.stored() == 0, "SIGTERM flushes the outbox"
        epoch, last = agent_proc.meta()
        expected = {(epoch, s) for s in range(1, last + 1)}
        wait_for(lambda: rec.seqs() >= expected, 30, f"every seq 1..{last}")
        assert rec.seqs() == expected, "nothing but this epoch's seqs"
        for topic, payload, _ in rec.messages:
            parse_message(topic, payload)  # all of it follows the protocol
        # The recorder's waits above add up to at least 230 distinct seqs (50, +100, +50, +30): the
        # scenario ran at full length (a hard count would measure the machine's speed instead).
        assert last >= 230
    finally:
        rec.close()


def test_presence_will_on_sigkill_and_higher_session_on_restart(tmp_path: Path, broker: BrokerProcess) -> None:
    agent = AgentProcess(tmp_path, broker, ticker=False)
    topic = Topics.node(SHOP, NODE, Channel.PRESENCE)

    def retained_presence() -> tuple[str, int, str] | None:
        late = Recorder(broker.port, (topic,))  # a new subscriber sees only the retained message
        try:
            got = wait_for(lambda: late.messages, 10, "the retained presence")
        finally:
            late.close()
        t, payload, retained = got[0]
        assert retained
        p = parse_message(t, payload)
        return p.state, p.session, p.reason

    try:
        agent.start()
        live = Recorder(broker.port, (topic,))
        wait_for(lambda: any(p["state"] == "online" for p in live.payloads()), 30, "birth")
        assert retained_presence() == ("online", 1, "")

        agent.kill()
        wait_for(lambda: any(p["state"] == "offline" for p in live.payloads()), 30, "the Last Will")
        assert retained_presence() == ("offline", 1, "will")

        agent.start()
        wait_for(lambda: [p for p in live.payloads() if p["state"] == "online" and p["session"] == 2], 30, "the second birth")
        assert retained_presence() == ("online", 2, "")

        assert agent.terminate() == 0
        assert retained_presence() == ("offline", 2, "shutdown")
        live.close()
    finally:
        agent.cleanup()
