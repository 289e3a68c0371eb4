"""A TCP proxy whose link can be cut: the uplink between agents and the broker, for the chaos tier.

``ChaosProxy(target_port).start()`` listens on a free port of its own and forwards every
connection to ``127.0.0.1:target_port`` on an asyncio loop in a thread. ``cut()`` makes the link
fail the way a WAN link does, according to ``mode``:

* ``"blackhole"`` (default): every open connection stays open but nothing crosses any more, and
  new connections are accepted and then hear nothing: the agents notice only through their MQTT
  keepalive and connect timeouts, the broker through its own keepalive (then it sends the Wills);
* ``"reset"``: open connections are closed and new ones refused (a router that answers).

``restore()`` closes whatever the cut left hanging and forwards again, on the same port.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

from shopfleet.broker import free_port

Mode = Literal["blackhole", "reset"]


class ChaosProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``; cut and restore the link on demand."""

    def __init__(self, target_port: int, *, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.cut_mode: Mode | None = None
        self.connections = 0  # accepted since start (a reconnecting agent counts again)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control (any thread) -------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self, mode: Mode = "blackhole") -> None:
        """Stop forwarding (see the module docstring for the two modes)."""
        self._call(self._cut(mode))

    def restore(self) -> None:
        """Close what the cut left hanging and forward new connections again."""
        self._call(self._restore())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close_all(stop_listening=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    # -- the loop -------------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self, mode: Mode) -> None:
        self.cut_mode = mode
        if mode == "reset":
            await self._close_all(stop_listening=True)

    async def _restore(self) -> None:
        was = self.cut_mode
        self.cut_mode = None
        await self._close_all(stop_listening=False)
        if was == "reset" or self._server is None:
            await self._listen()

    async def _close_all(self, *, stop_listening: bool) -> None:
        if stop_listening and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        for t in list(self._pipes):
            t.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self.cut_mode is not None:
            return  # blackhole: accepted, never answered; restore() closes it
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                while self.cut_mode == "blackhole":  # hold (and so drop) everything while cut
                    await asyncio.sleep(0.05)
                    data = b""
                if data:
                    dst.write(data)
                    await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)
