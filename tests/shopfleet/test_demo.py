"""``shopfleet demo`` as a newcomer runs it: the whole fleet comes up, both rollouts play out, nothing is left behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_fleet_and_both_rollouts_then_cleans_up() -> None:
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.run(
        [sys.executable, "-m", "shopfleet", "--log-level", "WARNING", "demo", "--shops", "2", "--duration", "70", "--port", "0"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["shops"] == 2 and summary["nodes"] == 6
    assert summary["nodes_seen_online"] == 6 and summary["nodes_online"] == 6
    assert summary["messages_ingested"] > 50 and summary["messages_rejected"] == 0 and summary["missing"] == 0
    assert summary["events"] > 0  # shelf picks and door events from the simulated boards, shoppers from the cameras
    assert summary["rollouts"] == {"2026.11.1": "completed", "2026.11.2-bad": "failed"}, lines[-8:]
    logins = next(line for line in lines if "demo logins:" in line)
    passwords = dict(re.findall(r"(\w+) / (\S+?)(?:,|$)", logins.split("demo logins:")[1]))
    assert set(passwords) == {"viewer", "operator", "mlops", "admin"}  # one per role, each a fresh random password
    assert all(len(p) >= 10 and "demo" not in p for p in passwords.values())
    # the demo's broker runs in its data directory (shopfleet-demo-*); brokers of tests running
    # in parallel on this machine are not the demo's to clean up
    leftovers = [
        p for p in psutil.process_iter(["pid", "name", "cmdline"])
        if p.pid not in before and p.info["name"] in ("mosquitto", "amqtt") and "shopfleet-demo-" in " ".join(p.info["cmdline"] or ())
    ]
    assert not leftovers, leftovers


def test_demo_refuses_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "shopfleet", "demo", "--shops", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--shops 0 is out of range" in proc.stderr


def test_demo_with_the_real_camera_pipeline() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shopfleet", "--log-level", "WARNING", "demo", "--shops", "1", "--duration", "40", "--port", "0",
         "--camera", "--no-rollouts"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    cam = summary["cameras"]["demo-01/gpu-1/plaza-cam"]
    assert cam["state"] == "running" and cam["fps"] > 1
    # zone events come only from the real pipeline (YOLOv4-tiny + tracker + shelf zone on vtest.avi)
    assert summary["events_by_type"].get("zone_enter", 0) > 0
