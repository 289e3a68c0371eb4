"""The shop's Falco rules: parsed, every macro and list they use defined, aimed at real containers.

A Falco rule that names an undefined macro fails to load, and the whole rules file with it; one
that names a container that does not exist loads fine and never fires. Both are checked here
without running Falco: conditions are tokenised, identifiers that are neither Falco fields
(``class.field``), operators nor literals must be a macro or list of the file or one of the
default macros and lists of Falco's own falco_rules.yaml listed in FALCO_DEFAULTS.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from fleet_controller.web.security_events import SecurityEventMetrics, security_events_router
from tests.manifests import support as s

CLUSTER = s.load("edge-cluster")
EDGE = s.load("edge")
RULES: list[dict[str, Any]] = yaml.safe_load(s.configmap_data(CLUSTER, "falco-shopfleet-rules", "falco")["shopfleet_rules.yaml"])
FALCO_CONFIG = yaml.safe_load(s.configmap_data(CLUSTER, "falco-shopfleet-rules", "falco")["falco.yaml"])

FALCO_DEFAULTS = frozenset({
    # macros of Falco's default falco_rules.yaml that these rules rely on
    "spawned_process", "container", "open_write", "open_read", "outbound", "shell_procs",
})
OPERATORS = frozenset({"and", "or", "not", "in", "startswith", "endswith", "contains", "icontains", "pmatch", "glob", "exists", "intersects"})
FIELD_CLASSES = frozenset({"evt", "proc", "fd", "container", "k8s", "user", "group", "fs", "spawned_process"})


def _identifiers(condition: str) -> set[str]:
    """Return the bare words of a condition that must be macros or lists."""
    text = re.sub(r"\"[^\"]*\"|'[^']*'", " ", condition)  # string literals
    out = set()
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_.\-/*]*", text):
        if word in OPERATORS or "/" in word or "*" in word:
            continue  # operator, path literal
        if "." in word and word.split(".")[0] in FIELD_CLASSES:
            continue  # a field such as fd.name
        out.add(word)
    return out


def _defined(kind: str) -> dict[str, dict[str, Any]]:
    return {e[kind]: e for e in RULES if kind in e}


def test_rules_file_has_the_four_rules():
    rules = _defined("rule")
    assert len(rules) == 4
    for rule in rules.values():
        assert {"desc", "condition", "output", "priority", "tags"} <= set(rule)
        assert rule["priority"] in {"EMERGENCY", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFORMATIONAL", "DEBUG"}
        assert "shopfleet" in rule["tags"]


def test_every_macro_and_list_used_is_defined():
    macros, lists = _defined("macro"), _defined("list")
    known = set(macros) | set(lists) | FALCO_DEFAULTS
    literal_values = {str(i) for lst in lists.values() for i in lst["items"]}
    for entry in [*macros.values(), *_defined("rule").values()]:
        words = _identifiers(entry["condition"])
        # Bare words inside "in (...)" that are not lists are literal values (container names...).
        for group in re.findall(r"\bin\s*\(([^)]*)\)", entry["condition"]):
            for item in (w.strip() for w in group.split(",")):
                if item not in lists:
                    words.discard(item)
        # Right-hand sides of comparisons are values, not macros.
        for value in re.findall(r"[=<>]\s*([A-Za-z0-9_\-]+)", entry["condition"]):
            words.discard(value)
        undefined = words - known - literal_values
        assert not undefined, f"{entry.get('rule') or entry.get('macro')}: undefined macros or lists {sorted(undefined)}"
    # Nothing defined and left unused (a typo in a name would show up as both).
    used = set().union(*(_identifiers(e["condition"]) | set(re.findall(r"\(([a-z_]+)\)", e["condition"]))
                         for e in [*macros.values(), *_defined("rule").values()]))
    assert set(macros) | set(lists) <= used


def test_rules_name_containers_that_exist():
    lists = _defined("list")
    containers = {c["name"] for _, spec in s.workloads(EDGE) for c in spec["containers"]}
    assert set(lists["shopfleet_vision_containers"]["items"]) <= containers
    sensor = _defined("macro")["shopfleet_sensor_driver"]["condition"]
    assert re.search(r"container\.name = ([\w-]+)", sensor).group(1) in containers
    assert "k8s.ns.name = shopfleet" in _defined("macro")["shopfleet_pod"]["condition"]


def test_sensor_driver_allowed_ports_are_what_it_talks_to():
    ports = set(_defined("list")["shopfleet_sensor_allowed_ports"]["items"])
    broker = s.find(EDGE, "Service", "shop-broker")["spec"]["ports"][0]["port"]
    assert ports == {53, broker}


def test_falco_loads_the_rules_and_sends_to_sidekick():
    ds = s.find(CLUSTER, "DaemonSet", "falco")["spec"]["template"]["spec"]
    c = ds["containers"][0]
    rules_dir = next(vm["mountPath"] for vm in c["volumeMounts"] if vm["name"] == "rules")
    assert rules_dir in FALCO_CONFIG["rules_files"]
    assert "/etc/falco/falco_rules.yaml" in FALCO_CONFIG["rules_files"], "the default rules define the default macros"
    assert c["readinessProbe"]["httpGet"]["path"] == FALCO_CONFIG["webserver"]["k8s_healthz_endpoint"]
    assert c["ports"][0]["containerPort"] == FALCO_CONFIG["webserver"]["listen_port"]
    svc = s.find(CLUSTER, "Service", "falcosidekick")
    assert FALCO_CONFIG["http_output"]["url"] == f"http://falcosidekick.falco.svc.cluster.local:{svc['spec']['ports'][0]['port']}/"
    sidekick = s.find(CLUSTER, "Deployment", "falcosidekick")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in sidekick["env"]}
    # the controller's receiver (fleet_controller/web/security_events.py) serves exactly this path
    assert env["WEBHOOK_ADDRESS"]["value"].startswith("https://")
    assert env["WEBHOOK_ADDRESS"]["value"].endswith("/api/v1/security-events")
    assert any(getattr(r, "path", "") == "/api/v1/security-events" and "POST" in r.methods
               for r in security_events_router(SimpleNamespace(), SecurityEventMetrics(CollectorRegistry())).routes)
    assert env["WEBHOOK_CUSTOMHEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "falcosidekick", "key": "webhook-headers"}
    assert env["CUSTOMFIELDS"]["valueFrom"]["secretKeyRef"] == {"name": "falcosidekick", "key": "custom-fields"}
    # The containerd socket Falco asks for pod names is the one it mounts.
    sock = FALCO_CONFIG["container_engines"]["cri"]["sockets"][0]
    assert any(sock.startswith(vm["mountPath"] + "/") for vm in c["volumeMounts"])


def test_the_check_sees_an_undefined_macro():
    words = _identifiers("spawned_process and shopfleet_vision_containr and fd.name startswith /usr/ and k8s.ns.name = shopfleet")
    assert words - FALCO_DEFAULTS - set(_defined("macro")) == {"shopfleet_vision_containr", "shopfleet"}
