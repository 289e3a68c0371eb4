"""A shop on real containers: the built images run with podman from the shop's rendered manifests.

What runs (every container from its pod template, through shopfleet/sim/podman.py):

* central side: the PKI, broker and signing-key files made by the controller image itself
  (``pki init``, ``broker-config``, ``release keygen``, at the paths the manifests mount), the
  central broker (StatefulSet central-broker) and the controller (StatefulSet
  shopfleet-controller, SQLite on its /tmp volume);
* the shop ``shop-x`` as rendered for node classes ``pi`` and ``gpu`` (fusion comes only to shops
  with a GPU node): its broker (Deployment mosquitto, the files ``broker-config --shop-broker``
  wrote), the agent (DaemonSet shopfleet-agent, node pi-1), the sensor driver (DaemonSet
  sensor-driver) reading a simulated shelf board through a pseudo-terminal (its by-id link kept
  current as udev would: :class:`ByIdLink`), vision (DaemonSet vision-arm64's template with the
  amd64 vision image: the arch pin is the scheduler's business) on vtest.avi, publishing its
  camera's track stream, and fusion (DaemonSet fusion, node pi-1-fusion, the vision image as a
  release pins it) joining that stream with the shop's events into carts;
* a second agent pod of the same DaemonSet for node arm-1 from the arm64 agent image, under qemu.

vision-gpu is rendered but not run: it needs the NVIDIA runtime (runtimeClassName nvidia,
``nvidia.com/gpu``), which this machine has not. It is the camera that publishes the track stream
in the manifests, so vision-arm64 stands in for it: its ConfigMap's ``vision.yaml`` gets the
``tracks:`` block of the rendered ``vision-gpu.yaml`` (user ``shop-x.track-stream``, its password
file, ``px_per_m``, ``origin_px``), and its pod the volume and read-only mount of the node's
``track-stream.password`` that vision-gpu's template has (:func:`_with_track_stream`). Fusion's
``camera:`` is set to the zones file's camera (``door``, which it already names), and its layout's
``publishers`` to this node's agents (``pi-1-vision``, ``pi-1-sensors``: a shop's overlay names its
nodes there, the renderer cannot). Fusion's node
selector asks for the gpu class; it runs on pi-1, next to the camera it reads (the scheduler's
business, as for the arch pin). Fusion's three broker users (``shop-x.pi-1-fusion``,
``shop-x.fusion-inputs``, ``shop-x.track-stream``) are in ``nodes.txt`` and their passwords on the
node as the node join writes them (docs/manifests.md, "Node-local paths").

Only what a cluster would supply is substituted, and where: Service DNS names become --add-host
entries; pods without hostNetwork share the host's network (none other here), so the harness
patches the ports in the rendered ConfigMaps (the host's own Mosquitto holds 1883; fusion's metrics
port is a free one, which the harness scrapes as the kubelet's probe would); the camera is
vtest.avi mounted in and the ConfigMap's source pointed at it; the applier's model server (the
applier needs a Kubernetes API) is the same server class run here on the host's cached
yolov4-tiny (:func:`serve_model`), and the vision pod's own model-stage init container stages and
verifies it; busybox init containers run with the base image's chown; eclipse-mosquitto is Debian's
mosquitto (images/mosquitto). The applier (needs a Kubernetes API) and fluent-bit are not run.

The last stdout line is a JSON summary: shop_online, events (count by type), model_verified,
arm64_agent_online, fusion (:class:`FusionWatch`: node online, pipeline state, /healthz, whether
it consumed the track stream, shopper sessions and carts, events dropped as from the wrong node),
image_mb, seconds. Exit code 0 when the shop came online with shelf and camera events, the arm64
agent reported in, and fusion runs, consumed the track stream, opened a shopper session and
dropped no event as from the wrong node (``event_wrong_node``). A session needs a door crossing of a
streamed track while the door contact is open: the board's scenario opens the door 2-12 s into
every 25 s loop (entries count for fusion's door_grace_s after it closes), and vtest.avi's walkers
cross the zones file's door line a dozen times a minute, so within the observation window some
crossings fall in an opening (others are refused as entry-door-closed, which shows the tracks
consumed as well).

Usage: python -m shopfleet.sim.shop_in_a_box [--tag TAG] [--timeout 420] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from shopfleet.broker import free_port
from shopfleet.sim.podman import PodContext, TranslateError, configmaps_of, pod_argvs

ROOT = Path(__file__).resolve().parents[2]
SHOP = "shop-x"
NODE = "pi-1"
ARM_NODE = "arm-1"
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
PREFIX = "sfbox"


def say(msg: str) -> None:
    print(f"shop-in-a-box: {msg}", file=sys.stderr, flush=True)


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:6])} ... exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], capture_output=True).returncode == 0


def load_build(tag: str | None, record_path: Path) -> tuple[str, dict[str, Any]]:
    """The build record of make images: tag and images (refs per arch, sizes)."""
    if not record_path.exists():
        raise SystemExit("shop-in-a-box: no build/images/images.json: run 'make images' first")
    record = json.loads(record_path.read_text())
    return tag or record["tag"], record["images"]


def ensure_mosquitto_image() -> str:
    ref = "localhost/shopfleet/mosquitto:bookworm-amd64"
    if not image_exists(ref):
        say("building the Mosquitto image from Debian's package (once)")
        subprocess.run(["buildah", "bud", "--isolation", "chroot", "--build-arg", "ARCH=amd64", "-f",
                        str(ROOT / "images/mosquitto/Containerfile"), "-t", ref, str(ROOT / "images/mosquitto")],
                       check=True, capture_output=True)
    return ref


def model_dir() -> Path:
    """The host's verified yolov4-tiny package (fetched and converted once into the cache)."""
    from vision.model import fetch_model

    cache = Path(os.environ.get("SHOPFLEET_CACHE", Path.home() / ".cache/shopfleet"))
    return fetch_model("yolov4-tiny", cache).path


