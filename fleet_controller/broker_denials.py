"""Count what Mosquitto refuses, by identity, from its log: ``shopfleet broker-denials``.

Mosquitto drops a publish its ACL refuses and tells nobody but its log: an MQTT 3.1.1 publisher
still gets a plain PUBACK, the controller never sees the message, and an attacker does not
report itself. Mosquitto 2.0 writes one line per refused publish, at ``log_type debug`` only::

    1795989758: Denied PUBLISH from shop-a.pi-1 (d0, q1, r0, m1, 'fleet/v1/shop-b/pi-1/telemetry', ... (1 bytes))

and a connection refused for its credentials at ``notice``::

    1795989759: Client <unknown> disconnected, not authorised.

This module reads that log (a file it follows across rotation, or standard input, e.g. the
broker's own stdout piped in), and:

* counts refused publishes by username and client id
  (``shopfleet_broker_denied_publishes_total{username,client_id}``; every listener that
  ``broker-config`` writes sets ``use_username_as_clientid``, so the client id in the line *is*
  the authenticated identity, and the ``New client connected ... u'USER'`` line confirms it);
* counts refused connections (``shopfleet_broker_refused_connections_total{reason}``), for
  which the broker knows no identity, only the address;
* logs each identity's first denial at WARNING with the topic, and a summary per identity at
  most once per ``summary_interval_s``;
* optionally forwards that summary to the controller as a security event (``POST
  /api/v1/security-events``, the same receiver Falco uses), so it opens an alert
  ``security:mqtt_publish_denied`` on the dashboard for the node's shop.

Mosquitto 2.0.11 accepts a SUBSCRIBE to a topic filter its ACL does not allow to be read (the
SUBACK grants it) and then simply never delivers: there is no "Denied SUBSCRIBE" line to count
(checked on this version). What a node may not read, it never gets.

Label cardinality is bounded (:data:`MAX_IDENTITIES`): past it, new identities are counted under
``username="_other"`` so a flood of made-up client ids cannot exhaust memory.

Only the standard library and ``prometheus_client`` are used, so the sidecar runs from the agent
image next to a shop's broker as well as next to the central one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

MAX_IDENTITIES = 10_000
"""Most (username, client id) label pairs kept; beyond, new ones count as ``_other``."""
OTHER = "_other"
UNKNOWN = "_unknown"
RULE = "MQTT publish denied"
"""The security event's rule: the controller turns it into alert rule ``security:mqtt_publish_denied``."""

_TS = r"^(?:\d+: )?"
DENIED_PUBLISH = re.compile(_TS + r"Denied PUBLISH from (?P<client>\S+) \(d\d, q(?P<qos>\d), r(?P<retain>\d), m\d+, '(?P<topic>[^']*)', \.\.\. \((?P<bytes>\d+) bytes\)\)")
CONNECTED = re.compile(_TS + r"New client connected from (?P<address>\S+) as (?P<client>\S+) \((?P<flags>[^)]*)\)\.")
NOT_AUTHORISED = re.compile(_TS + r"Client (?P<client>\S+) disconnected, not authorised\.")
TLS_ERROR = re.compile(_TS + r"OpenSSL Error\[0\]: (?P<detail>.*)")
"""A handshake that failed after the broker accepted the socket (the address is on the line before)."""
TLS_ACCEPT_FAILED = re.compile(_TS + r"Client connection from (?P<address>\S+) failed: (?P<detail>.*?)\.?$")
"""A handshake that failed within the accept itself (the client's hello and certificate had already
arrived): Mosquitto then logs this line instead of ``New connection from`` and ``OpenSSL Error``."""
HANDSHAKE_ABORTED = "unexpected eof"
"""OpenSSL's word for a client that hung up mid-handshake (a TCP probe, a port scan): not a refusal."""
NEW_CONNECTION = re.compile(_TS + r"New connection from (?P<address>\S+) on port (?P<port>\d+)\.")
_USER = re.compile(r"u'(?P<user>[^']*)'")
PACKET_TRACE = re.compile(_TS + r"(?:(?:Received|Sending) [A-Z]+ |\t|\S+ [012] \S+$|No will message specified\.)")
"""The per-packet lines ``log_type debug`` adds (PUBLISH, PUBACK, PINGREQ... in and out, each
subscription's filter); ``--echo no-packets`` leaves them out so the broker's own log stays readable."""


def is_packet_trace(line: str) -> bool:
    """Return whether ``line`` is one of debug's per-packet lines (never a denial, connection or error line)."""
    return "Denied " not in line and PACKET_TRACE.match(line) is not None


@dataclass(frozen=True)
class Denial:
    """One refused publish, as the broker logged it."""

    client_id: str
    username: str
    topic: str
    qos: int
    retain: bool
    size: int
    address: str = ""


@dataclass(frozen=True)
class Refusal:
    """One refused connection: ``reason`` is ``not_authorised`` (credentials) or ``tls`` (handshake)."""

    reason: str
    address: str = ""
    detail: str = ""


@dataclass
class _Identity:
    username: str
    address: str = ""


