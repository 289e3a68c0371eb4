"""``shopfleet agent`` as a real child process, for tests that restart, kill and inspect it
(tests/edge_agent/test_subprocess.py, tests/shopfleet/test_end_to_end.py)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from shopfleet.broker import BrokerProcess
from tests.support.wait import wait_for

SHOP, NODE = "shop-z", "gpu-1"
TICKER = (
    "import itertools, json, time\n"
    "for i in itertools.count():\n"
    "    print(json.dumps({'kind': 'event', 'type': 'tick', 'data': {'n': i}}), flush=True)\n"
    "    time.sleep(0.01)\n"
)


class AgentProcess:
    """One ``python -m shopfleet agent`` child with a config file in ``workdir``."""

    def __init__(self, workdir: Path, broker: BrokerProcess, *, ticker: bool) -> None:
        self.outbox = workdir / "outbox.db"
        config = {
            "shop": SHOP,
            "node": NODE,
            "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive_s": 5},
            "heartbeat_interval_s": 0.05 if ticker else 30,
            "outbox": {"path": str(self.outbox)},
            "shutdown_timeout_s": 20,
            "pipelines": [{"type": "process", "name": "ticker", "command": [sys.executable, "-c", TICKER]}] if ticker else [],
        }
        self.config = workdir / "agent.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self) -> None:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shopfleet", "agent", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def session(self) -> int | None:
        """Return the MQTT session this run of the agent logged on connecting, or None before it connected.

        The line comes after the agent installed its SIGTERM handler: a test that waits for it knows
        the process it signals is the one it started, past start-up.
        """
        if not self.log.exists():
            return None
        with open(self.log, "rb") as log:
            log.seek(self._log_offset)
            found = re.findall(rb" connected to \S+ \(session (\d+)\)", log.read())
        return int(found[-1]) if found else None

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM the agent once it is connected (so past start-up); return its exit code."""
        assert self.proc is not None
        wait_for(lambda: self.session() is not None or self.proc.poll() is not None, 60, "the agent to connect before SIGTERM")
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stored(self) -> int:
        """Return the messages in the outbox now (read by a second SQLite connection)."""
        if not self.outbox.exists():
            return 0
        db = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def meta(self) -> tuple[str, int]:
        db = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=10)
        try:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()
        return rows["epoch"], int(rows["next_seq"]) - 1

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
