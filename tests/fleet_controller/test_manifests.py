"""Manifests: the repository tree and every rendered shop validate; each policy rule fires."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from fleet_controller.rollout import manifests as m
from fleet_controller.rollout.cli import main as cli

DIGEST = "sha256:" + "ab" * 32


def _edge_objects() -> list[dict]:
    return m.load_overlay(m.edge_overlay_dir("production"))


def _find(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_repository_manifests_are_valid_on_every_supported_version():
    count, findings = m.validate_path(m.MANIFESTS_ROOT)
    assert count > 30
    assert findings == [], "\n".join(f.describe() for f in findings)


def test_edge_tree_has_what_a_shop_needs():
    objs = _edge_objects()
    agent = _find(objs, "DaemonSet", "shopfleet-agent")
    spec = agent["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    gpu = _find(objs, "DaemonSet", "vision-gpu")["spec"]["template"]["spec"]
    assert gpu["runtimeClassName"] == "nvidia"
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["priorityClassName"] == "system-node-critical"  # the production overlay's patch
    arm = _find(objs, "DaemonSet", "vision-arm64")["spec"]["template"]["spec"]
    assert arm["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    driver = _find(objs, "DaemonSet", "sensor-driver")["spec"]["template"]["spec"]
    assert not driver["containers"][0]["securityContext"].get("privileged")
    # One device request: a node with one board schedules the driver.
    assert [k for k in driver["containers"][0]["resources"]["limits"] if "/" in k] == ["shopfleet.io/shelf-board"]
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ConfigMap", "Service"} <= kinds  # namespaces are the cluster bootstrap's
    assert _find(objs, "Deployment", "mosquitto") and _find(objs, "DaemonSet", "fluent-bit")
    assert all(o["metadata"].get("namespace") == "shopfleet" for o in objs if o["kind"] not in m.CLUSTER_SCOPED)


def test_lab_overlay_patches_container_by_name():
    objs = m.load_overlay(m.edge_overlay_dir("lab"))
    c = _find(objs, "DaemonSet", "vision-arm64")["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"]["cpu"] == "500m"
    assert c["image"].startswith("ghcr.io/shopfleet/vision@sha256:")  # untouched fields survive the merge


def test_central_tree_has_controller_pieces():
    objs, findings = m.load_tree(m.MANIFESTS_ROOT / "central" / "overlays" / "production")
    assert not findings
    kinds = {o.obj["kind"] for o in objs}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    dep = next(o.obj for o in objs if o.obj["kind"] == "StatefulSet" and o.obj["metadata"]["name"] == "shopfleet-controller")
    assert dep["spec"]["replicas"] == 2
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert all("secretKeyRef" in e["valueFrom"] for e in env if e["name"].endswith("_URL"))


@pytest.mark.parametrize(
    "classes, expect_gpu, expect_arm",
    [
        pytest.param(frozenset({"pi"}), False, True, id="pi-only"),
        pytest.param(frozenset({"pi", "gpu"}), True, True, id="pi-and-gpu"),
        pytest.param(frozenset(), True, True, id="unknown-classes-get-all"),
    ],
)
def test_render_keeps_only_the_shops_node_classes(classes, expect_gpu, expect_arm):
    objs = m.render_shop(m.ShopTarget("berlin-01", classes), m.RenderInput("r1"), 7)
    names = {o["metadata"]["name"] for o in objs if o["kind"] == "DaemonSet"}
    assert ("vision-gpu" in names) is expect_gpu
    assert ("fusion" in names) is expect_gpu  # carts are made on the GPU node: no GPU node, no fusion
    assert ("vision-arm64" in names) is expect_arm


def test_render_pins_release_images_and_stamps_labels_then_validates():
    image = f"registry.example/vision@{DIGEST}"
    rel = m.RenderInput("v2", {"vision": image}, model_sha256="cd" * 32)
    objs = m.render_shop(m.ShopTarget("oslo-3", frozenset({"pi", "gpu"})), rel, 12)
    arm = _find(objs, "DaemonSet", "vision-arm64")
    assert arm["spec"]["template"]["spec"]["containers"][0]["image"] == image
    ann = arm["spec"]["template"]["metadata"]["annotations"]
    assert ann[m.ANNOTATION_MODEL] == "cd" * 32 and m.LABEL_RELEASE not in ann
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels[m.LABEL_SHOP] == "oslo-3" and labels[m.LABEL_REVISION] == "12" and labels[m.LABEL_MANAGED] == "shopfleet"
    cm = _find(objs, "ConfigMap", "shopfleet-agent")
    assert "shop: oslo-3" in cm["data"]["agent.yaml"] and m.SHOP_PLACEHOLDER not in yaml.safe_dump(objs)
    assert m.validate([m.Sourced(o, "rendered") for o in objs]) == []


def _agent() -> dict:
    return copy.deepcopy(_find(_edge_objects(), "DaemonSet", "shopfleet-agent"))


def _container(o: dict) -> dict:
    return o["spec"]["template"]["spec"]["containers"][0]


def _break(mutate):
    o = _agent()
    mutate(o)
    return o


BROKEN = [
    pytest.param(lambda o: _container(o).update(image="ghcr.io/shopfleet/agent:latest"), "image_not_pinned", id="tag-not-digest"),
    pytest.param(lambda o: _container(o)["resources"].pop("limits"), "no_resources", id="no-limits"),
    pytest.param(lambda o: _container(o).pop("livenessProbe"), "no_probes", id="no-liveness"),
    pytest.param(lambda o: _container(o)["securityContext"].update(allowPrivilegeEscalation=True), "security_context", id="escalation"),
    pytest.param(lambda o: _container(o)["securityContext"].update(readOnlyRootFilesystem=False), "security_context", id="writable-root"),
    pytest.param(lambda o: _container(o)["securityContext"].update(privileged=True), "privileged", id="privileged-undeclared"),
    pytest.param(lambda o: o["metadata"]["annotations"].pop(m.WHY_HOST_NETWORK), "host_namespace", id="host-network-undeclared"),
    pytest.param(lambda o: o["spec"]["template"]["spec"].update(hostPID=True), "host_namespace", id="host-pid-undeclared"),
    pytest.param(lambda o: o["metadata"]["annotations"].pop(m.WHY_HOST_PATH), "host_path", id="host-path-undeclared"),
    pytest.param(lambda o: o["spec"]["template"]["spec"].update(dnsPolicy="ClusterFirst"), "dns_policy", id="host-net-dns"),
    pytest.param(lambda o: _container(o).update(imagePullPolice="Always"), "schema", id="unknown-field-strict"),
    pytest.param(lambda o: o["spec"].update(replicas=2), "schema", id="daemonset-has-no-replicas"),
    pytest.param(lambda o: _container(o)["ports"][0].update(containerPort="http"), "schema", id="wrong-type"),
]


@pytest.mark.parametrize("mutate, rule", BROKEN)
def test_each_rule_fires_with_a_fix(mutate, rule):
    registry = CollectorRegistry()
    findings = m.validate([m.Sourced(_break(mutate), "agent.yaml")], metrics=m.ManifestMetrics(registry))
    rules = {f.rule for f in findings}
    assert rule in rules, [f.describe() for f in findings]
    f = next(f for f in findings if f.rule == rule)
    assert f.source == "agent.yaml" and f.obj == "DaemonSet/shopfleet/shopfleet-agent" and f.fix
    if rule == "schema":
        assert {f.k8s_version for f in findings if f.rule == "schema"} == set(m.SUPPORTED_K8S_VERSIONS)
    assert registry.get_sample_value("shopfleet_manifests_findings_total", {"rule": rule}) >= 1


def test_unknown_kind_and_bad_yaml_are_findings(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: x}\n")
    (tmp_path / "b.yaml").write_text("key: [unclosed\n")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    count, findings = m.validate_path(tmp_path)
    assert count == 1
    assert {f.rule for f in findings} == {"unknown_kind", "yaml"}


def test_kustomization_with_missing_resource_and_unmatched_patch(tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\npatches: [{path: p.yaml}]\nbogus: 1\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nope}\n")
    _, findings = m.load_tree(tmp_path)
    messages = " ".join(f.message for f in findings)
    assert "missing.yaml" in messages and "matches no object" in messages and "bogus" in messages


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_loader_never_raises_on_garbage(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("garbage")
    (d / "x.yaml").write_text(text)
    objs, findings = m.load_tree(d / "x.yaml")
    assert all(isinstance(f, m.Finding) for f in findings)
    m.validate(objs)  # total: findings, never exceptions


def test_cli_validate_and_render(tmp_path: Path, capsys):
    assert cli(["manifests", "validate", str(m.MANIFESTS_ROOT)]) == 0
    assert "0 problems" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    o = _break(lambda o: _container(o).update(image="agent:latest"))
    bad.write_text(yaml.safe_dump(o))
    assert cli(["manifests", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "image_not_pinned" in out and "sha256" in out
    out_dir = tmp_path / "render"
    rc = cli(["manifests", "render", "--shop", "berlin-01", "--node-classes", "pi", "--image", f"vision=reg.example/vision@{DIGEST}", "--out", str(out_dir)])
    assert rc == 0
    files = sorted(out_dir.glob("*.yaml"))
    assert files and not any("vision-gpu" in f.name for f in files)
    assert cli(["manifests", "validate", str(out_dir)]) == 0


def test_only_pods_whose_spec_changes_restart_on_a_release():
    """A pod template is the same across releases unless its image or model changes (no restart for the broker)."""
    target = m.ShopTarget("oslo-3", frozenset({"pi", "gpu"}))
    image = f"registry.example/vision@{DIGEST}"

    def templates(rel):
        return {(o["kind"], o["metadata"]["name"]): o["spec"]["template"] for o in m.render_shop(target, rel, 1)
                if o["kind"] in ("DaemonSet", "Deployment", "StatefulSet")}

    r1 = templates(m.RenderInput("r1", {"vision": image}, model_sha256="ab" * 32))
    r2 = templates(m.RenderInput("r2", {"vision": image}, model_sha256="ab" * 32))
    assert r1 == r2  # a release that changes nothing a pod runs restarts nothing
    r3 = templates(m.RenderInput("r3", {"vision": image}, model_sha256="cd" * 32))
    changed = {k for k in r1 if r1[k] != r3[k]}
    assert changed and all(name.startswith("vision") for _, name in changed)  # a new model restarts vision only
