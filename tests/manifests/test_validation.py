"""Validation refuses what a Kubernetes API server refuses, with the object, field path, value and fix.

The review behind issue 11 mutated manifests twelve ways; the OpenAPI schema caught two (unknown
field, string port). Each mutation below must now be refused with a precise finding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest

from fleet_controller.rollout import manifests as m
from fleet_controller.rollout import validation as v
from fleet_controller.rollout.k8s_objects import SCHEMA_VERSION, definitions

DIGEST = "sha256:" + "ab" * 32
_SC = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
_PROBE = {"httpGet": {"path": "/healthz", "port": "http"}}


def _daemonset() -> dict[str, Any]:
    """A valid DaemonSet with a GPU container and a sidecar: every check has something to look at."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "vision-gpu", "namespace": "shopfleet", "labels": {"app.kubernetes.io/name": "vision"}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "vision"}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "vision", "shopfleet.io/node-class": "gpu"}},
                "spec": {
                    "dnsPolicy": "ClusterFirst",
                    "containers": [
                        {
                            "name": "vision",
                            "image": f"ghcr.io/shopfleet/vision@{DIGEST}",
                            "ports": [{"name": "http", "containerPort": 9465}],
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "512Mi", "nvidia.com/gpu": "1"},
                                "limits": {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "1"},
                            },
                            "readinessProbe": _PROBE,
                            "livenessProbe": _PROBE,
                            "securityContext": _SC,
                            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                        },
                        {
                            "name": "uploader",
                            "image": f"ghcr.io/shopfleet/uploader@{DIGEST}",
                            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
                            "readinessProbe": {"exec": {"command": ["true"]}},
                            "livenessProbe": {"exec": {"command": ["true"]}},
                            "securityContext": _SC,
                        },
                    ],
                    "volumes": [{"name": "models", "emptyDir": {"sizeLimit": "2Gi"}}],
                },
            },
        },
    }


