"""Signed commands on a real agent over a real Mosquitto: the controller's remote action is verified
and run; forged, unsigned, wrong-target, replayed, far-future and expired commands are refused
with the reason (or ignored, for expired), and their handler never runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import ConfigError, validate_config
from edge_agent.facts import SystemFacts
from edge_agent.protocol import Channel, Command, CommandResult, Topics, encode, parse_message
from edge_agent.supervisor import PipelineConfigBase
from fleet_controller.rollout.signing import generate_keypair
from fleet_controller.web.remote_actions import CommandSigner, RemoteActions
from shopfleet.broker import BrokerProcess
from tests.support.pipelines import Counting
from tests.support.recorder import Recorder, publish, wait_for

SHOP, NODE = "shop-a", "pi-1"


class BrokerPublisher:
    """The controller's publisher, as RemoteActions uses it, on the test broker."""

    def __init__(self, port: int) -> None:
        self.port = port

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        publish(self.port, topic, payload, retain=retain)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[CommandSigner, Path]:
    generate_keypair(tmp_path / "controller.key")
    return CommandSigner.from_file(tmp_path / "controller.key"), tmp_path / "controller.pub"


@pytest.fixture
def agent_with(broker: BrokerProcess, tmp_path: Path) -> Iterator[Callable[..., tuple[Agent, Counting]]]:
    agents: list[Agent] = []

    def make(public_keys: list[Path], state: str = "counter.json") -> tuple[Agent, Counting]:
        pipeline = Counting()
        config = validate_config({
            "shop": SHOP, "node": NODE, "heartbeat_interval_s": 30, "shutdown_timeout_s": 2,
            "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
            "outbox": {"path": str(tmp_path / f"outbox-{len(agents)}.db"), "synchronous": "normal"},
            "commands": {"public_keys": [str(p) for p in public_keys], "state_path": str(tmp_path / state)},
        })
        agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path),
                      extra_pipelines=[(pipeline, PipelineConfigBase(name="cam-1"))])
        agents.append(agent)
        agent.start()
        assert agent.wait_connected(10)
        wait_for(lambda: pipeline.starts == 1, 10, "the pipeline to start")
        return agent, pipeline

    yield make
    for a in agents:
        a.stop(timeout=2)


def replies(rec: Recorder) -> dict[str, CommandResult]:
    topic = Topics.node(SHOP, NODE, Channel.REPLIES)
    with rec._lock:
        msgs = [(t, p) for t, p, _ in rec.messages if t == topic]
    out: dict[str, CommandResult] = {}
    for t, p in msgs:
        m = parse_message(t, p)
        assert isinstance(m, CommandResult)
        out[m.correlation_id] = m
    return out


def restart(counter: int, *, shop: str = SHOP, node: str = NODE, ttl: float = 30, pipeline: str = "cam-1") -> Command:
    return Command(name="restart_pipeline", args={"pipeline": pipeline}, expires_at=time.time() + ttl, shop=shop, node=node,
                   counter=counter)


def test_the_controllers_restart_is_verified_and_the_supervisor_restarts_the_pipeline(agent_with, keys, broker, tmp_path):
    _signer, pub = keys
    agent, pipeline = agent_with([pub])
    rec = Recorder(broker.port, (Topics.node(SHOP, NODE, Channel.REPLIES),))
    try:
        # Exactly what the controller does for the shop page's button: sign with the next counter and publish.
        from fleet_controller.registry.db import create_engine
        from fleet_controller.registry.migrations import upgrade
        from fleet_controller.registry.read import RegistryReader

        engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
        upgrade(engine)
        actions = RemoteActions(engine, RegistryReader(engine), tmp_path / "controller.key", lambda: BrokerPublisher(broker.port))
        action = actions.send_command(SHOP, NODE, "restart_pipeline", {"pipeline": "cam-1"})
        got = wait_for(lambda: replies(rec).get(action.correlation_id or ""), 10, "the restart's reply")
        assert got.ok and got.result == {"pipeline": "cam-1", "was": "running", "state": "running"}, got
        wait_for(lambda: pipeline.starts == 2, 5, "the pipeline started again")
        # an unknown pipeline: ok false, naming what the node runs
        action2 = actions.send_command(SHOP, NODE, "restart_pipeline", {"pipeline": "cam-9"})
        bad = wait_for(lambda: replies(rec).get(action2.correlation_id or ""), 10, "the second reply")
        assert not bad.ok and "no pipeline 'cam-9'" in bad.error and "cam-1" in bad.error
        assert agent.command_guard.highest_counter == 2
        engine.dispose()
    finally:
        rec.close()


