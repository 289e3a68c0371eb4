"""A kustomize subset that renders what ``kubectl kustomize`` renders, for the keys it supports.

``manifests/`` must stay plain YAML a platform engineer applies with ``kubectl apply -k``, and the
controller renders the same objects per shop without a Go binary. So this module reads a
kustomization the way kustomize does (a test renders every overlay with both and compares them
object by object):

* ``resources`` (files and directories), ``namespace`` (Namespace objects renamed, RoleBinding
  subjects named ``default`` moved, then ServiceAccount subjects pointed at the ServiceAccount in
  the set, as kustomize's name references do), ``labels`` (with ``includeSelectors`` /
  ``includeTemplates``), ``commonLabels``, ``commonAnnotations``, ``images``, ``replicas``;
* ``patches`` (``path`` or inline ``patch``, optional ``target``) and ``patchesStrategicMerge``:
  a strategic merge keyed as the API declares it (``x-kubernetes-patch-merge-key`` /
  ``x-kubernetes-list-map-keys`` in the OpenAPI schema, the table kustomize reads): containers,
  volumes and env by name, ports by containerPort (and protocol), volumeMounts by mountPath;
  atomic lists replaced; ``null`` deletes a field; ``$patch: delete`` removes a list element, a
  field or the whole object and ``$patch: replace`` replaces instead of merging, neither left in
  the output; a list of operations is a JSON 6902 patch.

Anything else in a kustomization (generators, name prefixes, components...) is a ``kustomization``
finding rather than a silent difference from kustomize.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleet_controller.rollout.k8s_objects import (
    CLUSTER_SCOPED,
    Finding,
    SchemaNode,
    Sourced,
    containers,
    object_name,
)

DIRECTIVE = "$patch"


class PatchError(ValueError):
    """A patch kustomize would refuse (an unknown ``$patch`` directive, a JSON patch path that does not exist)."""


class _Delete:
    """Marker: the merge removes this value (``$patch: delete``)."""


DELETE = _Delete()


# --------------------------------------------------------------------------------------------
# Strategic merge
# --------------------------------------------------------------------------------------------


def _directive(patch: Mapping[str, Any]) -> str:
    value = patch.get(DIRECTIVE, "merge")
    if value not in ("merge", "replace", "delete"):
        raise PatchError(f"unknown {DIRECTIVE} directive {value!r}: use merge, replace or delete")
    return str(value)


def strip_directives(value: Any) -> Any:
    """Return ``value`` with every ``$patch`` key and directive-only list element removed."""
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if k != DIRECTIVE}
    if isinstance(value, list):
        return [strip_directives(v) for v in value if not (isinstance(v, dict) and set(v) == {DIRECTIVE})]
    return copy.deepcopy(value)


def strategic_merge(base: Any, patch: Any, schema: SchemaNode | None) -> Any:
    """Merge ``patch`` into ``base`` as kustomize does; return the result or :data:`DELETE`.

    ``schema`` is the API type of ``base`` (None for a custom resource: then, as in kustomize,
    maps merge and lists are replaced).
    """
    if isinstance(patch, dict):
        return _merge_map(base if isinstance(base, dict) else {}, patch, schema)
    if isinstance(patch, list):
        return _merge_list(base if isinstance(base, list) else [], patch, schema)
    return copy.deepcopy(patch)


def _merge_map(base: dict[str, Any], patch: dict[str, Any], schema: SchemaNode | None) -> Any:
    directive = _directive(patch)
    if directive == "delete":
        return DELETE
    if directive == "replace":
        return strip_directives(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == DIRECTIVE:
            continue
        if value is None:  # an explicit null deletes the field
            out.pop(key, None)
            continue
        merged = strategic_merge(base.get(key), value, schema.field(key) if schema else None)
        if merged is DELETE:
            out.pop(key, None)
        else:
            out[key] = merged
    return out


def _list_directive(patch: list[Any]) -> str:
    """kyaml reads a list directive from the first element carrying ``$patch``, if that is all it carries."""
    for item in patch:
        if isinstance(item, dict) and DIRECTIVE in item:
            return _directive(item) if len(item) == 1 else "merge"
    return "merge"


def _scalar(value: Any) -> str:
    """The YAML text of a scalar, as kyaml compares merge key values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _same(values1: list[str], values2: list[str]) -> tuple[bool, list[str]]:
    """kyaml's ``match``: one value in common, the others equal or missing on one side."""
    if len(values1) != len(values2):
        return False, []
    common, res = False, []
    for x, y in zip(values1, values2, strict=True):
        if x == y:
            common = True
            res.append(x)
        elif x and y:
            return False, []
        else:
            res.append(x or y)
    return common, res


