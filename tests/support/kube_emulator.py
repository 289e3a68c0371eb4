"""A small Kubernetes API server emulator for the apply path's tests, on 127.0.0.1 over HTTP.

It serves exactly the calls the ``kubernetes`` dynamic client makes for
:class:`~edge_agent.apply.kube.KubernetesClusterClient`, and behaves the way the apply path relies on:

* **discovery**: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>/<version>``; a
  CRD's kind is served only once the CRD is ``Established``;
* **objects**: get, list (all namespaces, ``labelSelector`` with ``k=v`` and ``k!=v``), create
  (POST), server-side apply (PATCH ``application/apply-patch+yaml`` with ``fieldManager``,
  ``force``, ``dryRun=All``), merge patch (PATCH ``application/merge-patch+json``, the way a hand
  edit writes) and delete; a namespaced object needs its Namespace (404 otherwise, as a real API
  server answers);
* **field ownership**: every manager owns the leaf fields it set (lists are atomic, as for the
  lists without merge keys); an apply that changes a field another manager owns is refused with
  409 unless ``force=true``, which takes the field over; fields a manager stops applying are
  removed unless someone else owns them; ``metadata.managedFields`` shows it all;
* **generation and resourceVersion**: ``metadata.generation`` moves when anything but metadata
  and status changes, ``resourceVersion`` only when the stored object changes (a no-op apply
  leaves it alone), and dry runs store and bump nothing;
* **controllers**: a background thread plays the DaemonSet, Deployment and CRD controllers, one
  step per ``tick_s``: observe the generation, then replace pods one by one (updated and available
  counts, old replicas terminating), conditions included. ``stuck`` names workloads whose new pods
  never become available; a stuck Deployment reports ``ProgressDeadlineExceeded`` after
  ``progress_deadline_s``; ``paused`` stops the controllers altogether;
* **failures on demand**: :meth:`KubeEmulator.fail` answers matching requests with a status (429
  with ``Retry-After``, 500, 409, ...) or holds them past the client's timeout, a given number of
  times; :attr:`KubeEmulator.admission` refuses objects like an admission webhook (422).

What it does not do, on purpose: authentication, watches, strategic merge keys (lists are atomic),
defaulting, garbage collection of owned objects, finalizers (a deleted Namespace goes at once,
with everything in it). The real-cluster tier (``KUBECONFIG``) covers those.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

Obj = dict[str, Any]
Path = tuple[str, ...]

# (group, version, plural) -> (kind, namespaced)
BUILTIN: dict[tuple[str, str, str], tuple[str, bool]] = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("", "v1", "secrets"): ("Secret", True),
    ("", "v1", "services"): ("Service", True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("apps", "v1", "daemonsets"): ("DaemonSet", True),
    ("apps", "v1", "deployments"): ("Deployment", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles"): ("ClusterRole", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings"): ("ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io", "v1", "roles"): ("Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): ("RoleBinding", True),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions"): ("CustomResourceDefinition", False),
}

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SERVER_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")


class ApiError(Exception):
    """An API answer other than success: rendered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.headers = code, reason, message, headers or {}

    def body(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code}


@dataclass
class Failure:
    """A failure rule: the next ``times`` matching requests fail (``status``) or hang (``delay_s``)."""

    status: int | None = 500
    times: int = 1
    retry_after: float | None = None
    delay_s: float | None = None
    method: str | None = None
    path: str | None = None
    dry_run: bool | None = None
    discovery: bool = False
    hits: int = 0

    def matches(self, method: str, path: str, dry_run: bool, discovery: bool) -> bool:
        return (
            self.times > 0
            and (self.method is None or self.method == method)
            and (self.path is None or self.path in path)
            and (self.dry_run is None or self.dry_run == dry_run)
            and (discovery == self.discovery)
        )


@dataclass(frozen=True)
class Request:
    """One request as the emulator saw it (for assertions on what the client sent)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Obj | None
    status: int


@dataclass
class _Stored:
    obj: Obj
    owners: dict[str, set[Path]] = field(default_factory=dict)  # manager -> leaf paths
    operations: dict[str, str] = field(default_factory=dict)  # manager -> Apply | Update


def _leaves(obj: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Return the leaf fields of an object's user content (lists atomic), keyed by path."""
    out: dict[Path, Any] = {}
    if isinstance(obj, dict):  # an empty map owns nothing (it sets no field)
        for k, v in obj.items():
            if not prefix and k in ("apiVersion", "kind", "status"):
                continue
            if prefix == ("metadata",) and k in _SERVER_META:
                continue
            out.update(_leaves(v, (*prefix, k)))
    elif prefix:
        out[prefix] = obj
    return out


