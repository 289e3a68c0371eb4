"""What the Kubernetes API server refuses that its OpenAPI schema lets through.

The schema knows types: ``memory: 1GB`` is a string, ``dnsPolicy: ClusterFrist`` is a string, a
selector that matches no template label is two valid maps. The API server's validation (the
``ValidateX`` functions of ``pkg/apis/*/validation``) refuses them when a shop's agent applies the
set, which is too late: the release was built, signed and rolled out. :func:`api_findings` runs
the same checks at ``manifests validate`` and release-build time:

* names: DNS-1123 subdomain for most kinds, DNS-1123 label for Namespaces, container, volume
  names, DNS-1035 label for Services, a path segment for RBAC objects, IANA service names for
  ports;
* label keys (optional DNS prefix, ``/``, name) and values, in metadata, templates, selectors and
  node selectors; annotation keys;
* every resource quantity (found through the schema's ``Quantity`` type, so nothing is missed)
  parsed with the Kubernetes grammar;
* enum fields (:data:`ENUMS`, by API type and field as the API server declares them);
* a workload's selector against its template's labels; pod restartPolicy ``Always`` for
  controllers;
* requests at most limits; extended resources (``nvidia.com/gpu``, ``smarter-devices/*``) and
  huge pages integer, with a limit, and a request equal to it;
* container names unique across init and app containers; an image on every container; volume
  names unique and every volumeMount naming a volume; port names unique in a container.

Each finding names the object, the field path, the bad value and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from fleet_controller.rollout.k8s_objects import (
    Finding,
    SchemaNode,
    Sourced,
    object_name,
    pod_spec,
    pod_spec_path,
)

RULES = (
    "name",  # metadata.name / namespace / container / volume name not a valid DNS name for its kind
    "label",  # label key or value (or annotation key) the API server refuses
    "quantity",  # a resource quantity that is not Kubernetes quantity syntax, or negative
    "enum",  # a field outside the values the API accepts (dnsPolicy, protocol, strategy type...)
    "selector",  # a workload's selector missing or not matching its template labels
    "resources",  # requests above limits; extended resources not integer or request != limit
    "container",  # duplicate container names, missing image, restartPolicy not Always
    "volume",  # duplicate volume names, volumeMount naming no volume
    "port",  # invalid or duplicate port names
)

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(rf"^{_LABEL}$")
DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

# <quantity> ::= <signedNumber><suffix>; suffix: binary SI, decimal SI, or a decimal exponent.
QUANTITY = re.compile(r"^(?P<num>[+-]?(\d+\.?\d*|\.\d+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL: dict[str, Fraction] = {s: Fraction(10) ** e for s, e in {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}.items()}
QUANTITY_FIX = "write a number with an optional suffix: Ki Mi Gi Ti Pi Ei (powers of 1024), k M G T P E (powers of 1000) or m (1/1000), e.g. 512Mi, 1Gi, 250m"

_CORE = "io.k8s.api.core.v1."
_APPS = "io.k8s.api.apps.v1."
_PROTOCOLS = ("TCP", "UDP", "SCTP")
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    (_CORE + "PodSpec", "dnsPolicy"): ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"),
    (_CORE + "PodSpec", "restartPolicy"): ("Always", "OnFailure", "Never"),
    (_CORE + "PodSpec", "preemptionPolicy"): ("PreemptLowerPriority", "Never"),
    (_CORE + "Container", "imagePullPolicy"): ("Always", "IfNotPresent", "Never"),
    (_CORE + "Container", "terminationMessagePolicy"): ("File", "FallbackToLogsOnError"),
    (_CORE + "Container", "restartPolicy"): ("Always",),
    (_CORE + "ContainerPort", "protocol"): _PROTOCOLS,
    (_CORE + "ServicePort", "protocol"): _PROTOCOLS,
    (_CORE + "ServiceSpec", "type"): ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"),
    (_CORE + "ServiceSpec", "externalTrafficPolicy"): ("Cluster", "Local"),
    (_CORE + "ServiceSpec", "internalTrafficPolicy"): ("Cluster", "Local"),
    (_CORE + "ServiceSpec", "sessionAffinity"): ("ClientIP", "None"),
    (_CORE + "ServiceSpec", "ipFamilyPolicy"): ("SingleStack", "PreferDualStack", "RequireDualStack"),
    (_CORE + "HostPathVolumeSource", "type"): ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"),
    (_CORE + "Toleration", "operator"): ("Exists", "Equal"),
    (_CORE + "Toleration", "effect"): ("", "NoSchedule", "PreferNoSchedule", "NoExecute"),
    (_CORE + "NodeSelectorRequirement", "operator"): ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"),
    (_CORE + "SeccompProfile", "type"): ("RuntimeDefault", "Unconfined", "Localhost"),
    (_CORE + "PodSecurityContext", "fsGroupChangePolicy"): ("OnRootMismatch", "Always"),
    (_CORE + "HTTPGetAction", "scheme"): ("HTTP", "HTTPS"),
    (_CORE + "VolumeMount", "mountPropagation"): ("None", "HostToContainer", "Bidirectional"),
    (_CORE + "TopologySpreadConstraint", "whenUnsatisfiable"): ("DoNotSchedule", "ScheduleAnyway"),
    (_CORE + "PersistentVolumeClaimSpec", "accessModes"): ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"),
    (_APPS + "DaemonSetUpdateStrategy", "type"): ("RollingUpdate", "OnDelete"),
    (_APPS + "DeploymentStrategy", "type"): ("Recreate", "RollingUpdate"),
    (_APPS + "StatefulSetUpdateStrategy", "type"): ("RollingUpdate", "OnDelete"),
    (_APPS + "StatefulSetSpec", "podManagementPolicy"): ("OrderedReady", "Parallel"),
    ("io.k8s.api.batch.v1.CronJobSpec", "concurrencyPolicy"): ("Allow", "Forbid", "Replace"),
    ("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelectorRequirement", "operator"): ("In", "NotIn", "Exists", "DoesNotExist"),
    ("io.k8s.api.networking.v1.NetworkPolicySpec", "policyTypes"): ("Ingress", "Egress"),
    ("io.k8s.api.networking.v1.NetworkPolicyPort", "protocol"): _PROTOCOLS,
    ("io.k8s.api.policy.v1.PodDisruptionBudgetSpec", "unhealthyPodEvictionPolicy"): ("IfHealthyBudget", "AlwaysAllow"),
    ("io.k8s.api.admissionregistration.v1.ValidatingAdmissionPolicySpec", "failurePolicy"): ("Ignore", "Fail"),
    ("io.k8s.api.admissionregistration.v1.ValidatingAdmissionPolicyBindingSpec", "validationActions"): ("Deny", "Warn", "Audit"),
    ("io.k8s.api.admissionregistration.v1.MatchResources", "matchPolicy"): ("Exact", "Equivalent"),
}
"""Fields the API server accepts only a fixed set of values for, by API type and field name."""

_QUANTITY_TYPE = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_LABEL_SELECTOR = "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
_CONTROLLERS = frozenset({"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet"})
_RBAC = frozenset({"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"})
_NATIVE_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage", "storage"})


def parse_quantity(value: Any) -> Fraction | None:
    """Return the exact value of a Kubernetes quantity (``"1Gi"``, ``"250m"``, ``2``), or None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))
    if not isinstance(value, str):
        return None
    m = QUANTITY.match(value)
    if not m:
        return None
    num, suffix = Fraction(m.group("num")), m.group("suffix") or ""
    if suffix in _BINARY:
        return num * _BINARY[suffix]
    if suffix in _DECIMAL:
        return num * _DECIMAL[suffix]
    if suffix:
        return num * Fraction(10 ** int(suffix[1:])) if int(suffix[1:]) >= 0 else num / 10 ** -int(suffix[1:])
    return num


