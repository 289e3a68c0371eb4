"""The rollout executor on a fake clock against a real registry: what the executor tests share."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import select

from edge_agent.apply.verify import Verifier
from edge_agent.protocol import (
    DesiredState,
    Heartbeat,
    NodeFacts,
    PipelineHealth,
    Presence,
    ReportedState,
    parse_downlink,
)
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import NodeUpdate, RegistryStore, SeqCursor, WriteBatch
from fleet_controller.rollout.executor import RolloutExecutor
from fleet_controller.rollout.models import RolloutShop
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
from fleet_controller.rollout.signing import Signer, generate_keypair
from fleet_controller.rollout.store import (
    start_rollout,
)

FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.1, mem_total_bytes=1, mem_available_bytes=1, disk_total_bytes=1, disk_free_bytes=1)
T0 = 1_790_000_000.0  # a Friday, 2026-09-21 ~ 13:33 UTC
SHOPS = ["s-a", "s-b", "s-c", "s-d"]


def spec(name: str) -> ReleaseSpec:
    return ReleaseSpec(name=name, version="1", images={"vision": "reg.example/vision@sha256:" + "5e" * 32})


class Harness:
    def __init__(self, db_url: str, tmp: Path) -> None:
        self.engine = create_engine(db_url)
        upgrade(self.engine)
        self.registry = RegistryStore(self.engine)
        generate_keypair(tmp / "k.pem")
        self.signer = Signer.from_file(tmp / "k.pem")
        self.verifier = Verifier.from_files([tmp / "k.pub"])
        self.now = T0
        self.published: list[tuple[str, DesiredState, bool]] = []
        self.seq: dict[str, int] = {}
        self.executors = [self.executor("ctl-a")]
        self.releases = ReleaseStore(self.engine)
        for name in ("r1", "r2"):
            self.releases.create(spec(name))
        for s in SHOPS:
            self.send(Presence(shop=s, node="n1", state="online", session=1))
            self.heartbeat(s)
            self.registry.register_shop(s, timezone="Europe/Berlin")

    def executor(self, name: str) -> RolloutExecutor:
        def publish(topic: str, payload: bytes, retain: bool, qos: int) -> None:
            state = parse_downlink(topic, payload)
            self.verifier.verify(state)  # exactly what the agent checks
            self.published.append((topic, state, retain))

        return RolloutExecutor(self.engine, self.signer, publish, instance=name, metrics_registry=CollectorRegistry(),
                               lease_ttl_s=10, republish_after_s=30, clock=lambda: self.now)

    def send(self, msg) -> None:
        wb = WriteBatch()
        if msg.kind == "presence":
            wb.presences.append((msg, self.now))
        else:
            wb.uplinks.append((msg, self.now))
            wb.nodes[(msg.shop, msg.node)] = NodeUpdate(SeqCursor(msg.epoch, msg.seq), messages=1)
        wb.seen[(msg.shop, msg.node)] = self.now
        self.registry.write_batch(wb, self.now)

    def _seq(self, shop: str) -> int:
        self.seq[shop] = self.seq.get(shop, 0) + 1
        return self.seq[shop]

    def heartbeat(self, shop: str, fps: float = 15.0, errors: int = 0, **metrics: float) -> None:
        self.send(Heartbeat(shop=shop, node="n1", epoch="e", seq=self._seq(shop), ts=self.now, interval_s=10, facts=FACTS,
                            pipelines={"cam": PipelineHealth(kind="vision", state="running", fps=fps, errors=errors)}, metrics=metrics))

    def report(self, shop: str, status: str = "applied") -> None:
        state = self.last(shop)
        self.send(ReportedState(shop=shop, node="n1", epoch="e", seq=self._seq(shop), release=state.release, revision=state.revision, status=status))

    def last(self, shop: str) -> DesiredState:
        return [s for t, s, _ in self.published if s.shop == shop][-1]

    def shops_published(self) -> list[str]:
        return [s.shop for _, s, _ in self.published]

    def tick(self, advance: float = 0.0, executor: int = 0) -> bool:
        self.now += advance
        return self.executors[executor].tick()

    def state(self, rid: int, shop: str) -> str:
        with self.engine.connect() as c:
            return c.execute(select(RolloutShop.state).where(RolloutShop.rollout_id == rid, RolloutShop.shop_id == shop)).scalar_one()

    def start(self, release: str, **policy) -> int:
        base = {"waves": [{"name": "canary", "shops": ["s-a"]}, {"name": "all", "percent": 100}], "bake_time_s": 60, "apply_timeout_s": 120,
                "max_errors_per_minute": None} | policy
        base.pop("max_errors_per_minute")
        return start_rollout(self.engine, release, policy_from_dict(base), now=self.now)["id"]

    def bake(self, shops: list[str], rid: int, **hb) -> None:
        """Report applied, send fresh heartbeats through the bake time."""
        for s in shops:
            self.report(s)
        self.tick(1)
        for _ in range(3):
            self.now += 1
            for s in shops:
                self.heartbeat(s, **hb)
            self.tick()
        self.now += 60
        for s in shops:
            self.heartbeat(s, **hb)
        self.tick()
