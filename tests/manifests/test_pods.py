"""Every pod of the manifest trees, checked against the code that runs in it.

* each shopfleet container's argv (after the program name) parses with ``shopfleet``'s own parser;
* each agent's config file (the ConfigMap it mounts, plus the flags it is given) validates as
  ``AgentConfig``, and every file it names is mounted: passwords, public keys, zones, state;
* the controller's config file plus its environment validate as ``ControllerSettings``, with the
  database from ``SHOPFLEET_CONTROLLER_DB_URL`` and a ``rollout:`` section whose key is readable;
* writable state lives under /var/lib/shopfleet, on a mount the container may write, and a
  hostPath directory is handed to the pod's uid by an init container (fsGroup does not reach it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import overrides_from_args
from edge_agent.config import validate_config
from fleet_controller.service import STOP_EXIT_GRACE_S, stop_budget_s
from fleet_controller.settings import ENV_PREFIX, load_settings
from shopfleet.cli import build_parser
from tests.manifests import support as s

EDGE = s.load("edge")
CLUSTER = s.load("edge-cluster")
CENTRAL = s.load("central")


def _shopfleet_containers(objs: list[dict[str, Any]]) -> list[Any]:
    out = []
    for obj, spec in s.workloads(objs):
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            if c["image"].startswith(s.SHOPFLEET_IMAGES):
                out.append(pytest.param(obj, spec, c, id=f"{obj['metadata']['name']}/{c['name']}"))
    return out


ALL_SHOPFLEET = _shopfleet_containers(EDGE + CENTRAL)
AGENTS = [p for p in ALL_SHOPFLEET if p.values[2]["args"][0] == "agent"]


def _argv(objs: list[dict[str, Any]], obj: dict[str, Any], c: dict[str, Any]) -> list[str]:
    assert "command" not in c, "shopfleet images run the shopfleet entry point: give args, not command"
    env = s.env_values(objs, c, obj["metadata"]["namespace"])
    return [s.expand(a, env) for a in c["args"]]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(argv[0])
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error
        pytest.fail(f"shopfleet {' '.join(argv)}: the CLI refuses these arguments (exit {exc.code})")


def test_every_role_has_a_shopfleet_container():
    names = {c.values[0]["metadata"]["name"] for c in ALL_SHOPFLEET}
    assert {"shopfleet-agent", "shopfleet-applier", "vision-arm64", "vision-gpu", "sensor-driver", "shopfleet-controller"} <= names


@pytest.mark.parametrize("obj, spec, c", ALL_SHOPFLEET)
def test_argv_parses_with_the_cli(obj, spec, c):
    args = _parse(_argv(EDGE + CENTRAL, obj, c))
    assert args.command == c["args"][0]


@pytest.mark.parametrize("obj, spec, c", AGENTS)
def test_agent_config_validates_and_names_only_mounted_files(obj, spec, c, monkeypatch):
    args = _parse(_argv(EDGE, obj, c))
    ns = obj["metadata"]["namespace"]
    text = s.mounted_file_text(EDGE, spec, c, args.config, ns)
    data = s.yaml_text(text)
    overrides = overrides_from_args(args)
    assert overrides["broker.username"] == f"{s.SHOP}.{overrides['node']}"  # the user broker-config made
    for key, value in overrides.items():
        cur = data
        *head, last = key.split(".")
        for part in head:
            cur = cur.setdefault(part, {})
        cur[last] = value

    real_isfile = os.path.isfile

    def mounted(path: str | os.PathLike[str]) -> bool:
        p = str(path)
        return s.mount_for(spec, c, p) is not None or real_isfile(p)

    monkeypatch.setattr(os.path, "isfile", mounted)
    for e in c.get("env") or []:  # what the Downward API gives the container: the node's address
        if (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP":
            monkeypatch.setenv(e["name"], s.NODE_IP)
    config = validate_config(data, f"{obj['metadata']['name']}:{args.config}")

    assert config.shop == s.SHOP
    # The node's own identity: its certificate and key (TLS) or its password, each a single
    # read-only file from the node-local identity directory.
    tls = config.broker.tls
    identity = [tls.ca_file, tls.cert_file, tls.key_file] if tls is not None else [config.broker.password_file]
    for path in identity:
        assert path is not None
        mp, vm, vol = s.mount_for(spec, c, path)
        assert mp == path and vm.get("readOnly") and vol["hostPath"]["type"] == "File"
        assert vol["hostPath"]["path"] == path and path.startswith("/etc/shopfleet/node/")
    # The shop broker, by the name of its Service: its TLS port with a certificate, else its password port.
    svc = s.find(EDGE, "Service", config.broker.host.split(".")[0])
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert config.broker.port == ports["mqtts" if tls is not None else "mqtt"]
    # Metrics on the port the container declares (and the Service scrapes).
    assert config.metrics.port == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["port"] == c["ports"][0]["name"]
    # The kubelet probes (and Prometheus scrapes) the pod's address, the node's own on the host
    # network: metrics bound to loopback there would fail every probe; 0.0.0.0 on the host network
    # would serve the node's metrics to the whole shop LAN.
    bound = config.metrics.bind_host
    for probe in ("readinessProbe", "livenessProbe"):
        target = c[probe]["httpGet"].get("host")
        if target is None:
            assert bound not in ("127.0.0.1", "::1", "localhost"), f"{probe} probes the pod's address; metrics bind {bound}"
        else:
            assert bound in (target, "0.0.0.0"), f"{probe} probes {target}; metrics bind {bound}"
    if spec.get("hostNetwork"):
        assert bound == s.NODE_IP, f"host network: bind the node's own address (metrics.host_env), not {bound}"
    # Writable state: outbox (and the applier's record) on a writable, owned mount.
    state = [config.outbox.path] + ([str(config.apply.state_path)] if config.apply.enabled else [])
    for path in state:
        assert path.startswith("/var/lib/shopfleet/"), f"{path}: state lives under /var/lib/shopfleet"
        _assert_writable_and_owned(spec, c, path)
    # Shutdown drains the outbox before the kubelet's SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_timeout_s
    if config.apply.enabled:
        assert obj["metadata"]["name"] == "shopfleet-applier" and spec["nodeSelector"] == {"shopfleet.io/applier": "true"}
        assert config.apply.self_daemonset == f"{ns}/{obj['metadata']['name']}"
        for key in config.apply.public_keys:
            hit = s.mount_for(spec, c, str(key))
            assert hit is not None and hit[1].get("readOnly"), f"{key} is not mounted read-only"
        assert spec["serviceAccountName"] == "shopfleet-applier"
    else:
        assert spec.get("automountServiceAccountToken") is False, "only the applier talks to the Kubernetes API"
    for p in config.pipelines:
        if p.type == "vision":
            assert s.mount_for(spec, c, p.zones) is not None
            zones = s.yaml_text(s.mounted_file_text(EDGE, spec, c, p.zones, ns))
            assert {"camera", "anchor"} <= set(zones)
            assert p.source == "/dev/video0" and c["resources"]["limits"]["shopfleet.io/camera"] == "1"
        if p.type == "hardware":
            assert p.serial.port == _device_mount("shelf-board")
            assert c["resources"]["limits"]["shopfleet.io/shelf-board"] == c["resources"]["requests"]["shopfleet.io/shelf-board"] == "1"


def _device_mount(resource: str) -> str:
    import yaml

    plugin = s.find(CLUSTER, "DaemonSet", "device-plugin")["spec"]["template"]["spec"]["containers"][0]
    args = plugin["args"]
    devices = [yaml.safe_load(args[i + 1]) for i, a in enumerate(args) if a == "--device"]
    dev = next(d for d in devices if d["name"] == resource)
    (group,) = dev["groups"]
    (path,) = group["paths"]
    assert path["path"].startswith(("/dev/serial/by-id/", "/dev/v4l/by-id/")), "match devices by their stable by-id link"
    return str(path["mountPath"])


def _assert_writable_and_owned(spec: dict[str, Any], c: dict[str, Any], path: str) -> None:
    hit = s.mount_for(spec, c, str(Path(path).parent))
    assert hit is not None, f"{path}: its directory is not mounted (the root filesystem is read-only)"
    mp, vm, vol = hit
    assert not vm.get("readOnly"), f"{path}: mounted read-only"
    if "hostPath" in vol:
        uid, gid = spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]
        owners = [
            ic for ic in spec.get("initContainers") or []
            if ic.get("command", [])[:2] == ["chown", f"{uid}:{gid}"] and mp in ic["command"]
            and any(m["name"] == vm["name"] and m["mountPath"] == mp for m in ic["volumeMounts"])
        ]
        assert owners, f"{path}: hostPath {vol['hostPath']['path']} is root:root; no init container chowns it to {uid}:{gid}"
        caps = owners[0]["securityContext"]["capabilities"]
        assert caps == {"drop": ["ALL"], "add": ["CHOWN"]}, "the owner fix needs CHOWN and nothing else"


def test_every_hostpath_state_directory_is_owned_by_its_pod():
    for obj, spec in s.workloads(EDGE):
        for c in spec["containers"]:
            for mp, (vm, vol) in s.mounts(spec, c).items():
                if "hostPath" in vol and vol["hostPath"].get("type") == "DirectoryOrCreate" and not vm.get("readOnly"):  # read-only: nothing to own
                    assert vol["hostPath"]["path"].startswith("/var/lib/shopfleet/"), f"{obj['metadata']['name']}: one node-local state path"
                    _assert_writable_and_owned(spec, c, mp + "/x")


def test_controller_settings_are_the_ones_the_code_reads(tmp_path):
    (obj, spec, c), = [p.values for p in ALL_SHOPFLEET if p.values[0]["metadata"]["name"] == "shopfleet-controller"]
    args = _parse(_argv(CENTRAL, obj, c))
    ns = obj["metadata"]["namespace"]
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(s.mounted_file_text(CENTRAL, spec, c, str(args.config), ns))
    env = s.env_values(CENTRAL, c, ns)
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    # Every other variable exists only to be expanded into args or env values.
    for name in set(env) - set(ours):
        assert any(f"$({name})" in w for w in [*c["args"], *(e.get("value", "") for e in c["env"])]), f"env {name} is read by nothing"
    ours = {k: ("postgresql+psycopg://shopfleet@db/shopfleet" if v.startswith("secret:") else v) for k, v in ours.items()}
    settings = load_settings(cfg, environ=ours)
    assert settings.database_url().startswith("postgresql"), "the controller must not fall back to SQLite"
    assert settings.instance == "shopfleet-controller-0"
    # The MQTT user is the pod name (one per replica), its password a mounted Secret file.
    assert args.mqtt_username == "shopfleet-controller-0"
    hit = s.mount_for(spec, c, str(args.mqtt_password_file))
    assert hit is not None and "secret" in hit[2]
    # The broker is the central one, on a port it listens on with the TLS setting of that port.
    broker = s.find(CENTRAL, "Service", settings.broker.host.split(".")[0])
    port = next(p for p in broker["spec"]["ports"] if p["port"] == settings.broker.port)
    assert (port["name"] == "mqtts") is settings.broker.tls
    assert settings.broker.shared_group and settings.broker.protocol == "5"
    # The signing key: a Secret the controller's group can read (fsGroup + 0440).
    assert settings.rollout is not None
    _, _vm, vol = s.mount_for(spec, c, str(settings.rollout.signing_key))
    assert vol["secret"]["defaultMode"] & 0o040 and spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
    assert settings.api.host == "0.0.0.0" and settings.api.port == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # A graceful stop (the partition hand-over, the writer's last flush) ends before the kubelet's SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > stop_budget_s(settings) + STOP_EXIT_GRACE_S, stop_budget_s(settings)


def test_controller_env_var_names_map_to_settings_keys():
    (_obj, _spec, c), = [p.values for p in ALL_SHOPFLEET if p.values[0]["metadata"]["name"] == "shopfleet-controller"]
    names = [e["name"] for e in c["env"] if e["name"].startswith("SHOPFLEET")]
    assert "SHOPFLEET_CONTROLLER_DB_URL" in names
    assert not [n for n in names if not n.startswith(ENV_PREFIX)], "settings.py reads SHOPFLEET_CONTROLLER_* only"