def _files(d: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(d.iterdir()) if f.is_file()}


def _patch_yaml(text: str, fn: Any) -> str:
    data = yaml.safe_load(text)
    fn(data)
    return yaml.safe_dump(data, sort_keys=False)


class Box:
    """Everything started, so that stop() removes exactly that."""

    def __init__(self, work: Path, tag: str, images: dict[str, Any]) -> None:
        self.work = work
        self.tag = tag
        self.images = images
        self.names: list[str] = []
        self.ports = {k: free_port() for k in ("central_pw", "central_tls", "shop", "shop_tls", "api")}

    def ref(self, name: str, arch: str = "amd64") -> str:
        ref = f"localhost/shopfleet/{name}:{self.tag}-{arch}"
        if not image_exists(ref):
            raise SystemExit(f"shop-in-a-box: image {ref} is not in local storage: run 'make images' (tag {self.tag})")
        return ref

    def run_pod(self, obj: dict[str, Any], ctx: PodContext) -> None:
        for name, init, argv in pod_argvs(obj, ctx):
            cname = argv[argv.index("--name") + 1]
            podman("rm", "-f", cname, check=False)
            say(f"{'init ' if init else ''}{obj['kind']} {obj['metadata']['name']}/{name} on {ctx.node}")
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{cname} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
            if not init:
                self.names.append(cname)

    def logs(self) -> str:
        out = []
        for n in self.names:
            p = podman("logs", "--tail", "15", n, check=False)
            out.append(f"--- {n} (last lines)\n{p.stdout}{p.stderr}")
        return "\n".join(out)

    def stop(self) -> None:
        for n in reversed(self.names):
            podman("rm", "-f", "-t", "5", n, check=False)


