"""The private server helpers that fault tests rely on: they start, stop, crash and come back."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis

from tests.servers import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.fault

SHARED_PORTS = {6379, 5432}


def test_private_redis_stops_and_comes_back_on_the_same_port() -> None:
    with PrivateRedis() as server:
        assert server.port not in SHARED_PORTS
        client = redis.Redis.from_url(server.url, socket_timeout=2, retry_on_timeout=False)
        try:
            assert client.set("probe", "1")
            assert client.get("probe") == b"1"
            port = server.port

            server.stop()
            assert not server.running
            with pytest.raises(redis.ConnectionError):
                client.ping()

            server.start()
            assert server.port == port
            assert client.ping()
            assert client.get("probe") is None  # nothing is persisted

            server.kill()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            server.start()
            assert client.ping()
        finally:
            client.close()
    assert not server.running
    assert not server.dir.exists()


def test_persistent_private_redis_keeps_acknowledged_writes_across_a_crash() -> None:
    with PrivateRedis(persistent=True) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2, retry_on_timeout=False)
        try:
            assert client.rpush("turns", b"one", b"two") == 2
            client.expire("turns", 600)
            server.kill()  # SIGKILL: only what the append-only file holds survives
            server.start()
            assert client.lrange("turns", 0, -1) == [b"one", b"two"]
            assert 0 < client.ttl("turns") <= 600
        finally:
            client.close()


async def _count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        count: int = await conn.fetchval("select count(*) from probe")
        return count
    finally:
        await conn.close()


async def test_private_postgres_keeps_its_data_across_stop_and_crash() -> None:
    server = PrivatePostgres()
    try:
        await asyncio.to_thread(server.start)
        assert server.port not in SHARED_PORTS
        assert server.url == f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/postgres"

        conn = await asyncpg.connect(server.dsn, timeout=10)
        await conn.execute("create table probe (n int)")
        await conn.execute("insert into probe values (1), (2)")

        await asyncio.to_thread(server.stop)
        assert not server.running
        # The open session was disconnected and no new one gets in.
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await conn.fetchval("select 1")
        conn.terminate()
        with pytest.raises(OSError):
            await asyncpg.connect(server.dsn, timeout=5)

        await asyncio.to_thread(server.start)
        assert await _count_rows(server.dsn) == 2

        await asyncio.to_thread(server.kill)
        with pytest.raises(OSError):
            await asyncpg.connect(server.dsn, timeout=5)
        await asyncio.to_thread(server.start)
        assert await _count_rows(server.dsn) == 2
    finally:
        await asyncio.to_thread(server.close)
    assert not server.dir.exists()


def test_two_private_postgres_instances_are_independent() -> None:
    with PrivatePostgres() as a, PrivatePostgres() as b:
        assert a.port != b.port
        assert a.running and b.running
        a.stop()
        assert b.running
