"""``ClusterClient`` on a real Kubernetes/K3s API server, with the ``kubernetes`` client.

Server-side apply with field manager ``shopfleet`` and ``force=true``: the agent owns every field
it sends (a hand edit with kubectl is overwritten on the next apply or drift check, and shows up
in ``managedFields``). ``dry_run`` is the same request with ``dryRun=All``: the API server runs
validation and admission and stores nothing. Lists go by label
(``app.kubernetes.io/managed-by=shopfleet`` and the shop), so pruning only ever sees our own
objects, and never cluster-wide for a namespaced kind: each namespaced kind is listed in each
namespace the desired state names (its objects' namespaces and its Namespace objects), plus the
configured ``namespaces`` and those this client wrote to before, so the applier needs no
cluster-wide read (a Role per namespace is enough). A cluster-scoped kind is listed only when the
desired state contains that kind or this client wrote one before: then its RBAC must allow that
kind cluster-wide anyway, and otherwise the agent cannot have made any to prune.

Configuration: an explicit ``kubeconfig`` always wins; without one, the in-cluster service
account, then ``$KUBECONFIG`` / ``~/.kube/config``.

API errors are split by class for the caller, the HTTP status kept as a field:

* 429 (with its ``Retry-After``), 409 (a concurrent write), 5xx, timeouts and connection errors
  are ``ClusterUnavailable`` (temporary: retried);
* 404 is ``ObjectNotFound``; a kind discovery does not list is ``UnknownKind``;
* any other 4xx is ``ApplyFailed`` (the object is wrong or forbidden).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from edge_agent.apply.diff import MANAGED_BY, MANAGED_LABEL, SHOP_LABEL, ObjectRef
from edge_agent.apply.errors import ApplyFailed, ClusterUnavailable, ObjectNotFound, UnknownKind

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

_TEMPORARY_STATUSES = {408: "http_408", 409: "conflict", 429: "throttled"}


def _retry_after(headers: Any) -> float | None:
    """Return the seconds of an HTTP ``Retry-After`` header (delta-seconds form), None if absent or a date."""
    if not headers:
        return None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _message(exc: Any) -> str:
    """Return the API server's own message from an error body (a ``Status`` object), else the raw body."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            import json

            msg = json.loads(body).get("message")
            if msg:
                return str(msg)
        except (ValueError, AttributeError):
            pass
        return str(body)[:500]
    return str(getattr(exc, "reason", "") or exc)


def translate_api_error(exc: Any, what: str) -> ApplyFailed | ClusterUnavailable:
    """Return our error for a ``kubernetes`` ``ApiException``: class by status, status kept as a field."""
    status = int(getattr(exc, "status", 0) or 0)
    text = f"{what}: HTTP {status}: {_message(exc)}"
    if status in _TEMPORARY_STATUSES or status >= 500 or status == 0:
        reason = _TEMPORARY_STATUSES.get(status, "server_error" if status else "no_status")
        return ClusterUnavailable(text, reason=reason, status=status or None, retry_after=_retry_after(getattr(exc, "headers", None)))
    if status == 404:
        return ObjectNotFound(text)
    return ApplyFailed(text, reason=f"http_{status}", status=status)


