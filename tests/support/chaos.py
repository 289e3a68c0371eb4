"""The chaos tier's parts, all real and all as deployed (docs/chaos.md).

* the central Mosquitto started with the files ``shopfleet broker-config`` writes (the CLI run as
  an operator runs it: persistence, queue sized from the fleet, one user per node and replica);
* ``shopfleet controller --config FILE`` processes (SQLite or PostgreSQL, one or two replicas);
* ``shopfleet agent --config FILE`` processes, each with a process pipeline printing events;
* the truth: each agent's outbox (its epoch and the last seq it assigned) against the registry's
  rows and counters, read with SQL from the database the controllers write.

Sizes come from ``SHOPFLEET_CHAOS``: ``short`` (the default, what ``make test`` runs) or ``full``
(``make chaos``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
import yaml

from shopfleet.broker import free_port
from tests.support.security import GeneratedBroker, broker_owner
from tests.support.wait import wait_for

FULL = os.environ.get("SHOPFLEET_CHAOS", "short") == "full"

TICKER = (
    "import itertools, json, sys, time\n"
    "period = 1.0 / float(sys.argv[1])\n"
    "for i in itertools.count():\n"
    "    print(json.dumps({'kind': 'event', 'type': 'tick', 'data': {'n': i}}), flush=True)\n"
    "    time.sleep(period)\n"
)
"""A pipeline command printing one event per period (its rate in events/s is argv[1])."""


@dataclass(frozen=True)
class Sizes:
    """How big one run of the tier is."""

    agents: int
    rate: float  # events per second per agent (plus 2 heartbeats/s)
    outage_s: float  # uplink cut
    queued: int  # messages queued for a stopped controller (> Mosquitto's default 1,000)
    stream_s: float  # how long agents stream between faults
    kills: int  # kills per kill scenario


SIZES = Sizes(agents=8, rate=25.0, outage_s=30.0, queued=6000, stream_s=4.0, kills=3) if FULL else \
    Sizes(agents=3, rate=15.0, outage_s=5.0, queued=1200, stream_s=1.5, kills=1)


def _python() -> list[str]:
    return [sys.executable, "-m", "shopfleet"]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    # PYTHONFAULTHANDLER: a process the tier has to abort (SIGABRT) prints every thread's stack first
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- the broker, as ``shopfleet broker-config`` writes it ------------------------------------------


@dataclass
class Deployment:
    """The generated central broker config for ``nodes`` and ``replicas`` controller users."""

    root: Path
    nodes: list[tuple[str, str]]
    port: int
    creds: dict[str, Any]
    conf: Path
    broker: GeneratedBroker

    @classmethod
    def generate(cls, root: Path, nodes: list[tuple[str, str]], *, replicas: int = 1) -> Deployment:
        """Run ``shopfleet broker-config`` (defaults for sizing: 1 msg/s per node, a 3,600 s outage)."""
        (root / "nodes.txt").write_text("".join(f"{s}/{n}\n" for s, n in nodes))
        port = free_port()
        cmd = [*_python(), "broker-config", "--nodes", str(root / "nodes.txt"), "--out", str(root / "broker"),
               "--port", str(port), "--bind", "127.0.0.1", "--controller-replicas", str(replicas),
               "--persistence-dir", str(root / "broker-data")]
        if owner := broker_owner():
            cmd += ["--owner", owner]
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"broker-config failed: {out.stdout}{out.stderr}"
        conf = root / "broker" / "mosquitto.conf"
        creds = json.loads((root / "broker" / "credentials.json").read_text())
        return cls(root, nodes, port, creds, conf, GeneratedBroker(conf, [port], root))

    def controller_user(self, i: int) -> tuple[str, str]:
        c = self.creds["controllers"][i]
        return c["username"], c["password"]

    def node_user(self, shop: str, node: str) -> tuple[str, str]:
        c = self.creds["nodes"][f"{shop}/{node}"]
        return c["username"], c["password"]

    def conf_text(self) -> str:
        return self.conf.read_text()

    def dropped_lines(self) -> list[str]:
        """Lines where Mosquitto says it dropped messages for a client (a full queue)."""
        return [line for line in self.broker.log().splitlines() if "dropped" in line.lower()]


# -- controllers -----------------------------------------------------------------------------------


class Controller:
    """``shopfleet controller --config FILE`` as a child process."""

    def __init__(self, root: Path, name: str, dep: Deployment, db_url: str, *, replica: int = 0,
                 shared_group: str | None = None, ack_nodes: bool = False, **extra: Any) -> None:
        self.name, self.db_url = name, db_url
        user, password = dep.controller_user(replica)
        broker: dict[str, Any] = {"host": "127.0.0.1", "port": dep.port, "username": user, "password": password,
                                  "client_id": user, "keepalive_s": 5}
        if shared_group:
            broker |= {"protocol": "5", "shared_group": shared_group}
        settings: dict[str, Any] = {
            "db_url": db_url, "instance": name, "broker": broker, "api": {"host": "127.0.0.1", "port": 0},
            "intake": {"ack_nodes": ack_nodes},
            # keep every row the tier counts
            "retention": {"heartbeats_per_node": 10_000_000, "events_per_shop": 10_000_000, "interval_s": 3600},
            "presence": {"sweep_interval_s": 1.0},
        }
        for k, v in extra.items():
            settings[k] = {**settings.get(k, {}), **v} if isinstance(v, dict) else v
        self.config = root / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.config.chmod(0o600)
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[psutil.Process] = []

    def start(self, timeout: float = 180) -> Controller:
        start_at = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*_python(), "controller", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        proc = self.proc

        def ready() -> bool:
            assert proc.poll() is None, f"controller {self.name} exited {proc.returncode}: {self.tail()}"
            return ": API http" in self.log.read_text(errors="replace")[start_at:]

        try:
            wait_for(ready, timeout, f"controller {self.name} to start")
        except AssertionError as exc:
            proc.send_signal(signal.SIGABRT)  # the fault handler writes every thread's stack to the log
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.proc = None
            raise AssertionError(f"{exc}: {self.tail(12000)}") from None
        self.children = self.descendants()
        return self

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True) if self.proc else []
        except psutil.NoSuchProcess:
            return []

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the controller process alone (not its process group); return its children then."""
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        children = self.descendants()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        return children

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # the fault handler writes every thread's stack to the log
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            raise AssertionError(f"controller {self.name} did not stop within {timeout}s: {self.tail(12000)}") from None
        self.proc = None
        return code

    def api_url(self) -> str:
        m = re.findall(r": API (http://\S+)", self.log.read_text(errors="replace"))
        assert m, self.tail()
        return str(m[-1])

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on this controller's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"{self.api_url()}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cleanup(self) -> None:
        for p in self.descendants():
            _kill(p)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in self.children:
            _kill(p)


