"""The apply path through the real ``kubernetes`` client in ``KubernetesClusterClient``, against
our Kubernetes API emulator (tests/support/kube_emulator.py) over HTTP: each behaviour the apply
path promises is shown failing and recovering. The emulator itself is checked first, on the
points the apply path relies on. The last test is the real-cluster tier (``KUBECONFIG``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from edge_agent.apply.diff import MANAGED_BY, MANAGED_LABEL, SHOP_LABEL, ObjectRef
from edge_agent.apply.errors import ApplyFailed, ClusterUnavailable, ObjectNotFound, UnknownKind
from edge_agent.apply.handler import ApplyMetrics, ApplyReport, DesiredStateHandler
from edge_agent.apply.kube import KubernetesClusterClient
from edge_agent.apply.verify import AppliedRecord, RevisionStore, Verifier
from edge_agent.protocol import DesiredState
from fleet_controller.rollout.releases import ReleaseSpec, desired_state_for
from fleet_controller.rollout.signing import Signer, generate_keypair
from tests.support.kube_emulator import ApiError, KubeEmulator
from tests.support.wait import wait_for

SHOP = "emu-01"
AGENT = ObjectRef("apps/v1", "DaemonSet", "shopfleet", "shopfleet-agent")
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "gates.shopfleet.io"},
    "spec": {"group": "shopfleet.io", "scope": "Namespaced", "names": {"plural": "gates", "singular": "gate", "kind": "Gate"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {"type": "object"}}}]},
}
GATE = {"apiVersion": "shopfleet.io/v1", "kind": "Gate", "metadata": {"name": "fps", "namespace": "shopfleet"}, "spec": {"min": 10}}


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    generate_keypair(tmp_path / "k.pem")
    return Signer.from_file(tmp_path / "k.pem")


NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shopfleet"}}


@pytest.fixture
def emu():
    with KubeEmulator(nodes=2, tick_s=0.01, progress_deadline_s=0.3) as e:
        # The cluster bootstrap (manifests/edge/cluster, applied once by an admin) made the
        # namespace; a shop's desired state never carries it.
        e.handle("POST", "/api/v1/namespaces", {}, "application/json", NAMESPACE)
        mark = len(e.requests)
        del e.requests[:mark]
        yield e


def _state(signer: Signer, revision: int, release: str, classes=frozenset({"pi", "gpu"}), extra: tuple[dict, ...] = ()) -> DesiredState:
    # Each revision ships a new vision build (as a release does): only pod templates whose image
    # changes get a new generation; the others are left running.
    spec = ReleaseSpec(name=release, version=str(revision), images={"vision": "reg.example/vision@sha256:" + f"{revision:02x}" * 32})
    s = desired_state_for(SHOP, spec, revision, signer, node_classes=classes)
    return signer.sign(s.model_copy(update={"objects": s.objects + extra})) if extra else s


class Rig:
    """A handler on the real client against the emulator, with fast timings."""

    def __init__(self, tmp_path: Path, emu: KubeEmulator, client: Any = None, **kw: Any) -> None:
        self.reports: list[ApplyReport] = []
        self.registry = CollectorRegistry()
        self.store = RevisionStore(tmp_path / "state" / "applied.json")
        self.client = client or KubernetesClusterClient(emu.api_client(), request_timeout_s=kw.pop("request_timeout_s", 2),
                                                        discovery_cache=str(tmp_path / "discovery.json"))
        opts = {"ready_timeout_s": 5, "poll_interval_s": 0.02, "retry_deadline_s": 10, "retry_min_s": 0.02, "retry_max_s": 0.2, "self_ref": AGENT, **kw}
        self.handler = DesiredStateHandler(SHOP, Verifier.from_files([tmp_path / "k.pub"]), self.store, self.client, self.reports.append,
                                           metrics=ApplyMetrics(self.registry), **opts)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def _release_of(emu: KubeEmulator) -> set[str]:
    return {o["metadata"]["labels"]["shopfleet.io/release"] for o in emu.objects() if o["kind"] in ("DaemonSet", "Deployment", "ConfigMap")
            and "shopfleet.io/release" in (o["metadata"].get("labels") or {})}


# ----- the emulator, on the behaviour the apply path relies on ---------------------------------


def _apply(emu: KubeEmulator, obj: dict, manager: str = "shopfleet", force: bool = False, dry_run: bool = False):
    ns = obj["metadata"].get("namespace")
    path = f"/api/v1/namespaces/{ns}/configmaps/{obj['metadata']['name']}"
    query = {"fieldManager": manager, **({"force": "true"} if force else {}), **({"dryRun": "All"} if dry_run else {})}
    return emu.handle("PATCH", path, query, "application/apply-patch+yaml", obj)


def test_emulator_field_ownership_conflicts_and_force(emu):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": {"a": "1", "b": "2"}}
    _, first, _ = _apply(emu, cm)
    assert emu.owners("ConfigMap", "c", "default") == {"shopfleet": {"data.a", "data.b"}}
    assert first["metadata"]["managedFields"][0]["fieldsV1"] == {"f:data": {"f:a": {}, "f:b": {}}}
    # Another manager setting the same value shares the field; a different value conflicts...
    _apply(emu, {**cm, "data": {"a": "1"}}, manager="other")
    with pytest.raises(ApiError, match="conflict with \"shopfleet\".*data.b") as exc:
        _apply(emu, {**cm, "data": {"b": "X"}}, manager="other")
    assert exc.value.code == 409
    # ... unless forced, which moves the field to the forcing manager.
    _apply(emu, {**cm, "data": {"a": "1", "b": "X"}}, manager="other", force=True)
    assert emu.owners("ConfigMap", "c", "default") == {"shopfleet": {"data.a"}, "other": {"data.a", "data.b"}}
    # A field a manager stops applying goes, unless someone else still owns it.
    _apply(emu, {**cm, "data": {}}, manager="other")
    assert emu.find("ConfigMap", "c", "default")["data"] == {"a": "1"}


def test_emulator_generation_resource_version_and_dry_run(emu):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "g", "namespace": "default", "labels": {"x": "1"}}, "data": {"a": "1"}}
    _, o1, _ = _apply(emu, cm)
    _, same, _ = _apply(emu, cm)
    assert same["metadata"]["resourceVersion"] == o1["metadata"]["resourceVersion"] and same["metadata"]["generation"] == 1
    _, label, _ = _apply(emu, {**cm, "metadata": {**cm["metadata"], "labels": {"x": "2"}}})
    assert label["metadata"]["generation"] == 1 and label["metadata"]["resourceVersion"] != o1["metadata"]["resourceVersion"]
    _, dry, _ = _apply(emu, {**cm, "data": {"a": "2"}}, dry_run=True)
    assert dry["metadata"]["generation"] == 2 and emu.find("ConfigMap", "g", "default")["data"] == {"a": "1"}
    _, o3, _ = _apply(emu, {**cm, "data": {"a": "2"}})
    assert o3["metadata"]["generation"] == 2
    with pytest.raises(ApiError, match='namespaces "nowhere" not found'):
        _apply(emu, {**cm, "metadata": {"name": "g", "namespace": "nowhere"}}, dry_run=True)


def test_emulator_rolls_a_daemonset_and_a_deployment_out_step_by_step(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu, ready_timeout_s=0.5)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    ds, dep = emu.find("DaemonSet", "vision-arm64", "shopfleet"), emu.find("Deployment", "mosquitto", "shopfleet")
    assert ds["status"]["observedGeneration"] == ds["metadata"]["generation"] == 1
    assert ds["status"]["updatedNumberScheduled"] == ds["status"]["numberAvailable"] == 2
    assert {c["reason"] for c in dep["status"]["conditions"]} >= {"NewReplicaSetAvailable"}
    # An upgrade: the generation moves at once, the status follows the controller's steps.
    seen: list[tuple] = []
    emu.stuck.add("vision-arm64")  # freeze it after its first new pod, to look at the counts
    rig.handler.handle(_state(signer, 2, "r2"))
    ds = emu.find("DaemonSet", "vision-arm64", "shopfleet")
    seen.append((ds["metadata"]["generation"], ds["status"]["observedGeneration"], ds["status"]["updatedNumberScheduled"], ds["status"]["numberAvailable"]))
    assert seen == [(2, 2, 1, 1)]


# ----- the apply path over HTTP ----------------------------------------------------------------


def test_fresh_cluster_then_upgrade_dry_runs_everything_first_and_prunes_after(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu)
    first = rig.handler.handle(_state(signer, 1, "r1"))
    assert first.status == "applied", first.error
    kinds = ["dry" if r.query.get("dryRun") == "All" else r.method for r in emu.writes()]
    assert kinds.index("PATCH") > max(i for i, k in enumerate(kinds) if k == "dry")  # every object dry-run before the first write
    assert all(r.query.get("fieldManager") == "shopfleet" and r.query.get("force") == "true" and r.content_type == "application/apply-patch+yaml"
               for r in emu.writes() if r.method == "PATCH")
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is not None
    # The upgrade: every changed object is dry-run before the first write.
    mark = len(emu.requests)
    second = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert second.status == "applied", second.error
    new = [r for r in emu.requests[mark:] if r.method in ("PATCH", "DELETE")]
    kinds = ["dry" if r.query.get("dryRun") == "All" else r.method for r in new]
    assert kinds.index("PATCH") > max(i for i, k in enumerate(kinds) if k == "dry")
    # The GPU node class's workloads (vision-gpu and fusion) are pruned last, once all was ready.
    assert kinds[-2:] == ["DELETE", "DELETE"] and {r.path.rsplit("/", 1)[1] for r in new[-2:]} == {"vision-gpu", "fusion"}
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is None and emu.find("Namespace", "shopfleet") is not None
    assert _release_of(emu) == {"r2"}
    assert any(o.name == "vision-gpu" and o.status == "pruned" for o in second.objects)


def test_dry_run_rejection_writes_nothing_then_the_fixed_release_applies(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    emu.admission = lambda o: "hostPath outside the allow-list" if o["metadata"]["name"] == "fluent-bit" and o["kind"] == "DaemonSet" else None
    mark = len(emu.requests)
    report = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert report.status == "failed" and "dry run rejected, nothing applied" in report.error and "fluent-bit" in report.error
    assert [o.name for o in report.objects if o.status == "failed"] == ["fluent-bit"]
    assert not [r for r in emu.requests[mark:] if r.method in ("PATCH", "DELETE") and r.query.get("dryRun") != "All"]
    assert _release_of(emu) == {"r1"} and emu.find("DaemonSet", "vision-gpu", "shopfleet") is not None
    assert rig.store.load().status == "failed"
    emu.admission = None
    again = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert again.status == "applied", again.error
    assert _release_of(emu) == {"r2"}


@pytest.mark.parametrize(
    "failure, reason",
    [
        pytest.param({"status": 429, "retry_after": 0.05}, "throttled", id="429-retry-after"),
        pytest.param({"status": 500}, "server_error", id="500"),
        pytest.param({"status": 409}, "conflict", id="409-conflict"),
        pytest.param({"status": None, "delay_s": 3.0}, "connection", id="timeout"),
    ],
)
def test_temporary_failures_are_retried_and_reported_retrying(emu, tmp_path, signer, failure, reason):
    # The request timeout is well above what a healthy request takes on a loaded machine (an
    # ordinary request timing out would be one more retry) and well below the injected delay.
    rig = Rig(tmp_path, emu, request_timeout_s=1.5)
    rule = emu.fail(**failure, times=2, method="PATCH", dry_run=False)
    saved: list[str] = []
    rig.handler._report = lambda r: (rig.reports.append(r), saved.append(rig.store.load().status))
    report = rig.handler.handle(_state(signer, 1, "r1"))
    assert report.status == "applied", report.error
    assert rule.hits == 2 and rig.metric("shopfleet_agent_apply_retries_total", reason=reason) == 2
    statuses = [r.status for r in rig.reports]
    assert statuses[:3] == ["applying", "retrying", "applying"] and statuses[-1] == "applied"
    assert "failed" not in saved and rig.store.load() == AppliedRecord(1, "r1", "applied")


def test_retry_after_is_honoured(emu, tmp_path, signer):
    slept: list[float] = []
    rig = Rig(tmp_path, emu, sleep=lambda s: slept.append(s))
    emu.fail(429, retry_after=7, times=1, method="PATCH", dry_run=True)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    assert 7 in slept


def test_cluster_down_past_the_deadline_is_left_retrying_then_resumed(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu, retry_deadline_s=0.5)
    rule = emu.fail(503, times=10_000, method="PATCH")
    report = rig.handler.handle(_state(signer, 1, "r1"))
    assert report.status == "retrying" and "cluster unavailable" in report.error
    assert rig.store.load() == AppliedRecord(1, "r1", "retrying")
    assert rig.metric("shopfleet_agent_apply_total", outcome="failed") == 0
    rule.times = 0  # the API server is back
    rig.handler.reconcile()
    assert rig.reports[-1].status == "applied" and rig.store.load().status == "applied"
    assert _release_of(emu) == {"r1"}


def test_discovery_failure_is_temporary_too(emu, tmp_path, signer):
    emu.fail(503, times=2, discovery=True)
    rig = Rig(tmp_path, emu)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    assert rig.metric("shopfleet_agent_apply_retries_total", reason="server_error") == 2


def test_a_hanging_discovery_request_times_out_and_is_retried(emu, tmp_path, signer):
    rule = emu.fail(None, delay_s=1.0, times=1, discovery=True)
    rig = Rig(tmp_path, emu, request_timeout_s=0.3)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    assert rule.hits == 1 and rig.metric("shopfleet_agent_apply_retries_total", reason="connection") == 1


def test_crd_applied_first_waited_established_then_its_objects(emu, tmp_path, signer):
    emu.crd_ticks = 15  # established a little later than applied, as on a real server
    rig = Rig(tmp_path, emu)
    report = rig.handler.handle(_state(signer, 1, "r1", extra=(CRD, GATE)))
    assert report.status == "applied", report.error
    writes = [r.path for r in emu.writes() if r.query.get("dryRun") != "All"]
    crd_at = writes.index("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gates.shopfleet.io")
    gate_at = writes.index("/apis/shopfleet.io/v1/namespaces/shopfleet/gates/fps")
    assert crd_at <= 1 and gate_at > crd_at
    assert emu.find("Gate", "fps", "shopfleet")["spec"] == {"min": 10}
    crd = emu.find("CustomResourceDefinition", "gates.shopfleet.io")
    assert {"type": "Established", "status": "True"} in crd["status"]["conditions"]


def test_a_namespace_in_the_set_is_written_first_then_its_objects_dry_run(emu, tmp_path, signer):
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shopfleet-extra"}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra", "namespace": "shopfleet-extra"}, "data": {"a": "1"}}
    report = Rig(tmp_path, emu).handler.handle(_state(signer, 1, "r1", extra=(ns, cm)))
    assert report.status == "applied", report.error
    paths = [(r.path, r.query.get("dryRun") == "All") for r in emu.writes()]
    ns_write = paths.index(("/api/v1/namespaces/shopfleet-extra", False))
    cm_path = "/api/v1/namespaces/shopfleet-extra/configmaps/extra"
    # the ConfigMap can only be written (and, on a fresh cluster, dry-run with effect) once its namespace exists
    assert paths.index((cm_path, False)) > ns_write
    assert emu.find("ConfigMap", "extra", "shopfleet-extra") is not None


def test_lists_are_namespaced_so_the_applier_needs_no_cluster_wide_read(emu, tmp_path, signer):
    # RBAC as in manifests/edge/cluster/rbac.yaml: a Role in namespace shopfleet, no ClusterRole.
    emu.forbid_cluster_wide_lists = True
    rig = Rig(tmp_path, emu)
    first = rig.handler.handle(_state(signer, 1, "r1"))
    assert first.status == "applied", first.error
    second = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert second.status == "applied", second.error
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is None  # pruning still sees what r1 left
    lists = [r for r in emu.requests if r.method == "GET" and "labelSelector" in r.query]
    assert lists and all("/namespaces/shopfleet/" in r.path and r.status == 200 for r in lists)
    # a restarted agent (a new client, no memory) finds the namespaces in the desired state alone
    fresh = KubernetesClusterClient(emu.api_client(), request_timeout_s=2)
    assert {o["metadata"]["name"] for o in fresh.list_managed(SHOP, _state(signer, 2, "r2").objects)} >= {"shopfleet-agent"}
    assert fresh.list_managed(SHOP) == []  # nothing names a namespace: nothing is listed, nothing cluster-wide


def test_a_cluster_wide_list_is_refused_with_403_when_rbac_says_so(emu):
    emu.forbid_cluster_wide_lists = True
    with pytest.raises(ApiError) as exc:
        emu.handle("GET", "/apis/apps/v1/daemonsets", {"labelSelector": "a=b"}, "", None)
    assert exc.value.code == 403 and "at the cluster scope" in exc.value.message
    assert emu.handle("GET", "/apis/apps/v1/namespaces/shopfleet/daemonsets", {}, "", None)[0] == 200


def test_objects_left_in_a_namespace_the_desired_state_dropped_are_still_pruned(emu, tmp_path, signer):
    emu.forbid_cluster_wide_lists = True
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shopfleet-extra"}}
    emu.handle("POST", "/api/v1/namespaces", {}, "application/json", ns)  # made by the bootstrap, like shopfleet
    labels = {MANAGED_LABEL: MANAGED_BY, SHOP_LABEL: SHOP}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra", "namespace": "shopfleet-extra", "labels": labels}, "data": {"a": "1"}}
    rig = Rig(tmp_path, emu)
    assert rig.handler.handle(_state(signer, 1, "r1", extra=(cm,))).status == "applied"
    assert emu.find("ConfigMap", "extra", "shopfleet-extra") is not None
    assert rig.handler.handle(_state(signer, 2, "r2")).status == "applied"  # no object names shopfleet-extra any more
    assert emu.find("ConfigMap", "extra", "shopfleet-extra") is None


def test_object_of_an_unknown_kind_fails_the_dry_run(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu)
    report = rig.handler.handle(_state(signer, 1, "r1", extra=(GATE,)))
    assert report.status == "failed" and "Gate/shopfleet/fps" in report.error
    assert [r for r in emu.writes() if r.query.get("dryRun") != "All"] == []  # not even the Namespace
    with pytest.raises(UnknownKind):
        rig.client.dry_run(GATE)


def test_progress_deadline_exceeded_fails_at_once_and_prunes_nothing(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu, ready_timeout_s=30)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    emu.stuck.add("mosquitto")
    started = time.monotonic()
    report = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    elapsed = time.monotonic() - started
    assert report.status == "failed" and "Deployment/shopfleet/mosquitto" in report.error
    failed = [o for o in report.objects if o.status == "failed"]
    assert [o.name for o in failed] == ["mosquitto"] and "ProgressDeadlineExceeded" in failed[0].message
    assert elapsed < 15  # failed as soon as the deadline passed, not at the 30 s ready timeout
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is not None  # nothing pruned
    emu.stuck.clear()
    # A fixed release (here: the same, once the pods can start) applies and prunes.
    again = rig.handler.handle(_state(signer, 3, "r3", classes=frozenset({"pi"})))
    assert again.status == "applied", again.error
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is None


def test_old_status_is_not_taken_for_the_new_generation(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu, ready_timeout_s=0.3)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    emu.paused = True  # the counts still say "all updated and available", for generation 1
    report = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert report.status == "failed" and "not ready" in report.error
    assert any("has not observed generation 2" in o.message for o in report.objects if o.status == "pending")
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is not None  # nothing pruned
    emu.paused = False
    assert rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"}))).status == "applied"
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is None


def test_daemonset_not_available_times_out_with_its_counts(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu, ready_timeout_s=0.5)
    emu.stuck.add("sensor-driver")
    report = rig.handler.handle(_state(signer, 1, "r1"))
    assert report.status == "failed" and "DaemonSet/shopfleet/sensor-driver" in report.error
    pending = [o for o in report.objects if o.status == "pending"]
    assert [o.name for o in pending] == ["sensor-driver"] and "1 of 2 pods updated" in pending[0].message


class PodReplaced(BaseException):
    """What replacing the agent's own DaemonSet does to the process applying it."""