def _qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label/annotation key ([prefix/]name), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return "its prefix (before '/') must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters"
    if not name or len(name) > 63 or not QUALIFIED_NAME.match(name):
        return "its name part must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    return None


def _label_value_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "label values must be strings (quote numbers and booleans)"
    if len(value) > 63 or not LABEL_VALUE.match(value):
        return "label values must be empty or at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    return None


def _name_problem(value: Any, kind: str) -> tuple[str, str] | None:
    """Return (what is wrong, what it must be) when ``value`` is no valid name for ``kind``."""
    if not isinstance(value, str) or not value:
        return "is missing", "give it a name"
    if kind in _RBAC:
        if value in (".", "..") or "/" in value or "%" in value:
            return "is not a valid path segment", "a name without '/' or '%', not '.' or '..'"
        return None
    if kind == "Service":
        if len(value) > 63 or not DNS1035_LABEL.match(value):
            return "is not a DNS-1035 label", "at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
        return None
    if kind in ("Namespace", "container", "volume"):
        if len(value) > 63 or not DNS1123_LABEL.match(value):
            return "is not a DNS-1123 label", "at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        return None
    limit = 52 if kind == "CronJob" else 253
    if len(value) > limit or not DNS1123_SUBDOMAIN.match(value):
        return "is not a DNS-1123 subdomain", f"at most {limit} lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
    return None


