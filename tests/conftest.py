"""Fixtures: real Redis and PostgreSQL (the URLs from the environment, as `make test` sets them).

Each test run gets a fresh database; each test its own key prefix, so tests never see each
other's sessions and never touch keys they did not write.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from worker.archive.schema import upgrade
from worker.config import Settings
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

REDIS_URL = os.environ.get("CONSOLIDATOR_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_URL = os.environ.get(
    "CONSOLIDATOR_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TEST_DB = f"consolidator_test_{os.getpid()}"


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _recreate(admin: str, name: str, drop_only: bool = False) -> None:
    conn = await asyncpg.connect(_plain(admin))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    asyncio.run(_recreate(ADMIN_URL, TEST_DB))
    url = _with_db(ADMIN_URL, TEST_DB)
    upgrade(url)
    yield url
    asyncio.run(_recreate(ADMIN_URL, TEST_DB, drop_only=True))


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:10]}:"
    yield name
    # Tests share one archive and reuse session ids ("s1"): a key left behind would be another
    # live conversation with that id, which the daemon rightly refuses to merge.
    with SyncRedis.from_url(REDIS_URL) as client:
        for pattern in (f"{name}*", f"consolidator:lease:*{name}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.unlink(*keys)


@pytest.fixture
def make_settings(database_url: str, prefix: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": REDIS_URL,
            "database_url": database_url,
            "key_pattern": prefix + "conversation:{id}:history",
            "idle_after_s": 0,
            "expiry_margin_s": 60,
            "keep_recent": 4,
            "concurrency": 4,
            "scan_count": 500,
            "summarizer": "extractive",
            "lease_ttl_s": 10,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, decode_responses=False)
    yield client  # the test's keys are removed by the `prefix` fixture
    await client.aclose()


@pytest.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    async with open_runtime(make_settings(), summarizer=ExtractiveSummarizer()) as rt:
        yield rt


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_plain(database_url))
    yield conn
    await conn.close()
