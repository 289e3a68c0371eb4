"""What the manifest loader, renderer and validators share: findings, sourced objects, pod specs, schemas.

The OpenAPI schemas come from ``kubernetes-validate`` (the same files the schema validation uses).
Besides types they carry the API server's own annotations: ``x-kubernetes-patch-strategy`` and
``x-kubernetes-patch-merge-key`` (how a strategic merge keys each list, as kustomize reads them)
and the ``Quantity`` type of every resource quantity. :class:`SchemaNode` walks them beside an
object, so the merge and the checks follow the API's definitions instead of a hand-kept list.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SUPPORTED_K8S_VERSIONS: tuple[str, ...] = ("1.32", "1.33", "1.34")
"""Kubernetes minor versions of the K3s releases shops run; every object must validate on all."""

CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "RuntimeClass",
        "PriorityClass",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "StorageClass",
        "PersistentVolume",
        "IngressClass",
        "CSIDriver",
        "APIService",
        "Node",
    }
)
"""Kinds without a namespace (kustomize's ``namespace:`` leaves them alone)."""

WORKLOAD_KINDS = frozenset({"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job", "Pod"})


class ManifestInvalid(ValueError):
    """Manifests that fail schema or policy checks; permanent until the YAML is fixed."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        head = "; ".join(f.describe() for f in self.findings[:5])
        more = f" (+{len(self.findings) - 5} more)" if len(self.findings) > 5 else ""
        super().__init__(f"{len(self.findings)} manifest problem(s): {head}{more}")


@dataclass(frozen=True)
class Finding:
    """One problem with one object: where, which rule, what is wrong and how to fix it.

    ``path`` is the field path inside the object (``spec.template.spec.containers[0].image``)
    when the problem is one field; the message names it too, so ``describe()`` stands alone.
    """

    source: str
    obj: str
    rule: str
    message: str
    fix: str
    k8s_version: str | None = None
    path: str | None = None

    def describe(self) -> str:
        """Return a one-line human description."""
        ver = f" [k8s {self.k8s_version}]" if self.k8s_version else ""
        return f"{self.source}: {self.obj}: {self.rule}{ver}: {self.message} -> {self.fix}"


@dataclass
class Sourced:
    """A Kubernetes object and the file it came from."""

    obj: dict[str, Any]
    source: str


def object_name(obj: Mapping[str, Any]) -> str:
    """Return ``Kind/namespace/name`` (namespace left out for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    name = meta.get("name", "?") if isinstance(meta, Mapping) else "?"
    return f"{obj.get('kind', '?')}/{str(ns) + '/' if ns else ''}{name}"


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the pod spec of a Pod or a workload's template, or None for other kinds."""
    kind = obj.get("kind")
    spec: Any
    if kind == "Pod":
        spec = obj.get("spec")
    elif kind in WORKLOAD_KINDS:
        spec = ((obj.get("spec") or {}).get("template") or {}).get("spec")
    else:
        return None
    return spec if isinstance(spec, dict) else None


def pod_spec_path(obj: Mapping[str, Any]) -> str:
    """Return the field path of :func:`pod_spec` (for messages)."""
    return "spec" if obj.get("kind") == "Pod" else "spec.template.spec"


def containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return init containers then containers of a pod-bearing object (empty for other kinds)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    return [c for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])] if isinstance(c, dict)]


# --------------------------------------------------------------------------------------------
# OpenAPI schemas (from kubernetes-validate)
# --------------------------------------------------------------------------------------------

SCHEMA_VERSION = SUPPORTED_K8S_VERSIONS[-1]
"""The version whose schema drives merge keys and field types (they do not change between our versions)."""


def schema_dir(version: str) -> Any:
    """Return the directory of kubernetes-validate's strict schemas for ``version``."""
    return importlib.resources.files("kubernetes_validate").joinpath(f"kubernetes-json-schema/v{version}.0-local-strict")


@functools.lru_cache(maxsize=8)
def definitions(version: str) -> dict[str, Any]:
    """Return the ``$defs`` of ``version`` (every API type by its Go package name)."""
    d = schema_dir(version)
    if not d.is_dir():
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {version}: upgrade kubernetes-validate or pick another version")
    raw: dict[str, Any] = json.loads(d.joinpath("_definitions.json").read_text())
    return raw


def schema_file(version: str, kind: str, api_version: str) -> Any:
    """Return the schema file of ``kind`` in ``api_version`` (it may not exist)."""
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return schema_dir(version).joinpath(f"{kind.lower()}-{group}.json")


@functools.lru_cache(maxsize=256)
def _top_schema(version: str, kind: str, api_version: str) -> dict[str, Any] | None:
    f = schema_file(version, kind, api_version)
    if not f.is_file():
        return None
    top: dict[str, Any] = json.loads(f.read_text())
    return top


@dataclass(frozen=True)
class SchemaNode:
    """One node of an API type's schema, with its definition name when it was reached by ``$ref``.

    ``definition`` (e.g. ``io.k8s.api.core.v1.PodSpec``) lets tables key rules by API type and
    field, the way the API server's validation is written.
    """

    raw: Mapping[str, Any]
    defs: Mapping[str, Any]
    definition: str | None = None

    @staticmethod
    def for_object(obj: Mapping[str, Any], version: str = SCHEMA_VERSION) -> SchemaNode | None:
        """Return the schema of ``obj``'s kind and apiVersion, or None when Kubernetes has none (a CRD)."""
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if not isinstance(kind, str) or not isinstance(api_version, str):
            return None
        top = _top_schema(version, kind, api_version)
        if top is None:
            return None
        return SchemaNode(top, definitions(version)["$defs"]).resolved()

    def resolved(self) -> SchemaNode:
        """Follow ``$ref`` (and a single-branch ``allOf``) to the node that has the type's fields."""
        node, name = self.raw, self.definition
        for _ in range(20):
            ref = node.get("$ref")
            if isinstance(ref, str) and "$defs/" in ref:
                name = ref.rsplit("$defs/", 1)[1]
                node = self.defs.get(name) or {}
                continue
            all_of = node.get("allOf")
            if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
                node = all_of[0]
                continue
            break
        return SchemaNode(node, self.defs, name)

    def field(self, key: str) -> SchemaNode | None:
        """Return the schema of field ``key`` of this object type (map values for a map type)."""
        props = self.raw.get("properties")
        if isinstance(props, Mapping) and key in props:
            return SchemaNode(props[key], self.defs).resolved()
        extra = self.raw.get("additionalProperties")
        if isinstance(extra, Mapping):
            return SchemaNode(extra, self.defs).resolved()
        return None

    def items(self) -> SchemaNode | None:
        """Return the schema of this array's elements."""
        items = self.raw.get("items")
        return SchemaNode(items, self.defs).resolved() if isinstance(items, Mapping) else None

    def merge_keys(self) -> list[str] | None:
        """How a strategic merge treats this list, read exactly as kustomize (kyaml) reads it.

        None: the list is atomic and a patch replaces it. Otherwise the strategy contains
        ``merge`` and the list merges by these keys (``x-kubernetes-list-map-keys`` when present,
        else ``x-kubernetes-patch-merge-key``); an empty list means a merged list of scalars.
        """
        strategy = self.raw.get("x-kubernetes-patch-strategy")
        if not isinstance(strategy, str) or "merge" not in strategy.split(","):
            return None
        keys = self.raw.get("x-kubernetes-list-map-keys")
        if isinstance(keys, list) and keys:
            return [str(k) for k in keys]
        key = self.raw.get("x-kubernetes-patch-merge-key")
        return [str(key)] if isinstance(key, str) else []