class _Checker:
    """Collects the findings of one object."""

    def __init__(self, s: Sourced) -> None:
        self.s = s
        self.name = object_name(s.obj)
        self.out: list[Finding] = []

    def add(self, rule: str, path: str, value: Any, what: str, fix: str) -> None:
        self.out.append(Finding(self.s.source, self.name, rule, f"{path}: {value!r} {what}", fix, path=path))

    # --- generic walk over the object and its schema -----------------------------------------

    def walk(self, value: Any, schema: SchemaNode | None, path: str) -> None:
        if schema is None:
            return
        if schema.definition == _QUANTITY_TYPE:
            self.quantity(value, path)
            return
        if isinstance(value, dict):
            d = schema.definition or ""
            if d == _OBJECT_META:
                self.metadata_maps(value, path)
            elif d == _LABEL_SELECTOR:
                self.labels(value.get("matchLabels"), f"{path}.matchLabels")
            elif d == _CORE + "PodSpec":
                self.labels(value.get("nodeSelector"), f"{path}.nodeSelector")
            elif d == _CORE + "ServiceSpec":
                self.labels(value.get("selector"), f"{path}.selector")
            for key, v in value.items():
                allowed = ENUMS.get((d, key))
                if allowed is not None:
                    self.enum(v, allowed, f"{path}.{key}" if path else key)
                sub = schema.field(key)
                self.walk(v, sub, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            items = schema.items()
            for i, v in enumerate(value):
                self.walk(v, items, f"{path}[{i}]")

    def quantity(self, value: Any, path: str) -> None:
        parsed = parse_quantity(value)
        if parsed is None:
            self.add("quantity", path, value, "is not a Kubernetes quantity", QUANTITY_FIX)
        elif parsed < 0:
            self.add("quantity", path, value, "is negative", "use a quantity of 0 or more")

    def enum(self, value: Any, allowed: tuple[str, ...], path: str) -> None:
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if v not in allowed:
                where = f"{path}[{i}]" if isinstance(value, list) else path
                self.add("enum", where, v, "is not a supported value", f"use one of {', '.join(repr(a) for a in allowed)}")

    def labels(self, labels: Any, path: str) -> None:
        if not isinstance(labels, dict):
            return
        for key, value in labels.items():
            problem = _qualified_name_problem(str(key))
            if problem:
                self.add("label", path, key, f"is not a valid label key: {problem}", "rename the key, e.g. example.com/my-key or my-key")
            problem = _label_value_problem(value)
            if problem:
                self.add("label", f"{path}[{key}]", value, f"is not a valid label value: {problem}", "shorten or rewrite the value (a label value is no place for free text: use an annotation)")

    def metadata_maps(self, meta: Mapping[str, Any], path: str) -> None:
        self.labels(meta.get("labels"), f"{path}.labels")
        for key in meta.get("annotations") or {}:
            problem = _qualified_name_problem(str(key))
            if problem:
                self.add("label", f"{path}.annotations", key, f"is not a valid annotation key: {problem}", "rename the key, e.g. example.com/my-key")

    # --- object-level rules ------------------------------------------------------------------

    def metadata(self) -> None:
        meta = self.s.obj.get("metadata")
        kind = str(self.s.obj.get("kind", ""))
        if not isinstance(meta, dict):
            self.add("name", "metadata", meta, "is missing", "give the object metadata.name")
            return
        problem = _name_problem(meta.get("name"), kind)
        if problem:
            self.add("name", "metadata.name", meta.get("name"), f"{problem[0]} (a {kind} name)", f"rename it: {problem[1]}")
        ns = meta.get("namespace")
        if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS1123_LABEL.match(ns)):
            self.add("name", "metadata.namespace", ns, "is not a DNS-1123 label", "use a namespace name of lowercase letters, digits and '-'")

    def selector(self) -> None:
        obj = self.s.obj
        if obj.get("kind") not in _CONTROLLERS:
            return
        spec = obj.get("spec") or {}
        sel = spec.get("selector")
        tlabels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
            self.add("selector", "spec.selector", sel, "is missing or empty", "select the pods by their labels: spec.selector.matchLabels, e.g. {app.kubernetes.io/name: NAME}")
            return
        missing = {k: v for k, v in (sel.get("matchLabels") or {}).items() if tlabels.get(k) != v}
        for expr in sel.get("matchExpressions") or []:
            if not isinstance(expr, dict):
                continue
            key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
            has = key in tlabels
            ok = {
                "In": has and tlabels.get(key) in values,
                "NotIn": not has or tlabels.get(key) not in values,
                "Exists": has,
                "DoesNotExist": not has,
            }.get(str(op), True)
            if not ok:
                missing[f"{key} {op} {values}"] = "(expression)"
        if missing:
            self.add(
                "selector",
                "spec.selector",
                sel,
                f"does not match the template labels {tlabels!r} (unmatched: {missing!r})",
                "make spec.template.metadata.labels carry every spec.selector.matchLabels pair",
            )

    def pod(self) -> None:
        spec = pod_spec(self.s.obj)
        if spec is None:
            return
        base = pod_spec_path(self.s.obj)
        if self.s.obj.get("kind") in _CONTROLLERS and spec.get("restartPolicy", "Always") != "Always":
            self.add("container", f"{base}.restartPolicy", spec.get("restartPolicy"), f"is not allowed in a {self.s.obj.get('kind')} (its pods always restart)", "remove restartPolicy or set it to Always")
        volumes = [v for v in spec.get("volumes") or [] if isinstance(v, dict)]
        seen_volumes: set[Any] = set()
        for i, v in enumerate(volumes):
            problem = _name_problem(v.get("name"), "volume")
            if problem:
                self.add("name", f"{base}.volumes[{i}].name", v.get("name"), f"{problem[0]} (a volume name)", f"rename it: {problem[1]}")
            if v.get("name") in seen_volumes:
                self.add("volume", f"{base}.volumes[{i}].name", v.get("name"), "is a duplicate volume name", "give every volume its own name")
            seen_volumes.add(v.get("name"))
        # A StatefulSet's volumeClaimTemplates are volumes of its pods too.
        claims = (self.s.obj.get("spec") or {}).get("volumeClaimTemplates") if self.s.obj.get("kind") == "StatefulSet" else None
        mountable = seen_volumes | {(t.get("metadata") or {}).get("name") for t in claims or [] if isinstance(t, dict)}
        seen_containers: dict[Any, str] = {}
        for group in ("initContainers", "containers", "ephemeralContainers"):
            for i, c in enumerate(spec.get(group) or []):
                if isinstance(c, dict):
                    self.container(c, f"{base}.{group}[{i}]", seen_containers, mountable)

    def container(self, c: dict[str, Any], path: str, seen: dict[Any, str], volumes: set[Any]) -> None:
        cname = c.get("name")
        problem = _name_problem(cname, "container")
        if problem:
            self.add("name", f"{path}.name", cname, f"{problem[0]} (a container name)", f"rename it: {problem[1]}")
        if cname in seen:
            self.add("container", f"{path}.name", cname, f"is a duplicate container name (also {seen[cname]})", "give every container and init container its own name")
        else:
            seen[cname] = path
        image = c.get("image")
        if not isinstance(image, str) or not image.strip():
            self.add("container", f"{path}.image", image, "is missing: every container needs an image", "set image: REPO@sha256:<64 hex> (a release sets the digest)")
        port_names: dict[Any, str] = {}
        for j, port in enumerate(c.get("ports") or []):
            if not isinstance(port, dict) or "name" not in port:
                continue
            pname, ppath = port["name"], f"{path}.ports[{j}].name"
            if not isinstance(pname, str) or len(pname) > 15 or not IANA_SVC_NAME.match(pname) or "--" in pname or not re.search("[a-z]", pname):
                self.add("port", ppath, pname, "is not a valid port name", "at most 15 lowercase letters, digits and single '-', with at least one letter")
            elif pname in port_names:
                self.add("port", ppath, pname, f"is a duplicate port name in the container (also {port_names[pname]})", "give every port of a container its own name")
            else:
                port_names[pname] = ppath
        for j, mount in enumerate(c.get("volumeMounts") or []):
            if isinstance(mount, dict) and mount.get("name") not in volumes:
                self.add("volume", f"{path}.volumeMounts[{j}].name", mount.get("name"), "names no volume of the pod", f"add the volume to the pod's volumes or mount one of {sorted(str(v) for v in volumes)}")
        self.resources(c.get("resources") or {}, f"{path}.resources")

    def resources(self, res: Mapping[str, Any], path: str) -> None:
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        if not isinstance(requests, dict) or not isinstance(limits, dict):
            return
        for section, values in (("limits", limits), ("requests", requests)):
            for rname, qty in values.items():
                parsed = parse_quantity(qty)
                if parsed is not None and _integer_resource(str(rname)) and parsed.denominator != 1:
                    self.add("resources", f"{path}.{section}[{rname}]", qty, "must be a whole number (an extended resource counts devices)", f"use an integer, e.g. {rname}: 1")
        for rname, qty in requests.items():
            req, lim = parse_quantity(qty), parse_quantity(limits.get(rname)) if rname in limits else None
            rpath = f"{path}.requests[{rname}]"
            overcommit = _overcommit_allowed(str(rname))
            if rname not in limits:
                if not overcommit:
                    self.add("resources", rpath, qty, f"has no limit: {rname} cannot be overcommitted", f"set limits[{rname}] equal to the request")
                continue
            if req is None or lim is None:
                continue  # the quantity rule already reported it
            if not overcommit and req != lim:
                self.add("resources", rpath, qty, f"differs from its limit {limits[rname]!r}: {rname} cannot be overcommitted", f"set requests[{rname}] and limits[{rname}] to the same value")
            elif req > lim:
                self.add("resources", rpath, qty, f"is above its limit {limits[rname]!r}", f"lower requests[{rname}] or raise limits[{rname}] so the request is at most the limit")


