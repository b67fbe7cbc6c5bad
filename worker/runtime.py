"""The one place that opens and closes every client (DESIGN: a composition root)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.config import Settings
from worker.daemon import Daemon
from worker.hot.keys import KeyPattern
from worker.hot.scripts import Scripts
from worker.hot.store import HotStore
from worker.layouts.registry import layout_for
from worker.metrics import Metrics
from worker.pipeline import Pipeline
from worker.summarizers.base import Summarizer


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    redis: Redis
    engine: AsyncEngine
    pattern: KeyPattern
    pipeline: Pipeline
    daemon: Daemon
    metrics: Metrics


def redis_client(url: str, timeout_s: float = 10.0, concurrency: int = 16) -> Redis:
    # Bytes in, bytes out: the archive keeps the agent's elements byte for byte. The timeouts
    # turn a network partition into an error (then a backoff) instead of a silent hang.
    # redis-py's default pool fails a command outright (MaxConnectionsError) once 100
    # connections are in use, which failed most sessions of a flush at a concurrency above
    # that; this pool waits for a free connection instead. A session in flight may hold two
    # (its own commands and its lease renewal), and the scanner and probes need a few more.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=2 * concurrency + 8,
        timeout=timeout_s,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return Redis.from_pool(pool)


def database_engine(url: str, pool_size: int, timeout_s: float = 30.0) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        pool_recycle=1800,
        # asyncpg: `timeout` bounds connecting, `command_timeout` every statement.
        connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
    )


def default_summarizer(settings: Settings) -> Summarizer:
    from worker.summarizers.select import build_summarizer

    return build_summarizer(settings)


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    summarizer: Summarizer | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Runtime]:
    async with contextlib.AsyncExitStack() as stack:
        redis = redis_client(settings.redis_url, settings.redis_timeout_s, settings.concurrency)
        stack.push_async_callback(redis.aclose)
        engine = database_engine(
            settings.database_url, settings.concurrency + 2, settings.database_timeout_s
        )
        stack.push_async_callback(engine.dispose)
        chosen = summarizer or default_summarizer(settings)
        stack.push_async_callback(chosen.aclose)
        layout = layout_for(settings)
        scripts = Scripts(redis)
        store = HotStore(
            redis,
            scripts,
            layout,
            settings.max_value_bytes,
            settings.metadata_pattern,
            settings.agent_lock_pattern,
        )
        metrics = metrics or Metrics()
        pipeline = Pipeline(settings, redis, scripts, store, layout, engine, chosen, metrics)
        pattern = KeyPattern.compile(settings.pattern)
        daemon = Daemon(pipeline, pattern)
        yield Runtime(settings, redis, engine, pattern, pipeline, daemon, metrics)
