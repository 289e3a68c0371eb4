"""A local MQTT broker as a child process, for the demo and the tests.

Production shops and the central site run a real broker (Mosquitto, EMQX, HiveMQ, VerneMQ or a
cloud IoT broker). For ``shopfleet demo`` and for tests that must stop, restart or configure a
broker, this module starts one of our own on a free loopback port: Mosquitto when the
``mosquitto`` binary is installed (it is what shops run), else the pure-Python amqtt broker so
that the demo still works on a machine with nothing but Python.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; raise ``TimeoutError`` naming the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class BrokerProcess:
    """An MQTT broker child process on a loopback port; restartable on the same port.

    ``password_file`` and ``acl_file`` (as written by ``shopfleet broker-config``) switch
    Mosquitto to authenticated mode; amqtt ignores them (it cannot enforce our ACL).

    ``delivery`` replaces the test harness's persistence, queue and in-flight lines (the harness
    keeps 100 QoS 1 messages in flight per client) with others, such as those a written config
    holds (:func:`fleet_controller.broker_config.persistence_lines`); they must name a
    ``persistence_location`` of their own.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        engine: str = "auto",
        password_file: str | os.PathLike | None = None,
        acl_file: str | os.PathLike | None = None,
        extra_config: str = "",
        workdir: str | os.PathLike | None = None,
        delivery: Sequence[str] | None = None,
    ) -> None:
        if engine not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"unknown broker engine {engine!r}: use auto, mosquitto or amqtt")
        mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if engine == "auto":
            engine = "mosquitto" if mosquitto else "amqtt"
        if engine == "mosquitto" and not mosquitto:
            raise FileNotFoundError("mosquitto is not installed: apt-get install mosquitto, or use engine='amqtt'")
        self.engine = engine
        self._mosquitto = mosquitto
        self.host = host
        self.port = port or free_port(host)
        self.password_file = password_file
        self.acl_file = acl_file
        self.extra_config = extra_config
        self.delivery = list(delivery) if delivery is not None else None
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shopfleet-broker-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Return ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def _write_config(self) -> list[str]:
        log_path = self.workdir / "broker.log"
        if self.engine == "mosquitto":
            delivery = self.delivery if self.delivery is not None else [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
                "max_queued_messages 100000",
                "max_inflight_messages 100",
            ]
            lines = [
                f"listener {self.port} {self.host}",
                *delivery,
                "log_dest stderr",
                "log_type error",
                "log_type warning",
            ]
            if hasattr(os, "geteuid") and os.geteuid() == 0 and "user " not in self.extra_config:
                # Started as root, Mosquitto drops to the 'mosquitto' user, which cannot write its
                # persistence file in our private directory: a restart would then lose retained
                # messages and queued sessions, which is exactly what outage tests exercise.
                lines.append("user root")
            if self.password_file:
                lines += ["allow_anonymous false", f"password_file {self.password_file}"]
            else:
                lines.append("allow_anonymous true")
            if self.acl_file:
                lines.append(f"acl_file {self.acl_file}")
            if self.extra_config:
                lines.append(self.extra_config)
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [self._mosquitto, "-c", str(conf)]  # type: ignore[list-item]
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        del log_path
        amqtt = Path(sys.executable).with_name("amqtt")
        cmd = [str(amqtt)] if amqtt.exists() else [sys.executable, "-m", "amqtt.scripts.broker_script"]
        return [*cmd, "-c", str(conf)]

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        """Start the broker and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = self._write_config()
        self._log = open(self.workdir / "broker.log", "ab")  # noqa: SIM115 - the child writes to it until stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.engine} failed to start; its log: {(self.workdir / 'broker.log').read_text()[-2000:]}") from exc
        log.info("%s broker listening on %s:%s", self.engine, self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        self._log.close()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the broker, stay down ``down_for`` seconds, start it again on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        """Stop the broker and delete its working directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
