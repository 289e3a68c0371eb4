"""Kubernetes manifests: load the kustomize tree, render one shop's objects, validate them.

``manifests/`` is plain YAML a platform engineer can read and ``kubectl apply -k``; the controller
only fills in per-shop values. Loading is :mod:`fleet_controller.rollout.kustomize` (a kustomize
subset that renders exactly what ``kubectl kustomize`` renders, checked by a test), followed by
:func:`render_shop`, which pins the release's image digests, keeps only the node classes a shop
has, and stamps every object with the labels the agent prunes by.

Validation has three layers, all pure over a list of objects:

* the real Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, in strict mode (an
  unknown field is an error), for every minor version in :data:`SUPPORTED_K8S_VERSIONS`;
* what the API server checks beyond the schema (:mod:`fleet_controller.rollout.validation`):
  names, label keys and values, quantities, enum fields, selector against template, requests
  against limits, extended resources, unique container names, a present image;
* our policy (:func:`policy_findings`): images pinned by digest, resources and probes on every
  container, a restrictive securityContext, and no privileged container, host namespace or host
  path unless the workload declares why in a ``shopfleet.io/why-*`` annotation.

Findings are values (:class:`Finding`) with a stable ``rule`` code usable as a metric label and a
``fix`` sentence, so the CLI, the release builder and the tests report them the same way.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
import yaml
from prometheus_client import CollectorRegistry, Counter

from fleet_controller.rollout import validation
from fleet_controller.rollout.k8s_objects import (
    CLUSTER_SCOPED,
    SUPPORTED_K8S_VERSIONS,
    WORKLOAD_KINDS,
    Finding,
    ManifestInvalid,
    Sourced,
    containers,
    definitions,
    object_name,
    pod_spec,
    schema_file,
)
from fleet_controller.rollout.kustomize import load_tree

__all__ = [
    "CLUSTER_SCOPED",
    "SUPPORTED_K8S_VERSIONS",
    "WORKLOAD_KINDS",
    "Finding",
    "ManifestInvalid",
    "Sourced",
    "load_tree",
    "object_name",
]

_containers = containers
_pod_spec = pod_spec

def _manifests_root() -> Path:
    """Return the manifest tree that ships inside the ``shopfleet`` package (``shopfleet/manifests``).

    The YAML is package data of the same distribution, so a wheel renders releases. The folder is
    located with ``find_spec``, which only searches the path and runs none of ``shopfleet``'s code,
    so the controller still imports nothing of the CLI layer (the import-linter contract holds).
    """
    spec = importlib.util.find_spec("shopfleet")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the shopfleet package is not installed: its manifests/ tree cannot be found")
    return Path(next(iter(spec.submodule_search_locations))) / "manifests"


MANIFESTS_ROOT = _manifests_root()
"""The packaged manifest tree (``shopfleet/manifests/edge``, ``.../central``; ``manifests/`` in a checkout links to it)."""

DEFAULT_EDGE_OVERLAY = "production"
"""Edge overlay a shop gets unless its ``manifests-overlay`` label names another."""

LABEL_SHOP = "shopfleet.io/shop"
LABEL_RELEASE = "shopfleet.io/release"
LABEL_REVISION = "shopfleet.io/revision"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGED_BY = "shopfleet"
LABEL_NODE_CLASS = "shopfleet.io/node-class"
ANNOTATION_MODEL = "shopfleet.io/model-sha256"

WHY_PRIVILEGED = "shopfleet.io/why-privileged"
WHY_HOST_NETWORK = "shopfleet.io/why-host-network"
WHY_HOST_NAMESPACES = "shopfleet.io/why-host-namespaces"  # hostPID / hostIPC
WHY_HOST_PATH = "shopfleet.io/why-host-path"

DIGEST_RE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")
SHOP_PLACEHOLDER = "SHOP_ID"

CUSTOM_KINDS_WITHOUT_SCHEMA = frozenset(
    {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)
"""Custom resources of operators a cluster installs itself (the Prometheus operator): Kubernetes
ships no schema for them, so only the API server's generic checks (name, labels) apply."""

