"""Kubernetes manifests: load the kustomize tree, render one shop's objects, validate them.

``manifests/`` is plain YAML a platform engineer can read and
``kubectl apply -k``; the controller only fills in per-shop values. So this module is a small,
honest subset of kustomize (``resources``, ``namespace``, ``labels``, ``images``, strategic-merge
``patches`` by path), enough for our tree and no more, followed by :func:`render_shop`, which
pins the release's image digests, keeps only the node classes a shop has, and stamps every object
with the labels the agent prunes by.

Validation has two layers, both pure over a list of objects:

* the real Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, in strict mode (an
  unknown field is an error), for every minor version in :data:`SUPPORTED_K8S_VERSIONS`;
* our policy (:func:`policy_findings`): images pinned by digest, resources and probes on every
  container, a restrictive securityContext, and no privileged container, host namespace or host
  path unless the workload declares why in a ``shopfleet.io/why-*`` annotation.

Findings are values (:class:`Finding`) with a stable ``rule`` code usable as a metric label and a
``fix`` sentence, so the CLI, the release builder and the tests report them the same way.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
import yaml
from prometheus_client import CollectorRegistry, Counter

SUPPORTED_K8S_VERSIONS: tuple[str, ...] = ("1.32", "1.33", "1.34")
"""Kubernetes minor versions of the K3s releases shops run; every object must validate on all."""



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
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass", "PriorityClass"})
WORKLOAD_KINDS = frozenset({"DaemonSet", "Deployment", "StatefulSet", "Job", "Pod"})

FINDING_RULES = (
    "yaml",  # file is not YAML, or a document is not a mapping
    "kustomization",  # kustomization.yaml refers to something missing or unsupported
    "schema",  # the Kubernetes OpenAPI schema rejects the object
    "unknown_kind",  # no schema for this kind/apiVersion in the Kubernetes version
    "image_not_pinned",  # image without @sha256 digest
    "no_resources",  # container without cpu/memory requests and limits
    "no_probes",  # container without readiness and liveness probes
    "security_context",  # container securityContext not restrictive enough
    "privileged",  # privileged container without a declared reason
    "host_namespace",  # hostNetwork/hostPID/hostIPC without a declared reason
    "host_path",  # hostPath volume without a declared reason
    "dns_policy",  # hostNetwork without dnsPolicy ClusterFirstWithHostNet
)


class ManifestInvalid(ValueError):
    """Manifests that fail schema or policy checks; permanent until the YAML is fixed."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        head = "; ".join(f.describe() for f in self.findings[:5])
        more = f" (+{len(self.findings) - 5} more)" if len(self.findings) > 5 else ""
        super().__init__(f"{len(self.findings)} manifest problem(s): {head}{more}")


@dataclass(frozen=True)
class Finding:
    """One problem with one object: where, which rule, what is wrong and how to fix it."""

    source: str
    obj: str
    rule: str
    message: str
    fix: str
    k8s_version: str | None = None

    def describe(self) -> str:
        """Return a one-line human description."""
        ver = f" [k8s {self.k8s_version}]" if self.k8s_version else ""
        return f"{self.source}: {self.obj}: {self.rule}{ver}: {self.message} -> {self.fix}"


@dataclass
class Sourced:
    """A Kubernetes object and the file it came from."""

    obj: dict[str, Any]
    source: str


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