def _set(obj: Obj, path: Path, value: Any) -> None:
    for k in path[:-1]:
        nxt = obj.get(k)
        if not isinstance(nxt, dict):
            nxt = obj[k] = {}
        obj = nxt
    obj[path[-1]] = copy.deepcopy(value)


def _delete(obj: Obj, path: Path) -> None:
    parents = []
    for k in path[:-1]:
        nxt = obj.get(k)
        if not isinstance(nxt, dict):
            return
        parents.append((obj, k))
        obj = nxt
    obj.pop(path[-1], None)
    for parent, k in reversed(parents):  # drop the maps the removal emptied
        if parent[k] == {}:
            del parent[k]
        else:
            break


def _fields_v1(paths: set[Path]) -> Obj:
    root: Obj = {}
    for p in sorted(paths):
        node = root
        for k in p:
            node = node.setdefault(f"f:{k}", {})
    return root


def _spec_changed(old: Obj, new: Obj) -> bool:
    strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}  # noqa: E731
    return strip(old) != strip(new)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


class KubeEmulator:
    """The emulated API server: ``with KubeEmulator() as emu: ... emu.url``."""

    def __init__(self, *, nodes: int = 2, tick_s: float = 0.02, crd_ticks: int = 3, progress_deadline_s: float = 1.0) -> None:
        self.nodes = nodes
        self.tick_s = tick_s
        self.crd_ticks = crd_ticks
        self.progress_deadline_s = progress_deadline_s
        self.stuck: set[str] = set()
        self.paused = False  # True: the controllers do nothing (a busy or restarting controller-manager)
        self.admission: Callable[[Obj], str | None] | None = None
        # True: RBAC like the applier's (Roles per namespace, no ClusterRole): a list without a
        # namespace (of any kind) is refused with 403, as the API server refuses it.
        self.forbid_cluster_wide_lists = False
        self.requests: list[Request] = []
        self._failures: list[Failure] = []
        self._objects: dict[tuple[str, str, str, str | None, str], _Stored] = {}  # (group, version, plural, ns, name)
        self._crd_kinds: dict[tuple[str, str, str], tuple[str, bool]] = {}
        self._rollouts: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self._rv = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        for ns in ("default", "kube-system"):
            self._store(("", "v1", "namespaces", None, ns), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # ----- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Return the server's base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KubeEmulator:
        for target, name in ((self._server.serve_forever, "kube-emulator-http"), (self._controllers, "kube-emulator-controllers")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(5)

    def api_client(self) -> Any:
        """Return a ``kubernetes`` ApiClient pointed at this emulator, its own urllib3 retries off."""
        from kubernetes import client

        cfg = client.Configuration(host=self.url)
        cfg.retries = 0
        return client.ApiClient(cfg)

    # ----- test controls ----------------------------------------------------------------------

    def fail(self, status: int | None = 500, *, times: int = 1, retry_after: float | None = None, delay_s: float | None = None,
             method: str | None = None, path: str | None = None, dry_run: bool | None = None, discovery: bool = False) -> Failure:
        """Fail the next ``times`` matching requests with ``status`` (after ``delay_s``), or just hang them for ``delay_s``."""
        rule = Failure(status, times, retry_after, delay_s, method, path, dry_run, discovery)
        with self._lock:
            self._failures.append(rule)
        return rule

    def objects(self, kind: str | None = None) -> list[Obj]:
        """Return copies of the stored objects (of ``kind``)."""
        with self._lock:
            return [copy.deepcopy(s.obj) for s in self._objects.values() if kind is None or s.obj.get("kind") == kind]

    def find(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """Return a copy of one stored object, or None."""
        for o in self.objects(kind):
            if o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace:
                return o
        return None

    def owners(self, kind: str, name: str, namespace: str | None = None) -> dict[str, set[str]]:
        """Return manager -> dotted leaf paths it owns, for one object."""
        with self._lock:
            for s in self._objects.values():
                m = s.obj["metadata"]
                if s.obj["kind"] == kind and m["name"] == name and m.get("namespace") == namespace:
                    return {mgr: {".".join(p) for p in paths} for mgr, paths in s.owners.items() if paths}
        return {}

    def writes(self) -> list[Request]:
        """Return the requests that changed (or, dry run, would have changed) something."""
        return [r for r in self.requests if r.method in ("POST", "PATCH", "PUT", "DELETE")]

    # ----- discovery --------------------------------------------------------------------------

    def _kinds(self) -> dict[tuple[str, str, str], tuple[str, bool]]:
        return {**BUILTIN, **self._crd_kinds}

    def _discovery(self, path: str) -> Obj | None:
        kinds = self._kinds()
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.0-shopfleet-emulator", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for g, v, _ in kinds:
                if g and v not in groups.setdefault(g, []):
                    groups[g].append(v)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in sorted(groups.items())]}
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            g, v = "", parts[1]
        elif parts[0] == "apis" and len(parts) == 3:
            g, v = parts[1], parts[2]
        else:
            return None
        resources = [{"name": plural, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                      "verbs": ["create", "delete", "get", "list", "patch", "update"]}
                     for (rg, rv, plural), (kind, ns) in sorted(kinds.items()) if (rg, rv) == (g, v)]
        if not resources:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{g}/{v}" if g else v, "resources": resources}

    # ----- request handling -------------------------------------------------------------------

    def _route(self, path: str) -> tuple[str, str, str, str | None, str | None]:
        """Return (group, version, plural, namespace, name) of an object or collection path."""
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            g, v, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            g, v, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        ns: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        if len(rest) > 2 or (g, v, rest[0]) not in self._kinds():
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        return g, v, rest[0], ns, rest[1] if len(rest) == 2 else None

    def handle(self, method: str, path: str, query: dict[str, str], content_type: str, body: Obj | None) -> tuple[int, Obj, dict[str, str]]:
        """Answer one request: (status, JSON body, extra headers). Thread-safe."""
        with self._lock:
            if method == "GET":
                found = self._discovery(path)
                if found is not None:
                    return 200, found, {}
            g, v, plural, ns, name = self._route(path)
            kind, namespaced = self._kinds()[(g, v, plural)]
            api_version = f"{g}/{v}" if g else v
            if namespaced and ns is not None and not self._get(("", "v1", "namespaces", None, ns)) and method in ("POST", "PATCH"):
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
            key = (g, v, plural, ns if namespaced else None, name or "")
            dry_run = query.get("dryRun") == "All"
            if method == "GET" and name is None:
                if self.forbid_cluster_wide_lists and ns is None:
                    raise ApiError(403, "Forbidden", f'{plural}.{g or "core"} is forbidden: User "system:serviceaccount:shopfleet:shopfleet-applier" '
                                                     f'cannot list resource "{plural}" in API group "{g}" at the cluster scope')
                return 200, self._list(g, v, plural, ns, query.get("labelSelector"), api_version, kind), {}
            if method == "GET":
                stored = self._get(key)
                if stored is None:
                    raise ApiError(404, "NotFound", f'{plural}.{g or "core"} "{name}" not found')
                return 200, copy.deepcopy(stored.obj), {}
            if method == "DELETE":
                if name is None or self._get(key) is None:
                    raise ApiError(404, "NotFound", f'{plural}.{g or "core"} "{name}" not found')
                if not dry_run:
                    self._remove(key)
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "kind": plural}}, {}
            if body is None:
                raise ApiError(400, "BadRequest", "a body is required")
            manager = query.get("fieldManager", "")
            if method == "POST":
                name = (body.get("metadata") or {}).get("name")
                key = (g, v, plural, ns if namespaced else None, name or "")
                if self._get(key) is not None:
                    raise ApiError(409, "AlreadyExists", f'{plural}.{g or "core"} "{name}" already exists')
                return 201, self._write(key, body, manager or "unknown", "Update", dry_run, api_version, kind, force=True), {}
            if method == "PATCH" and content_type.startswith("application/apply-patch"):
                if not manager:
                    raise ApiError(400, "BadRequest", "PATCH with apply requires a fieldManager")
                if (body.get("metadata") or {}).get("name") != name:
                    raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
                return 200, self._write(key, body, manager, "Apply", dry_run, api_version, kind, force=query.get("force") == "true"), {}
            if method == "PATCH" and content_type.startswith("application/merge-patch"):
                stored = self._get(key)
                if stored is None:
                    raise ApiError(404, "NotFound", f'{plural}.{g or "core"} "{name}" not found')
                merged = _merge_patch(stored.obj, body)
                return 200, self._write(key, merged, manager or "unknown", "Update", dry_run, api_version, kind, force=True), {}
            raise ApiError(415, "UnsupportedMediaType", f"the emulator does not serve {method} {content_type}")

    def _get(self, key: tuple[str, str, str, str | None, str]) -> _Stored | None:
        return self._objects.get(key)

    def _list(self, g: str, v: str, plural: str, ns: str | None, selector: str | None, api_version: str, kind: str) -> Obj:
        items = []
        for (kg, kv, kp, kns, _), s in sorted(self._objects.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            if (kg, kv, kp) != (g, v, plural) or (ns is not None and kns != ns):
                continue
            labels = s.obj["metadata"].get("labels") or {}
            if selector and not all(self._selects(term, labels) for term in selector.split(",")):
                continue
            item = copy.deepcopy(s.obj)
            item.pop("apiVersion", None)  # a real API server leaves them out of list items
            item.pop("kind", None)
            items.append(item)
        return {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    @staticmethod
    def _selects(term: str, labels: dict[str, str]) -> bool:
        if "!=" in term:
            k, val = term.split("!=", 1)
            return labels.get(k) != val
        k, _, val = term.partition("=")
        return labels.get(k.rstrip("=")) == val.lstrip("=")

    def _validate(self, obj: Obj, api_version: str, kind: str) -> None:
        name = (obj.get("metadata") or {}).get("name") or ""
        if obj.get("apiVersion") != api_version or obj.get("kind") != kind:
            raise ApiError(400, "BadRequest", f"the body is {obj.get('apiVersion')} {obj.get('kind')}, the URL is {api_version} {kind}")
        if not _DNS1123.match(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \'-\' or \'.\'')
        if self.admission is not None:
            why = self.admission(obj)
            if why:
                raise ApiError(422, "Invalid", f'admission webhook "policy.shopfleet.test" denied the request: {why}')

    def _write(self, key: tuple[str, str, str, str | None, str], body: Obj, manager: str, operation: str, dry_run: bool,
               api_version: str, kind: str, *, force: bool) -> Obj:
        self._validate(body, api_version, kind)
        stored = self._get(key)
        old = copy.deepcopy(stored.obj) if stored is not None else {"apiVersion": api_version, "kind": kind, "metadata": {}}
        owners = copy.deepcopy(stored.owners) if stored is not None else {}
        operations = dict(stored.operations) if stored is not None else {}
        live = _leaves(old)
        new_leaves = _leaves(body)
        if operation == "Apply":
            conflicts = sorted(
                (other, p) for other, paths in owners.items() if other != manager for p in paths if p in new_leaves and live.get(p) != new_leaves[p]
            )
            if conflicts and not force:
                what = "; ".join(f'conflict with "{o}" using {api_version}: .{".".join(p)}' for o, p in conflicts)
                raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict{'s' * (len(conflicts) > 1)}: {what}")
            new = copy.deepcopy(old)
            for other, p in conflicts:
                owners[other].discard(p)
            others = set().union(*(paths for o, paths in owners.items() if o != manager)) if owners else set()
            for p in owners.get(manager, set()) - set(new_leaves) - others:
                _delete(new, p)
            for p, val in new_leaves.items():
                _set(new, p, val)
            owners[manager] = set(new_leaves)
        else:  # Update: the manager owns what it changed
            new = copy.deepcopy(body)
            new.pop("status", None)  # status is a subresource: only the controllers write it
            if "status" in old:
                new["status"] = old["status"]
            changed = {p for p, val in new_leaves.items() if live.get(p) != val}
            for o in owners:
                owners[o] -= changed | (set(live) - set(new_leaves))
            owners[manager] = owners.get(manager, set()) | changed
        operations[manager] = operation
        meta = new.setdefault("metadata", {})
        meta["name"], meta["namespace"] = key[4], key[3]
        if key[3] is None:
            meta.pop("namespace")
        unchanged = stored is not None and {k: v for k, v in new.items() if k != "metadata"} == {k: v for k, v in stored.obj.items() if k != "metadata"} \
            and {k: v for k, v in meta.items() if k not in _SERVER_META} == {k: v for k, v in stored.obj["metadata"].items() if k not in _SERVER_META}
        if unchanged and stored is not None:
            if not dry_run:
                stored.owners = owners
                stored.operations = operations
                stored.obj["metadata"]["managedFields"] = self._managed_fields(owners, operations, api_version)
            return copy.deepcopy(stored.obj)
        meta["managedFields"] = self._managed_fields(owners, operations, api_version)
        if stored is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta["generation"] = 1
            if kind == "Namespace":
                new["status"] = {"phase": "Active"}
            if kind == "CustomResourceDefinition":
                new["status"] = {"conditions": [{"type": "NamesAccepted", "status": "True"}, {"type": "Established", "status": "False", "reason": "Installing"}]}
        elif _spec_changed(stored.obj, new):
            meta["generation"] = stored.obj["metadata"].get("generation", 1) + 1
        if dry_run:
            meta["resourceVersion"] = str(self._rv)
            return new
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[key] = _Stored(new, owners, operations)
        return copy.deepcopy(new)

    @staticmethod
    def _managed_fields(owners: dict[str, set[Path]], operations: dict[str, str], api_version: str) -> list[Obj]:
        return [{"manager": m, "operation": operations.get(m, "Update"), "apiVersion": api_version, "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(paths)}
                for m, paths in sorted(owners.items()) if paths]

    def _store(self, key: tuple[str, str, str, str | None, str], obj: Obj) -> None:
        self._rv += 1
        obj["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=str(self._rv), generation=1)
        obj["status"] = {"phase": "Active"}
        self._objects[key] = _Stored(obj)

    def _remove(self, key: tuple[str, str, str, str | None, str]) -> None:
        stored = self._objects.pop(key)
        self._rollouts.pop((stored.obj["kind"], key[3], key[4]), None)
        if stored.obj["kind"] == "Namespace":  # no finalizers here: everything in it goes at once
            for k in [k for k in self._objects if k[3] == key[4]]:
                del self._objects[k]
        if stored.obj["kind"] == "CustomResourceDefinition":
            spec = stored.obj.get("spec") or {}
            for ver in spec.get("versions") or []:
                self._crd_kinds.pop((spec.get("group"), ver.get("name"), (spec.get("names") or {}).get("plural")), None)

    # ----- controllers ------------------------------------------------------------------------

    def _controllers(self) -> None:
        while not self._stop.wait(self.tick_s):
            if not self.paused:
                self.step()

    def step(self) -> None:
        """Advance every controller by one step (the background thread calls this every ``tick_s``)."""
        with self._lock:
            for key, s in list(self._objects.items()):
                kind = s.obj["kind"]
                if kind == "DaemonSet":
                    self._step_daemonset(key, s.obj)
                elif kind == "Deployment":
                    self._step_deployment(key, s.obj)
                elif kind == "CustomResourceDefinition":
                    self._step_crd(key, s.obj)

    def _set_status(self, obj: Obj, status: Obj) -> None:
        if obj.get("status") != status:
            obj["status"] = status
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)

    def _step_daemonset(self, key: tuple[str, str, str, str | None, str], obj: Obj) -> None:
        gen = obj["metadata"]["generation"]
        st = dict(obj.get("status") or {})
        n = self.nodes
        stuck = obj["metadata"]["name"] in self.stuck
        if st.get("observedGeneration") != gen:
            had = st.get("numberAvailable", 0)
            st.update(observedGeneration=gen, desiredNumberScheduled=n, currentNumberScheduled=n, updatedNumberScheduled=0,
                      numberAvailable=had, numberReady=had, numberUnavailable=n - had)
        else:
            updated = st["updatedNumberScheduled"]
            if stuck:
                # one old pod replaced by a new one that never becomes ready; the rollout stops there
                st.update(updatedNumberScheduled=max(updated, min(1, n)), numberAvailable=min(st["numberAvailable"], n - 1))
            elif updated < n or st["numberAvailable"] < n:
                st.update(updatedNumberScheduled=min(n, updated + 1), numberAvailable=min(n, max(st["numberAvailable"], updated + 1)))
            st["numberReady"] = st["numberAvailable"]
            st["numberUnavailable"] = n - st["numberAvailable"]
        self._set_status(obj, st)

    def _step_deployment(self, key: tuple[str, str, str, str | None, str], obj: Obj) -> None:
        gen = obj["metadata"]["generation"]
        want = (obj.get("spec") or {}).get("replicas", 1)
        st = dict(obj.get("status") or {})
        name = obj["metadata"]["name"]
        ro = self._rollouts.setdefault((obj["kind"], key[3], name), {})
        now = time.monotonic()
        if st.get("observedGeneration") != gen:
            ro.update(old=st.get("availableReplicas", 0), updated=0, started=now)
            st["observedGeneration"] = gen
            st["conditions"] = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": f'ReplicaSet "{name}" is progressing.'}]
        elif name in self.stuck:
            ro["updated"] = min(want, 1)
            if now - ro["started"] > self.progress_deadline_s:
                st["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                     "message": f'ReplicaSet "{name}" has timed out progressing.'},
                                    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}]
        elif ro["updated"] < want:
            ro["updated"] += 1  # surge one new pod ...
        elif ro["old"] > 0:
            ro["old"] -= 1  # ... then retire one old one
        else:
            st["conditions"] = [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": f'ReplicaSet "{name}" has successfully progressed.'},
                                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]
        new_available = 0 if name in self.stuck else ro["updated"]
        st.update(replicas=ro["updated"] + ro["old"], updatedReplicas=ro["updated"], availableReplicas=new_available + ro["old"],
                  readyReplicas=new_available + ro["old"])
        self._set_status(obj, st)

    def _step_crd(self, key: tuple[str, str, str, str | None, str], obj: Obj) -> None:
        ro = self._rollouts.setdefault(("CustomResourceDefinition", None, key[4]), {"ticks": 0})
        ro["ticks"] += 1
        if ro["ticks"] < self.crd_ticks:
            return
        spec = obj.get("spec") or {}
        names = spec.get("names") or {}
        for ver in spec.get("versions") or []:
            if ver.get("served", True):
                self._crd_kinds[(spec["group"], ver["name"], names["plural"])] = (names["kind"], spec.get("scope") == "Namespaced")
        self._set_status(obj, {"conditions": [{"type": "NamesAccepted", "status": "True"}, {"type": "Established", "status": "True"}],
                               "acceptedNames": names})

    # ----- HTTP -------------------------------------------------------------------------------

    def _failure_for(self, method: str, path: str, dry_run: bool) -> Failure | None:
        discovery = path in ("/version", "/api", "/apis") or bool(re.fullmatch(r"/api/v1|/apis/[^/]+/[^/]+", path))
        with self._lock:
            for rule in self._failures:
                if rule.matches(method, path, dry_run, discovery):
                    rule.times -= 1
                    rule.hits += 1
                    return rule
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two writes: without this, each answer waits for a delayed ACK

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                ctype = self.headers.get("Content-Type", "")
                body: Obj | None = None
                headers: dict[str, str] = {}
                try:
                    if raw:
                        body = yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)
                    rule = emu._failure_for(self.command, url.path, query.get("dryRun") == "All")
                    if rule is not None and rule.delay_s:
                        emu._stop.wait(rule.delay_s)  # past the client's timeout: it has given up
                    if rule is not None and rule.status:
                        hdr = {"Retry-After": f"{rule.retry_after:g}"} if rule.retry_after is not None else {}
                        reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
                        raise ApiError(rule.status, reasons.get(rule.status, "InternalError"), f"injected failure {rule.status}", hdr)
                    code, out, headers = emu.handle(self.command, url.path, query, ctype, body)
                except ApiError as exc:
                    code, out, headers = exc.code, exc.body(), exc.headers
                except (ValueError, yaml.YAMLError) as exc:
                    code, out = 400, ApiError(400, "BadRequest", f"cannot decode the body: {exc}").body()
                with emu._lock:
                    emu.requests.append(Request(self.command, url.path, query, ctype, body, code))
                data = json.dumps(out).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, val in headers.items():
                        self.send_header(k, val)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        return Handler