def central(box: Box, base: str) -> tuple[str, dict[str, Any]]:
    """Make the central files with the controller image, start the central broker and controller."""
    from fleet_controller.rollout.manifests import MANIFESTS_ROOT, load_overlay

    ctrl = box.ref("controller")
    etc, var = box.work / "central-etc", box.work / "central-var"
    (etc / "broker").mkdir(parents=True)
    (etc / "keys").mkdir()
    var.mkdir()
    # Fusion's users as docs/manifests.md lists them for the GPU camera node (here pi-1): its agent's
    # node user, its pipeline's and the camera's track stream's (one per shop each).
    nodes = [f"{SHOP}/{NODE}", f"{SHOP}/{NODE}-sensors", f"{SHOP}/{NODE}-vision", f"{SHOP}/{ARM_NODE}",
             f"{SHOP}/{NODE}-fusion", f"{SHOP}/fusion-inputs", f"{SHOP}/track-stream"]
    (etc / "nodes.txt").write_text("\n".join(nodes) + "\n")
    tool = ["run", "--rm", "--runtime", "runc", "--network", "none", "--user", "0", "--ulimit", "nofile=4096:4096",
            "--ulimit", "nproc=4096:4096", "-v", f"{etc}:/etc/shopfleet", "-v", f"{var}:/var/lib/mosquitto", ctrl]
    p = box.ports
    say("central: pki init, broker-config and release keygen, run by the controller image")
    podman(*tool, "pki", "init", "--dir", "/etc/shopfleet/pki")
    podman(*tool, "broker-config", "--nodes", "/etc/shopfleet/nodes.txt", "--out", "/etc/shopfleet/broker",
           "--pki", "/etc/shopfleet/pki", "--server-name", "127.0.0.1", "--port", str(p["central_pw"]),
           "--tls-port", str(p["central_tls"]), "--persistence-dir", "/var/lib/mosquitto",
           "--controller-user", "shopfleet-controller-0", "--shop-broker", SHOP, "--central", f"127.0.0.1:{p['central_tls']}",
           "--shop-port", str(p["shop"]), "--shop-tls-port", str(p["shop_tls"]),
           "--shop-denial-log", "/var/log/mosquitto/mosquitto.log", "--shop-install-dir", "/etc/shopfleet/shop-broker",
           "--shop-persistence-dir", "/var/lib/shopfleet/mosquitto", "--outage", "600")
    podman(*tool, "release", "keygen", "--out", "/etc/shopfleet/keys/signing.pem")
    creds = json.loads((etc / "broker/credentials.json").read_text())
    certs = etc / "pki/certs"
    secrets = {
        "central-broker": {k: v for k, v in _files(etc / "broker").items() if k in ("mosquitto.conf", "passwd", "acl")},
        "central-broker-ca": {k: v for k, v in _files(etc / "pki").items() if k in ("ca.crt", "crl.pem")},
        "central-broker-server": {k: v for k, v in _files(certs).items() if k.startswith("127.0.0.1.")},
        "shopfleet-controller": {"database-url": "sqlite:////tmp/controller.db"},
        "shopfleet-signing-key": {"signing.pem": (etc / "keys/signing.pem").read_text()},
        "shopfleet-controller-mqtt": {c["username"]: c["password"] for c in creds["controllers"]},
        "shop-broker": _files(etc / "broker/shops" / SHOP),
    }
    objs = load_overlay(MANIFESTS_ROOT / "central" / "base")
    cms = configmaps_of(objs)
    cms["shopfleet-controller"]["controller.yaml"] = _patch_yaml(
        cms["shopfleet-controller"]["controller.yaml"],
        lambda d: (d["broker"].update(port=p["central_pw"]), d["api"].update(port=p["api"], host="127.0.0.1")),
    )
    ctx = PodContext(node="central-1", workdir=box.work / "pods", host_root=box.work / "central-node", configmaps=cms,
                     secrets=secrets, images={"mosquitto": ensure_mosquitto_image(), "controller": ctrl},
                     add_hosts={"mqtt.shopfleet-central.svc.cluster.local": "127.0.0.1"}, name_prefix=PREFIX,
                     host_network=True, detach=True, init_image=base, emptydir_on_disk=True)
    broker = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "central-broker")
    controller = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "shopfleet-controller")
    # The StatefulSet's pod is named <set>-0: its MQTT user (shopfleet-controller-0) comes from metadata.name.
    box.run_pod(broker, ctx)
    ctx_ctrl = PodContext(**{**ctx.__dict__, "node": "0"})
    box.run_pod(controller, ctx_ctrl)
    return secrets["shop-broker"]["mosquitto.conf"], creds


