"""The sidecar's HTTP port: Prometheus metrics, liveness and readiness."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

if TYPE_CHECKING:
    from worker.runtime import Runtime


# Each check's bound, and so the longest /readyz takes: under the 2 s the README promises,
# with room for the answer's own way back.
READY_TIMEOUT_S = 1.5


class ReadinessCheck:
    """One readiness check of one server, answered within `READY_TIMEOUT_S`.

    A pooled connection that the network cut off took as long again as the timeout to be
    given back after it (the first probe answered after 4 s, measured behind a proxy that
    swallows every byte): the answer does not wait for that. The check runs as a task of its
    own. Probes that arrive while it is within its time share it rather than piling up more;
    one past its time is only cleaning up, and its answer would be old (a server back by now
    would still read as down), so the next probe starts a fresh check."""

    def __init__(self, check: Callable[[], Awaitable[object]]) -> None:
        self._check = check
        self._task: asyncio.Task[object] | None = None
        self._started = 0.0

    async def problem(self) -> str | None:
        """None when the server answered in time, else what went wrong."""
        now = asyncio.get_running_loop().time()
        if self._task is None or self._task.done() or now - self._started >= READY_TIMEOUT_S:
            self._task = asyncio.create_task(self._bounded())
            self._started = now
            # Retrieved, so that one which ends after its probe gave up is not reported as lost.
            self._task.add_done_callback(_retrieve)
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=READY_TIMEOUT_S)
        if not done:
            return "TimeoutError"
        if task.cancelled():  # the server's shutdown
            return "CancelledError"
        exc = task.exception()
        return None if exc is None else type(exc).__name__

    async def _bounded(self) -> object:
        async with asyncio.timeout(READY_TIMEOUT_S):
            return await self._check()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


def make_app(rt: Runtime) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(rt.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def select_one() -> None:
        async with rt.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    checks = {"redis": ReadinessCheck(rt.redis.ping), "postgresql": ReadinessCheck(select_one)}

    async def readyz(_: web.Request) -> web.Response:
        # Both at once: the answer takes the slower one's time, not the sum.
        found = await asyncio.gather(*(check.problem() for check in checks.values()))
        problems = {name: problem for name, problem in zip(checks, found, strict=True) if problem}
        rt.metrics.ready.set(0 if problems else 1)
        if problems:
            return web.json_response({"status": "not ready", **problems}, status=503)
        return web.json_response({"status": "ready"})

    async def stop_checks(_: web.Application) -> None:
        for check in checks.values():
            check.cancel()

    app = web.Application()
    app.on_cleanup.append(stop_checks)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class MetricsPortUnavailable(RuntimeError):
    """The metrics port cannot be listened on (taken, or not allowed)."""


@contextlib.asynccontextmanager
async def serve_metrics(rt: Runtime, port: int, host: str = "0.0.0.0") -> AsyncIterator[int]:
    """Serve the sidecar's endpoints while the block runs; yields the port (port 0: the one the
    system chose)."""
    runner = web.AppRunner(make_app(rt), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MetricsPortUnavailable(f"metrics port {port}: {exc.strerror or exc}") from exc
    try:
        yield int(runner.addresses[0][1]) if runner.addresses else port
    finally:
        await runner.cleanup()
