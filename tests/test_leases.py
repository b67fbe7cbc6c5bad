"""Leases the daemon could not give back while Redis was away are given back once it answers,
instead of holding the daemon's own sessions for a lease's length after the outage."""

from __future__ import annotations

from redis.asyncio import Redis

from worker.hot.keys import lease_key
from worker.hot.leases import claim, release_leftovers
from worker.hot.scripts import Scripts


async def test_a_lease_whose_release_failed_is_given_back_when_redis_answers(
    redis: Redis, prefix: str
) -> None:
    away = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens: every call fails
    mine, taken = prefix + "conversation:mine:history", prefix + "conversation:taken:history"
    try:
        for key in (mine, taken):
            # Claimed while Redis answered; the release at the end went to a Redis that did not.
            async with claim(redis, Scripts(away), key, 60_000) as lease:
                assert lease is not None
        assert await redis.pttl(lease_key(mine)) > 0  # left to its TTL
        # Meanwhile the other lease expired and another worker claimed that session.
        await redis.set(lease_key(taken), "another-workers-token", px=60_000)

        assert await release_leftovers(Scripts(redis)) == 1
        assert not await redis.exists(lease_key(mine))
        assert await redis.get(lease_key(taken)) == b"another-workers-token"
        assert await release_leftovers(Scripts(redis)) == 0  # nothing left to give back
    finally:
        await away.aclose()