class DiesWithItsPod:
    """The real client, except that applying the agent's own DaemonSet ends this 'process'."""

    def __init__(self, inner: KubernetesClusterClient) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, obj: dict) -> dict:
        out = self.inner.apply(obj)
        if ObjectRef.of(obj) == AGENT:
            raise PodReplaced()
        return out


def test_agent_persists_before_replacing_its_own_pod_and_resumes(emu, tmp_path, signer):
    first = Rig(tmp_path, emu)
    assert first.handler.handle(_state(signer, 1, "r1")).status == "applied"
    dying = Rig(tmp_path, emu)
    dying.handler._client = DiesWithItsPod(dying.client)  # type: ignore[assignment]
    mark = len(emu.requests)
    with pytest.raises(PodReplaced):
        dying.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert dying.store.load() == AppliedRecord(2, "r2", "applying") and dying.store.load_state().revision == 2
    writes = [r for r in emu.requests[mark:] if r.method == "PATCH" and r.query.get("dryRun") != "All"]
    assert writes[-1].path.endswith("/daemonsets/shopfleet-agent")  # own pod last...
    ready_checks = [i for i, r in enumerate(emu.requests[mark:]) if r.method == "GET" and r.path.endswith("/deployments/mosquitto")]
    assert ready_checks and ready_checks[-1] < emu.requests[mark:].index(writes[-1])  # ...after the others were ready
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is not None  # not pruned yet
    # The new pod: a fresh handler on the same state files picks the apply up.
    reborn = Rig(tmp_path, emu)
    resumed = reborn.handler.resume()
    assert resumed is not None and resumed.status == "applied", resumed and resumed.error
    assert emu.find("DaemonSet", "vision-gpu", "shopfleet") is None and emu.find("DaemonSet", "shopfleet-agent", "shopfleet") is not None
    assert reborn.store.load() == AppliedRecord(2, "r2", "applied") and reborn.handler.resume() is None