def _kill(p: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.kill()


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def orphans_holding(path: Path) -> list[str]:
    """Processes re-parented to init (ppid 1) that hold ``path`` (or its -wal/-shm) open."""
    names = {str(path), f"{path}-wal", f"{path}-shm", f"{path}-journal"}
    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if p.info["ppid"] != 1:
            continue
        try:
            if any(f.path in names for f in p.open_files()):
                found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def pg_connections(admin_url: str, application_name: str) -> int:
    """Open PostgreSQL connections whose application_name is ours."""
    eng = sa.create_engine(admin_url)
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text("select count(*) from pg_stat_activity where application_name = :a"),
                                 {"a": application_name}).scalar_one())
    finally:
        eng.dispose()


# -- agents ----------------------------------------------------------------------------------------


class Agent:
    """``shopfleet agent --config FILE`` for one node, streaming events at ``rate`` per second."""

    def __init__(self, root: Path, shop: str, node: str, dep: Deployment, *, port: int | None = None,
                 rate: float = SIZES.rate, ack: str = "broker", outbox_max: int | None = None) -> None:
        self.shop, self.node = shop, node
        d = root / f"agent-{shop}-{node}"
        d.mkdir(parents=True, exist_ok=True)
        self.outbox = d / "outbox.db"
        user, password = dep.node_user(shop, node)
        config = {
            "shop": shop, "node": node,
            "broker": {"host": "127.0.0.1", "port": port or dep.port, "username": user, "password": password,
                       "keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
            "heartbeat_interval_s": 0.5,
            "outbox": {"path": str(self.outbox), **({"max_messages": outbox_max} if outbox_max else {})},
            "uplink": {"ack": ack, "ack_timeout_s": 3.0},
            "shutdown_timeout_s": 120,
            "pipelines": [{"type": "process", "name": "ticker", "command": [sys.executable, "-c", TICKER, str(rate)]}],
        }
        self.config = d / "agent.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.config.chmod(0o600)
        self.log = d / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*_python(), "agent", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        return self

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def terminate(self, timeout: float = 180, *, signalled: bool = False) -> int:
        """SIGTERM (the outbox drains for up to shutdown_timeout_s) and wait; return the exit code."""
        assert self.proc is not None
        if not signalled:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def _ro(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=10)

    def last_seq(self) -> int:
        """The last seq this node's outbox assigned (0 before the first)."""
        if not self.outbox.exists():
            return 0
        db = self._ro()
        try:
            row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            return int(row[0]) - 1 if row else 0
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def epoch(self) -> str:
        db = self._ro()
        try:
            return str(db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
        finally:
            db.close()

    def pending(self) -> int:
        """Messages still in the outbox."""
        db = self._ro()
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# -- the registry against the truth ----------------------------------------------------------------


@dataclass
class NodeTruth:
    shop: str
    node: str
    epoch: str
    last: int  # seqs 1..last were assigned by the node's outbox


@dataclass
class Verdict:
    """The registry's view of a run against the agents' truth."""

    sent: int = 0  # seqs the outboxes assigned
    stored: int = 0  # distinct seqs with a row in the registry
    duplicates: int = 0  # rows beyond the first of one (node, epoch, seq)
    evicted: int = 0  # the registry's evicted_total
    missing_total: int = 0  # the registry's missing_total
    open_gaps: int = 0  # seqs inside the registry's open gap ranges
    redeliveries: int = 0  # the registry's duplicates_total: redelivered and dropped, never stored
    watermark_behind: int = 0  # nodes whose registry watermark is below their last seq
    epoch_mismatch: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Seqs neither stored nor reported evicted: lost."""
        return self.sent - self.stored - self.evicted

    @property
    def complete(self) -> bool:
        return self.watermark_behind == 0 and self.open_gaps == 0 and not self.epoch_mismatch

    def summary(self, scenario: str, **extra: Any) -> dict[str, Any]:
        return {"scenario": scenario, "sent": self.sent, "stored": self.stored, "missing": self.missing,
                "duplicates": self.duplicates, "evicted": self.evicted, "registry_missing_total": self.missing_total,
                "open_gaps": self.open_gaps, "redeliveries_dropped": self.redeliveries, **extra}


class Registry:
    """Reads the controllers' database directly (no API in between)."""

    def __init__(self, db_url: str) -> None:
        url = sa.engine.make_url(db_url)
        if url.get_backend_name() == "postgresql":  # not counted as the controllers' connections
            url = url.update_query_dict({"application_name": "shopfleet-chaos-reader"})
        self.engine = sa.create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def watermarks(self) -> dict[tuple[str, str], int]:
        with self.engine.connect() as c:
            try:
                rows = c.execute(sa.text("select shop_id, node_id, watermark from nodes")).all()
            except sa.exc.DBAPIError:  # not migrated yet
                return {}
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def complete_to(self, targets: dict[tuple[str, str], int]) -> bool:
        """True once every node's stream is in the registry up to its target seq, with no gap at or below it."""
        with self.engine.connect() as c:
            try:
                rows = c.execute(sa.text("select shop_id, node_id, watermark, gaps from nodes")).all()
            except sa.exc.DBAPIError:
                return False
        cursors = {(r[0], r[1]): (int(r[2]), json.loads(r[3]) if isinstance(r[3], str) else (r[3] or [])) for r in rows}
        for key, target in targets.items():
            watermark, gaps = cursors.get(key, (0, []))
            if watermark < target or any(int(a) <= target for a, _ in gaps):
                return False
        return True

    def stored_count(self) -> int:
        with self.engine.connect() as c:
            try:
                hb = c.execute(sa.text("select count(*) from heartbeats")).scalar_one()
                ev = c.execute(sa.text("select count(*) from events where kind <> 'presence'")).scalar_one()
            except sa.exc.DBAPIError:
                return 0
        return int(hb) + int(ev)

    def verdict(self, truths: Iterable[NodeTruth]) -> Verdict:
        v = Verdict()
        with self.engine.connect() as c:
            for t in truths:
                v.sent += t.last
                row = c.execute(sa.text(
                    "select epoch, watermark, gaps, missing_total, duplicates_total, evicted_total from nodes "
                    "where shop_id=:s and node_id=:n"), {"s": t.shop, "n": t.node}).one_or_none()
                if row is None:
                    v.watermark_behind += 1
                    continue
                epoch, watermark, gaps, missing_total, dups, evicted = row
                gaps = json.loads(gaps) if isinstance(gaps, str) else (gaps or [])
                if epoch != t.epoch:
                    v.epoch_mismatch.append(f"{t.shop}/{t.node}: registry {epoch}, outbox {t.epoch}")
                v.watermark_behind += int(watermark) < t.last
                v.open_gaps += sum(int(b) - int(a) + 1 for a, b in gaps)
                v.missing_total += int(missing_total)
                v.redeliveries += int(dups)
                v.evicted += int(evicted)
                counts: dict[int, int] = {}
                for table, cond in (("heartbeats", ""), ("events", " and kind <> 'presence'")):
                    for seq, n in c.execute(sa.text(
                            f"select seq, count(*) from {table} where shop_id=:s and node_id=:n and epoch=:e{cond} "
                            "group by seq"), {"s": t.shop, "n": t.node, "e": t.epoch}):
                        counts[int(seq)] = counts.get(int(seq), 0) + int(n)
                v.stored += sum(1 for s in counts if 1 <= s <= t.last)
                v.duplicates += sum(n - 1 for n in counts.values())
        return v


class Fleet:
    """Agents of one deployment; the truth is read from their outboxes once they stopped."""

    def __init__(self, root: Path, dep: Deployment, *, port: int | None = None, ack: str = "broker",
                 rate: float = SIZES.rate, outbox_max: int | None = None) -> None:
        self.agents = [Agent(root, s, n, dep, port=port, ack=ack, rate=rate, outbox_max=outbox_max) for s, n in dep.nodes]

    def start(self) -> Fleet:
        for a in self.agents:
            a.start()
        return self

    def sent_now(self) -> int:
        return sum(a.last_seq() for a in self.agents)

    def last_seqs(self) -> dict[tuple[str, str], int]:
        return {(a.shop, a.node): a.last_seq() for a in self.agents}

    def stop(self, then: Callable[[], None] | None = None) -> list[NodeTruth]:
        """SIGTERM every agent (each drains its outbox), call ``then()``; return the truth; fail if anything stayed unsent."""
        for a in self.agents:
            assert a.proc is not None and a.proc.poll() is None, f"agent {a.node} died: {a.tail()}"
            a.proc.send_signal(signal.SIGTERM)
        if then is not None:
            then()
        for a in self.agents:
            code = a.terminate(signalled=True) if a.proc else 0
            assert code == 0, f"agent {a.node} exited {code}: {a.tail()}"
        truths = [NodeTruth(a.shop, a.node, a.epoch(), a.last_seq()) for a in self.agents]
        unsent = {a.node: a.pending() for a in self.agents if a.pending()}
        assert not unsent, f"outboxes not drained at shutdown: {unsent}"
        return truths

    def cleanup(self) -> None:
        for a in self.agents:
            a.cleanup()


def caught_up(registry: Registry, targets: dict[tuple[str, str], int]) -> bool:
    """True once every node's registry watermark reached its target seq."""
    marks = registry.watermarks()
    return all(marks.get(k, 0) >= v for k, v in targets.items())


def settle(registry: Registry, truths: list[NodeTruth], timeout: float = 120) -> Verdict:
    """Wait until the registry holds every node's stream up to its last seq with no open gap; return the verdict."""
    last: list[Verdict] = []

    def done() -> bool:
        last[:] = [registry.verdict(truths)]
        return last[0].complete

    try:
        wait_for(done, timeout, "the registry to hold every seq the agents sent", interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0] if last else None}") from None
    return last[0]


def assert_exact(v: Verdict) -> None:
    """Nothing lost, nothing stored twice, and the registry's counters agree with the truth."""
    assert v.missing == 0, f"{v.missing} seqs lost (neither stored nor reported evicted): {v}"
    assert v.duplicates == 0, f"{v.duplicates} rows stored twice: {v}"
    assert v.evicted == v.sent - v.stored, f"evicted_total {v.evicted} but {v.sent - v.stored} seqs not stored: {v}"
    assert v.missing_total == 0, f"registry counts {v.missing_total} missing, the truth is 0: {v}"
    assert v.open_gaps == 0, f"registry holds {v.open_gaps} seqs in open gaps: {v}"


def report(summary: dict[str, Any]) -> None:
    """Print the scenario's one-line JSON summary (``make chaos`` shows them)."""
    print(f"\nCHAOS {json.dumps(summary)}", flush=True)
    out = os.environ.get("SHOPFLEET_CHAOS_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(summary) + "\n")