def _extended(name: str) -> bool:
    """An extended resource: a domain-prefixed name outside kubernetes.io (nvidia.com/gpu, smarter-devices/ttyUSB0)."""
    return "/" in name and "kubernetes.io/" not in name and not name.startswith("requests.")


def _integer_resource(name: str) -> bool:
    return _extended(name)


def _overcommit_allowed(name: str) -> bool:
    """Only the native resources (cpu, memory, ephemeral-storage) may have a request below the limit."""
    return not _extended(name) and not name.startswith("hugepages-")


def _walk_items(obj: Mapping[str, Any]) -> Iterator[tuple[Any, SchemaNode | None, str]]:
    schema = SchemaNode.for_object(obj)
    if schema is not None:
        yield obj, schema, ""
        return
    # A custom resource: Kubernetes has no schema for it, but its metadata is the common ObjectMeta.
    meta_schema = SchemaNode({"$ref": "#/$defs/" + _OBJECT_META}, SchemaNode.for_object({"kind": "ConfigMap", "apiVersion": "v1"}).defs).resolved()  # type: ignore[union-attr]
    yield obj.get("metadata"), meta_schema, "metadata"


def api_findings(s: Sourced) -> list[Finding]:
    """Return what the API server would refuse in one object beyond its schema (pure)."""
    check = _Checker(s)
    check.metadata()
    for value, schema, path in _walk_items(s.obj):
        check.walk(value, schema, path)
    check.selector()
    check.pod()
    return check.out
