"""A shop on real containers (make shop-in-a-box): the built images run from shop-x's rendered
manifests with podman, and the controller container's registry shows the shop online with shelf
and camera events, the model staged and verified by the vision pod, the arm64 agent (under
qemu) reported in with arm64 facts, and the fusion pod (DaemonSet fusion, the vision image)
online, running its fusion pipeline on the camera's track stream and opening shopper sessions.

Needs the images of ``make images`` (build/images/images.json names the tag), root, podman,
buildah, qemu-user-static and opencv-doc's vtest.avi; takes a few minutes (docs/images.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(900)]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman with runc and host networking as root)"
    record = ROOT / "build/images/images.json"
    if not record.exists():
        return "no build/images/images.json: run 'make images' first"
    tag = json.loads(record.read_text())["tag"]
    for name, arch in (("agent", "amd64"), ("agent", "arm64"), ("sensor-driver", "amd64"), ("vision", "amd64"), ("controller", "amd64")):
        ref = f"localhost/shopfleet/{name}:{tag}-{arch}"
        if subprocess.run(["podman", "image", "exists", ref], capture_output=True).returncode != 0:
            return f"image {ref} missing: run 'make images'"
    if not Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi").exists():
        return "needs opencv-doc (vtest.avi)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "needs qemu-user-static with binfmt (update-binfmts --enable qemu-aarch64)"
    return None


def test_a_shop_on_real_containers_reports_in():
    why = _missing()
    if why:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, "-m", "shopfleet.sim.shop_in_a_box", "--timeout", "480"], cwd=ROOT,
                          capture_output=True, text=True, timeout=880, env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    summary = json.loads(last)
    assert proc.returncode == 0, f"{last}\n{proc.stderr[-6000:]}"
    assert summary["shop_online"] is True
    assert summary["arm64_agent_online"] is True
    assert summary["events"].get("shelf_change", 0) > 0
    assert summary["events"].get("person_entered", 0) + summary["events"].get("person_exited", 0) > 0
    # The vision pod's model-stage fetched and verified the release's package, and vision runs on it.
    assert summary["model_verified"] is True
    assert summary["image_mb"]["agent"]["amd64"] < 150
    # Fusion, from its rendered DaemonSet: its own fleet node came online at the controller and its
    # heartbeat shows the fusion pipeline running; its /healthz (the pod's probe) answers 200.
    fusion = summary["fusion"]
    assert summary["nodes"].get("pi-1-fusion") == "online"
    assert fusion["online"] is True and fusion["pipeline_state"] == "running"
    assert fusion["healthz"] == 200
    # It consumed the camera's track stream (user shop-x.track-stream -> shop-x.fusion-inputs on the
    # shop broker): door crossings were resolved against tracks only the stream gives it (a session
    # opened, or a known track refused at a closed door / leaving without a session), never all
    # counted as crossing-unknown-track.
    assert fusion["tracks_consumed"] is True
    assert fusion["known_track_crossings"] + fusion["max_shoppers_inside"] + fusion["carts"] > 0
    # A shopper session: a crossing of a streamed track while the board's door contact was open.
    assert fusion["shopper_session"] is True
    assert fusion["max_shoppers_inside"] + fusion["carts"] > 0
    # The deployed sensor driver has no planogram (grams only): fusion counts units from its layout,
    # so its shelf changes are not each a planogram mismatch (every cart went to review before).
    assert fusion["errors_by_reason"].get("fusion_planogram-mismatch", 0) == 0, fusion["errors_by_reason"]
    assert summary["events"].get("shelf_change", 0) > 0