class ByIdLink:
    """udev's part for the simulated board: ``by-id/shelf-board`` follows the board's current pty.

    The board's scenario pulls its cable every loop (a new pty on replug), as a real USB board
    may; on a node, udev re-points /dev/serial/by-id at the new device and the driver reopens the
    link. Here the pod gets this by-id directory at /dev/serial/by-id and the host's devpts at
    /dev/host-pts (a pty belongs to the devpts instance it was made in: a --device node in the
    container's own /dev/pts would name nothing), and the link names /dev/host-pts/N. Each new
    pty is made root:dialout 0660, as the udev rule does, so the pod's group 20 opens it.
    """

    def __init__(self, board_link: Path, by_id: Path) -> None:
        self.board_link = board_link
        self.by_id = by_id
        by_id.mkdir(parents=True, exist_ok=True)
        self.current = ""
        self._stop = threading.Event()
        self.update()
        self._thread = threading.Thread(target=self._watch, name="by-id", daemon=True)
        self._thread.start()

    def update(self) -> None:
        if not self.board_link.is_symlink():
            # Unplugged: the board's link is gone, so udev removes the by-id link too. Forget the
            # pty: the kernel may hand the same number to the board's next one, which then needs
            # its owner and mode set again.
            if self.current:
                (self.by_id / "shelf-board").unlink(missing_ok=True)
                self.current = ""
            return
        try:
            pty = os.path.realpath(self.board_link)
        except OSError:
            return
        if not pty.startswith("/dev/pts/"):
            return
        try:
            st = os.stat(pty)
        except OSError:
            return
        if pty == self.current and st.st_gid == 20 and st.st_mode & 0o777 == 0o660:
            return  # the same pty, already the pod's (a new pty of a reused number would not be)
        os.chown(pty, 0, 20)
        os.chmod(pty, 0o660)
        tmp = self.by_id / "shelf-board.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to("/dev/host-pts/" + pty.rsplit("/", 1)[1])
        tmp.replace(self.by_id / "shelf-board")
        self.current = pty

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.update()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def serve_model(box: Box) -> tuple[str, Any]:
    """Do the applier's part of model delivery: serve the verified package to the vision pods.

    The applier (which needs a Kubernetes API, not run here) downloads the release's package
    from the controller and serves it on the shop network (docs/models.md); here the same server
    (ShopModelServer) serves the same deterministic archive of the host's cached yolov4-tiny, on
    the port the manifests' model-stage init container asks (9481). Everything after that is
    the pods' own: model-stage fetches it, checks its sha256 and stages it on the node's disk;
    vision mounts it by the sha in its annotation and re-hashes it on load.
    """
    from edge_agent.apply.model_fetch import ShopModelServer
    from fleet_controller.rollout.models_store import write_archive
    from fleet_controller.rollout.releases import model_package_digest

    pkg = model_dir()
    sha = model_package_digest(pkg).sha256
    archives = box.work / "model-archives"
    archives.mkdir()
    with open(archives / f"{sha}.tar", "wb") as out:
        write_archive(pkg, out)
    return sha, ShopModelServer(archives, 9481, host="127.0.0.1").start()


def _node_identity(box: Box, into: Path, node: str) -> None:
    """Put the agent's TLS identity on the node, as the node join does: the fleet CA, and the
    certificate and key broker-config issued for ``<shop>.<node>``, readable by the agent's uid."""
    pki = box.work / "central-etc/pki"
    for src, dst in ((pki / "ca.crt", "ca.crt"), (pki / f"certs/{SHOP}.{node}.crt", "agent.crt"),
                     (pki / f"certs/{SHOP}.{node}.key", "agent.key")):
        f = into / dst
        f.write_bytes(src.read_bytes())
        os.chown(f, 10001, 10001)
        os.chmod(f, 0o400)


def _with_track_stream(vision: dict[str, Any], gpu: dict[str, Any]) -> dict[str, Any]:
    """vision-arm64's object with what vision-gpu's template adds for its track stream: the volume
    and read-only mount of the node's track-stream.password (vision-gpu mounts it; vision-arm64,
    which publishes no track stream in the manifests, does not)."""
    import copy

    out = copy.deepcopy(vision)
    gspec, spec = gpu["spec"]["template"]["spec"], out["spec"]["template"]["spec"]
    have = {v["name"] for v in spec["volumes"]}
    for v in gspec["volumes"]:
        if v["name"] not in have and "track-stream" in str(v.get("hostPath", {}).get("path", "")):
            spec["volumes"].append(copy.deepcopy(v))
            mount = next(m for m in gspec["containers"][0]["volumeMounts"] if m["name"] == v["name"])
            spec["containers"][0]["volumeMounts"].append(copy.deepcopy(mount))
    return out