def test_drift_is_corrected_and_counted(emu, tmp_path, signer):
    rig = Rig(tmp_path, emu)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    mark = len(emu.requests)
    assert rig.handler.correct_drift() == [] and rig.metric("shopfleet_agent_apply_drift_checks_total", outcome="clean") == 1
    assert emu.requests[mark:] and not [r for r in emu.requests[mark:] if r.method != "GET"]  # a clean check only reads
    # A hand edit (kubectl edit: an Update by another manager) and a deleted object.
    emu.handle("PATCH", "/api/v1/namespaces/shopfleet/configmaps/vision", {"fieldManager": "kubectl-edit"},
               "application/merge-patch+json", {"data": {"vision.yaml": "# edited by hand\n"}})
    assert "kubectl-edit" in emu.owners("ConfigMap", "vision", "shopfleet")
    rig.client.delete(ObjectRef("v1", "ConfigMap", "shopfleet", "fluent-bit"))
    corrected = rig.handler.correct_drift()
    assert {str(r) for r in corrected} == {"ConfigMap/shopfleet/vision", "ConfigMap/shopfleet/fluent-bit"}
    assert rig.metric("shopfleet_agent_apply_drift_corrected_total", kind="ConfigMap") == 2
    assert "edited by hand" not in emu.find("ConfigMap", "vision", "shopfleet")["data"]["vision.yaml"]
    assert "kubectl-edit" not in emu.owners("ConfigMap", "vision", "shopfleet")
    assert emu.find("ConfigMap", "fluent-bit", "shopfleet") is not None
    # While the API server is down the check stops, counts the error and tries again next time.
    rule = emu.fail(500, times=1000, method="GET")
    assert rig.handler.correct_drift() == [] and rig.metric("shopfleet_agent_apply_drift_checks_total", outcome="error") == 1
    rule.times = 0


