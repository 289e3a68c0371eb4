"""Shared helpers of the manifest tests: load every tree, find pods, resolve container argv."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from fleet_controller.rollout import manifests as m

ROOT = m.MANIFESTS_ROOT
TREES = {
    "edge": m.edge_overlay_dir("production"),
    "edge-lab": m.edge_overlay_dir("lab"),
    "edge-cluster": ROOT / "edge" / "cluster",
    "central": ROOT / "central" / "overlays" / "production",
}
SHOP, NODE = "berlin-01", "pi-1"
SHOPFLEET_IMAGES = "ghcr.io/shopfleet/"


def load(tree: str) -> list[dict[str, Any]]:
    """Return the objects of one tree (a kustomization), failing on load problems."""
    objs, findings = m.load_tree(TREES[tree])
    assert not findings, [f.describe() for f in findings]
    return [s.obj for s in objs]


def all_objects() -> list[dict[str, Any]]:
    """Return the objects of every tree (the lab overlay left out: the same objects as production)."""
    return [o for t in ("edge", "edge-cluster", "central") for o in load(t)]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return obj["spec"] if obj["kind"] == "Pod" else None


def workloads(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objs:
        spec = pod_spec(o)
        if spec is not None:
            yield o, spec


def configmap_data(objs: list[dict[str, Any]], name: str, namespace: str) -> dict[str, str]:
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name and o["metadata"]["namespace"] == namespace)
    return {k: v.replace(m.SHOP_PLACEHOLDER, SHOP) for k, v in cm["data"].items()}


NODE_IP = "192.0.2.10"
"""The node's address (documentation range) the kubelet would give a status.hostIP fieldRef."""
MODEL_SHA256 = "ab" * 32
"""The model digest the kubelet would take from a rendered vision pod's shopfleet.io/model-sha256 annotation."""


def env_values(objs: list[dict[str, Any]], container: dict[str, Any], namespace: str) -> dict[str, str]:
    """Resolve a container's env as the kubelet would (fieldRef spec.nodeName -> NODE, status.hostIP -> NODE_IP, metadata.name -> a pod name, the model annotation -> MODEL_SHA256)."""
    out: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            out[e["name"]] = expand(e["value"], out)
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            out[e["name"]] = {"spec.nodeName": NODE, "status.hostIP": NODE_IP, "metadata.name": "shopfleet-controller-0",
                              f"metadata.annotations['{m.ANNOTATION_MODEL}']": MODEL_SHA256}[ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            out[e["name"]] = configmap_data(objs, ref["configMapKeyRef"]["name"], namespace)[ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            out[e["name"]] = f"secret:{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}"
    return out


def expand(word: str, env: dict[str, str]) -> str:
    """Expand $(VAR) references as Kubernetes does in command, args and env values; unknown ones fail."""

    def sub(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not defined in the container's env"
        return env[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, word)


def mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Return mountPath -> (volumeMount, volume) of a container."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    return {vm["mountPath"]: (vm, volumes[vm["name"]]) for vm in container.get("volumeMounts") or []}


def mount_for(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Return (mountPath, volumeMount, volume) of the deepest mount that holds ``path``."""
    best = None
    for mp, (vm, vol) in mounts(spec, container).items():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best[0])):
            best = (mp, vm, vol)
    return best


def mounted_file_text(objs: list[dict[str, Any]], spec: dict[str, Any], container: dict[str, Any], path: str, namespace: str) -> str:
    """Return the text of a file a container reads from a ConfigMap volume."""
    hit = mount_for(spec, container, path)
    assert hit is not None, f"{path} is not mounted in container {container['name']}"
    mp, vm, vol = hit
    assert "configMap" in vol, f"{path} comes from {vol}, not a ConfigMap"
    key = vm.get("subPath") or path[len(mp.rstrip("/")) + 1:]
    return configmap_data(objs, vol["configMap"]["name"], namespace)[key]


def yaml_text(text: str) -> Any:
    return yaml.safe_load(text)


def read(path: Path) -> str:
    return path.read_text()