def _valid_keys(values_list: list[list[str]], values: list[str], keys: list[str]) -> tuple[list[str], list[str]]:
    """kyaml's ``validateKeys``: drop secondary keys no element sets."""
    valid = {keys[i] for vs in values_list for i, v in enumerate(vs) if v != ""}
    if not valid:
        return keys, values
    return [k for k in keys if k in valid], [v for i, v in enumerate(values) if v != "" or keys[i] in valid]


def _find(items: list[Any], keys: list[str], values: list[str]) -> Any:
    """kyaml's ``ElementList``: the first map whose every key is present with exactly that value."""
    for item in items:
        if isinstance(item, dict) and all(k in item and _scalar(item[k]) == v for k, v in zip(keys, values, strict=True)):
            return item
    return None


def _set_element(items: list[Any], element: Any, keys: list[str], values: list[str]) -> None:
    """kyaml's ``ElementSetter``: replace the matching element(s) by ``element``, delete them (None), or append."""
    mapping = bool(keys) and keys[0] != ""
    out, found_any = [], False
    for item in items:
        if item is None or item == {}:
            continue  # kyaml drops empty elements
        if mapping and not isinstance(item, dict):
            out.append(item)
            continue
        found, val = True, None
        for j, key in enumerate(keys):
            if j < len(values):
                if key == "":
                    val = item if _scalar(item) == values[j] else None
                elif values[j] == "":
                    val = item if key in item else None
                else:
                    val = item if key in item and _scalar(item[key]) == values[j] else None
            if val is None:
                found = False
                break
        if not found:
            if values:
                out.append(item)
            continue
        found_any = True
        if element is not None:
            out.append(element)
    items[:] = out
    if element is not None and not found_any:
        items.append(element)


def _append_list(dst: list[Any], src: list[Any], keys: list[str]) -> list[Any]:
    """kyaml's ``appendListNode``: put each element of ``src`` into ``dst`` by key."""
    for elem in src:
        if keys[0] == "":
            _set_element(dst, elem, [""], [_scalar(elem)])
            continue
        values = []
        for key in keys:
            if not isinstance(elem, dict) or key not in elem:
                dst.append(elem)  # no key: kyaml appends it as it is
                continue
            values.append(_scalar(elem[key]))
        if len(keys) > 1:
            _set_element(dst, None, keys, values)
        _set_element(dst, elem, keys, values)
    return dst


def _merge_element(dest: Any, origin: Any, schema: SchemaNode | None) -> Any:
    if origin is None:
        return dest
    if dest is None:
        return strategic_merge({} if isinstance(origin, dict) else None, origin, schema)
    return strategic_merge(dest, origin, schema)


