"""``shopfleet demo`` as a child process that runs until the test has seen what it waits for.

The demo runs without ``--duration``; the test waits on its progress lines and on the
controller's SQLite database in the demo's ``--data-dir`` (read-only), then stops it with
SIGINT, as an operator's Ctrl-C, and reads the JSON summary the demo prints last on the way out.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from tests.support.wait import wait_for


class DemoProcess:
    """One ``python -m shopfleet demo`` child with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shopfleet", "--log-level", "WARNING", "demo", "--port", "0",
             "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        # Both pipes are drained all the time, so a chatty child never blocks on a full pipe.
        self._readers = [threading.Thread(target=self._read, args=(pipe, out), daemon=True)
                         for pipe, out in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(pipe: IO[str] | None, out: list[str]) -> None:
        assert pipe is not None
        for line in pipe:
            out.append(line.rstrip("\n"))

    def output(self) -> str:
        """Return the tail of both streams, for failure messages."""
        return "\n".join(self.stdout[-30:]) + "\n--- stderr ---\n" + "\n".join(self.stderr[-30:])

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the demo exited early with {self.proc.returncode}:\n{self.output()}")

    def wait_line(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        """Wait until a stdout line matches ``pattern``; return the match. Fails at once if the demo exits."""
        rx = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            self._alive()
            return next((m for line in list(self.stdout) if (m := rx.search(line))), None)

        return wait_for(seen, timeout, what)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the controller's database, read-only; [] while it does not exist yet."""
        db_path = self.data_dir / "controller" / "controller.db"
        if not db_path.exists():
            return []
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        finally:
            db.close()

    def wait_db(self, sql: str, timeout: float, what: str) -> list[tuple[Any, ...]]:
        """Wait until ``sql`` returns rows whose first column is truthy; return them."""

        def rows() -> list[tuple[Any, ...]] | None:
            self._alive()
            got = self.query(sql)
            return got if got and got[0][0] else None

        return wait_for(rows, timeout, what, interval=0.5)

    def stop(self, timeout: float = 120) -> dict[str, Any]:
        """Stop the demo with SIGINT, wait for it to clean up, and return its JSON summary (last stdout line)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        assert code == 0, f"the demo exited {code}:\n{self.output()}"
        return json.loads(self.stdout[-1])

    def cleanup(self) -> None:
        """Kill the demo if a failed test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
