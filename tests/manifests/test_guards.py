"""The ValidatingAdmissionPolicy shopfleet-pod-guard, evaluated with a CEL implementation.

Its variables are evaluated in order, then every validation, on the request's ``object`` as the
API server would see it (pods and workloads with their pod templates). The shop's own workloads
must pass; each escape (hostPID, hostIPC, a privileged container or init container, a hostPath
outside the allow-list or climbing out of it with '..') must be refused by exactly the rule for it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.manifests import support as s

celpy = pytest.importorskip("celpy", reason="cel-python (the dev extra) evaluates the policy's CEL rules")

CLUSTER = s.load("edge-cluster")
POLICY = s.find(CLUSTER, "ValidatingAdmissionPolicy", "shopfleet-pod-guard")
BINDING = s.find(CLUSTER, "ValidatingAdmissionPolicyBinding", "shopfleet-pod-guard")
ENV = celpy.Environment()


def evaluate(obj: dict[str, Any]) -> list[str]:
    """Return the messages of the validations ``obj`` fails (empty: admitted)."""
    act: dict[str, Any] = {"object": celpy.json_to_cel(obj)}
    variables: dict[str, Any] = {}
    for var in POLICY["spec"]["variables"]:
        # A variable may use the ones before it, as in the API server.
        act["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
        variables[var["name"]] = ENV.program(ENV.compile(var["expression"])).evaluate(act)
    act["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    failed = []
    for rule in POLICY["spec"]["validations"]:
        result = ENV.program(ENV.compile(rule["expression"])).evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), f"{rule['expression']} gave {result!r}, not a bool"
        if not result:
            failed.append(rule["message"])
    return failed


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shopfleet"}, "spec": spec}


GOOD = {"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": False}}],
        "volumes": [{"name": "state", "hostPath": {"path": "/var/lib/shopfleet/agent"}}, {"name": "cm", "configMap": {"name": "x"}}]}


def _with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    spec.update(changes)
    return spec


@pytest.mark.parametrize("obj", [o for o, _ in s.workloads(s.load("edge"))], ids=lambda o: o["metadata"]["name"])
def test_the_shops_own_workloads_are_admitted(obj):
    assert evaluate(obj) == []


def test_a_minimal_pod_and_one_with_allowed_host_paths_are_admitted():
    assert evaluate(_pod({"containers": [{"name": "c", "image": "x"}]})) == []
    assert evaluate(_pod(GOOD)) == []
    logs = _with(volumes=[{"name": "l", "hostPath": {"path": "/var/log/pods"}}, {"name": "n", "hostPath": {"path": "/etc/shopfleet/node/agent.password"}}])
    assert evaluate(_pod(logs)) == []


BAD = [
    pytest.param(_with(hostPID=True), "hostPID", id="host-pid"),
    pytest.param(_with(hostIPC=True), "hostIPC", id="host-ipc"),
    pytest.param(_with(containers=[{"name": "c", "image": "x", "securityContext": {"privileged": True}}]), "privileged containers", id="privileged"),
    pytest.param(_with(initContainers=[{"name": "i", "image": "x", "securityContext": {"privileged": True}}]), "privileged containers", id="privileged-init"),
    pytest.param(_with(ephemeralContainers=[{"name": "d", "image": "x", "securityContext": {"privileged": True}}]), "ephemeral", id="privileged-debug"),
    pytest.param(_with(volumes=[{"name": "root", "hostPath": {"path": "/"}}]), "hostPath", id="host-root"),
    pytest.param(_with(volumes=[{"name": "sock", "hostPath": {"path": "/run/k3s/containerd/containerd.sock"}}]), "hostPath", id="runtime-socket"),
    pytest.param(_with(volumes=[{"name": "esc", "hostPath": {"path": "/var/lib/shopfleet/../../../etc"}}]), "hostPath", id="dot-dot"),
    pytest.param(_with(volumes=[{"name": "pfx", "hostPath": {"path": "/var/lib/shopfleetx"}}]), "hostPath", id="prefix-is-not-a-parent"),
]


@pytest.mark.parametrize("spec, rule", BAD)
def test_each_escape_is_refused_by_its_rule(spec, rule):
    failed = evaluate(_pod(spec))
    assert len(failed) == 1 and rule in failed[0], failed


@pytest.mark.parametrize("spec, rule", BAD[:4])
def test_workload_templates_are_checked_too(spec, rule):
    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d", "namespace": "shopfleet"},
          "spec": {"selector": {}, "template": {"metadata": {}, "spec": spec}}}
    failed = evaluate(ds)
    assert len(failed) == 1 and rule in failed[0], failed


def test_the_nsenter_escape_is_refused():
    # The classic: a privileged pod in the host's PID namespace, then nsenter -t 1 -m -u -i -n sh.
    nsenter = _pod({"hostPID": True, "containers": [{"name": "x", "image": "alpine", "command": ["nsenter", "-t", "1", "-m", "sh"],
                                                     "securityContext": {"privileged": True}}]})
    assert len(evaluate(nsenter)) == 2


def test_policy_and_binding_cover_the_shop_namespace():
    spec = POLICY["spec"]
    assert spec["failurePolicy"] == "Fail"
    rules = {(g, r) for rule in spec["matchConstraints"]["resourceRules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("apps", "daemonsets"), ("apps", "deployments")} <= rules
    assert BINDING["spec"]["policyName"] == POLICY["metadata"]["name"] and "Deny" in BINDING["spec"]["validationActions"]
    (expr,) = BINDING["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and "shopfleet" in expr["values"]
    # Device plugins and Falco must be privileged: they live outside the guarded namespace.
    for obj, pod in s.workloads(CLUSTER):
        if any((c.get("securityContext") or {}).get("privileged") for c in pod["containers"]):
            assert obj["metadata"]["namespace"] not in expr["values"]


def test_allow_list_message_names_every_allowed_path():
    allowed = ENV.program(ENV.compile(next(v for v in POLICY["spec"]["variables"] if v["name"] == "allowedHostPaths")["expression"])).evaluate({})
    message = next(v["message"] for v in POLICY["spec"]["validations"] if "hostPath" in v["expression"])
    assert all(str(p) in message for p in allowed)
