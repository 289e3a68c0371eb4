"""Fusion as deployed: the rendered DaemonSet fusion runs a config the agent loads, a layout fusion
loads, and broker users the shop broker's ACL (as broker-config writes it) lets do what they do.

The generic checks (test_pods, test_guards, test_validation, test_tree) cover fusion like every
workload; these are the fusion-specific ones, on the objects the controller's renderer gives a
shop with a GPU node (the objects its applier applies).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from edge_agent.cli import overrides_from_args
from edge_agent.config import AgentConfig, BrokerConfig, load_config
from edge_agent.pipelines.fusion import FusionPipeline, track_subscription, track_topic
from edge_agent.protocol import Channel, Topics
from fleet_controller.broker_config import render_shop_acl
from fleet_controller.rollout import manifests as m
from fusion.engine import Fusion, FusionConfig
from fusion.layout import parse_layout
from shopfleet.cli import build_parser
from tests.manifests import support as s

NS = "shopfleet"


@pytest.fixture(scope="module")
def shop() -> list[dict[str, Any]]:
    """What the renderer gives a shop with Pi and GPU nodes."""
    return m.render_shop(m.ShopTarget(s.SHOP, frozenset({"pi", "gpu"})), m.RenderInput("r1", model_sha256=s.MODEL_SHA256), 3)


def _container(objs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = s.find(objs, "DaemonSet", name)["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def _load(objs: list[dict[str, Any]], name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any], AgentConfig]:
    """Load a workload's agent config as the container would: its argv, its mounted file, the agent's loader."""
    spec, c = _container(objs, name)
    env = s.env_values(objs, c, NS)
    argv = [s.expand(a, env) for a in c["args"]]
    args = build_parser(argv[0]).parse_args(argv)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(s.mounted_file_text(objs, spec, c, args.config, NS))
    real_isfile = os.path.isfile
    # A password file "exists" when the pod mounts it (the node's file; test_pods checks the same way).
    monkeypatch.setattr(os.path, "isfile", lambda p: s.mount_for(spec, c, str(p)) is not None or real_isfile(p))
    return spec, c, load_config(cfg, overrides_from_args(args))


def _assert_node_password(spec: dict[str, Any], c: dict[str, Any], broker: BrokerConfig, objs: list[dict[str, Any]]) -> None:
    """A pipeline's own broker user: a node-local password file mounted read-only, the shop broker's password port."""
    path = broker.password_file
    assert path is not None and path.startswith("/etc/shopfleet/node/")
    mp, vm, vol = s.mount_for(spec, c, path)
    assert mp == path and vm.get("readOnly") and vol["hostPath"] == {"path": path, "type": "File"}
    assert path in s.find(objs, "DaemonSet", spec["containers"][0]["name"])["metadata"]["annotations"][m.WHY_HOST_PATH]
    svc = s.find(objs, "Service", broker.host.split(".")[0])
    assert svc["metadata"]["name"] == "shop-broker"
    assert broker.port == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "mqtt")


def _camera(objs: list[dict[str, Any]], spec: dict[str, Any], c: dict[str, Any], pipeline: Any) -> str:
    zones = s.yaml_text(s.mounted_file_text(objs, spec, c, pipeline.zones, NS))
    return str(pipeline.camera or zones["camera"])


def test_fusion_config_loads_with_the_agents_loader_and_its_layout_with_fusions(shop, tmp_path, monkeypatch):
    spec, c, config = _load(shop, "fusion", tmp_path, monkeypatch)
    # Its own fleet node and MQTT user, like vision's and the sensor driver's.
    assert config.shop == s.SHOP and config.node == f"{s.NODE}-fusion"
    assert config.broker.username == f"{s.SHOP}.{s.NODE}-fusion"
    (p,) = config.pipelines
    assert p.type == "fusion" and p.shop == s.SHOP
    # The layout: a key of ConfigMap fusion, loaded by fusion's own parser and engine.
    text = s.mounted_file_text(shop, spec, c, p.layout, NS)
    layout = parse_layout(yaml.safe_load(text), source=p.layout)
    Fusion(layout, FusionConfig.model_validate(p.fusion))
    assert layout.name == s.SHOP  # cart ids start with it
    # The pipeline's own broker connection: not the agent's user (the broker binds the client id to it).
    assert p.broker.username == f"{s.SHOP}.fusion-inputs" != config.broker.username
    _assert_node_password(spec, c, p.broker, shop)
    # Outbox (the closed carts not sent yet) on the node, the model never on the pod.
    assert config.outbox.path.startswith("/var/lib/shopfleet/fusion/")
    assert m.ANNOTATION_MODEL not in (s.find(shop, "DaemonSet", "fusion")["spec"]["template"]["metadata"].get("annotations") or {})


def test_fusion_reads_the_track_stream_of_the_gpu_camera_on_its_node(shop, tmp_path, monkeypatch):
    _, _, fusion = _load(shop, "fusion", tmp_path, monkeypatch)
    monkeypatch.undo()
    vspec, vc, vision = _load(shop, "vision-gpu", tmp_path, monkeypatch)
    (cam,) = vision.pipelines
    assert cam.type == "vision" and cam.tracks is not None
    assert cam.tracks.shop == s.SHOP
    (p,) = fusion.pipelines
    assert p.camera == _camera(shop, vspec, vc, cam)  # fusion's camera is the one that publishes tracks
    assert cam.tracks.broker.username == f"{s.SHOP}.track-stream" not in (vision.broker.username, p.broker.username)
    # ...and fusion is bound to that publisher: the track stream's user's node is the node fusion takes tracks from.
    assert p.track_node == cam.tracks.node() == "track-stream"
    _assert_node_password(vspec, vc, cam.tracks.broker, shop)
    # Same node: fusion runs where vision-gpu runs.
    fspec, _ = _container(shop, "fusion")
    assert fspec["nodeSelector"] == vspec["nodeSelector"]


def test_the_layout_binds_each_kind_of_event_to_the_agents_the_manifests_run(shop, tmp_path, monkeypatch):
    """Fusion does not start without the layout's publishers; the example names them as the manifests name those agents."""
    spec, c, fusion = _load(shop, "fusion", tmp_path, monkeypatch)
    (p,) = fusion.pipelines
    layout = parse_layout(yaml.safe_load(s.mounted_file_text(shop, spec, c, p.layout, NS)), source=p.layout)
    pipeline = FusionPipeline(p)
    pipeline.bind(layout)  # raises without publishers
    pub = layout.publishers
    assert pub is not None and set(pub.boards) == {slot.board for slot in layout.slots}
    # Each publisher is the fleet node of an agent the manifests run: <Kubernetes node><suffix of its --node>.
    monkeypatch.undo()
    suffix = {}
    for workload in ("vision-gpu", "sensor-driver"):
        _, _, agent = _load(shop, workload, tmp_path, monkeypatch)
        monkeypatch.undo()
        assert agent.node.startswith(f"{s.NODE}-")  # --node $(SHOPFLEET_NODE)-<role>
        suffix[workload] = agent.node.removeprefix(s.NODE)
    assert pub.vision.endswith(suffix["vision-gpu"]) and pub.vision != suffix["vision-gpu"]
    assert all(n.endswith(suffix["sensor-driver"]) and n != suffix["sensor-driver"] for n in (pub.door, *pub.boards.values()))
    # Nothing else about them is the manifests' to know (Kubernetes node names): the shop's overlay sets them.