@dataclass
class _Pending:
    count: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    client_id: str = ""
    address: str = ""


class DenialMetrics:
    """The sidecar's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.denied = Counter(
            "shopfleet_broker_denied_publishes_total",
            "Publishes the broker's ACL refused (from its log), by the publisher's username and client id.",
            ["username", "client_id"], registry=r,
        )
        self.refused = Counter(
            "shopfleet_broker_refused_connections_total",
            "Connections the broker refused (from its log), by reason: not_authorised (credentials), tls (handshake).",
            ["reason"], registry=r,
        )
        self.lines = Counter("shopfleet_broker_log_lines_total", "Broker log lines read.", registry=r)
        self.last_denial = Gauge(
            "shopfleet_broker_last_denied_publish_timestamp_seconds", "Unix time of the last refused publish seen (0: none yet).", registry=r,
        )
        self.forwarded = Counter(
            "shopfleet_broker_denial_reports_total",
            "Denial summaries sent to the controller, by outcome (sent, failed).", ["outcome"], registry=r,
        )


def shop_node_of(username: str) -> tuple[str, str]:
    """Return (shop, node) of a node username ``<shop>.<node>`` (a bridge's node is ``_bridge``); ("", "") for others."""
    shop, dot, node = username.partition(".")
    return (shop, node) if dot and shop and node else ("", "")


class DenialWatcher:
    """Parse broker log lines, count denials and refusals, and hand summaries to ``report``.

    Feed it lines with :meth:`feed` (thread-unsafe: one reader thread); :meth:`flush` emits the
    summaries that are due (called by :meth:`feed` and by the sidecar's timer).
    """

    def __init__(
        self,
        metrics: DenialMetrics,
        *,
        report: Callable[[dict[str, object]], None] | None = None,
        summary_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.report = report
        self.summary_interval_s = summary_interval_s
        self.clock = clock
        self.identities: dict[str, _Identity] = {}
        self._labels: set[tuple[str, str]] = set()
        self._pending: dict[str, _Pending] = {}
        self._warned: set[str] = set()
        self._last_flush = clock()
        self._last_address = ""
        self._lock = threading.Lock()
        self.denials = 0

    def feed(self, line: str) -> Denial | Refusal | None:
        """Take one log line; return what it meant (or None)."""
        self.metrics.lines.inc()
        line = line.rstrip("\r\n")
        if "Denied PUBLISH" in line and (m := DENIED_PUBLISH.match(line)):
            ident = self.identities.get(m["client"])
            d = Denial(m["client"], ident.username if ident else m["client"], m["topic"], int(m["qos"]), m["retain"] == "1",
                       int(m["bytes"]), ident.address if ident else "")
            self._count(d)
            return d
        if "New client connected" in line and (m := CONNECTED.match(line)):
            u = _USER.search(m["flags"])
            if len(self.identities) >= MAX_IDENTITIES:
                self.identities.clear()  # a new connection line comes with every reconnect
            self.identities[m["client"]] = _Identity(u["user"] if u else UNKNOWN, m["address"])
            return None
        if "New connection from" in line and (m := NEW_CONNECTION.match(line)):
            self._last_address = m["address"]
            return None
        if "not authorised" in line and (m := NOT_AUTHORISED.match(line)):
            self.metrics.refused.labels("not_authorised").inc()
            return Refusal("not_authorised", self._last_address)
        if "OpenSSL Error" in line and (m := TLS_ERROR.match(line)):
            return self._tls_refusal(self._last_address, m["detail"])
        if "Client connection from" in line and (m := TLS_ACCEPT_FAILED.match(line)):
            return self._tls_refusal(m["address"], m["detail"])
        return None

    def _tls_refusal(self, address: str, detail: str) -> Refusal | None:
        if HANDSHAKE_ABORTED in detail:
            return None
        self.metrics.refused.labels("tls").inc()
        return Refusal("tls", address, detail)

    def _count(self, d: Denial) -> None:
        key = (d.username, d.client_id)
        if key not in self._labels:
            if len(self._labels) >= MAX_IDENTITIES:
                key = (OTHER, OTHER)
            self._labels.add(key)
        self.metrics.denied.labels(*key).inc()
        self.metrics.last_denial.set(self.clock())
        self.denials += 1
        if d.username not in self._warned:
            self._warned.add(d.username)
            log.warning(
                "broker refused a publish by %s (client id %s%s) to %r: a node publishing where it may not is "
                "compromised or misconfigured; further denials of this identity are summarised every %.0fs",
                d.username, d.client_id, f" from {d.address}" if d.address else "", d.topic, self.summary_interval_s,
            )
        with self._lock:
            p = self._pending.get(d.username)
            if p is None:
                if len(self._pending) >= MAX_IDENTITIES:
                    return
                p = self._pending[d.username] = _Pending(first=self.clock(), client_id=d.client_id, address=d.address)
            p.count += 1
            if len(p.topics) < 20 or d.topic in p.topics:
                p.topics[d.topic] = p.topics.get(d.topic, 0) + 1
        self.flush()

    def flush(self, *, force: bool = False) -> list[dict[str, object]]:
        """Emit the summaries of every identity with denials since the last flush, if one is due; return them."""
        now = self.clock()
        with self._lock:
            if not self._pending or (not force and now - self._last_flush < self.summary_interval_s):
                return []
            pending, self._pending = self._pending, {}
            self._last_flush = now
        out = [self.summary(user, p, now) for user, p in sorted(pending.items())]
        for s in out:
            log.warning("%s", s["output"])
            if self.report is not None:
                self.report(s)
        return out

    @staticmethod
    def summary(username: str, p: _Pending, now: float) -> dict[str, object]:
        """Return a summary as a Falco-shaped security event (what ``POST /api/v1/security-events`` takes)."""
        shop, node = shop_node_of(username)
        topics = ", ".join(f"{t} ({n})" for t, n in sorted(p.topics.items(), key=lambda kv: -kv[1])[:5])
        output = (f"broker refused {p.count} publish(es) by {username} (client id {p.client_id}"
                  f"{', from ' + p.address if p.address else ''}) since {datetime.fromtimestamp(p.first, UTC).isoformat()}: {topics}")
        fields: dict[str, object] = {"mqtt.username": username, "mqtt.client_id": p.client_id, "mqtt.denied": p.count,
                                     "mqtt.topics": sorted(p.topics)[:20], "mqtt.address": p.address}
        if shop:
            fields["shopfleet.shop"] = shop
        return {"output": output[:8000], "priority": "Warning", "rule": RULE, "time": datetime.fromtimestamp(now, UTC).isoformat(),
                "hostname": node if node and not node.startswith("_") else "", "output_fields": fields}


class ControllerReporter:
    """POST each summary to the controller's security-event receiver with an API token (role security-ingest)."""

    def __init__(self, url: str, token: str, metrics: DenialMetrics, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.metrics = metrics
        self.timeout_s = timeout_s

    def __call__(self, event: dict[str, object]) -> None:
        """Send one event; a failure is logged and counted, never raised (the counts stay in the metrics)."""
        req = urllib.request.Request(self.url, data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
            self.metrics.forwarded.labels("sent").inc()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.metrics.forwarded.labels("failed").inc()
            log.error("cannot send the denial summary to %s: %s; the counts stay in this sidecar's metrics", self.url, exc)


def follow(path: Path, *, stop: threading.Event, poll_s: float = 0.25, from_start: bool = False, truncate_at: int = 0) -> Iterator[str]:
    """Yield lines appended to ``path``, like ``tail -F``: waits for the file, reopens it after rotation or truncation.

    ``truncate_at`` > 0: once everything is read and the file is larger, truncate it to zero (the
    broker opens its log in append mode, so it goes on writing at the new end). That bounds a debug
    log nobody rotates (a Kubernetes emptyDir) at the cost of the lines written in the instant
    between the last read and the truncation.
    """
    f: IO[str] | None = None
    ino = -1
    buf = ""
    try:
        while not stop.is_set():
            if f is None:
                try:
                    f = open(path, errors="replace")  # noqa: SIM115 - kept open across iterations
                except FileNotFoundError:
                    stop.wait(poll_s)
                    continue
                ino = os.fstat(f.fileno()).st_ino
                if not from_start:
                    f.seek(0, os.SEEK_END)
                from_start = True  # a rotated-in file is read from its start
            chunk = f.read(65536)
            if chunk:
                buf += chunk
                *lines, buf = buf.split("\n")
                yield from lines
                continue
            if truncate_at and f.tell() >= truncate_at:
                with contextlib.suppress(OSError):
                    os.truncate(path, 0)
                    log.info("truncated %s after reading %d bytes (--truncate-at)", path, f.tell())
                f.seek(0)
                continue
            try:
                st = os.stat(path)
                rotated = st.st_ino != ino or st.st_size < f.tell()
            except FileNotFoundError:
                rotated = True
            if rotated:
                f.close()
                f = None
                buf = ""
                continue
            stop.wait(poll_s)
    finally:
        if f is not None:
            f.close()


def run(lines: Iterable[str], watcher: DenialWatcher, *, stop: threading.Event, echo: IO[str] | None = None, echo_packets: bool = True) -> None:
    """Feed ``lines`` to ``watcher`` until they end or ``stop`` is set; ``echo`` passes lines through (``echo_packets``
    False: all but the per-packet trace), so the broker's log stays visible."""
    def timer() -> None:
        while not stop.wait(min(watcher.summary_interval_s, 5.0)):
            watcher.flush()

    t = threading.Thread(target=timer, name="denial-summaries", daemon=True)
    t.start()
    try:
        for line in lines:
            if echo is not None and (echo_packets or not is_packet_trace(line)):
                echo.write(line if line.endswith("\n") else line + "\n")
                with contextlib.suppress(OSError):
                    echo.flush()
            watcher.feed(line)
            if stop.is_set():
                break
    finally:
        stop.set()
        watcher.flush(force=True)


def stdin_lines() -> Iterator[str]:
    """Yield standard input's lines (the broker's output piped in)."""
    yield from sys.stdin
