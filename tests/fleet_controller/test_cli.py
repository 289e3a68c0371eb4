"""``shopfleet controller`` as a real process: starts, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx

# The controller's own subcommands, without the rest of the CLI root (other parts register theirs there).
RUN = (
    "import argparse, logging, sys; from fleet_controller import cli; logging.basicConfig(level=logging.INFO); "
    "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def test_controller_process_serves_and_stops_on_sigterm(broker, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "controller", "--broker", f"127.0.0.1:{broker.port}", "--api", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--client-id", "cli-test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        m = None
        for _ in range(5):  # the first-start admin announcement may come first
            line = proc.stdout.readline()  # blocks until the controller says something
            m = re.search(r"API (http://[\d.:]+)", line)
            if m:
                break
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        r = httpx.get(f"{m.group(1)}/healthz", timeout=10)
        assert r.status_code == 200 and r.json()["mqtt_connected"] is True
        assert (tmp_path / "data" / "controller.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_controller_refused_by_broker_exits_1(tmp_path):
    """Nothing listens on the port: a clear error and exit code 1, not a hang."""
    from shopfleet.broker import free_port

    proc = subprocess.run(
        [sys.executable, "-c", RUN, "controller", "--broker", f"127.0.0.1:{free_port()}", "--api", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
        env={"SHOPFLEET_CONTROLLER_BROKER__CONNECT_TIMEOUT_S": "2", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "is the broker running there?" in proc.stderr
