"""The sidecar's HTTP port: Prometheus metrics, liveness and readiness."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

if TYPE_CHECKING:
    from worker.runtime import Runtime


def make_app(rt: Runtime) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(rt.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        problems: dict[str, str] = {}
        try:
            await asyncio.wait_for(rt.redis.ping(), 2.0)
        except Exception as exc:  # any failure means not ready; the reason is reported
            problems["redis"] = type(exc).__name__
        try:
            async with asyncio.timeout(2.0), rt.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            problems["postgresql"] = type(exc).__name__
        rt.metrics.ready.set(0 if problems else 1)
        if problems:
            return web.json_response({"status": "not ready", **problems}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
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
