"""What the model delivery tests share: a package on disk, a controller API on a real port, a cutting proxy.

``ModelApi`` runs the controller's FastAPI app (login guard, releases and the models router) under
uvicorn on a free port, over a migrated SQLite database, so the agent's stager talks real HTTP
to the real routes. ``CutProxy`` sits between them and closes a connection after a number of
bytes, the way a flaky shop uplink does, and records each request's ``Range`` header.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import uvicorn
from argon2 import PasswordHasher
from prometheus_client import CollectorRegistry

from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.read import RegistryReader
from fleet_controller.rollout.api import build_router as rollout_router
from fleet_controller.rollout.models_store import ModelStore
from fleet_controller.rollout.signing import Signer, generate_keypair
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.app import create_app
from fleet_controller.web.models_api import ModelApiMetrics, build_router
from shopfleet.broker import free_port
from tests.support.wait import wait_for


def make_package(root: Path, name: str = "yolo-test", size: int = 300_000, seed: int = 1) -> Path:
    """Write a model package directory (model.json + model.onnx of ``size`` pseudo-random bytes)."""
    d = root / name
    d.mkdir(parents=True)
    block = b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(256))  # 8 KiB, different per seed
    (d / "model.onnx").write_bytes((block * (size // len(block) + 1))[:size])
    (d / "model.json").write_text(f'{{"format": "shopfleet-model/1", "name": "{name}", "seed": {seed}}}\n')
    return d


class ModelApi:
    """The controller API (guard, releases, models) on ``127.0.0.1:<port>`` in a thread."""

    def __init__(self, tmp_path: Path) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{tmp_path / 'controller.db'}")
        upgrade(self.engine)
        generate_keypair(tmp_path / "signing.pem")
        self.signer = Signer.from_file(tmp_path / "signing.pem")
        self.public_key_file = tmp_path / "signing.pub"
        self.registry = CollectorRegistry()
        accounts = AccountStore(self.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        accounts.add_user("ml", "ml-password-123", "ml-engineer")
        self.user_token = accounts.create_token("ml", "model-tests")
        auth = build_auth(accounts, self.registry)
        from cryptography.hazmat.primitives import serialization

        pub = serialization.load_pem_public_key(self.public_key_file.read_bytes())
        self.metrics = ModelApiMetrics(self.registry)
        app = create_app(RegistryReader(self.engine), self.registry, dependencies=[auth.dependency],
                         routers=[auth.router, rollout_router(self.engine), build_router(ModelStore(self.engine), [pub], self.metrics)])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, timeout=20, what="uvicorn started")

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.dispose()


class CutProxy:
    """A TCP proxy to ``upstream_port`` that closes the n-th connection after ``cuts[n]`` response bytes.

    ``cuts`` lists, per connection in order, how many bytes of the upstream's answer (headers
    included) to pass before closing both sides; connections beyond the list pass everything.
    ``ranges`` records each request's Range header (None when absent).
    """

    def __init__(self, upstream_port: int, cuts: list[int]) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.ranges: list[str | None] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            cut = self.cuts.pop(0) if self.cuts else None
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        with client, up:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(65536)
                if not chunk:
                    return
                request += chunk
            headers = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            self.ranges.append(next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("range:")), None))
            up.sendall(request)
            sent = 0
            while True:
                data = up.recv(65536)
                if not data:
                    return
                if cut is not None and sent + len(data) >= cut:
                    client.sendall(data[: cut - sent])
                    time.sleep(0.05)
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self._stop = True
        self._sock.close()