def test_forged_unsigned_misdirected_replayed_and_far_future_commands_are_refused_with_the_reason(agent_with, keys, broker, tmp_path):
    signer, pub = keys
    agent, pipeline = agent_with([pub])
    generate_keypair(tmp_path / "attacker.key")
    attacker = CommandSigner.from_file(tmp_path / "attacker.key")
    good = signer.sign(restart(5))
    tampered = good.model_copy(update={"args": {"pipeline": "cam-1", "x": 1}, "correlation_id": "tampered"})  # altered after signing
    cases = {
        "unsigned": restart(6),
        "unknown_key": attacker.sign(restart(7)),
        "forged": tampered,
        "wrong_target": signer.sign(restart(8, node="pi-2")),
        "expiry_too_far": signer.sign(restart(9, ttl=7200)),
    }
    topic = Topics.node(SHOP, NODE, Channel.COMMANDS)
    rec = Recorder(broker.port, (Topics.node(SHOP, NODE, Channel.REPLIES),))
    try:
        for cmd in cases.values():
            publish(broker.port, topic, encode(cmd))
        publish(broker.port, topic, encode(good))
        got = wait_for(lambda: len(replies(rec)) == len(cases) + 1 and replies(rec), 15, "every reply")
        for reason, cmd in cases.items():
            r = got[cmd.correlation_id]
            assert not r.ok and r.error.startswith(f"refused: {reason}:"), (reason, r.error)
        assert got[good.correlation_id].ok
        # the same valid command again (a captured copy), and an older counter: replays
        replayed = good
        older = signer.sign(restart(4))
        publish(broker.port, topic, encode(older))
        wait_for(lambda: older.correlation_id in replies(rec), 10, "the older counter's reply")
        assert replies(rec)[older.correlation_id].error.startswith("refused: replay:")
        publish(broker.port, topic, encode(replayed))
        wait_for(lambda: agent.registry.get_sample_value("shopfleet_agent_commands_total",
                                                         {"name": "restart_pipeline", "outcome": "refused_replay"}) == 2, 10, "2 replays")
        # an expired signed command is ignored (the protocol's expiry), not run
        publish(broker.port, topic, encode(signer.sign(restart(50, ttl=-1))))
        wait_for(lambda: agent.registry.get_sample_value("shopfleet_agent_commands_total",
                                                         {"name": "restart_pipeline", "outcome": "expired"}) == 1, 10, "the expiry")
        assert pipeline.starts == 2  # only the one good command restarted it
        for reason in cases:
            assert agent.registry.get_sample_value("shopfleet_agent_commands_total",
                                                   {"name": "restart_pipeline", "outcome": f"refused_{reason}"}) == 1
    finally:
        rec.close()


def test_the_counter_survives_a_restart_so_a_captured_command_stays_refused(agent_with, keys, broker):
    signer, pub = keys
    agent, _ = agent_with([pub])
    captured = signer.sign(restart(3))
    topic = Topics.node(SHOP, NODE, Channel.COMMANDS)
    publish(broker.port, topic, encode(captured))
    wait_for(lambda: agent.command_guard.highest_counter == 3, 10, "the command accepted")
    agent.stop(timeout=2)
    again, _ = agent_with([pub])  # same commands.state_path
    assert again.command_guard.highest_counter == 3
    rec = Recorder(broker.port, (Topics.node(SHOP, NODE, Channel.REPLIES),))
    try:
        publish(broker.port, topic, encode(captured))
        r = wait_for(lambda: replies(rec).get(captured.correlation_id), 10, "the replay's reply")
        assert r.error.startswith("refused: replay:")
    finally:
        rec.close()


def test_without_keys_only_an_unsigned_ping_runs(agent_with, keys, broker):
    signer, _pub = keys
    _agent, pipeline = agent_with([])
    rec = Recorder(broker.port, (Topics.node(SHOP, NODE, Channel.REPLIES),))
    try:
        ping = Command(name="ping", expires_at=time.time() + 30)
        signed = signer.sign(restart(1))
        for c in (ping, signed):
            publish(broker.port, Topics.node(SHOP, NODE, Channel.COMMANDS), encode(c))
        got = wait_for(lambda: len(replies(rec)) == 2 and replies(rec), 10, "two replies")
        assert got[ping.correlation_id].ok
        assert got[signed.correlation_id].error.startswith("refused: no_keys:") and "commands.public_keys" in got[signed.correlation_id].error
        assert pipeline.starts == 1
    finally:
        rec.close()


def test_a_missing_public_key_file_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"commands.public_keys.*does not exist"):
        validate_config({"shop": SHOP, "node": NODE, "commands": {"public_keys": [str(tmp_path / "nope.pub")]}})
