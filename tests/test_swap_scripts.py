"""The compare-and-swap scripts on their own, against real Redis: they rewrite a conversation
only while it still holds exactly the bytes the consolidator read, and never touch what an
agent changed, whichever way the agent pushes."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from worker.hot.scripts import Scripts, Swap

TOKEN = "lease-token"
# Binary-safe: a NUL, bytes that are not UTF-8, and an element that holds a whole other one.
READ = [b'{"role":"user","content":"ORD-1"}', b"\x00\xff\xfe not utf-8", b"ab", b"c", b"x" * 5000]
SUMMARY = b'{"role":"system","content":"[Summary] ORD-1"}'


@pytest.fixture
async def keys(redis: Redis, prefix: str) -> tuple[str, str]:
    key, lease = f"{prefix}conversation:s:history", f"{prefix}lease"
    await redis.set(lease, TOKEN)
    return key, lease


async def store(redis: Redis, key: str, oldest_first: list[bytes], newest_first: bool) -> None:
    """The list as an agent that RPUSHes (or LPUSHes) these turns, oldest first, leaves it."""
    for raw in oldest_first:
        await (redis.lpush if newest_first else redis.rpush)(key, raw)
    await redis.expire(key, 600)


async def conversation(redis: Redis, key: str, newest_first: bool) -> list[bytes | str]:
    stored = await redis.lrange(key, 0, -1)
    return stored[::-1] if newest_first else stored


@pytest.mark.parametrize("newest_first", [False, True], ids=["rpush", "lpush"])
async def test_prefix_replaced_and_appended_turns_kept(
    redis: Redis, keys: tuple[str, str], newest_first: bool
) -> None:
    key, lease = keys
    await store(redis, key, READ, newest_first)
    await store(redis, key, [b"appended meanwhile"], newest_first)

    result = await Scripts(redis).replace_prefix(
        key, lease, TOKEN, READ[:4], [SUMMARY], newest_first=newest_first
    )

    assert result.swap is Swap.DONE and result.memory_after > 0
    assert await conversation(redis, key, newest_first) == [SUMMARY, READ[4], b"appended meanwhile"]
    assert 0 < await redis.ttl(key) <= 600


@pytest.mark.parametrize("newest_first", [False, True], ids=["rpush", "lpush"])
@pytest.mark.parametrize(
    "change",
    ["one byte of a folded turn", "turns re-cut at another boundary", "a folded turn trimmed"],
)
async def test_prefix_changed_since_the_read_is_left_alone(
    redis: Redis, keys: tuple[str, str], newest_first: bool, change: str
) -> None:
    key, lease = keys
    now = list(READ)
    if change == "one byte of a folded turn":
        now[0] = now[0].replace(b"ORD-1", b"ORD-2")  # same length
    elif change == "turns re-cut at another boundary":
        now[2:4] = [b"a", b"bc"]  # the same bytes end to end
    else:
        now = now[1:]
    await store(redis, key, now, newest_first)

    result = await Scripts(redis).replace_prefix(
        key, lease, TOKEN, READ[:4], [SUMMARY], newest_first=newest_first
    )

    assert result.swap is Swap.CHANGED
    assert await conversation(redis, key, newest_first) == now


async def test_no_rewrite_without_the_lease(redis: Redis, keys: tuple[str, str]) -> None:
    key, lease = keys
    await store(redis, key, READ, newest_first=False)
    await redis.set(lease, "another replica")
    scripts = Scripts(redis)

    swapped = await scripts.replace_prefix(
        key, lease, TOKEN, READ[:4], [SUMMARY], newest_first=False
    )
    deleted = await scripts.delete_list(key, lease, TOKEN, READ)

    assert (swapped.swap, deleted) == (Swap.LEASE_LOST, Swap.LEASE_LOST)
    assert await redis.lrange(key, 0, -1) == READ


async def test_delete_only_what_was_archived(redis: Redis, keys: tuple[str, str]) -> None:
    key, lease = keys
    scripts = Scripts(redis)
    edited = [READ[0].replace(b"ORD-1", b"ORD-2"), *READ[1:]]
    for now in ([*READ, b"appended after the read"], edited):
        await redis.delete(key)
        await store(redis, key, now, newest_first=False)
        assert await scripts.delete_list(key, lease, TOKEN, READ) is Swap.CHANGED
        assert await redis.lrange(key, 0, -1) == now

    await redis.delete(key)
    await store(redis, key, READ, newest_first=False)
    assert await scripts.delete_list(key, lease, TOKEN, READ) is Swap.DONE
    assert not await redis.exists(key)