def shop(box: Box, creds: dict[str, Any], base: str, by_id: Path, model_sha: str) -> int:
    """Render shop-x and run its broker, agent, sensor driver, vision (publishing its track stream),
    fusion and the arm64 agent; return fusion's metrics port."""
    from fleet_controller.rollout import manifests

    # Node classes pi and gpu: fusion (and vision-gpu, not run) come only to shops with a GPU node.
    objs = manifests.render_shop(manifests.ShopTarget(SHOP, frozenset({"pi", "gpu"}), "production"),
                                 manifests.RenderInput("box", model_sha256=model_sha), 1)
    cms = configmaps_of(objs)
    port = box.ports["shop"]

    def broker_port(d: dict[str, Any]) -> None:
        d["broker"]["port"] = port

    def broker_tls_port(d: dict[str, Any]) -> None:
        d["broker"]["port"] = box.ports["shop_tls"]

    cms["shopfleet-agent"]["agent.yaml"] = _patch_yaml(cms["shopfleet-agent"]["agent.yaml"], broker_tls_port)
    cms["sensor-driver"]["sensors.yaml"] = _patch_yaml(cms["sensor-driver"]["sensors.yaml"], broker_port)

    # The track stream as vision-gpu.yaml configures it (user <shop>.track-stream, its password
    # file, px_per_m, origin_px), on the shop broker's port here.
    tracks = yaml.safe_load(cms["vision"]["vision-gpu.yaml"])["pipelines"][0]["tracks"]
    tracks["broker"]["port"] = port
    camera = yaml.safe_load(cms["vision"]["zones.yaml"])["camera"]

    def vision_cfg(d: dict[str, Any]) -> None:
        broker_port(d)
        d["pipelines"][0].update(source="/media/vtest.avi", threads=1, tracks=tracks)

    cms["vision"]["vision.yaml"] = _patch_yaml(cms["vision"]["vision.yaml"], vision_cfg)
    fusion_metrics = free_port()

    def fusion_cfg(d: dict[str, Any]) -> None:
        broker_port(d)
        d["metrics"]["port"] = fusion_metrics
        d["pipelines"][0]["broker"]["port"] = port
        # The camera whose track stream and door crossings fusion joins: the zones file's.
        d["pipelines"][0]["camera"] = camera

    cms["fusion"]["fusion.yaml"] = _patch_yaml(cms["fusion"]["fusion.yaml"], fusion_cfg)

    def layout_cfg(d: dict[str, Any]) -> None:
        # Who publishes fusion's events, as a shop's overlay names them (fleet nodes on Kubernetes node names, which the
        # renderer does not know): the camera's agent on pi-1, and pi-1's sensor driver reading the board (its shelves
        # and the door contact). Events of any other node are dropped (event_wrong_node).
        d["publishers"] = {"vision": f"{NODE}-vision", "door": f"{NODE}-sensors",
                           "boards": {b: f"{NODE}-sensors" for b in dict.fromkeys(slot["board"] for slot in d["slots"])}}

    cms["fusion"]["layout.yaml"] = _patch_yaml(cms["fusion"]["layout.yaml"], layout_cfg)
    # The denials sidecar's API token; no controller is reachable at the manifests' address here,
    # so its forwarding fails (and is counted) while it still counts refusals from the log.
    secrets = {"shop-broker": _files(box.work / "central-etc/broker/shops" / SHOP), "broker-denials": {"token": "unused"}}
    node_root = box.work / "node-pi-1"
    pw = node_root / "etc/shopfleet/node"
    pw.mkdir(parents=True)
    _node_identity(box, pw, NODE)
    # The node's own password files, each readable by its pod's uid only (as the node join writes
    # them, docs/manifests.md "Node-local paths"); the last three are the GPU camera node's.
    for user, fname, uid in ((NODE, "agent", 10001), (f"{NODE}-sensors", "sensors", 10003), (f"{NODE}-vision", "vision", 10002),
                             ("track-stream", "track-stream", 10002), (f"{NODE}-fusion", "fusion", 10005),
                             ("fusion-inputs", "fusion-inputs", 10005)):
        f = pw / f"{fname}.password"
        f.write_text(creds["nodes"][f"{SHOP}/{user}"]["password"])
        os.chown(f, uid, uid)
        os.chmod(f, 0o400)
    ctx = PodContext(
        node=NODE, workdir=box.work / "pods", host_root=node_root, configmaps=cms, secrets=secrets,
        images={"mosquitto": ensure_mosquitto_image(), "denials": box.ref("agent"), "agent": box.ref("agent"),
                "sensor-driver": box.ref("sensor-driver"),
                "vision": box.ref("vision"), "model-stage": box.ref("vision"), "fusion": box.ref("vision")},
        devices={"shopfleet.io/shelf-board": None, "shopfleet.io/camera": None},
        extra_mounts={"sensor-driver": [f"type=bind,source={by_id},destination=/dev/serial/by-id,ro",
                                        "type=bind,source=/dev/pts,destination=/dev/host-pts"],
                      "vision": [f"type=bind,source={VTEST},destination=/media/vtest.avi,ro"]},
        add_hosts={"shop-broker.shopfleet.svc.cluster.local": "127.0.0.1", "shopfleet-models.shopfleet.svc.cluster.local": "127.0.0.1"},
        name_prefix=PREFIX, host_network=True,
        detach=True, init_image=base,
    )

    def get(kind: str, name: str) -> dict[str, Any]:
        return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)

    box.run_pod(get("Deployment", "mosquitto"), ctx)
    box.run_pod(get("DaemonSet", "shopfleet-agent"), ctx)
    box.run_pod(get("DaemonSet", "sensor-driver"), ctx)
    box.run_pod(_with_track_stream(get("DaemonSet", "vision-arm64"), get("DaemonSet", "vision-gpu")), ctx)
    box.run_pod(get("DaemonSet", "fusion"), ctx)
    # The arm64 node: same DaemonSet, its own node root; its metrics port moved off pi-1's
    # (both share this host's network).
    arm_root = box.work / "node-arm-1"
    (arm_root / "etc/shopfleet/node").mkdir(parents=True)
    _node_identity(box, arm_root / "etc/shopfleet/node", ARM_NODE)
    arm_cms = {**cms, "shopfleet-agent": dict(cms["shopfleet-agent"])}
    arm_cms["shopfleet-agent"]["agent.yaml"] = _patch_yaml(arm_cms["shopfleet-agent"]["agent.yaml"],
                                                          lambda d: d["metrics"].update(port=free_port()))
    arm_ctx = PodContext(**{**ctx.__dict__, "node": ARM_NODE, "host_root": arm_root, "configmaps": arm_cms,
                            "images": {"agent": box.ref("agent", "arm64")}, "init_image": base})
    box.run_pod(get("DaemonSet", "shopfleet-agent"), arm_ctx)
    return fusion_metrics


