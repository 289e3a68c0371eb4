"""The real ``KubernetesClusterClient`` code (dynamic client, discovery, server-side apply, label
lists, delete) against kmock's in-memory Kubernetes API emulator over HTTP.

kmock is partial, and the gaps are filled here, at the emulator, never in our client: it does not
create objects on an apply PATCH (a real API server does), does not filter lists by label selector,
runs no DaemonSet controller (so status is set here as the controller would), and cannot route
``/api/v1/namespaces`` itself (so the Namespace kind is left out of this tier). The real-cluster
tier (``KUBECONFIG``) covers the rest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import kmock
from kmock._internal import enums
from kubernetes import client as kc
from prometheus_client import CollectorRegistry

from edge_agent.apply.diff import ObjectRef
from edge_agent.apply.handler import ApplyMetrics, DesiredStateHandler
from edge_agent.apply.kube import MANAGED_KINDS, KubernetesClusterClient
from edge_agent.apply.verify import RevisionStore, Verifier
from fleet_controller.rollout.releases import ReleaseSpec, desired_state_for
from fleet_controller.rollout.signing import Signer, generate_keypair

SHOP = "kmock-01"
RESOURCES = {
    "v1/serviceaccounts": ("ServiceAccount", True), "v1/configmaps": ("ConfigMap", True), "v1/services": ("Service", True),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False),
    "apps/v1/daemonsets": ("DaemonSet", True), "apps/v1/deployments": ("Deployment", True),
}


class ApplyingEmulator(kmock.KubernetesEmulator):
    """kmock plus what an API server and the workload controllers would do."""

    async def _handle(self, request):
        if request.resource is not None and request.action == enums.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            data = dict(request.data)
            if data.get("kind") in ("DaemonSet", "Deployment"):
                data["status"] = {"observedGeneration": 0, "desiredNumberScheduled": 2, "updatedNumberScheduled": 2, "numberReady": 2,
                                  "updatedReplicas": 1, "availableReplicas": 1}
            if key not in self._objects:
                self._objects[key] = data
            elif self._objects[key].deleted:
                self._objects[key].create(data)
            else:
                self._objects[key].patch({"status": data.get("status", {})})
        return await super()._handle(request)

    async def _serve_list(self, request):
        listing = {"apiVersion": "v1", "kind": "List", **(await super()._serve_list(request))}  # kmock leaves kind out
        selector = request.params.get("labelSelector")
        if selector:
            want = dict(part.split("=", 1) for part in selector.split(","))
            listing["items"] = [o for o in listing["items"] if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in want.items())]
        return listing


async def test_handler_with_the_real_client_over_http(tmp_path: Path):
    generate_keypair(tmp_path / "k.pem")
    signer = Signer.from_file(tmp_path / "k.pem")
    spec = ReleaseSpec(name="r1", version="1", images={"vision": "reg.example/vision@sha256:" + "77" * 32})
    kinds = tuple(k for k in MANAGED_KINDS if k[1] != "Namespace")

    def state(revision: int, classes: frozenset[str]):
        s = desired_state_for(SHOP, spec, revision, signer, node_classes=classes)
        return signer.sign(s.model_copy(update={"objects": tuple(o for o in s.objects if o["kind"] != "Namespace")}))

    async with ApplyingEmulator() as km, kmock.Server(km) as server:
        for key, (kind, namespaced) in RESOURCES.items():
            km.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "create", "patch", "delete"})
        api = kc.ApiClient(kc.Configuration(host=str(server.url).rstrip("/")))
        reports = []

        def run() -> tuple:
            cluster = KubernetesClusterClient(api, kinds=kinds, request_timeout_s=10)
            handler = DesiredStateHandler(SHOP, Verifier.from_files([tmp_path / "k.pub"]), RevisionStore(tmp_path / "applied.json"), cluster,
                                          reports.append, metrics=ApplyMetrics(CollectorRegistry()), ready_timeout_s=5, poll_interval_s=0.1)
            first = handler.handle(state(1, frozenset({"pi", "gpu"})))
            live_first = {o["metadata"]["name"] for o in cluster.list_managed(SHOP)}
            second = handler.handle(state(2, frozenset({"pi"})))
            live_second = {o["metadata"]["name"] for o in cluster.list_managed(SHOP)}
            missing = cluster.get(ObjectRef("apps/v1", "DaemonSet", "shopfleet", "vision-gpu"))
            return first, second, live_first, live_second, missing

        first, second, live_first, live_second, missing = await asyncio.to_thread(run)
        assert first.status == "applied", first.error
        assert {"shopfleet-agent", "vision-arm64", "vision-gpu", "sensor-driver", "mosquitto"} <= live_first
        assert second.status == "applied", second.error
        assert "vision-gpu" not in live_second and missing is None
        assert any(o.name == "vision-gpu" and o.status == "pruned" for o in second.objects)
        applies = [r for r in km if r.method == enums.method.PATCH]
        assert applies and all(r.headers.get("Content-Type") == "application/apply-patch+yaml" for r in applies)
        assert all(r.params.get("fieldManager") == "shopfleet" and r.params.get("force") == "true" for r in applies)
        deletes = [r for r in km if r.method == enums.method.DELETE]
        assert [str(r.url.path).rsplit("/", 1)[-1] for r in deletes] == ["vision-gpu"]