def _pod(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["template"]["spec"]


def _c(o: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return _pod(o)["containers"][i]


def _findings(obj: dict[str, Any]) -> list[m.Finding]:
    return m.validate([m.Sourced(obj, "vision.yaml")])


def test_the_fixture_is_valid():
    assert _findings(_daemonset()) == []


CPATH = "spec.template.spec.containers[0]"
Mutation = Callable[[dict[str, Any]], None]
MUTATIONS: list[Any] = [
    pytest.param(lambda o: _c(o)["resources"]["limits"].update(memory="1GB"), {"quantity"}, f"{CPATH}.resources.limits.memory", "1GB", "Gi", id="quantity-1GB"),
    pytest.param(lambda o: o["metadata"]["labels"].update({"app.kubernetes.io/name": "vision gpu!"}), {"label"}, "metadata.labels[app.kubernetes.io/name]", "vision gpu!", "annotation", id="bad-label-value"),
    pytest.param(lambda o: o["metadata"].update(name="Vision_GPU"), {"name"}, "metadata.name", "Vision_GPU", "lowercase", id="invalid-name"),
    pytest.param(lambda o: _pod(o).update(dnsPolicy="ClusterFrist"), {"enum"}, "spec.template.spec.dnsPolicy", "ClusterFrist", "'ClusterFirst'", id="dnspolicy-typo"),
    pytest.param(lambda o: o["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "vision-gpu"}), {"selector"}, "spec.selector", "vision-gpu", "template", id="selector-template-mismatch"),
    pytest.param(lambda o: _pod(o).update(initContainers=[copy.deepcopy(_c(o, 1))]), {"container"}, f"{CPATH.replace('containers[0]', 'containers[1]')}.name", "uploader", "own name", id="duplicate-container"),
    pytest.param(lambda o: _c(o)["resources"]["requests"].update(cpu="3"), {"resources"}, f"{CPATH}.resources.requests[cpu]", "'3'", "at most the limit", id="requests-above-limits"),
    pytest.param(lambda o: _c(o)["resources"]["limits"].update({"nvidia.com/gpu": "2"}), {"resources"}, f"{CPATH}.resources.requests[nvidia.com/gpu]", "'1'", "same value", id="gpu-request-not-limit"),
    pytest.param(lambda o: o["spec"]["updateStrategy"].update(type="Recreate"), {"enum"}, "spec.updateStrategy.type", "Recreate", "'OnDelete'", id="daemonset-recreate"),
    pytest.param(lambda o: _c(o).pop("image"), {"container", "image_not_pinned"}, f"{CPATH}.image", "None", "image:", id="missing-image"),
    pytest.param(lambda o: _c(o).update(imagePullPolice="Always"), {"schema"}, None, "imagePullPolice", "API reference", id="unknown-field"),
    pytest.param(lambda o: _c(o)["ports"][0].update(containerPort="9465"), {"schema"}, None, "9465", "API reference", id="string-port"),
]


@pytest.mark.parametrize("mutate, rules, path, bad, fix_hint", MUTATIONS)
def test_each_mutation_of_the_review_is_refused_precisely(mutate: Mutation, rules: set[str], path: str | None, bad: str, fix_hint: str):
    obj = _daemonset()
    mutate(obj)
    findings = _findings(obj)
    assert {f.rule for f in findings} == rules, [f.describe() for f in findings]
    rule = sorted(rules - {"image_not_pinned"})[0]
    f = next(f for f in findings if f.rule == rule)
    assert f.obj == "DaemonSet/shopfleet/" + obj["metadata"]["name"] and f.source == "vision.yaml"
    if path is not None:
        assert f.path == path and f.message.startswith(path + ": ")
    assert bad in f.message, f.describe()
    assert fix_hint in f.fix, f.describe()


def _workloads() -> list[dict[str, Any]]:
    objs = m.render_shop(m.ShopTarget("berlin-01"), m.RenderInput("r1"), 1)
    found = [o for o in objs if m.pod_spec(o) is not None]
    assert found
    return found


TREE_MUTATIONS = [
    pytest.param(lambda o: m.containers(o)[0].setdefault("resources", {}).setdefault("limits", {}).update(memory="1GB"), "quantity", id="quantity"),
    pytest.param(lambda o: o["metadata"].setdefault("labels", {}).update(bad="-x-"), "label", id="label-value"),
    pytest.param(lambda o: o["metadata"].update(name="Not_A_Name"), "name", id="name"),
    pytest.param(lambda o: m.pod_spec(o).update(dnsPolicy="Clusterfirst"), "enum", id="dns-policy"),  # type: ignore[union-attr]
    pytest.param(lambda o: m.pod_spec(o)["containers"].append(copy.deepcopy(m.pod_spec(o)["containers"][0])), "container", id="duplicate-container"),  # type: ignore[index]
    pytest.param(lambda o: m.containers(o)[0].pop("image"), "container", id="missing-image"),
]


@pytest.mark.parametrize("mutate, rule", TREE_MUTATIONS)
def test_mutations_of_every_workload_in_the_tree_are_refused(mutate: Mutation, rule: str):
    for original in _workloads():
        obj = copy.deepcopy(original)
        mutate(obj)
        assert rule in {f.rule for f in v.api_findings(m.Sourced(obj, "tree"))}, m.object_name(obj)


@pytest.mark.parametrize(
    "text, value",
    [("1Gi", 2**30), ("512Mi", 512 * 2**20), ("250m", Fraction(1, 4)), ("1.5", Fraction(3, 2)), ("1e3", 1000), ("2E-1", Fraction(1, 5)), (".5k", 500), ("+3", 3), (2, 2), ("100n", Fraction(1, 10**7))],
)
def test_quantities_parse_to_their_exact_value(text: Any, value: Any):
    assert v.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["1GB", "1 Gi", "Gi", "1gi", "1KiB", "", "1.2.3", "0x10", True, None, "1e"])
def test_invalid_quantities_are_refused(text: Any):
    assert v.parse_quantity(text) is None


@pytest.mark.parametrize(
    "kind, name, ok",
    [
        ("ConfigMap", "shopfleet.agent-1", True),
        ("ConfigMap", "Agent", False),
        ("Namespace", "shop.fleet", False),  # a label: no dots
        ("Service", "1broker", False),  # DNS-1035: starts with a letter
        ("Service", "broker-1", True),
        ("ClusterRole", "system:shopfleet-agent", True),  # RBAC names are path segments
        ("ClusterRole", "a/b", False),
        ("CronJob", "x" * 53, False),
    ],
)
def test_names_follow_the_api_servers_rule_for_the_kind(kind: str, name: str, ok: bool):
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
    found = [f for f in v.api_findings(m.Sourced(obj, "x.yaml")) if f.rule == "name"]
    assert (not found) is ok, found


def test_every_enum_names_a_real_field_of_its_api_type():
    defs = definitions(SCHEMA_VERSION)["$defs"]
    for (definition, fld), allowed in v.ENUMS.items():
        assert fld in defs[definition]["properties"], (definition, fld)
        assert allowed


def test_more_api_server_rules():
    obj = _daemonset()
    _c(obj)["resources"]["requests"]["smarter-devices/ttyUSB0"] = "500m"
    _c(obj)["resources"]["limits"]["smarter-devices/ttyUSB0"] = "500m"
    _c(obj, 1)["resources"]["requests"]["hugepages-2Mi"] = "4Mi"
    _c(obj)["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    _c(obj)["ports"].append({"name": "http", "containerPort": 9466})
    _pod(obj)["volumes"].append({"name": "models", "emptyDir": {}})
    _pod(obj)["nodeSelector"] = {"-bad-": "x"}
    obj["spec"]["selector"] = {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["other"]}]}
    _pod(obj)["restartPolicy"] = "Never"
    messages = [f.describe() for f in _findings(obj)]
    text = "\n".join(messages)
    assert "must be a whole number" in text and "smarter-devices/ttyUSB0" in text
    assert "requests[hugepages-2Mi]" in text and "has no limit" in text
    assert "'nowhere' names no volume" in text
    assert "'http' is a duplicate port name" in text
    assert "'models' is a duplicate volume name" in text
    assert "nodeSelector: '-bad-' is not a valid label key" in text
    assert "spec.selector" in text and "does not match the template labels" in text
    assert "restartPolicy: 'Never' is not allowed in a DaemonSet" in text


def test_a_statefulsets_claim_templates_are_mountable():
    obj = _daemonset()
    obj["kind"] = "StatefulSet"
    obj["spec"].pop("updateStrategy")
    obj["spec"]["serviceName"] = "vision"
    obj["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
    _c(obj)["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    assert [f.describe() for f in _findings(obj)] == []
    obj["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] = "1GB"
    assert [f.path for f in _findings(obj)] == ["spec.volumeClaimTemplates[0].spec.resources.requests.storage"]


def test_custom_resources_get_the_generic_metadata_checks():
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "agent", "namespace": "shopfleet", "labels": {"release": "not ok!"}},
        "spec": {"endpoints": [{"port": "metrics"}], "selector": {}},
    }
    findings = _findings(monitor)
    assert [f.rule for f in findings] == ["label"], [f.describe() for f in findings]
    monitor["metadata"]["labels"]["release"] = "ok"
    assert _findings(monitor) == []


def test_findings_are_counted_by_rule():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    obj = _daemonset()
    _c(obj)["resources"]["limits"]["memory"] = "1GB"
    m.validate([m.Sourced(obj, "x")], metrics=m.ManifestMetrics(registry))
    assert registry.get_sample_value("shopfleet_manifests_findings_total", {"rule": "quantity"}) == 1
