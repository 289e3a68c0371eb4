"""The pod-template-to-podman translator (shopfleet/sim/podman.py) on a real rendered shop."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleet_controller.rollout import manifests
from shopfleet.cli import build_parser
from shopfleet.sim.podman import (
    PodContext,
    TranslateError,
    configmaps_of,
    container_argv,
    pod_argvs,
)


def _render() -> list[dict[str, Any]]:
    return manifests.render_shop(manifests.ShopTarget("shop-x", frozenset({"pi"}), "production"),
                                 manifests.RenderInput("r1", {}), 1)


def _obj(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _ctx(tmp_path: Path, objs: list[dict[str, Any]], **kw: Any) -> PodContext:
    return PodContext(node="pi-1", workdir=tmp_path / "work", host_root=tmp_path / "node", configmaps=configmaps_of(objs),
                      images={"sensor-driver": "localhost/shopfleet/sensor-driver:t-amd64"}, **kw)


def _pod(tmp_path: Path, name: str, identity: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render the shop; return its objects and DaemonSet ``name``, with the node's identity files in place:
    ``agent`` a TLS certificate, key and CA (the agent reaches its shop broker by mutual TLS), else a password."""
    objs = _render()
    node = tmp_path / "node/etc/shopfleet/node"
    node.mkdir(parents=True)
    files = ["ca.crt", "agent.crt", "agent.key"] if identity == "agent" else [f"{identity}.password"]
    for f in files:
        (node / f).write_text("x")
    return objs, _obj(objs, "DaemonSet", name)


def _after_image(argv: list[str], image: str) -> list[str]:
    return argv[argv.index(image) + 1:]


def test_sensor_driver_keeps_every_pod_field(tmp_path: Path):
    objs, ds = _pod(tmp_path, "sensor-driver", "sensors")
    ctx = _ctx(tmp_path, objs, devices={"shopfleet.io/shelf-board": ("/dev/pts/7", "/dev/serial/by-id/shelf-board")})
    argv = container_argv(ds, "sensor-driver", ctx)
    joined = " ".join(argv)
    assert "--user 10003:10003" in joined and "--group-add 20" in joined
    assert "--read-only --read-only-tmpfs=false" in joined and "--cap-drop ALL" in joined
    assert "--security-opt no-new-privileges" in joined and "--runtime runc" in joined
    # A pty is the host devpts' own: bind-mounted, since --device would name another instance's pty.
    assert "--mount type=bind,source=/dev/pts/7,destination=/dev/serial/by-id/shelf-board" in joined
    assert "--network" not in argv  # the sensor driver is not on the host network in the manifests
    args = _after_image(argv, "localhost/shopfleet/sensor-driver:t-amd64")
    # $(SHOPFLEET_SHOP).$(SHOPFLEET_NODE)-sensors expanded from the env, as the kubelet does
    assert args[-2:] == ["--username", "shop-x.pi-1-sensors"]
    parsed = build_parser(args[0]).parse_args(args)
    assert parsed.config == "/etc/shopfleet/sensors/sensors.yaml" and parsed.node == "pi-1-sensors"
    # The mounted config is the rendered ConfigMap with the shop filled in, read-only.
    mount = next(a for a in argv if a.endswith("destination=/etc/shopfleet/sensors,ro"))
    src = Path(mount.split("source=")[1].split(",")[0])
    assert "shop: shop-x" in (src / "sensors.yaml").read_text()
    # hostPath state lands under the scratch node root, created like DirectoryOrCreate.
    assert (tmp_path / "node/var/lib/shopfleet/sensors").is_dir()


def test_agent_pod_host_network_subpath_and_init(tmp_path: Path):
    objs, ds = _pod(tmp_path, "shopfleet-agent", "agent")
    ctx = _ctx(tmp_path, objs, init_image="localhost/shopfleet/base:bookworm-amd64",
               add_hosts={"shop-broker.shopfleet.svc.cluster.local": "127.0.0.1"})
    steps = pod_argvs(ds, ctx)
    assert [(n, init) for n, init, _ in steps] == [("state-owner", True), ("agent", False)]
    init_argv = steps[0][2]
    assert "--user 0:10001" in " ".join(init_argv) and "--cap-add CHOWN" in " ".join(init_argv)
    assert init_argv[init_argv.index("--entrypoint") + 1] == "chown"
    agent = steps[1][2]
    assert agent[agent.index("--network") + 1] == "host"
    assert "--add-host" in agent
    sub = next(a for a in agent if "destination=/etc/shopfleet/agent.yaml" in a)
    assert sub.split("source=")[1].split(",")[0].endswith("/volumes/config/agent.yaml")