def observe(box: Box) -> dict[str, Any]:
    """What the controller's registry says about shop-x."""
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.read import RegistryReader

    path = next((box.work / "pods").glob("shopfleet-controller-*/volumes/tmp/controller.db"), None)
    if path is None:
        return {}
    engine = create_engine(f"sqlite:///{path}")
    try:
        reader = RegistryReader(engine)
        states = {n.node: n for n in reader.node_states([SHOP])}
        counts = reader.event_counts()
    except Exception as exc:  # the controller may be migrating the file right now
        return {"error": str(exc)}
    finally:
        engine.dispose()
    return {"nodes": {k: {"presence": v.presence, "arch": v.facts.get("arch"), "pipelines": v.pipelines} for k, v in states.items()},
            "events": counts}


def vision_running(nodes: dict[str, Any]) -> bool:
    """Whether the vision node's heartbeat shows its camera pipeline running."""
    vision = nodes.get(f"{NODE}-vision", {})
    return any(isinstance(p, dict) and p.get("state") == "running" for p in (vision.get("pipelines") or {}).values())


def model_verified(box: Box, ran: bool, sha: str) -> bool:
    """Whether the vision node verified the release's model and ran on it.

    From what the node itself did and reports: its model-stage init container staged the package
    (it checks the sha256 before the directory appears: the package is on the node's disk under
    that sha), and the vision node reported its pipeline running (``ran``, from any heartbeat seen:
    at the end of vtest.avi the pipeline is in backoff until it plays the file again) - which it
    is only after load_package re-hashed the mounted package against its manifest.
    """
    staged = box.work / "node-pi-1/var/lib/shopfleet/models" / sha
    return staged.is_dir() and (staged / "model.json").exists() and ran


