"""Release images resolved from a real OCI registry (Debian's docker-registry on a free port).

The test pushes a tiny multi-arch index over the distribution API itself (blobs, one manifest
per arch, the index under a tag), so it needs no image builder; the fleet's nodes come from
heartbeats written into the controller's registry, whose facts carry each node's arch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.protocol import NodeFacts
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import NodeUpdate, RegistryStore, SeqCursor, WriteBatch
from fleet_controller.rollout.cli import main as cli
from fleet_controller.rollout.registry import (
    ImageResolveError,
    NodeArch,
    component_selectors,
    parse_reference,
    required_arches,
    resolve,
)
from shopfleet.broker import free_port
from tests.support.controller import FACTS, heartbeat
from tests.support.wait import wait_for

pytestmark = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry (apt-get install docker-registry)")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A docker-registry of its own: config and storage in a temp dir, on a free loopback port."""
    d = tmp_path_factory.mktemp("registry")
    port = free_port()
    (d / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"http://{host}/v2/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=20, what="docker-registry answering /v2/")
        yield host
    finally:
        proc.terminate()
        proc.wait(10)


def _blob(c: httpx.Client, host: str, repo: str, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = c.post(f"http://{host}/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    loc = start.headers["location"]
    loc = loc if loc.startswith("http") else f"http://{host}{loc}"
    # The upload URL carries the registry's own state parameters: add the digest to them.
    put = c.put(httpx.URL(loc).copy_merge_params({"digest": digest}), content=data, headers={"Content-Type": "application/octet-stream"})
    assert put.status_code == 201, put.text
    return {"digest": digest, "size": len(data)}


def push_index(host: str, repo: str, tag: str, arches: list[str]) -> str:
    """Push one tiny image per arch and an index of them under ``tag``; return the index digest."""
    entries = []
    with httpx.Client(timeout=10) as c:
        layer = _blob(c, host, repo, b"")  # an empty layer is enough for the registry
        for arch in arches:
            cfg = _blob(c, host, repo, json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode())
            man = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                              "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
                              "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}]}).encode()
            digest = "sha256:" + hashlib.sha256(man).hexdigest()
            r = c.put(f"http://{host}/v2/{repo}/manifests/{digest}", content=man, headers={"Content-Type": OCI_MANIFEST})
            assert r.status_code == 201, r.text
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(man), "platform": {"architecture": arch, "os": "linux"}})
            if len(arches) == 1:
                r = c.put(f"http://{host}/v2/{repo}/manifests/{tag}", content=man, headers={"Content-Type": OCI_MANIFEST})
                assert r.status_code == 201
                return digest
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        r = c.put(f"http://{host}/v2/{repo}/manifests/{tag}", content=index, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 201, r.text
    return "sha256:" + hashlib.sha256(index).hexdigest()


@pytest.fixture
def fleet_db(tmp_path: Path) -> Iterator[str]:
    """A controller database with shop-a: an arm64 Pi and an amd64 GPU node (heartbeat facts)."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = create_engine(url)
    upgrade(engine)
    store = RegistryStore(engine)
    store.register_shop("shop-a", region="north")
    wb = WriteBatch()
    now = time.time()
    for node, facts in (("pi-1", FACTS), ("gpu-1", NodeFacts(**{**FACTS.model_dump(), "arch": "amd64", "node_class": "gpu"}))):
        hb = heartbeat(node=node, facts=facts)
        wb.uplinks.append((hb, now))
        wb.nodes[("shop-a", node)] = NodeUpdate(SeqCursor(hb.epoch, hb.seq), messages=1)
        wb.seen[("shop-a", node)] = now
    store.write_batch(wb, now)
    engine.dispose()
    yield url


def test_a_tag_resolves_to_the_index_digest_with_its_arches(registry):
    digest = push_index(registry, "shopfleet/vision", "1.0", ["amd64", "arm64"])
    res = resolve(f"{registry}/shopfleet/vision:1.0")
    assert res.digest == digest
    assert res.pinned == f"{registry}/shopfleet/vision@{digest}"
    assert res.arches == {"amd64", "arm64"} and res.media_type == OCI_INDEX
    # A single-arch manifest names its arch only in its config blob.
    single = push_index(registry, "shopfleet/tool", "x", ["arm64"])
    one = resolve(f"{registry}/shopfleet/tool:x")
    assert one.digest == single and one.arches == {"arm64"}


def test_what_cannot_be_resolved_says_why(registry):
    with pytest.raises(ImageResolveError, match="no manifest for 'nope'") as exc:
        resolve(f"{registry}/shopfleet/vision:nope")
    assert exc.value.reason == "tag_not_found"
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ImageResolveError, match="unreachable") as exc:
        resolve(f"{dead}/shopfleet/vision:1.0")
    assert exc.value.reason == "registry_unreachable"
    with pytest.raises(ImageResolveError, match="names no registry host"):
        parse_reference("vision:1.0")


def test_arches_needed_follow_the_manifests_node_selectors():
    from fleet_controller.rollout.manifests import edge_overlay_dir, load_overlay

    sel = component_selectors(load_overlay(edge_overlay_dir("production")))
    nodes = [NodeArch("s", "pi-1", "pi", "arm64"), NodeArch("s", "gpu-1", "gpu", "amd64")]
    assert set(required_arches("agent", nodes, sel)) == {"arm64", "amd64"}
    assert set(required_arches("vision", nodes, sel)) == {"arm64"}  # vision-arm64 pins kubernetes.io/arch
    assert set(required_arches("vision-gpu", nodes, sel)) == {"amd64"}
    assert required_arches("vision-gpu", nodes[:1], sel) == {}  # a shop with no GPU node needs no GPU image


def test_release_create_pins_tags_and_refuses_a_missing_arch(registry, fleet_db, capsys):
    agent = push_index(registry, "shopfleet/agent", "v2", ["amd64", "arm64"])
    vision = push_index(registry, "shopfleet/vision", "v2", ["amd64", "arm64"])
    amd_only = push_index(registry, "shopfleet/agent", "amd-only", ["amd64"])
    assert amd_only
    # One bad image of three: nothing is created, and the error names the arch and the node.
    rc = cli(["release", "create", "--name", "r0", "--version", "0", "--db", fleet_db,
              "--image", f"agent={registry}/shopfleet/agent:amd-only", "--image", f"vision={registry}/shopfleet/vision:v2",
              "--image", f"sensor-driver={registry}/shopfleet/sensor-driver:missing"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "agent: image" in err and "arm64 on shop-a/pi-1" in err
    assert "sensor-driver:" in err and "no manifest for 'missing'" in err
    assert cli(["release", "list", "--db", fleet_db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # All resolvable: the release holds the index digests, not the tags.
    rc = cli(["release", "create", "--name", "r1", "--version", "1", "--db", fleet_db, "--json",
              "--image", f"agent={registry}/shopfleet/agent:v2", "--image", f"vision={registry}/shopfleet/vision:v2"])
    assert rc == 0, capsys.readouterr().err
    created = json.loads(capsys.readouterr().out)
    assert created["images"] == {"agent": f"{registry}/shopfleet/agent@{agent}", "vision": f"{registry}/shopfleet/vision@{vision}"}
    # The tag moves on; the release does not.
    push_index(registry, "shopfleet/agent", "v2", ["amd64", "arm64", "riscv64"])
    assert cli(["release", "list", "--db", fleet_db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["images"]["agent"].endswith(agent)


def test_release_create_with_a_dead_registry_creates_nothing(fleet_db, capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert cli(["release", "create", "--name", "r9", "--version", "9", "--db", fleet_db,
                "--image", f"agent={dead}/shopfleet/agent:v1"]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert cli(["release", "list", "--db", fleet_db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