def _acl(text: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    user = ""
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            user = words[1]
            out[user] = []
        elif words[:1] == ["topic"] and user:
            out[user].append((words[1], words[2]))
    return out


def _may(acl: dict[str, list[tuple[str, str]]], user: str, access: str, topic: str) -> bool:
    return any(a in (access, "readwrite") and topic_matches_sub(pattern, topic) for a, pattern in acl[user])


def test_the_shop_brokers_acl_lets_each_fusion_user_do_what_it_does(shop, tmp_path, monkeypatch):
    """broker-config's node list gets the users the manifests name, and its shop ACL gives them their topics."""
    _, _, fusion = _load(shop, "fusion", tmp_path, monkeypatch)
    monkeypatch.undo()
    vspec, vc, vision = _load(shop, "vision-gpu", tmp_path, monkeypatch)
    (p,) = fusion.pipelines
    (cam,) = vision.pipelines
    assert cam.tracks is not None
    users = [fusion.broker.username, p.broker.username, cam.tracks.broker.username]
    nodes = []
    for u in users:
        assert u is not None
        shop_id, node = u.split(".", 1)
        assert shop_id == s.SHOP
        nodes.append(node)
    acl = _acl(render_shop_acl(s.SHOP, nodes))
    camera = _camera(shop, vspec, vc, cam)
    # The fusion agent sends carts as events of its own node.
    assert _may(acl, users[0], "write", Topics.node(s.SHOP, fusion.node, Channel.EVENTS))
    # The pipeline subscribes to every node's events and every track stream of its shop (the
    # subscriptions FusionPipeline.run makes), and nothing of another shop.
    for sub in (f"{Topics.root}/{s.SHOP}/+/{Channel.EVENTS.value}", track_subscription(s.SHOP)):
        assert _may(acl, users[1], "read", sub), sub
    assert not _may(acl, users[1], "read", track_topic("other-shop", nodes[2], camera))
    # The camera's track stream publishes on its camera's topic under its own node, the one fusion's track_node names;
    # no other user of the shop may write there, and it may write under no other node.
    topic = track_topic(s.SHOP, p.track_node, camera)
    assert topic == track_topic(s.SHOP, cam.tracks.node(), camera) and _may(acl, users[2], "write", topic)
    assert not any(_may(acl, u, "write", topic) for u in users[:2])
    assert not _may(acl, users[2], "write", track_topic(s.SHOP, nodes[0], camera))


def test_a_model_rollout_does_not_restart_fusion():
    """Why fusion is its own workload: a new model restarts the vision pods, and fusion's open carts are in memory."""
    target = m.ShopTarget(s.SHOP, frozenset({"gpu"}))

    def template(model: str, images: dict[str, str] | None = None) -> Any:
        objs = m.render_shop(target, m.RenderInput("r", images or {}, model_sha256=model), 1)
        return {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] == "DaemonSet"}

    a, b = template("ab" * 32), template("cd" * 32)
    assert a["vision-gpu"] != b["vision-gpu"] and a["fusion"] == b["fusion"]
    # A release pins fusion's image as its own component (the vision build); vision's image alone leaves it be.
    image = "registry.example/shopfleet/vision@sha256:" + "ef" * 32
    assert template("ab" * 32, {"vision-gpu": image})["fusion"] == a["fusion"]
    assert template("ab" * 32, {"fusion": image})["fusion"]["spec"]["containers"][0]["image"] == image
