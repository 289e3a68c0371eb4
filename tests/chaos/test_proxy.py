"""The chaos tier's TCP proxy does what its cuts promise (against a real echo server on loopback)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.support.chaos_proxy import ChaosProxy
from tests.support.wait import wait_for


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[ChaosProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p = ChaosProxy(server.server_address[1]).start()
    yield p
    p.close()
    server.shutdown()
    server.server_close()


def _echo(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(65536)


def test_forwards_both_ways(proxy):
    assert _echo(proxy.port, b"hello") == b"hello"


def test_blackhole_accepts_but_nothing_crosses_until_restored(proxy):
    open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    open_conn.sendall(b"before")
    assert open_conn.recv(100) == b"before"
    proxy.cut("blackhole")
    open_conn.sendall(b"during")
    with pytest.raises(TimeoutError):
        open_conn.recv(100)  # the open connection went silent
    with pytest.raises(TimeoutError):
        _echo(proxy.port, b"new", timeout=0.5)  # a new one is accepted, then hears nothing
    proxy.restore()
    assert open_conn.recv(100) == b""  # what the cut held is closed on restore
    open_conn.close()
    assert _echo(proxy.port, b"after") == b"after"


def test_reset_refuses_until_restored(proxy):
    open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    open_conn.sendall(b"before")
    assert open_conn.recv(100) == b"before"  # the proxy holds this connection (not just the kernel's backlog)
    proxy.cut("reset")

    def closed() -> bool:
        try:
            return open_conn.recv(100) == b""
        except ConnectionResetError:  # closed with a reset: as closed as an orderly close
            return True
        except TimeoutError:  # not yet
            return False

    wait_for(closed, 5, "the open connection to be closed")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    proxy.restore()
    assert _echo(proxy.port, b"back") == b"back"