def _merge_list(base: list[Any], patch: list[Any], schema: SchemaNode | None) -> Any:
    """Merge two lists exactly as kustomize's kyaml does (patch elements first, then the base's).

    kustomize merges with ``ListIncreaseDirection: Prepend``: the result lists the patch's
    elements in the patch's order, then the base elements the patch does not name, each merged
    element in place. The steps below follow kyaml's ``setAssociativeSequenceElements`` closely,
    quirks included (secondary keys such as a port's ``protocol`` change the order), so the
    comparison with real kustomize holds for any YAML.
    """
    directive = _list_directive(patch)
    if directive == "delete":
        return DELETE
    keys = schema.merge_keys() if schema else None
    if directive == "replace" or keys is None:  # atomic lists (and custom resources' lists) are replaced
        return strip_directives(patch)
    first = next((i for i, p in enumerate(patch) if isinstance(p, dict) and DIRECTIVE in p), None)
    if first is not None and len(patch[first]) == 1:
        patch = patch[:first] + patch[first + 1 :]
    origin = patch
    dest = copy.deepcopy(base) if base else copy.deepcopy(patch)
    elem_schema = schema.items() if schema else None
    values_list: list[list[str]] = []
    if keys:
        for src in (origin, dest):
            for item in src:
                vs = [_scalar(item.get(k)) if isinstance(item, dict) else "" for k in keys]
                if vs not in values_list:
                    values_list.append(vs)
    else:
        keys = [""]
        for src in (origin, dest):
            for item in src:
                if [_scalar(item)] not in values_list:
                    values_list.append([_scalar(item)])
    if len(keys) > 1:
        for i in range(len(values_list)):
            v1 = values_list[i]
            for j in range(len(values_list)):
                matched, merged_values = _same(v1, values_list[j])
                if matched:
                    values_list[i] = merged_values
                    values_list[j] = merged_values
    items: list[Any] = []
    valid_keys, valid_values = keys, [""] * len(keys)
    for values in values_list:
        valid_keys, valid_values = _valid_keys(values_list, values, keys)
        k2, v2 = _valid_keys([valid_values], valid_values, valid_keys)
        if k2 == [""]:
            d_elem = next((x for x in dest if _scalar(x) == v2[0]), None)
            o_elem = next((x for x in origin if _scalar(x) == v2[0]), None)
            val = copy.deepcopy(o_elem if o_elem is not None else d_elem)
        else:
            found = _find(dest, k2, v2)
            val = _merge_element(found, _find(origin, k2, v2), elem_schema)
            if found is not None and val is not DELETE and val is not None:
                # kyaml merges into the base element itself, so the base list holds the result too
                dest[next(i for i, x in enumerate(dest) if x is found)] = val
        if val is DELETE or val is None or val == {}:
            _set_element(dest, None, valid_keys, valid_values)
            continue
        if isinstance(val, dict):
            for key, value in zip(valid_keys, valid_values, strict=True):
                if key not in val and value != "":
                    val[key] = value
        _set_element(items, val, valid_keys, valid_values)
    if values_list:
        dest = _append_list(items, dest, valid_keys)
    return dest


# --------------------------------------------------------------------------------------------
# JSON 6902 patches
# --------------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for p in parts[:-1]:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            raise PatchError(f"JSON patch path {path!r} does not exist (at {p!r})")
    return node


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent, last = _parent(doc, parts, path), parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise PatchError(f"JSON patch path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    parent, last = _parent(doc, parts, path), parts[-1]
    value = _get(doc, path)
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[int(last)]
    return value


def _add(doc: Any, path: str, value: Any, replace: bool = False) -> None:
    parts = _pointer(path)
    parent, last = _parent(doc, parts, path), parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"JSON patch replace: {path!r} does not exist")
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(copy.deepcopy(value))
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = copy.deepcopy(value)
            else:
                parent.insert(int(last), copy.deepcopy(value))
        else:
            raise PatchError(f"JSON patch path {path!r}: index out of range")
    else:
        raise PatchError(f"JSON patch path {path!r}: parent is not a map or list")


def json_patch(doc: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """Apply RFC 6902 operations to a copy of ``doc``."""
    out = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"JSON patch operation {op!r} needs 'op' and 'path'")
        kind, path = op["op"], str(op["path"])
        if kind == "add":
            _add(out, path, op.get("value"))
        elif kind == "replace":
            _add(out, path, op.get("value"), replace=True)
        elif kind == "remove":
            _remove(out, path)
        elif kind == "move":
            _add(out, path, _remove(out, str(op.get("from"))))
        elif kind == "copy":
            _add(out, path, _get(out, str(op.get("from"))))
        elif kind == "test":
            if _get(out, path) != op.get("value"):
                raise PatchError(f"JSON patch test failed at {path!r}")
        else:
            raise PatchError(f"unknown JSON patch op {kind!r}: use add, remove, replace, move, copy or test")
    return out


# --------------------------------------------------------------------------------------------
# Field specs (where kustomize's label, annotation and replica transformers write)
# --------------------------------------------------------------------------------------------

# (group, version, kind, path, create); None matches anything. Copied from kustomize's defaults.
FieldSpec = tuple[str | None, str | None, str | None, str, bool]

