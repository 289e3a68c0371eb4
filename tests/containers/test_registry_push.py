"""A registry that goes down mid-push: the push fails with a clear error and the tag never appears.

scripts/build_images.py pushes each index with ``buildah manifest push --all``: blobs first, the
per-arch manifests, the index under its tag last, so a push cut off half-way leaves unreferenced
blobs but no tag, and the build record (build/images/images.json) is written only after every
push succeeded. Here a TCP relay in front of a real docker-registry drops every connection after
a few megabytes of upload, as a registry dying mid-push would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shopfleet.broker import free_port
from tests.support.images import build_images_module
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/shopfleet/base:bookworm-amd64"

pytestmark = [pytest.mark.containers]


class CuttingRelay:
    """Relays TCP to ``upstream`` until ``limit`` bytes went upstream in all, then drops everything."""

    def __init__(self, upstream: int, limit: int) -> None:
        self.port = free_port()
        self.upstream = upstream
        self.limit = limit
        self.sent = 0
        self.cut = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.cut.is_set():
                c.close()
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    self.sent += len(data)
                    if self.sent > self.limit:
                        self.close()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.cut.set()
        for s in [self.sock, *self.conns]:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[int]:
    if not shutil.which("docker-registry"):
        pytest.skip("needs docker-registry")
    port = free_port()
    (tmp_path / "config.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                                         f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=20, what="docker-registry")
    yield port
    proc.terminate()
    proc.wait(10)


def test_a_registry_down_mid_push_fails_clearly_and_leaves_no_tag(registry):
    if subprocess.run(["podman", "image", "exists", BASE], capture_output=True).returncode != 0:
        pytest.skip(f"{BASE} missing: run 'make images' (it builds the base first)")
    mod = build_images_module()
    index = "localhost/shopfleet/test-push:cut"
    subprocess.run(["buildah", "manifest", "rm", index], capture_output=True)
    subprocess.run(["buildah", "manifest", "create", index], check=True, capture_output=True)
    try:
        subprocess.run(["buildah", "manifest", "add", index, f"containers-storage:{BASE}"], check=True, capture_output=True)
        relay = CuttingRelay(registry, limit=4 << 20)  # the base layer is ~40 MB compressed: cut well inside it
        with pytest.raises(mod.BuildError, match=r"pushing 127\.0\.0\.1:\d+/shopfleet/base:cut failed.*tag was not moved"):
            mod.push_index(index, f"127.0.0.1:{relay.port}/shopfleet/base:cut")
        assert relay.cut.is_set()
        # Nothing half-applied: the registry has no such tag.
        r = httpx.get(f"http://127.0.0.1:{registry}/v2/shopfleet/base/manifests/cut",
                      headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        assert r.status_code == 404
        # And the same push straight to the registry succeeds: the error was the registry's.
        digest = mod.push_index(index, f"127.0.0.1:{registry}/shopfleet/base:cut")
        assert digest.startswith("sha256:")
    finally:
        subprocess.run(["buildah", "manifest", "rm", index], capture_output=True)
