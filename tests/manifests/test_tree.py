"""The shape of the trees: least privilege, Pod Security levels, node roles, scrape targets, restarts."""

from __future__ import annotations

from tests.manifests import support as s

EDGE = s.load("edge")
CLUSTER = s.load("edge-cluster")
CENTRAL = s.load("central")


def test_applier_rbac_covers_exactly_what_the_desired_state_contains():
    role = s.find(CLUSTER, "Role", "shopfleet-applier")
    assert role["metadata"]["namespace"] == "shopfleet"
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    group = {"DaemonSet": "apps", "Deployment": "apps", "ConfigMap": "", "Service": ""}
    needed = set()
    for o in EDGE:
        assert o["kind"] in group, f"{o['kind']} is in the desired state but the applier may not write it"
        assert o["metadata"]["namespace"] == "shopfleet"
        needed.add((group[o["kind"]], o["kind"].lower() + "s"))
    assert granted == needed
    for rule in role["rules"]:
        assert {"patch", "create", "delete"} <= set(rule["verbs"])


def test_no_rbac_object_grants_bind_escalate_or_cluster_wide_writes():
    for o in CLUSTER:
        if o["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in o["rules"]:
            assert not {"bind", "escalate", "impersonate", "*"} & set(rule["verbs"]), o["metadata"]["name"]
            assert "*" not in rule["resources"] and "secrets" not in rule["resources"]
    # the apply path lists namespace by namespace (edge_agent/apply/kube.py): the applier needs
    # nothing cluster-wide, not even reading
    assert not [o for o in CLUSTER if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    bindings = [o for o in CLUSTER if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "shopfleet-applier", "namespace": "shopfleet"}] for b in bindings)


def test_only_the_applier_gets_a_service_account_token():
    for obj, spec in s.workloads(EDGE + CENTRAL):
        if obj["metadata"]["name"] == "shopfleet-applier":
            assert spec["serviceAccountName"] == "shopfleet-applier"
        else:
            assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]


def test_pod_security_levels_are_what_the_pods_need():
    levels = {o["metadata"]["name"]: o["metadata"]["labels"] for o in CLUSTER + CENTRAL if o["kind"] == "Namespace"}
    assert levels["shopfleet-central"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # hostPath and hostNetwork are forbidden from `baseline` up: the shop namespace is privileged
    # at the PodSecurity level, guarded by the admission policy, and warns at restricted.
    assert levels["shopfleet"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert levels["shopfleet"]["pod-security.kubernetes.io/warn"] == "restricted"
    for _obj, spec in s.workloads(CENTRAL):  # restricted, checked field by field
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in spec.get("volumes") or [])
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    for obj, spec in s.workloads(CLUSTER):
        if any((c.get("securityContext") or {}).get("privileged") for c in spec["containers"]):
            assert levels[obj["metadata"]["namespace"]]["pod-security.kubernetes.io/enforce"] == "privileged"
            assert obj["metadata"]["namespace"] != "shopfleet"


def test_node_roles_are_labels():
    pods = {o["metadata"]["name"]: spec for o, spec in s.workloads(EDGE)}
    assert pods["shopfleet-applier"]["nodeSelector"] == {"shopfleet.io/applier": "true"}
    (term,) = pods["shopfleet-agent"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "shopfleet.io/applier", "operator": "NotIn", "values": ["true"]}]
    assert pods["sensor-driver"]["nodeSelector"]["shopfleet.io/sensors"] == "true"
    assert pods["vision-arm64"]["nodeSelector"]["shopfleet.io/vision"] == "true"
    assert pods["vision-gpu"]["nodeSelector"]["shopfleet.io/vision"] == "true"
    assert pods["mosquitto"]["nodeSelector"] == {"shopfleet.io/broker": "true"}
    # Fusion on the GPU camera node, beside the camera whose track stream it reads.
    assert pods["fusion"]["nodeSelector"] == pods["vision-gpu"]["nodeSelector"]


def test_metrics_ports_have_services_and_scrape_config():
    for port in (9464, 9465, 9466, 9468):  # agents, vision, sensor driver, fusion
        svcs = [o for o in EDGE if o["kind"] == "Service" and o["metadata"].get("annotations", {}).get("prometheus.io/port") == str(port)]
        assert len(svcs) == 1, port
        svc = svcs[0]
        assert svc["metadata"]["labels"]["shopfleet.io/metrics"] == "true" and svc["spec"]["ports"][0]["name"] == "metrics"
        selected = [spec for o, spec in s.workloads(EDGE)
                    if all(o["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())]
        assert selected and all(any(p["containerPort"] == port for c in sp["containers"] for p in c.get("ports", [])) for sp in selected)
    monitor = s.yaml_text((s.ROOT / "monitoring" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"] == {"shopfleet.io/metrics": "true"}
    assert {"shopfleet", "shopfleet-central"} <= set(monitor["spec"]["namespaceSelector"]["matchNames"])


def test_http_probes_use_declared_ports():
    for _obj, spec in s.workloads(EDGE + CENTRAL + CLUSTER):
        for c in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                p = c[probe]
                if "httpGet" in p:
                    port = p["httpGet"]["port"]
                    assert any(pp.get("name") == port or pp["containerPort"] == port for pp in c["ports"]), f"{c['name']}: probe port not declared"


def test_agent_probes_use_healthz():
    # /metrics answers even with a dead uplink thread; /healthz (edge_agent/metrics.py) does not.
    seen = 0
    for _obj, spec in s.workloads(EDGE):
        for c in spec["containers"]:
            if c["name"] in ("agent", "applier"):  # the applier has its own image and container name
                seen += 1
                assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert seen == 2  # the per-node agent and the applier