_METADATA_LABELS: tuple[FieldSpec, ...] = (
    (None, None, None, "metadata/labels", True),
    ("", "v1", "ReplicationController", "spec/template/metadata/labels", True),
    (None, None, "Deployment", "spec/template/metadata/labels", True),
    (None, None, "ReplicaSet", "spec/template/metadata/labels", True),
    (None, None, "DaemonSet", "spec/template/metadata/labels", True),
    ("apps", None, "StatefulSet", "spec/template/metadata/labels", True),
    ("batch", None, "Job", "spec/template/metadata/labels", True),
    ("batch", None, "CronJob", "spec/jobTemplate/metadata/labels", True),
    ("batch", None, "CronJob", "spec/jobTemplate/spec/template/metadata/labels", True),
)
_AFFINITY = (
    "spec/template/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels",
    "spec/template/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels",
    "spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels",
    "spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels",
    "spec/template/spec/topologySpreadConstraints/labelSelector/matchLabels",
)
_COMMON_LABELS: tuple[FieldSpec, ...] = (
    ("", "v1", "Service", "spec/selector", True),
    ("", "v1", "ReplicationController", "spec/selector", True),
    (None, None, "Deployment", "spec/selector/matchLabels", True),
    *(("apps", None, "Deployment", p, False) for p in _AFFINITY),
    (None, None, "ReplicaSet", "spec/selector/matchLabels", True),
    (None, None, "DaemonSet", "spec/selector/matchLabels", True),
    ("apps", None, "StatefulSet", "spec/selector/matchLabels", True),
    *(("apps", None, "StatefulSet", p, False) for p in _AFFINITY),
    ("batch", None, "Job", "spec/selector/matchLabels", False),
    ("batch", None, "CronJob", "spec/jobTemplate/spec/selector/matchLabels", False),
    ("policy", None, "PodDisruptionBudget", "spec/selector/matchLabels", False),
    ("networking.k8s.io", None, "NetworkPolicy", "spec/podSelector/matchLabels", False),
    ("networking.k8s.io", None, "NetworkPolicy", "spec/ingress/from/podSelector/matchLabels", False),
    ("networking.k8s.io", None, "NetworkPolicy", "spec/egress/to/podSelector/matchLabels", False),
    *_METADATA_LABELS,
    ("apps", None, "StatefulSet", "spec/volumeClaimTemplates/metadata/labels", True),
)
_COMMON_ANNOTATIONS: tuple[FieldSpec, ...] = tuple(
    (g, v, k, p.replace("/labels", "/annotations"), c) for g, v, k, p, c in _METADATA_LABELS if "volumeClaim" not in p
)
_REPLICAS = ("Deployment", "ReplicationController", "ReplicaSet", "StatefulSet")


def _group_version(obj: Mapping[str, Any]) -> tuple[str, str]:
    api = str(obj.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    return group, version


def _spec_applies(spec: FieldSpec, obj: Mapping[str, Any]) -> bool:
    group, version, kind, _, _ = spec
    g, v = _group_version(obj)
    return (group is None or group == g) and (version is None or version == v) and (kind is None or kind == obj.get("kind"))


def _merge_at(node: Any, parts: list[str], pairs: Mapping[str, str], create: bool) -> None:
    """Add ``pairs`` to the map at ``parts`` below ``node``, going through every element of a list."""
    if isinstance(node, list):
        for item in node:
            _merge_at(item, parts, pairs, create)
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    if head not in node or node[head] is None:
        if not create:
            return
        node[head] = {}
    if rest:
        _merge_at(node[head], rest, pairs, create)
    elif isinstance(node[head], dict):
        node[head].update(pairs)


def _apply_field_specs(obj: dict[str, Any], specs: Iterable[FieldSpec], pairs: Mapping[str, str]) -> None:
    for spec in specs:
        if _spec_applies(spec, obj):
            _merge_at(obj, spec[3].split("/"), pairs, spec[4])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Res:
    """An object being built, with its namespace as loaded (kustomize matches patches on either)."""

    obj: dict[str, Any]
    source: str
    original_ns: str = ""
    prev_ns: set[str] = field(default_factory=set)


SUPPORTED_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "commonLabels",
        "commonAnnotations",
        "resources",
        "patches",
        "patchesStrategicMerge",
        "images",
        "replicas",
    }
)