def test_reconciler_thread_corrects_drift_periodically(emu, tmp_path, signer):
    import threading

    rig = Rig(tmp_path, emu)
    assert rig.handler.handle(_state(signer, 1, "r1")).status == "applied"
    stop = threading.Event()
    t = threading.Thread(target=rig.handler.run_reconciler, args=(stop, 0.05), daemon=True)
    t.start()
    try:
        rig.client.delete(ObjectRef("v1", "ConfigMap", "shopfleet", "vision"))
        # The object reappears before the counter moves (apply, then log and count): wait on both.
        wait_for(lambda: emu.find("ConfigMap", "vision", "shopfleet"), 10, "the reconciler to recreate the ConfigMap")
        wait_for(
            lambda: rig.metric("shopfleet_agent_apply_drift_corrected_total", kind="ConfigMap") >= 1,
            10,
            "the reconciler to count the corrected drift",
        )
    finally:
        stop.set()
        t.join(5)


def test_errors_carry_the_status_as_a_field(emu, tmp_path):
    client = KubernetesClusterClient(emu.api_client(), request_timeout_s=2, discovery_cache=str(tmp_path / "d.json"))
    assert client.get(ObjectRef("v1", "ConfigMap", "default", "missing")) is None
    client.delete(ObjectRef("v1", "ConfigMap", "default", "missing"))  # a missing object is fine
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_Valid", "namespace": "default"}}
    with pytest.raises(ApplyFailed) as exc:
        client.apply(bad)
    assert exc.value.status == 422 and exc.value.reason == "http_422" and "RFC 1123" in str(exc.value)
    with pytest.raises(ObjectNotFound) as nf:
        client.dry_run({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "nowhere"}})
    assert nf.value.status == 404
    emu.fail(429, retry_after=3, method="GET")
    with pytest.raises(ClusterUnavailable) as tmp:
        client.get(ObjectRef("v1", "ConfigMap", "default", "x"))
    assert tmp.value.status == 429 and tmp.value.retry_after == 3 and tmp.value.reason == "throttled"


