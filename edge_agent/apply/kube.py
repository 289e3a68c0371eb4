"""``ClusterClient`` on a real Kubernetes/K3s API server, with the ``kubernetes`` client.

Server-side apply with field manager ``shopfleet`` and ``force=true``: the agent owns every field
it sends (a hand edit with kubectl is overwritten on the next apply, and shows up in
``managedFields``). Lists go by label (``app.kubernetes.io/managed-by=shopfleet`` and the shop),
across the kinds a desired state may contain, so pruning only ever sees our own objects.
API errors are split for the caller: 4xx (the object is wrong or forbidden) is ``ApplyFailed``,
anything else (5xx, connection refused, timeout) is ``ClusterUnavailable``.
"""

from __future__ import annotations

from typing import Any

from edge_agent.apply.diff import MANAGED_BY, MANAGED_LABEL, SHOP_LABEL, ObjectRef
from edge_agent.apply.errors import ApplyFailed, ClusterUnavailable

FIELD_MANAGER = "shopfleet"

MANAGED_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
)
"""Kinds a shop's desired state may contain (and the agent's ClusterRole allows)."""


class KubernetesClusterClient:
    """Talk to the shop's K3s API server through the dynamic client."""

    def __init__(
        self, api_client: Any = None, *, kubeconfig: str | None = None, request_timeout_s: float = 30.0,
        kinds: tuple[tuple[str, str], ...] = MANAGED_KINDS,
    ) -> None:
        from kubernetes import client, config, dynamic

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(config_file=kubeconfig)
            api_client = client.ApiClient()
        self._dyn = dynamic.DynamicClient(api_client)
        self._timeout = request_timeout_s
        self._kinds = kinds

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self._dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            raise ApplyFailed(f"the cluster does not know {api_version} {kind}") from None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.dynamic.exceptions import DynamicApiError
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=self._timeout, **kwargs)
        except (ApiException, DynamicApiError) as exc:
            status = getattr(exc, "status", None) or 0
            detail = exc.summary() if isinstance(exc, DynamicApiError) else f"{exc.reason}: {exc.body}"
            if 400 <= status < 500:
                raise ApplyFailed(f"HTTP {status}: {detail}") from None
            raise ClusterUnavailable(f"HTTP {status}: {exc}") from None
        except (HTTPError, OSError) as exc:
            raise ClusterUnavailable(str(exc)) from None

    def list_managed(self, shop: str) -> list[dict[str, Any]]:
        """Return every object of the managed kinds labelled as ours and the shop's."""
        selector = f"{MANAGED_LABEL}={MANAGED_BY},{SHOP_LABEL}={shop}"
        out: list[dict[str, Any]] = []
        for api_version, kind in self._kinds:
            res = self._resource(api_version, kind)
            listing = self._call(self._dyn.get, res, label_selector=selector)
            for item in listing.to_dict().get("items") or []:
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                out.append(item)
        return out

    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Return the live object or None."""
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self._resource(ref.api_version, ref.kind)
        try:
            return self._call(self._dyn.get, res, name=ref.name, namespace=ref.namespace).to_dict()
        except NotFoundError:
            return None
        except ApplyFailed as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` as field manager ``shopfleet``, forcing conflicts."""
        ref = ObjectRef.of(obj)
        res = self._resource(ref.api_version, ref.kind)
        result = self._call(
            self._dyn.server_side_apply,
            res,
            body=obj,
            name=ref.name,
            namespace=ref.namespace,
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        return result.to_dict()

    def delete(self, ref: ObjectRef) -> None:
        """Delete the object in the background; a missing object is fine."""
        res = self._resource(ref.api_version, ref.kind)
        try:
            self._call(self._dyn.delete, res, name=ref.name, namespace=ref.namespace, body={"propagationPolicy": "Background"})
        except ApplyFailed as exc:
            if "HTTP 404" not in str(exc):
                raise