FINDING_RULES = (
    "yaml",  # file is not YAML, or a document is not a mapping
    "kustomization",  # kustomization.yaml refers to something missing or unsupported
    "schema",  # the Kubernetes OpenAPI schema rejects the object
    "unknown_kind",  # no schema for this kind/apiVersion in the Kubernetes version
    *validation.RULES,  # what the API server checks beyond the schema
    "image_not_pinned",  # image without @sha256 digest
    "no_resources",  # container without cpu/memory requests and limits
    "no_probes",  # container without readiness and liveness probes
    "security_context",  # container securityContext not restrictive enough
    "privileged",  # privileged container without a declared reason
    "host_namespace",  # hostNetwork/hostPID/hostIPC without a declared reason
    "host_path",  # hostPath volume without a declared reason
    "dns_policy",  # hostNetwork without dnsPolicy ClusterFirstWithHostNet
)


@dataclass(frozen=True)
class ShopTarget:
    """What rendering needs to know about a shop."""

    shop: str
    node_classes: frozenset[str] = frozenset()
    overlay: str = DEFAULT_EDGE_OVERLAY


@dataclass(frozen=True)
class RenderInput:
    """What rendering needs to know about a release: its name, image per component, model."""

    release: str
    images: Mapping[str, str] = field(default_factory=dict)
    model_sha256: str | None = None


# --------------------------------------------------------------------------------------------
# Rendering one shop
# --------------------------------------------------------------------------------------------


def _replace_placeholder(value: Any, shop: str) -> Any:
    if isinstance(value, str):
        return value.replace(SHOP_PLACEHOLDER, shop)
    if isinstance(value, dict):
        return {k: _replace_placeholder(v, shop) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_placeholder(v, shop) for v in value]
    return value


def render_objects(base: Sequence[Mapping[str, Any]], target: ShopTarget, release: RenderInput, revision: int) -> list[dict[str, Any]]:
    """Return the exact objects ``target`` gets for ``release`` at ``revision`` (pure)."""
    out: list[dict[str, Any]] = []
    for src in base:
        obj = copy.deepcopy(dict(src))
        meta = obj.setdefault("metadata", {})
        node_class = (meta.get("labels") or {}).get(LABEL_NODE_CLASS)
        if node_class and target.node_classes and node_class not in target.node_classes:
            continue
        if obj["kind"] == "ConfigMap":
            obj["data"] = _replace_placeholder(obj.get("data") or {}, target.shop)
        meta.setdefault("labels", {}).update(
            {
                LABEL_SHOP: target.shop,
                LABEL_RELEASE: release.release,
                LABEL_REVISION: str(revision),
                LABEL_MANAGED: MANAGED_BY,
            }
        )
        pinned: dict[str, str] = {}  # base image repository -> the release's image for it
        for c in _containers(obj):
            if c.get("name") in release.images:
                pinned[str(c.get("image", "")).split("@", 1)[0]] = release.images[c["name"]]
                c["image"] = release.images[c["name"]]
        for c in _containers(obj):
            # A helper container of the same image (the vision pods' model-stage init container)
            # runs the release's build too, never the manifests' base digest.
            if c.get("name") not in release.images and str(c.get("image", "")).split("@", 1)[0] in pinned:
                c["image"] = pinned[str(c["image"]).split("@", 1)[0]]
        # Pod templates get nothing per release but what their pods run: the images above and, for
        # vision, the model. So only pods whose spec really changes restart (the shop broker and the
        # log shipper do not drop their connections on every release); the release name is on the
        # object's labels, which a rollout does not restart on.
        pod_spec = _pod_spec(obj)
        if pod_spec is not None and (meta.get("labels") or {}).get("app.kubernetes.io/component") == "vision" and release.model_sha256:
            tmeta = obj["spec"]["template"].setdefault("metadata", {}) if obj["kind"] != "Pod" else meta
            tmeta.setdefault("annotations", {})[ANNOTATION_MODEL] = release.model_sha256
        out.append(obj)
    return out


