"""``shopfleet controller`` as deployed: one process with logins, dashboard, alerts and the rollout executor.

The parts are tested on their own elsewhere; this checks that the real command puts them
together from a config file: the first-start admin, every route guarded, the executor running.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from fleet_controller.rollout.signing import generate_keypair
from shopfleet.broker import BrokerProcess

pytestmark = pytest.mark.slow


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shopfleet", "controller", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_controller_command_runs_every_part(broker: BrokerProcess, tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    generate_keypair(key)
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "broker": {"port": broker.port},
        "api": {"port": 0},
        "rollout": {"signing_key": str(key), "tick_interval_s": 0.5},
    }))
    proc = _start(config)
    try:
        api = password = None
        for _ in range(10):
            line = proc.stdout.readline()
            if m := re.search(r"one-time password (\S+)", line):
                password = m.group(1)
            if m := re.search(r"API (http://[\d.:]+)", line):
                api = m.group(1)
            if api and password:
                break
        assert api and password, proc.stderr.read() if proc.poll() is not None else (api, password)
        with httpx.Client(base_url=api, timeout=10) as http:
            assert http.get("/api/v1/rollouts").status_code == 401
            assert http.get("/api/v1/shops").status_code == 401
            assert http.get("/login").status_code == 200
            health = http.get("/healthz").json()
            assert {"rollout-executor", "alerts", "dashboard-live"} <= set(health["workers"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # the admin exists in the database the controller made: a token for it opens the API
        out = subprocess.run([sys.executable, "-m", "shopfleet", "tokens", "create", "--user", "admin", "--name", "t",
                              "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        token = re.search(r"(sft_\S+)", out.stdout).group(1)
        proc = _start(config)
        for _ in range(10):
            if m := re.search(r"API (http://[\d.:]+)", proc.stdout.readline()):
                api = m.group(1)
                break
        r = httpx.get(f"{api}/api/v1/rollouts", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_a_missing_signing_key_is_refused_at_start(broker: BrokerProcess, tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "broker": {"port": broker.port},
                                      "api": {"port": 0}, "rollout": {"signing_key": str(tmp_path / "nope.pem")}}))
    out = subprocess.run([sys.executable, "-m", "shopfleet", "controller", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "nope.pem" in out.stderr and "keygen" in out.stderr
