"""``shopfleet demo`` as a newcomer runs it: the whole fleet comes up, both rollouts play out, nothing is left behind.

The demo runs until what a test checks has happened (progress lines, the registry), then gets
Ctrl-C (tests/support/demo.py); no test waits a fixed time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.demo import DemoProcess

pytestmark = pytest.mark.slow


def test_demo_runs_the_fleet_and_both_rollouts_then_cleans_up(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.process_iter()}
    demo = DemoProcess(tmp_path / "demo", "--shops", "2")
    try:
        demo.wait_line(r"nodes online 6/6", 120, "all six nodes online")
        # the bad release starts only once the good one ended, so its end is the end of both
        demo.wait_line(r"rollout 2026\.11\.2-bad: (completed|rolled_back|aborted|failed|halted)", 240, "both rollouts to end")
        demo.wait_db("select count(*) from events where kind = 'event'", 60, "shop events in the registry")
        summary = demo.stop()
    finally:
        demo.cleanup()
    lines = demo.stdout
    assert summary["shops"] == 2 and summary["nodes"] == 6
    assert summary["nodes_seen_online"] == 6 and summary["nodes_online"] == 6
    assert summary["messages_ingested"] > 50 and summary["messages_rejected"] == 0 and summary["missing"] == 0
    assert summary["events"] > 0  # shelf picks and door events from the simulated boards, shoppers from the cameras
    assert summary["rollouts"] == {"2026.11.1": "completed", "2026.11.2-bad": "failed"}, lines[-8:]
    assert summary["carts"] > 0 and 0 <= summary["carts_in_review"] <= summary["carts"]  # carts from the shops' fusion
    logins = next(line for line in lines if "demo logins:" in line)
    passwords = dict(re.findall(r"(\w+) / (\S+?)(?:,|$)", logins.split("demo logins:")[1]))
    assert set(passwords) == {"viewer", "reviewer", "operator", "mlops", "admin"}  # one per role, each a fresh random password
    assert all(len(p) >= 10 and "demo" not in p for p in passwords.values())
    # this demo's broker is gone (other tests on the machine run brokers of their own)
    leftovers = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in before
                 and p.info["name"] in ("mosquitto", "amqtt") and str(demo.data_dir) in " ".join(p.info["cmdline"] or ())]
    assert not leftovers, leftovers


def test_demo_refuses_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "shopfleet", "demo", "--shops", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--shops 0 is out of range" in proc.stderr


def test_demo_with_the_real_camera_pipeline(tmp_path: Path) -> None:
    demo = DemoProcess(tmp_path / "demo", "--shops", "1", "--camera", "--no-rollouts")
    try:
        demo.wait_line(r"nodes online 3/3", 240, "the shop's nodes online (the first run converts the model)")
        # zone events come only from the real pipeline (YOLOv4-tiny + tracker + shelf zone on vtest.avi)
        demo.wait_db("select count(*) from events where kind = 'event' and type = 'zone_enter'", 120, "a zone_enter event")
        summary = demo.stop()
    finally:
        demo.cleanup()
    cam = summary["cameras"]["demo-01/gpu-1/plaza-cam"]
    assert cam["state"] == "running" and cam["fps"] > 1
    assert summary["events_by_type"].get("zone_enter", 0) > 0
