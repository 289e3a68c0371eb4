"""Model delivery on the shop: the applier fetches over real HTTP from the controller's API, resumes, limits, verifies, stages.

Every test runs the controller's app under uvicorn (tests/support/models.py) and the agent's
real handler with the in-memory cluster, so "nothing applied" and "the previous release still
runs" are read off the cluster, not assumed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import update

from edge_agent.apply.cluster import InMemoryClusterClient
from edge_agent.apply.diff import ObjectRef
from edge_agent.apply.handler import ApplyMetrics, ApplyReport, DesiredStateHandler
from edge_agent.apply.model_fetch import (
    ModelMetrics,
    ModelRejected,
    ModelsConfig,
    ModelStager,
    ModelUnavailable,
    ShopModelServer,
    package_digest,
    stage_from_shop,
)
from edge_agent.apply.verify import RevisionStore, Verifier
from edge_agent.protocol import DesiredState
from fleet_controller.rollout.models_store import ModelChunk
from fleet_controller.rollout.releases import ModelRef, ReleaseSpec, desired_state_for, store_model
from tests.support.models import CutProxy, ModelApi, make_package

SHOP = "berlin-01"
DIGEST = "@sha256:" + "12" * 32
VISION = ObjectRef("apps/v1", "DaemonSet", "shopfleet", "vision-arm64")


@pytest.fixture
def api(tmp_path: Path):
    a = ModelApi(tmp_path / "controller")
    yield a
    a.stop()


class Shop:
    """The applier of one shop: the real handler and stager over an in-memory cluster."""

    def __init__(self, tmp_path: Path, api: ModelApi, source: str | None, **models: object) -> None:
        self.api = api
        self.registry = CollectorRegistry()
        self.client = InMemoryClusterClient()
        self.reports: list[ApplyReport] = []
        self.store = RevisionStore(tmp_path / "state" / "applied.json")
        self.dir = tmp_path / "models"
        self.stager = ModelStager(ModelsConfig(source=source, dir=self.dir, **models), ModelMetrics(self.registry))  # type: ignore[arg-type]
        self.handler = DesiredStateHandler(
            SHOP, Verifier.from_files([api.public_key_file]), self.store, self.client, self.reports.append,
            metrics=ApplyMetrics(self.registry), models=self.stager, retry_min_s=0.01, retry_max_s=0.05, poll_interval_s=0.01,
            retry_deadline_s=20,
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def running_release(self) -> str | None:
        live = self.client.get(VISION)
        return None if live is None else live["metadata"]["labels"]["shopfleet.io/release"]


def _state(api: ModelApi, revision: int, release: str, model: ModelRef) -> DesiredState:
    spec = ReleaseSpec(name=release, version="1", images={"vision": f"reg.example/vision{DIGEST}"}, model=model)
    return desired_state_for(SHOP, spec, revision, api.signer, node_classes=frozenset({"pi", "gpu"}))


def test_a_cut_download_resumes_where_it_stopped(tmp_path: Path, api: ModelApi):
    ref = store_model(api.engine, make_package(tmp_path / "pkg", size=400_000))
    proxy = CutProxy(api.port, cuts=[90_000, 250_000])  # two cuts mid-body, then the uplink holds
    shop = Shop(tmp_path, api, proxy.url, rate_limit_bps=0)
    model = _state(api, 1, "a", ref).model
    assert model is not None
    partial = shop.dir / ".partial" / f"{ref.archive_sha256}.tar"
    sizes = []
    for _ in range(2):
        with pytest.raises(ModelUnavailable, match="resumes there"):
            shop.stager.ensure(model)
        sizes.append(partial.stat().st_size)
    assert 0 < sizes[0] < sizes[1] < ref.archive_bytes
    path = shop.stager.ensure(model)
    assert package_digest(path) == ref.sha256 and not partial.exists()
    assert proxy.ranges == ["bytes=0-", f"bytes={sizes[0]}-", f"bytes={sizes[1]}-"]
    assert shop.metric("shopfleet_agent_model_bytes_total") == ref.archive_bytes  # every byte fetched once
    assert shop.metric("shopfleet_agent_model_fetch_failures_total", reason="incomplete") == 2
    proxy.close()


def test_the_handler_retries_a_cut_fetch_and_an_outage_resumes_later(tmp_path: Path, api: ModelApi):
    a = store_model(api.engine, make_package(tmp_path / "a", seed=1))
    b = store_model(api.engine, make_package(tmp_path / "b", seed=2, size=500_000))
    proxy = CutProxy(api.port, cuts=[])
    shop = Shop(tmp_path, api, proxy.url, rate_limit_bps=0)
    assert shop.handler.handle(_state(api, 1, "a", a)).status == "applied"
    # The uplink cuts the first transfer mid-way, then stays down past the apply's retry deadline.
    proxy.cuts = [200_000] + [0] * 10_000
    shop.handler._retry_deadline_s = 0.5
    final = shop.handler.handle(_state(api, 2, "b", b))
    assert final.status == "retrying" and "fetch model" in final.error
    assert shop.running_release() == "a"  # nothing of b was applied
    assert not shop.stager.path(b.sha256).exists()
    assert [r.status for r in shop.reports[-3:]] == ["applying", "retrying", "retrying"]
    # The uplink is back: the reconciler resumes the same revision from the partial file.
    proxy.cuts = []
    shop.handler.reconcile()
    assert shop.reports[-1].status == "applied" and shop.running_release() == "b"
    assert shop.metric("shopfleet_agent_model_bytes_total") == a.archive_bytes + b.archive_bytes
    assert (shop.dir / ".applied").read_text().strip() == b.sha256
    proxy.close()


def test_the_bandwidth_limit_holds(tmp_path: Path, api: ModelApi):
    limit = 250_000
    ref = store_model(api.engine, make_package(tmp_path / "pkg", size=400_000))
    shop = Shop(tmp_path, api, api.url, rate_limit_bps=limit)
    model = _state(api, 1, "a", ref).model
    assert model is not None
    started = time.monotonic()
    shop.stager.ensure(model)
    elapsed = time.monotonic() - started
    rate = ref.archive_bytes / elapsed
    assert rate <= limit * 1.05, f"{rate:.0f} B/s above the {limit} B/s limit"
    assert elapsed < ref.archive_bytes / limit * 3 + 5  # and it does finish
    assert shop.metric("shopfleet_agent_model_bytes_total") == ref.archive_bytes


def test_a_package_whose_sha256_differs_is_refused_and_the_shop_keeps_its_release(tmp_path: Path, api: ModelApi):
    a = store_model(api.engine, make_package(tmp_path / "a", seed=1))
    b = store_model(api.engine, make_package(tmp_path / "b", seed=2))
    shop = Shop(tmp_path, api, api.url, rate_limit_bps=0)
    assert shop.handler.handle(_state(api, 1, "a", a)).status == "applied"
    sent = len(shop.client.sent)
    with api.engine.begin() as c:  # the stored bytes rot (or are swapped) after the release was signed
        c.execute(update(ModelChunk).where(ModelChunk.sha256 == b.sha256, ModelChunk.idx == 0).values(data=b"\0" * b.archive_bytes))
    final = shop.handler.handle(_state(api, 2, "b", b))
    assert final.status == "refused"
    assert "model sha256_mismatch" in final.error and "nothing applied" in final.error and "keeps running" in final.error
    assert len(shop.client.sent) == sent and shop.running_release() == "a"
    assert not shop.stager.path(b.sha256).exists() and not any((shop.dir / ".partial").iterdir())
    assert shop.metric("shopfleet_agent_model_fetch_failures_total", reason="sha256_mismatch") == 1
    assert shop.metric("shopfleet_agent_apply_refused_total", reason="model") == 1
    assert shop.stager.is_staged(a.sha256)  # the running model is untouched
    # Once the controller holds the right bytes again, the next revision applies.
    store = api.engine
    from fleet_controller.rollout.models_store import ModelStore

    ModelStore(store).delete(b.sha256)
    assert store_model(store, tmp_path / "b" / "yolo-test") == b
    assert shop.handler.handle(_state(api, 3, "b", b)).status == "applied" and shop.running_release() == "b"


def test_rollback_uses_the_kept_model_without_a_download_and_old_ones_are_pruned(tmp_path: Path, api: ModelApi):
    refs = [store_model(api.engine, make_package(tmp_path / str(i), seed=i)) for i in range(3)]
    shop = Shop(tmp_path, api, api.url, rate_limit_bps=0, keep=2)
    assert shop.handler.handle(_state(api, 1, "r0", refs[0])).status == "applied"
    assert shop.handler.handle(_state(api, 2, "r1", refs[1])).status == "applied"
    fetched = shop.metric("shopfleet_agent_model_bytes_total")
    served = api.metric("shopfleet_controller_model_bytes_served_total")
    assert shop.handler.handle(_state(api, 3, "r0", refs[0])).status == "applied"  # the rollback
    assert shop.metric("shopfleet_agent_model_bytes_total") == fetched
    assert api.metric("shopfleet_controller_model_bytes_served_total") == served
    vision = shop.client.get(VISION)
    assert vision is not None and vision["spec"]["template"]["metadata"]["annotations"]["shopfleet.io/model-sha256"] == refs[0].sha256
    assert shop.handler.handle(_state(api, 4, "r2", refs[2])).status == "applied"
    assert sorted(shop.stager.staged()) == sorted([refs[2].sha256, refs[0].sha256])  # r1 pruned: neither running nor previous
    assert not (shop.dir / ".archives" / f"{refs[1].sha256}.tar").exists()
    assert shop.metric("shopfleet_agent_model_packages") == 2


def test_without_a_source_a_new_model_is_refused_naming_the_key(tmp_path: Path, api: ModelApi):
    ref = store_model(api.engine, make_package(tmp_path / "pkg"))
    shop = Shop(tmp_path, api, None)
    final = shop.handler.handle(_state(api, 1, "a", ref))
    assert final.status == "refused" and "apply.models.source" in final.error and shop.client.sent == []
    unstored = ref.model_copy(update={"archive_sha256": None, "archive_bytes": 0})
    final = shop.handler.handle(_state(api, 2, "b", unstored))
    assert final.status == "refused" and "--model DIR" in final.error


def test_other_nodes_copy_the_model_from_the_applier_and_verify_it(tmp_path: Path, api: ModelApi):
    ref = store_model(api.engine, make_package(tmp_path / "pkg"))
    shop = Shop(tmp_path, api, api.url, rate_limit_bps=0)
    model = _state(api, 1, "a", ref).model
    assert model is not None
    shop.stager.ensure(model)
    server = ShopModelServer(shop.dir / ".archives", 0, host="127.0.0.1").start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        node_dir = tmp_path / "node-2" / "models"
        path = stage_from_shop(url, ref.sha256, node_dir, sleep=lambda s: None)
        assert path == node_dir / ref.sha256 and package_digest(path) == ref.sha256
        assert {p.name for p in path.iterdir()} == {"model.json", "model.onnx"}
        with pytest.raises(ModelRejected, match="has not staged"):
            stage_from_shop(url, "ef" * 32, node_dir, sleep=lambda s: None)
        # A tampered copy on the applier is refused on the node, and nothing appears there.
        archive = shop.dir / ".archives" / f"{ref.sha256}.tar"
        data = bytearray(archive.read_bytes())
        data[2000] ^= 0xFF
        archive.write_bytes(bytes(data))
        other = tmp_path / "node-3" / "models"
        with pytest.raises(ModelRejected, match="digest"):
            stage_from_shop(url, ref.sha256, other, sleep=lambda s: None)
        assert not (other / ref.sha256).exists()
    finally:
        server.stop()
    assert stage_from_shop("http://127.0.0.1:9", ref.sha256, node_dir) == path  # staged: no request at all