def load_yaml_docs(path: Path) -> tuple[list[Sourced], list[Finding]]:
    """Return the Kubernetes objects of one YAML file, and a finding per unreadable document."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return [], [Finding(str(path), "-", "yaml", f"not valid YAML: {exc}", "fix the YAML syntax at the line named")]
    out, findings = [], []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            findings.append(Finding(str(path), f"document {i + 1}", "yaml", "not a Kubernetes object", "give every document apiVersion, kind and metadata"))
            continue
        out.append(Sourced(doc, str(path)))
    return out, findings


def load_tree(path: str | Path) -> tuple[list[Sourced], list[Finding]]:
    """Load a kustomization directory, a plain directory of YAML, or one YAML file."""
    p = Path(path)
    if p.is_file():
        return load_yaml_docs(p)
    if not (p / "kustomization.yaml").exists():
        objs: list[Sourced] = []
        findings: list[Finding] = []
        for f in sorted([*p.glob("*.yaml"), *p.glob("*.yml")]):
            o, fi = load_yaml_docs(f)
            objs += o
            findings += fi
        return objs, findings
    res, findings = _build(p)
    return [Sourced(r.obj, r.source) for r in res], findings


def _ns(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("namespace") or "") if isinstance(meta, dict) else ""


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("name") or "") if isinstance(meta, dict) else ""


def _same_ns(a: str, b: str) -> bool:
    return (a or "default") == (b or "default")


def _patch_matches(patch: Mapping[str, Any], r: _Res) -> bool:
    """A patch without ``target`` applies to the object of its group, kind, name and namespace."""
    if patch.get("kind") != r.obj.get("kind") or _name(patch) != _name(r.obj):
        return False
    pg, _ = _group_version(patch)
    if pg != _group_version(r.obj)[0]:
        return False
    ns = _ns(patch)
    return any(_same_ns(ns, n) for n in {_ns(r.obj), r.original_ns, *r.prev_ns})


def _selector_matches(selector: str, labels: Mapping[str, Any]) -> bool:
    """Match a label selector string (``a=b,c!=d,e in (x,y),!f,g``)."""
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = term.strip()
        if not term:
            continue
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            has = m.group(1) in labels and str(labels[m.group(1)]) in values
            if has != (m.group(2) == "in"):
                return False
            continue
        m = re.fullmatch(r"(\S+?)\s*(!=|==|=)\s*(\S*)", term)
        if m:
            equal = str(labels.get(m.group(1), "\0")) == m.group(3)
            if equal != (m.group(2) != "!="):
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _target_matches(target: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    g, v = _group_version(obj)
    checks = [("group", g), ("version", v), ("kind", str(obj.get("kind", ""))), ("name", _name(obj)), ("namespace", _ns(obj))]
    for key, actual in checks:
        want = target.get(key)
        if want is not None and not re.fullmatch(str(want), actual):
            return False
    meta = obj.get("metadata") or {}
    if target.get("labelSelector") and not _selector_matches(str(target["labelSelector"]), meta.get("labels") or {}):
        return False
    selector = target.get("annotationSelector")
    return not selector or _selector_matches(str(selector), meta.get("annotations") or {})


def _patch_docs(d: Path, entry: Any, kfile: Path) -> tuple[list[Any], str, list[Finding]]:
    """Return the documents of one ``patches`` entry, where they came from, and findings."""
    if isinstance(entry, str):  # patchesStrategicMerge: a path or an inline patch
        entry = {"path": entry} if (d / entry).is_file() else {"patch": entry}
    if not isinstance(entry, dict) or not (entry.get("path") or entry.get("patch")):
        return [], str(kfile), [Finding(str(kfile), "Kustomization", "kustomization", f"patch {entry!r} has neither path nor patch", "give each patch a 'path' to a YAML file or an inline 'patch'")]
    if entry.get("path"):
        ppath = d / str(entry["path"])
        if not ppath.is_file():
            return [], str(kfile), [Finding(str(kfile), "Kustomization", "kustomization", f"patch path {entry['path']!r} does not exist", "fix the path in patches")]
        text, source = ppath.read_text(), str(ppath)
    else:
        text, source = str(entry["patch"]), f"{kfile} (inline patch)"
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        return [], source, [Finding(source, "-", "yaml", f"not valid YAML: {exc}", "fix the YAML syntax at the line named")]
    return docs, source, []


def _apply_patch_entry(d: Path, kfile: Path, entry: Any, res: list[_Res]) -> list[Finding]:
    docs, source, findings = _patch_docs(d, entry, kfile)
    target = entry.get("target") if isinstance(entry, dict) else None
    for doc in docs:
        if isinstance(doc, list):  # JSON 6902
            if not isinstance(target, dict):
                findings.append(Finding(source, "-", "kustomization", "a JSON 6902 patch (a list of operations) needs a target", "add target: {kind, name} to the patch entry"))
                continue
            hits = [r for r in res if _target_matches(target, r.obj)]
            for r in hits:
                try:
                    r.obj = json_patch(r.obj, doc)
                except PatchError as exc:
                    findings.append(Finding(source, object_name(r.obj), "kustomization", str(exc), "fix the operation's path or value"))
        elif isinstance(doc, dict):
            if target is not None:
                hits = [r for r in res if isinstance(target, dict) and _target_matches(target, r.obj)]
            else:
                hits = [r for r in res if _patch_matches(doc, r)]
            if not hits:
                where = f"target {target}" if target is not None else object_name(doc)
                findings.append(Finding(source, object_name(doc), "kustomization", f"patch matches no object ({where})", "fix kind and metadata.name of the patch (or its target)"))
            for r in hits:
                body = doc
                if target is not None:  # a targeted patch applies whatever name it carries
                    body = copy.deepcopy(doc)
                    body.setdefault("metadata", {})
                    if isinstance(body["metadata"], dict):
                        body["metadata"]["name"] = _name(r.obj)
                        if _ns(r.obj):
                            body["metadata"]["namespace"] = _ns(r.obj)
                try:
                    merged = strategic_merge(r.obj, body, SchemaNode.for_object(r.obj))
                except PatchError as exc:
                    findings.append(Finding(source, object_name(r.obj), "kustomization", str(exc), f"use {DIRECTIVE}: merge, replace or delete"))
                    continue
                if merged is DELETE:
                    res.remove(r)
                else:
                    r.obj = merged
        else:
            findings.append(Finding(source, "-", "kustomization", "a patch must be a Kubernetes object or a list of JSON patch operations", "fix the patch document"))
    return findings


def _set_namespace(res: list[_Res], ns: str) -> None:
    for r in res:
        kind = r.obj.get("kind")
        meta = r.obj.setdefault("metadata", {})
        if kind == "Namespace" and r.obj.get("apiVersion") == "v1":
            meta["name"] = ns  # kustomize names the Namespace object after the kustomization's namespace
        if kind not in CLUSTER_SCOPED:
            if _ns(r.obj):
                r.prev_ns.add(_ns(r.obj))
            meta["namespace"] = ns
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            for subj in r.obj.get("subjects") or []:
                if isinstance(subj, dict) and subj.get("name") == "default":
                    subj["namespace"] = ns


def _fix_subject_namespaces(res: list[_Res]) -> None:
    """Point ServiceAccount subjects at the ServiceAccount of that name in the set (kustomize's name reference)."""
    accounts = [r for r in res if r.obj.get("kind") == "ServiceAccount"]
    for r in res:
        if r.obj.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        for subj in r.obj.get("subjects") or []:
            if not isinstance(subj, dict) or subj.get("kind") != "ServiceAccount":
                continue
            cands = [a for a in accounts if _name(a.obj) == subj.get("name")]
            if "namespace" in subj:
                want = str(subj["namespace"])
                by_orig = [a for a in cands if a.original_ns == want]
                cands = by_orig or [a for a in cands if _ns(a.obj) == want]
            if len({_ns(a.obj) for a in cands}) > 1 and r.obj.get("kind") == "RoleBinding":
                cands = [a for a in cands if _ns(a.obj) == _ns(r.obj)]
            if len({_ns(a.obj) for a in cands}) == 1 and _ns(cands[0].obj):
                subj["namespace"] = _ns(cands[0].obj)


def _image_repo(image: str) -> str:
    """Return the repository of an image reference, without tag or digest."""
    repo = image.split("@", 1)[0]
    head, _, last = repo.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _apply_images(res: list[_Res], images: Iterable[Any]) -> None:
    for img in images:
        if not isinstance(img, dict):
            continue
        name = img.get("name")
        for r in res:
            for c in containers(r.obj):
                image = str(c.get("image", ""))
                repo = _image_repo(image)
                if repo != name:
                    continue
                new = str(img.get("newName", repo))
                if img.get("digest"):
                    c["image"] = f"{new}@{img['digest']}"
                elif img.get("newTag"):
                    c["image"] = f"{new}:{img['newTag']}"
                else:
                    c["image"] = new + image[len(repo) :]


def _build(d: Path, depth: int = 0) -> tuple[list[_Res], list[Finding]]:
    kfile = d / "kustomization.yaml"
    try:
        k = yaml.safe_load(kfile.read_text()) or {}
    except yaml.YAMLError as exc:
        return [], [Finding(str(kfile), "-", "yaml", f"not valid YAML: {exc}", "fix the YAML syntax")]
    if not isinstance(k, dict):
        return [], [Finding(str(kfile), "-", "kustomization", "a kustomization must be a mapping", "write kustomization.yaml as a mapping of keys")]
    findings: list[Finding] = []
    unknown = sorted(set(k) - SUPPORTED_KEYS)
    if unknown:
        findings.append(
            Finding(str(kfile), "Kustomization", "kustomization", f"unsupported keys {unknown}", f"use only {sorted(SUPPORTED_KEYS)} (the subset the controller renders like kustomize)")
        )
    res: list[_Res] = []
    for entry in k.get("resources") or []:
        target = d / str(entry)
        if not target.exists():
            findings.append(Finding(str(kfile), "Kustomization", "kustomization", f"resource {entry!r} does not exist", "fix the path in resources"))
        elif target.is_dir() and (target / "kustomization.yaml").exists():
            if depth > 20:
                findings.append(Finding(str(kfile), "Kustomization", "kustomization", f"resource {entry!r} nests too deep (a cycle?)", "remove the cycle from resources"))
                continue
            sub, fi = _build(target, depth + 1)
            res += sub
            findings += fi
        elif target.is_dir():
            findings.append(Finding(str(kfile), "Kustomization", "kustomization", f"resource {entry!r} is a directory without kustomization.yaml", "add a kustomization.yaml there or list its files"))
        else:
            objs, fi = load_yaml_docs(target)
            res += [_Res(s.obj, s.source, _ns(s.obj)) for s in objs]
            findings += fi
    for entry in k.get("patchesStrategicMerge") or []:
        findings += _apply_patch_entry(d, kfile, entry, res)
    for entry in k.get("patches") or []:
        findings += _apply_patch_entry(d, kfile, entry, res)
    if k.get("namespace"):
        _set_namespace(res, str(k["namespace"]))
    if k.get("commonLabels"):
        for r in res:
            _apply_field_specs(r.obj, _COMMON_LABELS, k["commonLabels"])
    for lab in k.get("labels") or []:
        if not isinstance(lab, dict):
            continue
        if lab.get("fields"):
            findings.append(Finding(str(kfile), "Kustomization", "kustomization", "labels[].fields is not supported", "use includeSelectors or includeTemplates"))
        if lab.get("includeSelectors"):
            specs: tuple[FieldSpec, ...] = _COMMON_LABELS
        elif lab.get("includeTemplates"):
            specs = _METADATA_LABELS
        else:
            specs = _METADATA_LABELS[:1]
        for r in res:
            _apply_field_specs(r.obj, specs, lab.get("pairs") or {})
    if k.get("commonAnnotations"):
        for r in res:
            _apply_field_specs(r.obj, _COMMON_ANNOTATIONS, k["commonAnnotations"])
    for rep in k.get("replicas") or []:
        for r in res:
            if isinstance(rep, dict) and r.obj.get("kind") in _REPLICAS and _name(r.obj) == rep.get("name"):
                r.obj.setdefault("spec", {})["replicas"] = rep.get("count")
    _apply_images(res, k.get("images") or [])
    _fix_subject_namespaces(res)
    return res, findings