def object_name(obj: Mapping[str, Any]) -> str:
    """Return ``Kind/namespace/name`` (namespace left out for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')}/{ns + '/' if ns else ''}{meta.get('name', '?')}"


# --------------------------------------------------------------------------------------------
# Loading (a kustomize subset)
# --------------------------------------------------------------------------------------------


def _load_yaml_docs(path: Path) -> tuple[list[Sourced], list[Finding]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        return [], [Finding(str(path), "-", "yaml", f"not valid YAML: {exc}", "fix the YAML syntax at the line named")]
    out, findings = [], []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            findings.append(
                Finding(str(path), f"document {i + 1}", "yaml", "not a Kubernetes object", "give every document apiVersion, kind and metadata")
            )
            continue
        out.append(Sourced(doc, str(path)))
    return out, findings


def _merge(base: Any, patch: Any) -> Any:
    """Strategic-merge subset: dicts merge, lists of named dicts merge by name, else replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out_list = [dict(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out_list)}
        for item in patch:
            if item["name"] in index:
                out_list[index[item["name"]]] = _merge(out_list[index[item["name"]]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    if spec is None:
        return []
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _pod_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec")
    if kind in WORKLOAD_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec")
    return None


def _image_repo(image: str) -> str:
    """Return the repository of an image reference, without tag or digest."""
    repo = image.split("@", 1)[0]
    head, _, last = repo.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _apply_images(objs: list[Sourced], images: Iterable[Mapping[str, Any]]) -> None:
    for img in images:
        name = img.get("name")
        for s in objs:
            for c in _containers(s.obj):
                repo = _image_repo(c.get("image", ""))
                if repo != name:
                    continue
                new = img.get("newName", repo)
                if img.get("digest"):
                    c["image"] = f"{new}@{img['digest']}"
                elif img.get("newTag"):
                    c["image"] = f"{new}:{img['newTag']}"
                else:
                    c["image"] = new + c["image"][len(repo):]


def load_tree(path: str | Path) -> tuple[list[Sourced], list[Finding]]:
    """Load a kustomization directory, a plain directory of YAML, or one YAML file."""
    p = Path(path)
    if p.is_file():
        return _load_yaml_docs(p)
    kfile = p / "kustomization.yaml"
    if not kfile.exists():
        objs: list[Sourced] = []
        findings: list[Finding] = []
        for f in sorted([*p.glob("*.yaml"), *p.glob("*.yml")]):
            o, fi = _load_yaml_docs(f)
            objs += o
            findings += fi
        return objs, findings
    return _load_kustomization(p)


_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"}


def _load_kustomization(d: Path) -> tuple[list[Sourced], list[Finding]]:
    kfile = d / "kustomization.yaml"
    try:
        k = yaml.safe_load(kfile.read_text()) or {}
    except yaml.YAMLError as exc:
        return [], [Finding(str(kfile), "-", "yaml", f"not valid YAML: {exc}", "fix the YAML syntax")]
    unknown = sorted(set(k) - _KUSTOMIZE_KEYS)
    findings: list[Finding] = []
    if unknown:
        findings.append(
            Finding(str(kfile), "Kustomization", "kustomization", f"unsupported keys {unknown}", f"use only {sorted(_KUSTOMIZE_KEYS)}")
        )
    objs: list[Sourced] = []
    for res in k.get("resources") or []:
        target = d / res
        if not target.exists():
            findings.append(Finding(str(kfile), "Kustomization", "kustomization", f"resource {res!r} does not exist", "fix the path in resources"))
            continue
        o, fi = load_tree(target)
        objs += o
        findings += fi
    for patch in k.get("patches") or []:
        ppath = d / patch.get("path", "")
        if not patch.get("path") or not ppath.is_file():
            findings.append(Finding(str(kfile), "Kustomization", "kustomization", f"patch {patch!r} has no readable path", "give each patch a 'path' to a YAML file"))
            continue
        pobjs, fi = _load_yaml_docs(ppath)
        findings += fi
        for po in pobjs:
            key = (po.obj["kind"], po.obj.get("metadata", {}).get("name"))
            hits = [s for s in objs if (s.obj["kind"], s.obj.get("metadata", {}).get("name")) == key]
            if not hits:
                findings.append(Finding(str(ppath), object_name(po.obj), "kustomization", "patch matches no object", "fix kind and metadata.name of the patch"))
            for s in hits:
                s.obj = _merge(s.obj, po.obj)
    ns = k.get("namespace")
    for s in objs:
        if ns and s.obj["kind"] not in CLUSTER_SCOPED:
            s.obj.setdefault("metadata", {})["namespace"] = ns
        if ns and s.obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            for subj in s.obj.get("subjects") or []:
                if subj.get("kind") == "ServiceAccount":
                    subj["namespace"] = ns
        for lab in k.get("labels") or []:
            s.obj.setdefault("metadata", {}).setdefault("labels", {}).update(lab.get("pairs") or {})
    _apply_images(objs, k.get("images") or [])
    return objs, findings


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
        for c in _containers(obj):
            if c.get("name") in release.images:
                c["image"] = release.images[c["name"]]
        pod_spec = _pod_spec(obj)
        if pod_spec is not None:
            tmeta = obj["spec"]["template"].setdefault("metadata", {}) if obj["kind"] != "Pod" else meta
            ann = tmeta.setdefault("annotations", {})
            ann[LABEL_RELEASE] = release.release
            if (meta.get("labels") or {}).get("app.kubernetes.io/component") == "vision" and release.model_sha256:
                ann[ANNOTATION_MODEL] = release.model_sha256
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


def _schema_dir(version: str) -> Any:
    return importlib.resources.files("kubernetes_validate").joinpath(f"kubernetes-json-schema/v{version}.0-local-strict")


@functools.lru_cache(maxsize=8)
def _definitions(version: str) -> referencing.Registry:
    d = _schema_dir(version)
    if not d.is_dir():
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {version}: upgrade kubernetes-validate or pick another version")
    defs = json.loads(d.joinpath("_definitions.json").read_text())
    return referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT202012) @ referencing.Registry()


@functools.lru_cache(maxsize=512)
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator | None:
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    f = _schema_dir(version).joinpath(f"{kind.lower()}-{group}.json")
    if not f.is_file():
        return None
    schema = json.loads(f.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_definitions(version))


def schema_findings(s: Sourced, versions: Sequence[str] = SUPPORTED_K8S_VERSIONS) -> list[Finding]:
    """Validate one object against the strict OpenAPI schema of every version."""
    out: list[Finding] = []
    name = object_name(s.obj)
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