class KubernetesClusterClient:
    """Talk to the shop's K3s API server through the dynamic client."""

    def __init__(
        self, api_client: Any = None, *, kubeconfig: str | None = None, request_timeout_s: float = 30.0,
        kinds: tuple[tuple[str, str], ...] = MANAGED_KINDS, discovery_cache: str | None = None,
        namespaces: Iterable[str] = (),
    ) -> None:
        from kubernetes import client

        if api_client is None:
            api_client = client.ApiClient(load_configuration(kubeconfig))
        self._api = api_client
        self._timeout = request_timeout_s
        self._kinds = kinds
        self._cache_file = discovery_cache
        self._dyn_client: Any = None
        # Where earlier releases may have left objects: the configured namespaces and every one
        # this client wrote to (a namespace dropped from the desired state is still listed, so its
        # objects are pruned), and the cluster-scoped kinds it wrote.
        self._namespaces: set[str] = set(namespaces)
        self._cluster_kinds: set[tuple[str, str]] = set()

    @property
    def _dyn(self) -> Any:
        # Built on first use, and through _call: building it runs discovery (GET /version, /apis),
        # which may fail like any other request and must be retried like one.
        if self._dyn_client is None:
            from kubernetes.dynamic import DynamicClient

            timeout = self._timeout

            class TimedDynamicClient(DynamicClient):
                """The dynamic client, with our timeout on the requests it makes itself (discovery)."""

                def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
                    params.setdefault("_request_timeout", timeout)
                    return super().request(method, path, body, **params)

            self._dyn_client = self._call(lambda **_: TimedDynamicClient(self._api, cache_file=self._cache_file), what="discovery")  # type: ignore[no-untyped-call]
        return self._dyn_client

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        dyn = self._dyn
        try:
            # The lazy discoverer refreshes its cache once when a kind is missing, so a kind whose
            # CRD was just established is found here without restarting the agent.
            return self._call(lambda **_: dyn.resources.get(api_version=api_version, kind=kind), what="discovery")
        except ResourceNotFoundError:
            raise UnknownKind(f"the cluster does not know {api_version} {kind}") from None

    def _call(self, fn: Callable[..., Any], *args: Any, what: str = "request", **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=self._timeout, **kwargs)
        except ApiException as exc:
            raise translate_api_error(exc, what) from None
        except (HTTPError, OSError) as exc:
            raise ClusterUnavailable(f"{what}: {type(exc).__name__}: {exc}", reason="connection") from None

    def list_managed(self, shop: str, desired: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Return every object of the managed kinds labelled as ours and the shop's, listed namespace by namespace.

        ``desired`` (the desired state's objects) names the namespaces to list the namespaced kinds
        in and the cluster-scoped kinds to list at all (see the module docstring).
        """
        selector = f"{MANAGED_LABEL}={MANAGED_BY},{SHOP_LABEL}={shop}"
        desired = list(desired)
        namespaces = set(self._namespaces)
        kinds_wanted = set(self._cluster_kinds)
        for o in desired:
            meta = o.get("metadata") or {}
            if meta.get("namespace"):
                namespaces.add(str(meta["namespace"]))
            if o.get("kind") == "Namespace" and meta.get("name"):
                namespaces.add(str(meta["name"]))
            kinds_wanted.add((str(o.get("apiVersion", "")), str(o.get("kind", ""))))
        out: list[dict[str, Any]] = []
        for api_version, kind in self._kinds:
            try:
                res = self._resource(api_version, kind)
            except UnknownKind:
                continue  # a kind this cluster does not serve holds none of our objects
            if getattr(res, "namespaced", False):
                scopes: list[str | None] = list(sorted(namespaces))
            else:
                scopes = [None] if (api_version, kind) in kinds_wanted else []
            for ns in scopes:
                extra = {"namespace": ns} if ns is not None else {}
                where = f" in namespace {ns}" if ns is not None else ""
                try:
                    listing = self._call(self._dyn.get, res, label_selector=selector, what=f"list {kind}{where}", **extra)
                except ObjectNotFound:
                    continue  # the namespace does not exist (yet): nothing of ours in it
                for item in listing.to_dict().get("items") or []:
                    item.setdefault("apiVersion", api_version)
                    item.setdefault("kind", kind)
                    out.append(item)
        return out

    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Return the live object or None."""
        try:
            res = self._resource(ref.api_version, ref.kind)
            return dict(self._call(self._dyn.get, res, name=ref.name, namespace=ref.namespace, what=f"get {ref}").to_dict())
        except (ObjectNotFound, UnknownKind):
            return None

    def _apply(self, obj: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        ref = ObjectRef.of(obj)
        res = self._resource(ref.api_version, ref.kind)
        if not dry_run:
            if ref.namespace:
                self._namespaces.add(ref.namespace)
            else:
                self._cluster_kinds.add((ref.api_version, ref.kind))
        extra = {"dry_run": "All"} if dry_run else {}
        result = self._call(
            self._dyn.server_side_apply, res, body=obj, name=ref.name, namespace=ref.namespace,
            field_manager=FIELD_MANAGER, force_conflicts=True, what=f"{'dry-run ' if dry_run else ''}apply {ref}", **extra,
        )
        return dict(result.to_dict())

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` as field manager ``shopfleet``, forcing conflicts."""
        return self._apply(obj, dry_run=False)

    def dry_run(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` with ``dryRun=All``: validation and admission run, nothing is stored."""
        return self._apply(obj, dry_run=True)

    def delete(self, ref: ObjectRef) -> None:
        """Delete the object in the background; a missing object (or kind) is fine."""
        try:
            res = self._resource(ref.api_version, ref.kind)
            self._call(self._dyn.delete, res, name=ref.name, namespace=ref.namespace, body={"propagationPolicy": "Background"}, what=f"delete {ref}")
        except (ObjectNotFound, UnknownKind):
            pass


def load_configuration(kubeconfig: str | None) -> Any:
    """Return a ``kubernetes`` client Configuration: an explicit kubeconfig wins over in-cluster.

    The client's own urllib3 retries are turned off: the handler retries with its own backoff,
    deadline and ``retrying`` report, and a hidden second retry layer would multiply waits.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.retries = 0
    return cfg