def edge_overlay_dir(overlay: str, root: Path = MANIFESTS_ROOT) -> Path:
    """Return the directory of edge overlay ``overlay``, or raise ``ValueError`` listing the choices."""
    d = root / "edge" / "overlays" / overlay
    if not (d / "kustomization.yaml").exists():
        choices = sorted(p.name for p in (root / "edge" / "overlays").iterdir() if p.is_dir())
        raise ValueError(f"unknown edge overlay {overlay!r}: use one of {choices}")
    return d


@functools.lru_cache(maxsize=16)
def _load_overlay_cached(path: str) -> tuple[tuple[dict[str, Any], ...], tuple[Finding, ...]]:
    objs, findings = load_tree(path)
    return tuple(s.obj for s in objs), tuple(findings)


def load_overlay(path: str | Path) -> list[dict[str, Any]]:
    """Return the objects of a kustomization (cached per path); raise ``ManifestInvalid`` on load problems."""
    objs, findings = _load_overlay_cached(str(Path(path).resolve()))
    if findings:
        raise ManifestInvalid(findings)
    return [copy.deepcopy(o) for o in objs]


def render_shop(target: ShopTarget, release: RenderInput, revision: int, root: Path = MANIFESTS_ROOT) -> list[dict[str, Any]]:
    """Load the shop's edge overlay and render its objects for ``release`` at ``revision``."""
    return render_objects(load_overlay(edge_overlay_dir(target.overlay, root)), target, release, revision)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _registry(version: str) -> referencing.Registry:
    defs = definitions(version)
    return referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT202012) @ referencing.Registry()


