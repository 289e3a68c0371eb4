"""What the security tests share: brokers run from the generated config, real paho clients that record what happens, TLS files of a CN."""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import signal
import ssl
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from fleet_controller.broker_config import BrokerFiles, BrokerOptions
from fleet_controller.pki import Pki
from shopfleet.broker import wait_for_port
from tests.support.wait import wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


PAIRS = [("shop-a", "pi-1"), ("shop-a", "pi-2"), ("shop-b", "pi-1")]


def broker_owner() -> str | None:
    """Return the user the broker must be able to read files as, when this differs from us."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return None  # Mosquitto then runs as 'nobody'... which the generated files do not cater for
    return "mosquitto"


class GeneratedBroker:
    """``mosquitto -c <generated conf>`` as a child process; restartable; its log kept for failures."""

    def __init__(self, conf: Path, ports: list[int], workdir: Path) -> None:
        self.conf = conf
        self.ports = ports
        self.log_path = workdir / f"{conf.parent.name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> GeneratedBroker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for port in self.ports:
                wait_for_port("127.0.0.1", port, 15, self.proc)
        except Exception as exc:
            self.stop()
            raise AssertionError(f"mosquitto -c {self.conf} did not start: {self.log()[-3000:]}") from exc
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Deployment:
    """A generated central broker (and shop brokers) in a temporary deploy directory."""

    root: Path
    pki: Pki
    files: BrokerFiles
    options: BrokerOptions
    brokers: list[GeneratedBroker] = field(default_factory=list)

    @property
    def creds(self) -> dict:
        import json

        return json.loads(self.files.credentials_file.read_text())

    def central(self) -> GeneratedBroker:
        ports = [p for p in (self.options.port, self.options.tls_port if self.files.tls else 0) if p]
        b = GeneratedBroker(self.files.conf_file, ports, self.root)
        self.brokers.append(b)
        return b.start()

    def shop(self, shop: str) -> GeneratedBroker:
        ports = [p for p in (self.options.shop_port, self.options.shop_tls_port) if p]
        b = GeneratedBroker(self.files.shop_dirs[shop] / "mosquitto.conf", ports, self.root)
        self.brokers.append(b)
        return b.start()


class Client:
    """A real paho client that records connects, disconnects and what it receives."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: tuple[Path, Path | None, Path | None] | None = None,
        clean_session: bool = True,
        connect: bool = True,
    ) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connacks: list = []
        self.disconnects: list = []
        self.subacks: list = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", clean_session=clean_session)
        self.c.max_queued_messages_set(0)
        if username is not None:
            self.c.username_pw_set(username, password)
        if tls is not None:
            ca, cert, key = tls
            self.c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.append(rc)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.append(rcs)
        self.port = port
        if connect:
            self.connect()

    def connect(self) -> Client:
        """Connect and wait for the CONNACK (which may be a refusal: see ``refused``)."""
        n = len(self.connacks)
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        wait_for(lambda: len(self.connacks) > n or self.disconnects, what="CONNACK")
        return self

    @property
    def accepted(self) -> bool:
        return bool(self.connacks) and not self.connacks[-1].is_failure and not self.disconnects

    def subscribe(self, topic: str) -> None:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def received_until(self, marker_topic: str, timeout: float = 10) -> list[tuple[str, bytes]]:
        """Return everything received up to and including the marker message."""
        out = []
        while True:
            item = self.got.get(timeout=timeout)
            out.append(item)
            if item[0] == marker_topic:
                return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def tls_of(dep: Deployment, cn: str) -> tuple[Path, Path, Path]:
    """Return (ca, cert, key) of ``cn`` from the deployment's PKI."""
    return dep.pki.ca_cert_path, dep.pki.cert_path(cn), dep.pki.key_path(cn)

