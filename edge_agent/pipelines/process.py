"""``type: process``: supervise an external command whose stdout is JSON lines of events.

The simplest way to plug anything into a shop node (a vendor's people counter, a shell script
polling a fridge) without writing Python: the command prints one JSON object per line, the agent
turns each into an event, alert or readings and restarts the command with backoff when it exits.
Lines that are not valid (not JSON, unknown ``kind``, wrong fields, too long) are counted by
reason and dropped; the command keeps running. stderr is logged with the pipeline's name. The
command runs in its own session (a Ctrl-C in the agent's terminal reaches only the agent, which
stops pipelines in order) and is told to exit when the agent dies, even by SIGKILL
(``PR_SET_PDEATHSIG``), so a crashed agent leaves no orphans behind.

Line format (docs/agent.md has examples)::

    {"kind": "event", "type": "door_opened", "data": {"door": "front"}}
    {"kind": "alert", "name": "fridge_warm", "state": "firing", "severity": "warning"}
    {"kind": "readings", "readings": [{"name": "temperature_c", "value": 4.2, "source": "fridge-1"}]}
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from edge_agent.protocol import AlertFields, EventFields, Reading
from edge_agent.supervisor import EventSink, PipelineConfigBase

log = logging.getLogger(__name__)


class Config(PipelineConfigBase):
    """An external command supervised by the agent."""

    type: Literal["process"] = Field(description="Pipeline type: run an external command.")
    command: list[str] = Field(min_length=1, description="Program and arguments, e.g. ['/usr/local/bin/counter', '--json'].")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the command.")
    cwd: str | None = Field(None, description="Working directory of the command (default: the agent's).")
    stop_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Seconds between SIGTERM and SIGKILL when the pipeline stops."
    )
    max_line_bytes: int = Field(
        65536, ge=256, le=1024 * 1024, description="Longest stdout line accepted; longer lines are dropped as 'too_long'."
    )


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the agent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class LineError(ValueError):
    """A stdout line that is not a valid pipeline message; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


LINE_REJECT_REASONS = ("too_long", "bad_json", "schema")

STDERR_LOG_CHARS = 500
"""Longest piece of one stderr line the agent logs; a runaway command cannot flood the log."""


def _named(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


class EventLine(EventFields):
    """An event printed by the command: the protocol's event payload plus ``kind``."""

    kind: Literal["event"]
    _type_given = field_validator("type")(_named)


class AlertLine(AlertFields):
    """An alert printed by the command: the protocol's alert payload plus ``kind``."""

    kind: Literal["alert"]
    _name_given = field_validator("name")(_named)


class ReadingsLine(BaseModel):
    """Readings printed by the command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["readings"]
    readings: list[Reading] = Field(min_length=1, max_length=1000)


ProcessLine = Annotated[EventLine | AlertLine | ReadingsLine, Field(discriminator="kind")]
_LINE = TypeAdapter(ProcessLine)


def parse_line(raw: bytes, max_bytes: int = 65536) -> EventLine | AlertLine | ReadingsLine:
    """Parse one stdout line, or raise ``LineError`` with one of LINE_REJECT_REASONS."""
    if len(raw) > max_bytes:
        raise LineError("too_long", f"line is {len(raw)} bytes > {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LineError("bad_json", f"not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LineError("bad_json", f"JSON {type(data).__name__}, expected an object")
    try:
        return _LINE.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise LineError("schema", f"{loc}: {err['msg']}") from None


class ProcessPipeline:
    """Run a command, turn its stdout lines into events; a non-zero exit is a failure."""

    kind = "process"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.name
        self._lock = threading.Lock()
        self._lines = 0
        self._errors_by_reason: dict[str, int] = {}
        self._last_line: float | None = None
        self._detail = "not started"
        self._logged_reasons: set[str] = set()

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Start the command and relay its output until it exits or ``stop`` is set."""
        cfg = self.config
        try:
            proc = subprocess.Popen(
                cfg.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **cfg.env},
                cwd=cfg.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self._detail = f"cannot start {cfg.command[0]!r}: {exc}"
            raise RuntimeError(f"{self._detail}; check pipelines[{cfg.name}].command") from None
        self._detail = f"pid {proc.pid} running"
        out = threading.Thread(target=self._read_stdout, args=(proc.stdout, sink), name=f"{self.name}-stdout", daemon=True)
        err = threading.Thread(target=self._read_stderr, args=(proc.stderr,), name=f"{self.name}-stderr", daemon=True)
        out.start()
        err.start()
        try:
            while not stop.wait(0.2):
                if proc.poll() is not None:
                    break
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(cfg.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("pipeline %s: command ignored SIGTERM for %.1fs, killing it", self.name, cfg.stop_timeout_s)
                    proc.kill()
                    proc.wait()
            out.join(2.0)
            err.join(2.0)
        code = proc.returncode
        self._detail = f"exited with code {code}"
        if not stop.is_set():
            raise RuntimeError(f"command {cfg.command[0]!r} exited with code {code}")

    def _read_stdout(self, stream: IO[bytes], sink: EventSink) -> None:
        limit = self.config.max_line_bytes
        for raw in iter(lambda: stream.readline(limit + 1), b""):
            if len(raw) > limit and not raw.endswith(b"\n"):
                # Skip the rest of an over-long line, then count it once.
                while True:
                    more = stream.readline(limit + 1)
                    if not more or more.endswith(b"\n"):
                        break
                self._reject(LineError("too_long", f"line exceeds {limit} bytes"))
                continue
            raw = raw.strip()
            if not raw:
                continue
            try:
                line = parse_line(raw, limit)
            except LineError as exc:
                self._reject(exc)
                continue
            with self._lock:
                self._lines += 1
                self._last_line = time.monotonic()
            source = getattr(line, "source", "") or self.name
            if isinstance(line, EventLine):
                sink.event(line.type, source, dict(line.data), at=line.at)
            elif isinstance(line, AlertLine):
                sink.alert(line.name, line.state, line.severity, source, line.message, dict(line.data))
            else:
                sink.readings([r if r.source else r.model_copy(update={"source": self.name}) for r in line.readings])

    def _reject(self, exc: LineError) -> None:
        with self._lock:
            self._errors_by_reason[exc.reason] = self._errors_by_reason.get(exc.reason, 0) + 1
            first = exc.reason not in self._logged_reasons
            self._logged_reasons.add(exc.reason)
        if first:
            log.warning(
                "pipeline %s: dropped a stdout line (%s); print one JSON object per line as in docs/agent.md. "
                "Further lines dropped for this reason are only counted.",
                self.name,
                exc,
            )

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode(errors="replace").rstrip()
            if text:
                log.info("pipeline %s stderr: %s", self.name, text[:STDERR_LOG_CHARS])

    def health(self) -> dict[str, Any]:
        """Return lines relayed, bad lines by reason, age of the last line and process state."""
        with self._lock:
            age = None if self._last_line is None else time.monotonic() - self._last_line
            return {
                "errors": sum(self._errors_by_reason.values()),
                "errors_by_reason": dict(self._errors_by_reason),
                "last_frame_age_s": age,
                "detail": f"{self._detail}; {self._lines} lines",
            }


def build(config: Config) -> ProcessPipeline:
    """Return the pipeline for a ``type: process`` config entry."""
    return ProcessPipeline(config)