@functools.lru_cache(maxsize=512)
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator | None:
    f = schema_file(version, kind, api_version)
    if not f.is_file():
        return None
    schema = json.loads(f.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


def schema_findings(s: Sourced, versions: Sequence[str] = SUPPORTED_K8S_VERSIONS) -> list[Finding]:
    """Validate one object against the strict OpenAPI schema of every version."""
    out: list[Finding] = []
    name = object_name(s.obj)
    if (s.obj.get("apiVersion"), s.obj.get("kind")) in CUSTOM_KINDS_WITHOUT_SCHEMA:
        return out
    for v in versions:
        validator = _validator(v, str(s.obj.get("kind")), str(s.obj.get("apiVersion")))
        if validator is None:
            out.append(
                Finding(s.source, name, "unknown_kind", f"no schema for {s.obj.get('apiVersion')} {s.obj.get('kind')}", "use an apiVersion/kind Kubernetes knows", v)
            )
            continue
        err = jsonschema.exceptions.best_match(validator.iter_errors(s.obj))
        if err is not None:
            where = ".".join(str(p) for p in err.absolute_path) or "(root)"
            out.append(Finding(s.source, name, "schema", f"{where}: {err.message[:300]}", "fix the field as the Kubernetes API reference describes it", v))
    return out


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def policy_findings(s: Sourced) -> list[Finding]:
    """Return our policy violations of one object (pure)."""
    obj, out = s.obj, list[Finding]()
    spec = _pod_spec(obj)
    if spec is None:
        return out
    name, ann = object_name(obj), _annotations(obj)

    def add(rule: str, message: str, fix: str) -> None:
        out.append(Finding(s.source, name, rule, message, fix))

    if spec.get("hostNetwork"):
        if not ann.get(WHY_HOST_NETWORK):
            add("host_namespace", "hostNetwork without a declared reason", f"remove hostNetwork or annotate {WHY_HOST_NETWORK} with why")
        if spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
            add("dns_policy", "hostNetwork pod without dnsPolicy ClusterFirstWithHostNet", "set dnsPolicy: ClusterFirstWithHostNet")
    for ns_key in ("hostPID", "hostIPC"):
        if spec.get(ns_key) and not ann.get(WHY_HOST_NAMESPACES):
            add("host_namespace", f"{ns_key} without a declared reason", f"remove {ns_key} or annotate {WHY_HOST_NAMESPACES} with why")
    if any("hostPath" in v for v in spec.get("volumes") or []) and not ann.get(WHY_HOST_PATH):
        add("host_path", "hostPath volume without a declared reason", f"use another volume type or annotate {WHY_HOST_PATH} with why")
    pod_sc = spec.get("securityContext") or {}
    for c in _containers(obj):
        cname = c.get("name", "?")
        image = c.get("image", "")
        if not DIGEST_RE.match(image):
            add("image_not_pinned", f"container {cname}: image {image!r} is not pinned by digest", "use REPO@sha256:<64 hex> (a release sets the digest)")
        res = c.get("resources") or {}
        missing = [f"{k}.{r}" for k in ("requests", "limits") for r in ("cpu", "memory") if r not in (res.get(k) or {})]
        if missing:
            add("no_resources", f"container {cname}: resources missing {missing}", "set cpu and memory requests and limits")
        if c in (spec.get("initContainers") or []):
            continue
        no_probe = [p for p in ("readinessProbe", "livenessProbe") if p not in c]
        if no_probe:
            add("no_probes", f"container {cname}: no {' or '.join(no_probe)}", "add readiness and liveness probes")
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            if not ann.get(WHY_PRIVILEGED):
                add("privileged", f"container {cname} is privileged without a declared reason", f"drop privileged or annotate {WHY_PRIVILEGED} with why")
            continue  # a declared privileged container is exempt from the restrictive checks
        problems = []
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append("readOnlyRootFilesystem must be true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append("capabilities.drop must contain ALL")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append("runAsNonRoot must be true (pod or container)")
        if problems:
            add("security_context", f"container {cname}: {'; '.join(problems)}", "make the container's securityContext restrictive")
    return out


class ManifestMetrics:
    """Prometheus counter of manifest findings by rule, on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.findings = Counter(
            "shopfleet_manifests_findings_total", "Manifest problems found by validation, by rule.", ["rule"], registry=registry
        )


def validate(objs: Sequence[Sourced], versions: Sequence[str] = SUPPORTED_K8S_VERSIONS, metrics: ManifestMetrics | None = None) -> list[Finding]:
    """Return every schema and policy finding of ``objs`` (empty list = valid)."""
    out: list[Finding] = []
    for s in objs:
        out += schema_findings(s, versions)
        out += validation.api_findings(s)
        out += policy_findings(s)
    if metrics is not None:
        for f in out:
            metrics.findings.labels(f.rule).inc()
    return out


def validate_path(path: str | Path, versions: Sequence[str] = SUPPORTED_K8S_VERSIONS) -> tuple[int, list[Finding]]:
    """Validate every kustomization under ``path`` (or the file/dir itself); return (objects, findings)."""
    p = Path(path)
    roots = sorted({k.parent for k in p.rglob("kustomization.yaml")}) if p.is_dir() else []
    if not roots:
        objs, findings = load_tree(p)
        return len(objs), findings + validate(objs, versions)
    count, findings = 0, []
    for root in roots:
        objs, fi = load_tree(root)
        count += len(objs)
        findings += fi + validate(objs, versions)
    return count, findings


def write_objects(objs: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write one YAML file per object as ``NN-kind-name.yaml``; return the paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, o in enumerate(objs):
        p = d / f"{i:02d}-{o['kind'].lower()}-{o['metadata']['name']}.yaml"
        p.write_text(yaml.safe_dump(dict(o), sort_keys=False))
        paths.append(p)
    return paths
