"""A quarantined key outlives its expiry: its record keeps a copy, and restore puts it back.

A quarantined session is not archived, so without a copy, one malformed element and an
expiry would lose every good turn beside it. The copy is the key's DUMP, refreshed when the
value changes; `consolidator restore ID --quarantined` recreates the key from it, and once
the operator has fixed it, a flush archives the conversation as usual.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import cli
from tests.conftest import REDIS_URL
from worker.config import Settings

TTL_S = 600
BAD_ELEMENT = b'{"role": "user", "content": "unterminated'
GOOD_ELEMENT = b'{"role": "user", "content": "first", "timestamp": 1.0}'


def _id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"  # the tests share one archive


async def _saved(pg: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    return await pg.fetchrow(
        "SELECT reason, saved_value, saved_at FROM quarantine WHERE redis_key = $1", key
    )


ADK = {"CONSOLIDATOR_LAYOUT": "adk"}  # the command line's setting beside the test's


def adk_settings(make_settings: Callable[..., Settings], prefix: str) -> tuple[Settings, str]:
    """Settings for ADK keys, which name their app and user: and the key pattern."""
    pattern = prefix + "adk:session:{app}:{user}:{id}"
    return make_settings(layout="adk", key_pattern=pattern), pattern


async def quarantined_of(
    settings: Settings, redis: Redis, pg: asyncpg.Connection, name: str, owner: str
) -> tuple[str, str]:
    """A malformed session whose metadata hash names `owner`, quarantined: its id and key."""
    metadata = settings.metadata_pattern
    assert metadata is not None

    async def write(key: str) -> None:
        session_id = key.split(":")[-2]  # conversation:{id}:history
        await redis.hset(metadata.replace("{id}", session_id), "user_id", owner)
        await redis.rpush(key, GOOD_ELEMENT, BAD_ELEMENT)

    session_id, key, _ = await quarantined(settings, redis, pg, name, write)
    return session_id, key


async def archived_once(settings: Settings, redis: Redis, name: str) -> tuple[str, str]:
    """A session of one good turn, archived: its id and key."""
    session_id = _id(name)
    key = settings.pattern.replace("{id}", session_id)
    await redis.rpush(key, GOOD_ELEMENT)
    archived = await cli(settings, "flush", session_id, "--no-summarize")
    assert archived.returncode == 0, archived.stderr
    return session_id, key


async def quarantined(
    settings: Settings,
    redis: Redis,
    pg: asyncpg.Connection,
    name: str,
    write: Callable[[str], Awaitable[object]],
    **env: str,
) -> tuple[str, str, asyncpg.Record]:
    """A session whose key `write` fills, flushed once: its id, key and quarantine record."""
    session_id = _id(name)
    key = settings.pattern.replace("{id}", session_id)
    await write(key)
    await redis.expire(key, TTL_S)
    flushed = await cli(settings, "flush", session_id, **env)
    assert flushed.returncode == 1 and "quarantined" in flushed.stdout, flushed.stdout
    record = await _saved(pg, key)
    assert record is not None
    return session_id, key, record


async def test_a_quarantined_list_is_restored_after_its_key_expired_then_archived_once_fixed(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    good = [agents.element("user" if i % 2 == 0 else "assistant", f"Turn {i}") for i in range(6)]
    session_id, key, record = await quarantined(
        settings,
        redis,
        pg,
        "q-list",
        lambda key: redis.rpush(key, *good[:3], BAD_ELEMENT, *good[3:]),
    )
    assert record["reason"] == "undecodable" and record["saved_value"] is not None
    written = await redis.lrange(key, 0, -1)

    await redis.delete(key)  # the agent went away and the key expired
    stats = await cli(settings, "stats")
    assert f"copy: {len(record['saved_value'])} bytes" in stats.stdout, stats.stdout
    restored = await cli(settings, "restore", session_id, "--quarantined", "--ttl", "300")
    assert restored.returncode == 0, restored.stderr
    assert f"restored {key} (undecodable)" in restored.stdout, restored.stdout
    assert await redis.lrange(key, 0, -1) == written
    assert 290_000 < await redis.pttl(key) <= 300_000

    await redis.lset(key, 3, agents.element("user", "Turn 2b, fixed by hand").decode())
    fixed = await cli(settings, "flush", session_id, "--no-summarize")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    history = await cli(settings, "history", session_id)
    assert [f"Turn {i}" in history.stdout for i in range(6)] == [True] * 6, history.stdout
    assert "Turn 2b, fixed by hand" in history.stdout
    assert await _saved(pg, key) is None  # archived: the record and its copy are gone


async def test_the_copy_follows_the_key_and_is_not_sent_again_while_unchanged(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    session_id, key, first = await quarantined(
        settings, redis, pg, "q-follow", lambda key: redis.rpush(key, GOOD_ELEMENT, BAD_ELEMENT)
    )

    await cli(settings, "flush", session_id)  # met again, unchanged
    again = await _saved(pg, key)
    assert again is not None and again["saved_at"] == first["saved_at"]

    await redis.rpush(key, agents.element("assistant", "a later turn, good"))
    await cli(settings, "flush", session_id)
    moved = await _saved(pg, key)
    assert moved is not None and moved["saved_at"] > first["saved_at"]
    latest = await redis.lrange(key, 0, -1)
    await redis.delete(key)
    restored = await cli(settings, "restore", session_id, "--quarantined")
    assert restored.returncode == 0, restored.stderr
    assert await redis.lrange(key, 0, -1) == latest


async def test_a_key_of_the_wrong_type_comes_back_as_it_was_and_is_not_overwritten(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    fields = {b"role": b"user", b"content": b"a hash, not a list"}

    async def write_hash(key: str) -> None:
        for name, value in fields.items():
            await redis.hset(key, name, value)

    session_id, key, record = await quarantined(settings, redis, pg, "q-hash", write_hash)
    assert record["reason"] == "wrong_type"

    await redis.hset(key, b"content", b"changed by the agent since")
    refused = await cli(settings, "restore", session_id, "--quarantined")
    assert refused.returncode == 1 and f"{key} exists" in refused.stderr, refused.stderr
    # A live quarantined key's turns since the copy are in no archive: never replaced.
    forced = await cli(settings, "restore", session_id, "--quarantined", "--force")
    assert forced.returncode == 2, forced.stderr
    assert await redis.hget(key, b"content") == b"changed by the agent since"
    await redis.delete(key)
    restored = await cli(settings, "restore", session_id, "--quarantined")
    assert restored.returncode == 0, restored.stderr
    assert await redis.hgetall(key) == fields


async def test_a_key_too_large_to_read_has_no_copy_and_restore_says_so(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    big = agents.element("user", "x" * 20_000)
    session_id, key, record = await quarantined(
        settings,
        redis,
        pg,
        "q-big",
        lambda key: redis.rpush(key, big),
        CONSOLIDATOR_MAX_VALUE_BYTES="4096",
    )
    assert record["reason"] == "too_large" and record["saved_value"] is None

    await redis.delete(key)
    restored = await cli(settings, "restore", session_id, "--quarantined")
    assert restored.returncode == 1
    assert f"no copy kept of {key} (too_large)" in restored.stderr, restored.stderr
    assert await redis.exists(key) == 0
    nothing = await cli(settings, "restore", _id("never-seen"), "--quarantined")
    assert nothing.returncode == 1 and "nothing quarantined" in nothing.stderr


async def test_forget_erases_the_copy_with_the_record(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    card = agents.element("user", "my card is 4111 1111 1111 1111")
    session_id, key, record = await quarantined(
        settings, redis, pg, "q-forget", lambda key: redis.rpush(key, card, BAD_ELEMENT)
    )
    assert record["saved_value"] is not None

    forgot = await cli(settings, "forget", session_id)
    assert forgot.returncode == 0, forgot.stderr
    assert await _saved(pg, key) is None
    assert await redis.exists(key) == 0


async def test_forget_user_erases_a_copy_whose_key_and_metadata_expired(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings(metadata_pattern=prefix + "session:{id}")
    user = _id("u-gone")
    others = _id("u-other")

    async def session_of(owner: str) -> tuple[str, str]:
        session_id, key = await quarantined_of(settings, redis, pg, "q-user", owner)
        # Both keys expire: nothing in Redis names the user any more.
        await redis.delete(key, f"{prefix}session:{session_id}")
        return session_id, key

    _, mine = await session_of(user)
    _, theirs = await session_of(others)
    forgot = await cli(settings, "forget", "--user", user)
    assert forgot.returncode == 0, forgot.stderr
    assert "1 quarantine records" in forgot.stdout, forgot.stdout
    assert await _saved(pg, mine) is None
    assert await _saved(pg, theirs) is not None  # another user's copy is not touched


async def test_a_copy_the_key_outgrew_is_kept_and_said_to_be_older(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    limit = {"CONSOLIDATOR_MAX_VALUE_BYTES": "4096"}
    session_id, key, first = await quarantined(
        settings,
        redis,
        pg,
        "q-grew",
        lambda key: redis.rpush(key, GOOD_ELEMENT, BAD_ELEMENT),
        **limit,
    )
    copied = first["saved_value"]
    assert copied is not None
    await redis.rpush(key, agents.element("user", "y" * 8000))
    await cli(settings, "flush", session_id, **limit)
    grown = await _saved(pg, key)
    assert grown is not None and grown["reason"] == "too_large"
    assert grown["saved_value"] == copied  # the latest state there is, kept

    stats = await cli(settings, "stats")
    assert "the key changed after this copy" in stats.stdout, stats.stdout
    await redis.delete(key)
    restored = await cli(settings, "restore", session_id, "--quarantined")
    assert restored.returncode == 0, restored.stderr
    assert "the key changed after this copy" in restored.stderr, restored.stderr
    assert await redis.lrange(key, 0, -1) == [GOOD_ELEMENT, BAD_ELEMENT]


async def test_a_user_erasure_leaves_another_users_copy_under_the_same_id(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings, pattern = adk_settings(make_settings, prefix)
    session_id = _id("q-adk")
    keys = {user: pattern.format(app="shop", user=user, id=session_id) for user in ("bob", "carol")}
    for key in keys.values():
        await redis.set(key, b"not an ADK session", ex=TTL_S)
    flushed = await cli(settings, "flush", "--all", **ADK)
    assert flushed.stdout.count("quarantined") >= 2, flushed.stdout
    await redis.delete(*keys.values())  # both expired: only the copies are left

    alices = await cli(settings, "forget", session_id, "--user", "alice", **ADK)
    assert alices.returncode == 0, alices.stderr
    assert await _saved(pg, keys["bob"]) is not None and await _saved(pg, keys["carol"]) is not None
    ambiguous = await cli(settings, "forget", session_id, **ADK)
    assert ambiguous.returncode != 0 and "more than one user" in ambiguous.stderr
    bobs = await cli(settings, "forget", session_id, "--user", "bob", **ADK)
    assert bobs.returncode == 0 and "1 quarantine records" in bobs.stdout, bobs.stdout
    assert await _saved(pg, keys["bob"]) is None and await _saved(pg, keys["carol"]) is not None
    carols = await cli(settings, "forget", session_id, **ADK)  # one user left: no ambiguity
    assert carols.returncode == 0 and "1 quarantine records" in carols.stdout, carols.stdout
    assert await _saved(pg, keys["carol"]) is None


async def test_prune_keeps_a_fresh_copy_under_the_id_of_a_pruned_session(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    session_id, key = await archived_once(settings, redis, "q-prune")
    await pg.execute(
        "UPDATE sessions SET last_seen = now() - interval '100 days' WHERE session_id = $1",
        session_id,
    )
    await redis.rpush(key, BAD_ELEMENT)  # the agent writes on, and breaks it
    await cli(settings, "flush", session_id)
    assert await _saved(pg, key) is not None

    pruned = await cli(settings, "prune", "--older-than", "90d")
    assert pruned.returncode == 0, pruned.stderr
    assert await pg.fetchval("SELECT count(*) FROM sessions WHERE session_id = $1", session_id) == 0
    assert await _saved(pg, key) is not None


async def test_a_restored_key_keeps_its_user_once_archived(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings(metadata_pattern=prefix + "session:{id}")
    user = _id("u-back")
    session_id, key = await quarantined_of(settings, redis, pg, "q-owner", user)
    await redis.delete(key, f"{prefix}session:{session_id}")
    restored = await cli(settings, "restore", session_id, "--quarantined")
    assert restored.returncode == 0, restored.stderr
    await redis.lset(key, 1, agents.element("user", "fixed").decode())
    fixed = await cli(settings, "flush", session_id, "--no-summarize")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    owner = "SELECT user_id FROM sessions WHERE session_id = $1"
    assert await pg.fetchval(owner, session_id) == user

    await redis.delete(key)
    forgot = await cli(settings, "forget", "--user", user)
    assert forgot.returncode == 0 and "1 sessions" in forgot.stdout, forgot.stdout
    assert await pg.fetchval(owner, session_id) is None


async def test_a_redis_user_without_dump_still_quarantines_without_a_copy(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    name, password = _id("nodump"), uuid.uuid4().hex
    await redis.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-dump"],
    )
    try:
        settings = make_settings()
        server = urlsplit(REDIS_URL)
        url = {
            "CONSOLIDATOR_REDIS_URL": server._replace(
                netloc=f"{name}:{password}@{server.netloc}"
            ).geturl()
        }
        _, _, record = await quarantined(
            settings, redis, pg, "q-acl", lambda key: redis.rpush(key, BAD_ELEMENT), **url
        )
        assert record["reason"] == "undecodable" and record["saved_value"] is None
        stats = await cli(settings, "stats")
        assert "DUMP refused" in stats.stdout, stats.stdout
    finally:
        await redis.acl_deluser(name)


async def test_forget_of_a_users_session_takes_their_copy_under_another_users_archived_id(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings, pattern = adk_settings(make_settings, prefix)
    session_id = _id("q-two")
    alices = pattern.format(app="shop", user="alice", id=session_id)
    await pg.execute(
        "INSERT INTO sessions (session_id, redis_key, layout, app_name, user_id, turn_count) "
        "VALUES ($1, $2, 'adk', 'shop', 'alice', 3)",
        session_id,
        alices,
    )
    bobs = pattern.format(app="shop", user="bob", id=session_id)
    await redis.set(bobs, b"not an ADK session", ex=TTL_S)
    flushed = await cli(settings, "flush", "--all", **ADK)
    assert "quarantined" in flushed.stdout, flushed.stdout
    await redis.delete(bobs)  # expired: only the copy is left

    forgot = await cli(settings, "forget", session_id, "--user", "bob", **ADK)
    assert forgot.returncode == 0 and "1 quarantine records" in forgot.stdout, forgot.stdout
    assert await _saved(pg, bobs) is None
    assert await pg.fetchval("SELECT user_id FROM sessions WHERE session_id = $1", session_id) == (
        "alice"
    )


async def test_forget_of_another_users_id_spares_a_quarantined_key_its_record_names(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings(metadata_pattern=prefix + "session:{id}")
    session_id, key = await quarantined_of(settings, redis, pg, "q-spare", "bob")
    await redis.delete(f"{prefix}session:{session_id}")  # the metadata expired, the key lives
    live = await redis.lrange(key, 0, -1)

    forgot = await cli(settings, "forget", session_id, "--user", "alice")
    assert forgot.returncode == 0, forgot.stderr
    assert await redis.lrange(key, 0, -1) == live
    assert await _saved(pg, key) is not None


async def test_forget_of_another_users_id_spares_their_live_key_beside_an_unowned_archive(
    make_settings: Callable[..., Settings], prefix: str, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings(metadata_pattern=prefix + "session:{id}")
    session_id, key = await archived_once(settings, redis, "q-unowned")  # no metadata yet
    metadata = f"{prefix}session:{session_id}"
    await redis.hset(metadata, "user_id", "bob")
    await redis.rpush(key, agents.element("user", "bob's turn, not archived yet"))

    forgot = await cli(settings, "forget", session_id, "--user", "alice")
    assert forgot.returncode == 0, forgot.stderr
    assert len(await redis.lrange(key, 0, -1)) == 2
    assert await redis.hget(metadata, "user_id") == b"bob"


async def test_restore_force_from_the_archive_does_not_replace_a_live_quarantined_key(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    session_id, key = await archived_once(settings, redis, "q-force")
    later = agents.element("user", "written after the archive")
    await redis.rpush(key, BAD_ELEMENT, later)
    await cli(settings, "flush", session_id)
    assert await _saved(pg, key) is not None
    live = await redis.lrange(key, 0, -1)

    forced = await cli(settings, "restore", session_id, "--force")
    assert forced.returncode == 1 and "quarantined" in forced.stderr, forced.stderr
    assert await redis.lrange(key, 0, -1) == live
