"""A fault-injecting TCP proxy for tests: a server made unreachable without being stopped.

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/db"
        ...
        proxy.cut()        # every open connection is reset, new ones are reset on arrival
        proxy.restore()    # connections go through again
        proxy.blackhole()  # a partition: nothing is refused, nothing gets through either

The proxy runs its own event loop in a thread, so it keeps forwarding while the test blocks
(on a subprocess, a sleep or a synchronous client), and `cut()` takes effect before it returns.
It counts connection attempts, so a test can tell a client that backs off from one that hammers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tests.servers import Started

T = TypeVar("T")
_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    accepted: int = 0  # connections forwarded to the target
    refused: int = 0  # connections reset on arrival while cut
    severed: int = 0  # open connections reset by cut()
    refused_at: list[float] = field(default_factory=list)  # time.monotonic() of each refusal


class FaultProxy(Started):
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.stats = ProxyStats()
        self._cut = False
        self._blackhole = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def is_cut(self) -> bool:
        return self._cut

    # -- control, from any thread -------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        self._call(self._listen())

    def cut(self) -> None:
        """Reset every open connection and every new one until `restore()`."""
        self._call(self._sever())

    def blackhole(self) -> None:
        """Swallow every byte, both ways, on open and new connections alike, without closing
        anything: what a client sees when the network between it and the server is cut.
        `restore()` then resets the connections that were swallowed, as a peer that forgot
        them would, and lets new ones through."""
        self._call(self._swallow())

    def restore(self, *, reset: bool = True) -> None:
        """Let traffic through again. `reset=False`: the swallowed connections live on, as when
        the network comes back before either end gave up on them (what they sent meanwhile
        stays lost)."""
        self._call(self._heal(reset))

    def close(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def refusals_between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.stats.refused_at) if start <= t <= end)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "the proxy is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    # -- the proxy, on its own loop -------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            self.stats.refused += 1
            self.stats.refused_at.append(time.monotonic())
            client_w.transport.abort()
            return
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        if self._cut:  # cut while connecting
            upstream_w.transport.abort()
            client_w.transport.abort()
            return
        self.stats.accepted += 1
        pair = (client_w, upstream_w)
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(client_r, upstream_w)),
            asyncio.create_task(self._pump(upstream_r, client_w)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                if self._blackhole:
                    continue  # lost on the way
                writer.write(data)
                await writer.drain()

    async def _sever(self) -> None:
        self._cut = True
        for pair in list(self._pairs):
            self.stats.severed += 1
            for w in pair:
                w.transport.abort()  # RST, as when the server's host or the network goes away

    async def _swallow(self) -> None:
        self._blackhole = True

    async def _heal(self, reset: bool) -> None:
        if self._blackhole:
            self._blackhole = False
            if reset:
                await self._sever()  # the swallowed connections are dead: reset them
        self._cut = False

    async def _shutdown(self) -> None:
        await self._sever()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()
