"""Controller processes as operations sees them: a SIGKILLed controller leaves no writer behind.

Issue 15: after a controller SIGKILL the registry writer and multiprocessing's resource tracker
lived on (parent pid 1) holding database connections; twelve kills left twelve more connections.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.support.wait import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree checks use Linux /proc via psutil")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return ""


def _writer_and_tracker(pid: int) -> list[psutil.Process] | None:
    children = _descendants(pid)
    cmdlines = [_cmdline(c) for c in children]
    tracker = any("resource_tracker" in c for c in cmdlines)
    writer = any("spawn_main" in c and "resource_tracker" not in c for c in cmdlines)
    return children if tracker and writer else None


def test_sigkilled_controller_takes_its_writer_and_resource_tracker_with_it(broker, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "shopfleet", "controller", "--data-dir", str(tmp_path / "ctl"),
           "--broker", f"127.0.0.1:{broker.port}", "--api", "127.0.0.1:0", "--client-id", "kill-test"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        # The writer (a spawned child) and the resource tracker are both started by the service.
        # Until a child has exec'd it still shows its parent's command line, so wait for both to
        # show their own rather than for two children.
        children = wait_for(lambda: _writer_and_tracker(proc.pid), timeout=60,
                            what="the controller's writer and resource tracker to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(_alive(c) for c in children), timeout=10,
                 what="the writer and the resource tracker to exit after their controller was SIGKILLed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in _descendants(proc.pid):
            c.kill()