class FusionWatch:
    """What the fusion pod shows of itself, polled while the shop runs.

    From the heartbeat (the controller's registry): node ``<node>-fusion`` online, its ``fusion``
    pipeline's state and detail (``N shoppers inside, R receipts, V to review``). From the pod's
    metrics port, as the kubelet's probe and Prometheus read it: ``/healthz`` and
    ``shopfleet_agent_pipeline_errors_total{pipeline="fusion"}`` by reason.

    The track stream is consumed when fusion resolved one of the camera's door crossings against a
    track it had from the stream: fusion looks the crossing's track id up among the tracks the
    stream gave it, and only a known track opens a session (``shoppers inside``), is refused as
    ``entry-door-closed`` or leaves as ``exit-unknown-track`` (no session); a crossing of a track
    the stream never carried counts ``crossing-unknown-track`` and nothing else.
    """

    DETAIL = re.compile(r"(\d+) shoppers inside, (\d+) receipts, (\d+) to review")

    def __init__(self, port: int) -> None:
        self.port = port
        self.max_inside = 0
        self.carts = 0
        self.state = ""
        self.detail = ""
        self.healthz: int | None = None
        self.errors: dict[str, float] = {}

    def update(self, nodes: dict[str, Any]) -> None:
        import urllib.error
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        pipe = ((nodes.get(f"{NODE}-fusion") or {}).get("pipelines") or {}).get("fusion") or {}
        if isinstance(pipe, dict):
            self.state = str(pipe.get("state", ""))
            self.detail = str(pipe.get("detail", ""))
            m = self.DETAIL.search(self.detail)
            if m:
                self.max_inside = max(self.max_inside, int(m[1]))
                self.carts = max(self.carts, int(m[2]) + int(m[3]))
        base = f"http://127.0.0.1:{self.port}"
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                self.healthz = r.status
        except urllib.error.HTTPError as exc:
            self.healthz = exc.code
        except OSError:
            self.healthz = None
        try:
            with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return
        errors: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "shopfleet_agent_pipeline_errors":
                for sample in fam.samples:
                    if sample.name.endswith("_total") and sample.labels.get("pipeline") == "fusion":
                        errors[sample.labels["reason"]] = sample.value
        self.errors = errors

    def known_track_crossings(self) -> int:
        """Door crossings fusion matched to a streamed track without opening a session."""
        return int(self.errors.get("fusion_entry-door-closed", 0) + self.errors.get("fusion_exit-unknown-track", 0))

    def tracks_consumed(self) -> bool:
        return self.known_track_crossings() + self.max_inside + self.carts > 0

    def shopper_session(self) -> bool:
        return self.max_inside + self.carts > 0

    def summary(self, nodes: dict[str, Any], events: dict[str, Any]) -> dict[str, Any]:
        return {
            "online": (nodes.get(f"{NODE}-fusion") or {}).get("presence") == "online",
            "pipeline_state": self.state,
            "healthz": self.healthz,
            "tracks_consumed": self.tracks_consumed(),
            "known_track_crossings": self.known_track_crossings(),
            "unknown_track_crossings": int(self.errors.get("fusion_crossing-unknown-track", 0)),
            "events_wrong_node": int(self.errors.get("event_wrong_node", 0)),
            "max_shoppers_inside": self.max_inside,
            "carts": self.carts,
            "cart_events": {k: v for k, v in events.items() if k.startswith("cart_")},
            "shopper_session": self.shopper_session(),
            "errors_by_reason": self.errors,
            "detail": self.detail,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", help="image tag (default: the last 'make images')")
    ap.add_argument("--timeout", type=float, default=420, help="seconds to wait for the shop to report in")
    ap.add_argument("--observe", type=float, default=60,
                    help="keep counting events until this many seconds after the shop's pods started (once it reported in)")
    ap.add_argument("--record", type=Path, default=ROOT / "build/images/images.json", help="build record of make images")
    ap.add_argument("--keep", action="store_true", help="leave the containers and the work directory for a look")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    for tool in ("podman", "buildah"):
        if not shutil.which(tool):
            raise SystemExit(f"shop-in-a-box: needs {tool} (apt-get install {tool})")
    if not VTEST.exists():
        raise SystemExit(f"shop-in-a-box: needs {VTEST} (apt-get install opencv-doc)")
    tag, images = load_build(args.tag, args.record)
    work = Path(tempfile.mkdtemp(prefix="shop-in-a-box-"))
    os.chmod(work, 0o755)
    box = Box(work, tag, images)
    base = "localhost/shopfleet/base:bookworm-amd64"
    from shopfleet.sim.shelf import ShelfBoard

    board = ShelfBoard(SHOP, work / "board", seed=7)
    summary: dict[str, Any] = {}
    ok = False
    link: ByIdLink | None = None
    server: Any = None
    try:
        board.start()
        link = ByIdLink(board.link, work / "by-id")
        model_sha, server = serve_model(box)
        _, creds = central(box, base)
        fusion = FusionWatch(shop(box, creds, base, link.by_id, model_sha))
        wanted = {NODE, f"{NODE}-sensors", f"{NODE}-vision", f"{NODE}-fusion"}
        started = time.monotonic()
        deadline = started + args.timeout
        seen: dict[str, Any] = {}
        vision_ran = False
        while time.monotonic() < deadline:
            seen = observe(box)
            nodes = seen.get("nodes", {})
            online = {k for k, v in nodes.items() if v["presence"] == "online"}
            types = set(seen.get("events", {}))
            shelf = "shelf_change" in types
            camera = bool(types & {"person_entered", "person_exited"})
            vision_ran = vision_ran or vision_running(nodes)
            fusion.update(nodes)
            fused = fusion.state == "running" and fusion.tracks_consumed() and fusion.shopper_session()
            if wanted <= online and ARM_NODE in online and shelf and camera and fused and time.monotonic() - started >= args.observe:
                break
            time.sleep(3)
        nodes = seen.get("nodes", {})
        online = {k for k, v in nodes.items() if v["presence"] == "online"}
        arm = nodes.get(ARM_NODE, {})
        summary = {
            "shop_online": wanted <= online,
            "nodes": {k: v["presence"] for k, v in nodes.items()},
            "events": seen.get("events", {}),
            "model_verified": model_verified(box, vision_ran or vision_running(nodes), model_sha),
            "arm64_agent_online": arm.get("presence") == "online" and arm.get("arch") == "arm64",
            "fusion": fusion.summary(nodes, seen.get("events", {})),
            "image_mb": {n: e.get("image_mb") for n, e in images.items()},
            "seconds": round(time.monotonic() - t0),
        }
        types = set(summary["events"])
        f = summary["fusion"]
        ok = bool(summary["shop_online"] and summary["arm64_agent_online"] and "shelf_change" in types
                  and types & {"person_entered", "person_exited"}
                  and f["online"] and f["pipeline_state"] == "running" and f["tracks_consumed"] and f["shopper_session"]
                  and f["events_wrong_node"] == 0)
        if not ok:
            say("the shop did not fully report in; container logs follow")
            print(box.logs(), file=sys.stderr)
    except (RuntimeError, TranslateError, subprocess.SubprocessError) as exc:
        say(f"FAILED: {exc}")
        print(box.logs(), file=sys.stderr)
        summary = {"shop_online": False, "events": {}, "model_verified": False, "arm64_agent_online": False, "fusion": {},
                   "image_mb": {n: e.get("image_mb") for n, e in images.items()}, "error": str(exc),
                   "seconds": round(time.monotonic() - t0)}
    finally:
        if server is not None:
            server.stop()
        if link is not None:
            link.stop()
        board.stop()
        if not args.keep:
            box.stop()
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept: containers {', '.join(box.names)}; work directory {work}")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