def test_explicit_kubeconfig_wins_over_in_cluster_config(emu, tmp_path, monkeypatch):
    from kubernetes import config

    called: list[str] = []
    monkeypatch.setattr(config, "load_incluster_config", lambda **kw: called.append("in-cluster"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))
    client = KubernetesClusterClient(kubeconfig=str(kubeconfig), request_timeout_s=2, discovery_cache=str(tmp_path / "d.json"))
    assert client.get(ObjectRef("v1", "Namespace", None, "default"))["metadata"]["name"] == "default"
    assert called == []


# ----- the real-cluster tier ------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="real-cluster tier: set KUBECONFIG to a disposable K3s/Kubernetes cluster to run it (docs/apply.md)")
def test_real_cluster_dry_run_apply_and_prune(tmp_path, signer):
    client = KubernetesClusterClient(kubeconfig=os.environ["KUBECONFIG"], discovery_cache=str(tmp_path / "d.json"))
    reports: list[ApplyReport] = []
    handler = DesiredStateHandler(SHOP, Verifier.from_files([tmp_path / "k.pub"]), RevisionStore(tmp_path / "applied.json"), client, reports.append,
                                  metrics=ApplyMetrics(CollectorRegistry()), ready_timeout_s=120, poll_interval_s=2, retry_deadline_s=120, self_ref=AGENT)
    try:
        report = handler.handle(_state(signer, 1, "r1", classes=frozenset({"pi"})))
        # The images are placeholders: the pods cannot start, but every object must be accepted.
        assert "dry run rejected" not in report.error and not [o for o in report.objects if o.status == "failed" and "dry run" in o.message]
        live = client.list_managed(SHOP)
        assert {o["metadata"]["name"] for o in live} >= {"shopfleet-agent", "vision-arm64"}
        assert all(any(m.get("manager") == "shopfleet" for m in o["metadata"].get("managedFields") or []) for o in live)
    finally:
        for o in client.list_managed(SHOP):
            client.delete(ObjectRef.of(o))