def test_a_missing_node_file_is_named(tmp_path: Path):
    objs = _render()
    ds = _obj(objs, "DaemonSet", "shopfleet-agent")
    with pytest.raises(TranslateError, match=r"hostPath /etc/shopfleet/node/ca.crt \(File\) does not exist"):
        container_argv(ds, "agent", _ctx(tmp_path, objs))


def test_a_real_device_goes_through_device(tmp_path: Path):
    objs, ds = _pod(tmp_path, "sensor-driver", "sensors")
    ctx = _ctx(tmp_path, objs, devices={"shopfleet.io/shelf-board": ("/dev/ttyACM0", "/dev/serial/by-id/shelf-board")})
    assert "--device /dev/ttyACM0:/dev/serial/by-id/shelf-board" in " ".join(container_argv(ds, "sensor-driver", ctx))


def test_a_device_resource_without_a_device_is_refused(tmp_path: Path):
    objs, ds = _pod(tmp_path, "sensor-driver", "sensors")
    with pytest.raises(TranslateError, match="shopfleet.io/shelf-board needs a device"):
        container_argv(ds, "sensor-driver", _ctx(tmp_path, objs))


def test_fusion_pod_translates_with_its_two_password_files(tmp_path: Path):
    """The fusion DaemonSet of a shop with a GPU node, as shop_in_a_box runs it: uid 10005, its
    agent's and its pipeline's node-local password files mounted read-only, the vision image."""
    objs = manifests.render_shop(manifests.ShopTarget("shop-x", frozenset({"pi", "gpu"}), "production"),
                                 manifests.RenderInput("r1", {}), 1)
    ds = _obj(objs, "DaemonSet", "fusion")
    node = tmp_path / "node/etc/shopfleet/node"
    node.mkdir(parents=True)
    with pytest.raises(TranslateError, match=r"hostPath /etc/shopfleet/node/fusion.password \(File\) does not exist"):
        container_argv(ds, "fusion", _ctx(tmp_path, objs))
    for f in ("fusion.password", "fusion-inputs.password"):
        (node / f).write_text("x")
    ctx = replace(_ctx(tmp_path, objs, init_image="localhost/shopfleet/base:bookworm-amd64"), images={"fusion": "localhost/shopfleet/vision:t-amd64"})
    steps = pod_argvs(ds, ctx)
    assert [(n, init) for n, init, _ in steps] == [("state-owner", True), ("fusion", False)]
    argv = steps[1][2]
    joined = " ".join(argv)
    assert "--user 10005:10005" in joined and "--read-only --read-only-tmpfs=false" in joined
    for f in ("fusion.password", "fusion-inputs.password"):
        assert f"source={node / f},destination=/etc/shopfleet/node/{f},ro" in joined
    args = _after_image(argv, "localhost/shopfleet/vision:t-amd64")
    parsed = build_parser(args[0]).parse_args(args)
    assert parsed.config == "/etc/shopfleet/fusion/fusion.yaml" and parsed.node == "pi-1-fusion"
    assert args[-2:] == ["--username", "shop-x.pi-1-fusion"]


def test_the_box_camera_gets_vision_gpus_track_stream_mount(tmp_path: Path):
    """shop_in_a_box's vision pod stands in for vision-gpu as the track stream's publisher: it gets
    vision-gpu's track-stream.password volume and mount, at the path vision-gpu.yaml's tracks: reads."""
    import yaml

    from shopfleet.sim.shop_in_a_box import _with_track_stream

    objs = manifests.render_shop(manifests.ShopTarget("shop-x", frozenset({"pi", "gpu"}), "production"),
                                 manifests.RenderInput("r1", {}), 1)
    arm = _obj(objs, "DaemonSet", "vision-arm64")
    out = _with_track_stream(arm, _obj(objs, "DaemonSet", "vision-gpu"))
    tracks = yaml.safe_load(configmaps_of(objs)["vision"]["vision-gpu.yaml"])["pipelines"][0]["tracks"]
    assert tracks["broker"]["username"] == "shop-x.track-stream"
    mounts = {m["mountPath"]: m for m in out["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[tracks["broker"]["password_file"]].get("readOnly") is True
    added = len(out["spec"]["template"]["spec"]["volumes"]) - len(arm["spec"]["template"]["spec"]["volumes"])
    assert added == 1  # only the track stream's password, nothing else of vision-gpu (no GPU, no runtime class)
    assert "runtimeClassName" not in out["spec"]["template"]["spec"]
