"""200 simulated shops over a real Mosquitto and a real controller process with the rollout executor.

One fleet for the whole module (starting 200 shops is the expensive part); the tests run in order
and each starts from what the previous one left: r1 everywhere, then a bad r2 that must stay in its
canary, then r3 with the controller SIGKILLed in the middle. The controller runs as a child process
so that the kill is real; the test reads its SQLite database (WAL) directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from edge_agent.apply.verify import Verifier
from edge_agent.protocol import Topics, encode
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.store import RegistryStore
from fleet_controller.rollout.models import RolloutShop
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore, desired_state_for
from fleet_controller.rollout.signing import Signer, generate_keypair
from fleet_controller.rollout.store import rollout_status, start_rollout
from shopfleet.broker import BrokerProcess
from shopfleet.sim.fleet import SimulatedFleet
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow

N_SHOPS = 200
ROOT = Path(__file__).resolve().parents[2]
DIGEST = "@sha256:" + "ef" * 32


class ControllerProc:
    """The controller child process; ``kill()`` is SIGKILL."""

    def __init__(self, config: dict, log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until close()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.rollout.controller_proc", json.dumps(config)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline().decode()
        assert line.startswith("READY"), f"controller did not start: {line!r}; see {log_path}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = BrokerProcess(workdir=tmp / "broker")
        (tmp / "broker").mkdir()
        self.broker.start()
        generate_keypair(tmp / "signing.pem")
        self.signer = Signer.from_file(tmp / "signing.pem")
        self.db_url = f"sqlite:///{tmp / 'controller.db'}"
        self.config = {
            "controller": {"db_url": self.db_url, "broker": {"port": self.broker.port, "client_id": "ctl-rollout"},
                           "api": {"port": 0}, "presence": {"sweep_interval_s": 0.5}, "instance": "ctl-a"},
            "executor": {"signing_key": str(tmp / "signing.pem"), "tick_interval_s": 0.3, "lease_ttl_s": 3.0, "republish_after_s": 5.0},
        }
        self.ctl = ControllerProc(self.config, tmp / "controller-a.log")
        self.engine = create_engine(self.db_url)
        self.shop_ids = [f"shop-{i:03d}" for i in range(N_SHOPS)]
        self.fleet = SimulatedFleet(self.shop_ids, Verifier.from_files([tmp / "signing.pub"]), tmp / "agents",
                                    host="127.0.0.1", port=self.broker.port, connections=4, heartbeat_interval_s=1.0,
                                    faults={"r2-bad": "degraded"})
        self.fleet.start()
        wait_for(lambda: self._count_shops() == N_SHOPS, 60, "every shop to reach the registry")
        reg = RegistryStore(self.engine)
        for i, s in enumerate(self.shop_ids):
            reg.register_shop(s, region=("north", "south")[i % 2], labels={"tier": "flagship" if i < 5 else "standard"})
        self.releases = ReleaseStore(self.engine)

    def _count_shops(self) -> int:
        from fleet_controller.registry.models import Shop

        with self.engine.connect() as c:
            return len(c.execute(select(Shop.id)).all())

    def release(self, name: str, **labels: str) -> ReleaseSpec:
        spec = ReleaseSpec(name=name, version="1", images={"vision": f"reg.example/vision{DIGEST}", "agent": f"reg.example/agent{DIGEST}"}, labels=labels)
        return self.releases.create(spec)

    def rows(self, rollout_id: int) -> dict[str, RolloutShop]:
        with self.engine.connect() as c:
            return {r.shop_id: r for r in c.execute(select(RolloutShop.__table__).where(RolloutShop.rollout_id == rollout_id))}

    def status(self, rollout_id: int) -> dict:
        return rollout_status(self.engine, rollout_id)

    def close(self) -> None:
        self.fleet.stop()
        self.ctl.stop()
        self.engine.dispose()
        self.broker.cleanup()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("rollout-world"))
    yield w
    w.close()


def _final(world: World, rid: int, timeout: float) -> dict:
    return wait_for(lambda: (st := world.status(rid))["status"] not in ("running", "paused", "rolling_back") and st, timeout, f"rollout {rid} to finish")


def test_good_release_completes_every_wave_inside_the_windows(world: World):
    world.release("r1")
    busy = world.shop_ids[10:20]
    until = time.time() + 4
    for s in busy:
        world.fleet.shops[s].busy_until = until  # shoppers inside: not to be touched before they leave
    policy = policy_from_dict({
        "waves": [{"name": "canary", "shops": ["shop-007", "shop-123"]}, {"name": "ten", "percent": 10},
                  {"name": "half", "percent": 50}, {"name": "all", "percent": 100}],
        "max_in_flight": 100, "bake_time_s": 1.0, "apply_timeout_s": 30,
        "windows": {"idle": {"max_age_s": 10}},
        "gates": {"min_fps": 5, "metrics": [{"metric": "cart_review_rate", "max": 0.1}]},
    })
    st = start_rollout(world.engine, "r1", policy)
    assert [w["shops"] for w in st["waves"]] == [2, 18, 80, 100]
    final = _final(world, st["id"], 90)
    assert final["status"] == "completed", final
    assert all(w["done"] == w["shops"] for w in final["waves"])
    rows = world.rows(st["id"])
    # Waves ran in order: no shop of a wave started before every shop of the previous one was done.
    by_wave: dict[int, list[RolloutShop]] = {}
    for r in rows.values():
        by_wave.setdefault(r.wave, []).append(r)
    for i in range(1, len(by_wave)):
        assert min(r.started_at for r in by_wave[i]) >= max(r.done_at for r in by_wave[i - 1])
    # Inside the windows: no shop applied while a shopper was inside; the busy ones waited.
    assert sum(s.applied_while_busy for s in world.fleet.shops.values()) == 0
    assert all(rows[s].started_at >= until - 0.5 for s in busy)
    assert {s.applier.release() for s in world.fleet.shops.values()} == {"r1"}


def test_bad_release_fails_its_canary_is_rolled_back_and_touches_nobody_else(world: World):
    world.release("r2-bad")  # the simulated fleet is told (faults) that r2-bad runs degraded
    before = {s: len(sh.history) for s, sh in world.fleet.shops.items()}
    canary = ["shop-042", "shop-043", "shop-044"]
    policy = policy_from_dict({
        "waves": [{"name": "canary", "shops": canary}, {"name": "all", "percent": 100}],
        "max_in_flight": 50, "bake_time_s": 4.0, "apply_timeout_s": 30,
        "gates": {"min_fps": 5, "max_errors_per_minute": 60},
    })
    st = start_rollout(world.engine, "r2-bad", policy)
    final = _final(world, st["id"], 60)
    assert final["status"] == "failed" and "wave 0 failed" in final["reason"], final
    rows = world.rows(st["id"])
    assert {rows[s].state for s in canary} == {"rolled_back"}
    assert any("fps" in rows[s].reason or "back on r1" in rows[s].reason for s in canary)
    assert {r.state for s, r in rows.items() if s not in canary} == {"skipped"}
    for s in canary:
        shop = world.fleet.shops[s]
        releases = [h[2] for h in shop.history[before[s]:]]
        assert releases == ["r2-bad", "r1"], (s, shop.history)
        assert shop.applier.release() == "r1"
    untouched = [s for s in world.shop_ids if s not in canary]
    assert all(len(world.fleet.shops[s].history) == before[s] for s in untouched)
    assert {world.fleet.shops[s].applier.release() for s in untouched} == {"r1"}


def test_controller_killed_mid_rollout_resumes(world: World, tmp_path):
    world.release("r3")
    policy = policy_from_dict({
        "waves": [{"name": "a", "percent": 25}, {"name": "b", "percent": 50}, {"name": "c", "percent": 100}],
        "max_in_flight": 60, "bake_time_s": 1.0, "apply_timeout_s": 30,
    })
    st = start_rollout(world.engine, "r3", policy)
    wait_for(lambda: sum(1 for r in world.rows(st["id"]).values() if r.state == "done") >= 40, 60, "40 shops done before the kill")
    world.ctl.kill()
    killed_at = time.time()
    done_at_kill = {s for s, r in world.rows(st["id"]).items() if r.state == "done"}
    assert len(done_at_kill) < N_SHOPS
    # A second controller instance on the same database takes over once the lease expires.
    config = {**world.config, "controller": {**world.config["controller"], "instance": "ctl-b"}}
    world.ctl = ControllerProc(config, world.tmp / "controller-b.log")
    final = _final(world, st["id"], 120)
    assert final["status"] == "completed", final
    rows = world.rows(st["id"])
    assert all(rows[s].done_at < killed_at + 0.5 for s in done_at_kill)  # finished shops were not redone
    assert {s.applier.release() for s in world.fleet.shops.values()} == {"r3"}
    # Every shop applied r3 exactly once (re-published revisions are recognised as already applied).
    for shop in world.fleet.shops.values():
        applied = [h for h in shop.history if h[2] == "r3" and h[3] == "applied"]
        assert len({h[1] for h in applied}) == 1, shop.history


@pytest.mark.parametrize("attack", ["unsigned", "forged", "replayed"])
def test_forged_unsigned_and_replayed_states_are_refused_and_reported(world: World, attack):
    shop = world.fleet.shops["shop-150"]
    if not any(h[3] == "applied" for h in shop.history):  # run alone: give the shop a genuine state first
        if "r1" not in {r["name"] for r in world.releases.list()}:
            world.release("r1")
        genuine = desired_state_for(shop.shop, world.releases.get("r1"), 2, world.signer)
        world.fleet.links[1].publish_sync(Topics.desired(shop.shop), encode(genuine))
        wait_for(lambda: any(h[3] == "applied" for h in shop.history), 20, "the genuine state to apply")
    release_now = shop.applier.release()
    current = max(h[1] for h in shop.history if h[3] == "applied")
    spec = world.releases.get("r1")
    offset = {"unsigned": 5, "forged": 6, "replayed": 0}[attack]
    if attack == "replayed":
        msg = desired_state_for(shop.shop, spec, current - 1, world.signer)  # genuinely signed, but old
    elif attack == "unsigned":
        msg = desired_state_for(shop.shop, spec, current + offset, world.signer).model_copy(update={"signature": None})
    else:
        genuine = desired_state_for(shop.shop, spec, current + offset, world.signer)
        objs = list(genuine.objects)
        objs[0] = {**objs[0], "metadata": {**objs[0]["metadata"], "labels": {"owned": "yes"}}}
        msg = genuine.model_copy(update={"objects": tuple(objs)})
    world.fleet.links[1].publish_sync(Topics.desired(shop.shop), encode(msg))
    reason = {"unsigned": "unsigned", "forged": "forged", "replayed": "replay"}[attack]
    from fleet_controller.registry.models import ReportedStateRecord

    def reported():
        with world.engine.connect() as c:
            r = c.execute(select(ReportedStateRecord.__table__).where(ReportedStateRecord.shop_id == shop.shop)).first()
        return r if r is not None and r.status == "refused" and r.revision == msg.revision and r.error.startswith(reason) else None

    row = wait_for(reported, 20, f"the {attack} refusal to reach the controller")
    assert row.error.startswith(reason)
    assert shop.applier.release() == release_now
    assert shop.metrics_registry.get_sample_value("shopfleet_agent_apply_refused_total", {"reason": reason}) == 1
