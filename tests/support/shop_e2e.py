"""A shop as deployed, for end-to-end tests of one ``shopfleet agent`` process on its shop broker.

* :class:`SecuredShopBroker`: a Mosquitto with the password file and the ACL that
  ``shopfleet broker-config --shop-broker`` writes for a shop broker
  (``fleet_controller.broker_config.render_shop_acl``: one node user per pipeline connection, as
  docs/fusion.md says), plus one read-only user standing in for the bridge to the central broker
  (the bridge connects *out* of the shop broker, so the generated ACL has no user for it).
* :class:`MjpegServer`: ceiling cameras as HTTP MJPEG streams (what ``cv2.VideoCapture`` reads from
  an IP camera), every stream showing frame ``k`` of its clip at the same moment (one clock), so
  overlapping cameras see the same instant. A stream can be cut, as a camera that dies.
* :class:`Controller`: the controller side of the uplink, a subscriber as the bridge user that
  parses what the agent sent (heartbeats, events) with the protocol's own parser.
* :class:`AgentProc`: ``python -m shopfleet agent --config FILE`` as a child process.
"""

from __future__ import annotations

import http.server
import os
import re
import secrets
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.protocol import Event, Heartbeat, ProtocolError, encode, parse_message
from fleet_controller.broker_config import node_username, render_password_file, render_shop_acl
from shopfleet.broker import BrokerProcess

BRIDGE_USER = "bridge-standin"


class SecuredShopBroker:
    """Mosquitto with the generated shop ACL: ``creds(node)`` gives a node user's ``broker:`` keys."""

    def __init__(self, workdir: Path, shop: str, nodes: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.shop = shop
        self.passwords = {node_username(shop, n): secrets.token_hex(8) for n in nodes}
        self.passwords[BRIDGE_USER] = secrets.token_hex(8)
        (workdir / "passwd").write_text(render_password_file(self.passwords))
        # The generated ACL, and the bridge's view of it: everything of the fleet/v1 tree, read only.
        acl = render_shop_acl(shop, nodes) + f"\nuser {BRIDGE_USER}\ntopic read fleet/v1/#\n"
        (workdir / "acl").write_text(acl)
        (workdir / "data").mkdir(exist_ok=True)
        self.broker = BrokerProcess(workdir=workdir / "data", engine="mosquitto", password_file=workdir / "passwd", acl_file=workdir / "acl")
        self.broker.start()
        self.port = self.broker.port

    def creds(self, node: str, **extra: Any) -> dict[str, Any]:
        """Return the ``broker:`` config of a node user of this shop."""
        user = node_username(self.shop, node)
        return {"host": "127.0.0.1", "port": self.port, "username": user, "password": self.passwords[user], **extra}

    def settings(self, user: str, client_id: str) -> MqttSettings:
        return MqttSettings(host="127.0.0.1", port=self.port, client_id=client_id, username=user, password=self.passwords[user])

    def cleanup(self) -> None:
        self.broker.cleanup()


class MjpegServer:
    """HTTP MJPEG streams ``/NAME.mjpg`` of JPEG frames, all on one clock at ``fps``, looping."""

    def __init__(self, streams: dict[str, list[bytes]], fps: float) -> None:
        self.streams = streams
        self.fps = fps
        self.t0: float | None = None  # the clock starts at the first request, so the first viewer sees frame 0
        self.cut: set[str] = set()
        self.served: dict[str, int] = dict.fromkeys(streams, 0)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.strip("/").split(".")[0]
                if name not in outer.streams or name in outer.cut:
                    self.send_error(404)
                    return
                if outer.t0 is None:
                    outer.t0 = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                frames, last = outer.streams[name], -1
                try:
                    while name not in outer.cut:
                        k = int((time.monotonic() - outer.t0) * outer.fps)
                        if k == last:
                            time.sleep(max(0.0, outer.t0 + (k + 1) / outer.fps - time.monotonic()))
                            continue
                        last = k
                        jpg = frames[k % len(frames)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpg), jpg))
                        outer.served[name] += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.mjpg"

    def kill(self, name: str) -> None:
        """Cut the stream and refuse new requests for it: the camera is dead."""
        self.cut.add(name)

    def close(self) -> None:
        self.cut.update(self.streams)
        self.httpd.shutdown()
        self.httpd.server_close()


class Controller:
    """Everything the agents of a shop send upstream, as the bridge user sees it on the shop broker."""

    def __init__(self, shop: SecuredShopBroker) -> None:
        self.lock = threading.Lock()
        self.messages: list[Any] = []
        self.rejected: list[str] = []
        self.link = ThreadedLink(shop.settings(BRIDGE_USER, "bridge-standin"), self._on, subscriptions=(f"fleet/v1/{shop.shop}/+/+",))
        self.link.start()
        self.link.wait_connected(10)

    def _on(self, msg: Any) -> None:
        try:
            m = parse_message(msg.topic, msg.payload)
        except ProtocolError as exc:
            with self.lock:
                self.rejected.append(f"{msg.topic}: {exc}")
            return
        with self.lock:
            self.messages.append(m)

    def heartbeats(self, node: str) -> list[Heartbeat]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, Heartbeat) and m.node == node]

    def events(self, type_: str, source: str | None = None) -> list[Event]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, Event) and m.type == type_ and (source is None or m.source == source)]

    def close(self) -> None:
        self.link.stop()


class Listener:
    """A node user's subscriber on the shop broker that records ``(topic, payload)``."""

    def __init__(self, shop: SecuredShopBroker, node: str, topics: tuple[str, ...]) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[str, bytes]] = []
        self.link = ThreadedLink(shop.settings(node_username(shop.shop, node), f"{node}-listener"), self._on, subscriptions=topics)
        self.link.start()
        self.link.wait_connected(10)

    def _on(self, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def take(self) -> list[tuple[str, bytes]]:
        """Return what arrived so far and start over."""
        with self.lock:
            out, self.got = self.got, []
        return out

    def close(self) -> None:
        self.link.stop()


def publish_event(shop: SecuredShopBroker, node: str, seq: int, type_: str, source: str, data: dict[str, Any]) -> None:
    """Publish one event as ``node``'s agent would (QoS 1, with the node's own user)."""
    from edge_agent.protocol import Topics

    user = node_username(shop.shop, node)
    link = ThreadedLink(shop.settings(user, f"{node}-test"), lambda m: None)
    link.start()
    try:
        link.wait_connected(10)
        body = encode(Event(shop=shop.shop, node=node, epoch="e2e", seq=seq, type=type_, source=source, data=data))
        link.publish_sync(Topics.node(shop.shop, node, "events"), body, qos=1)
    finally:
        link.stop()


class AgentProc:
    """One ``python -m shopfleet agent`` child with ``config`` written to ``workdir/agent.yaml``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.config_file = workdir / "agent.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log = workdir / "agent.log"
        self.metrics_port = config.get("metrics", {}).get("port", 0)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "shopfleet", "agent", "--config", str(self.config_file)], stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Return the agent's /metrics samples as {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


FLOOR_DETAIL = re.compile(r"(\d+)/(\d+) cameras live, (\d+) ticks")
FUSION_DETAIL = re.compile(r"(\d+) shoppers inside")


def floor_detail(detail: str) -> tuple[int, int, int] | None:
    """Return (cameras live, cameras, ticks) from a floor pipeline's health detail."""
    m = FLOOR_DETAIL.search(detail)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None
