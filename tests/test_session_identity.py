"""One archived session is one conversation: two live keys that share a session id (two ADK
users who chose the same id, two layouts writing to one database) are never merged, while a
conversation whose key moved (a new key pattern) carries on under its id."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import cli
from tests.layout_helpers import archived, list_of, ref_of
from worker.archive.erase import forget_user
from worker.config import Settings
from worker.runtime import open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


def new_id() -> str:
    return f"s{uuid.uuid4().hex[:12]}"  # session ids are global to the archive the tests share


async def talk(redis: Redis, key: str, who: str, turns: int = 8) -> list[bytes]:
    written = [
        agents.element("user" if i % 2 == 0 else "assistant", f"{who} private turn {i}.")
        for i in range(turns)
    ]
    await redis.rpush(key, *written)
    await redis.expire(key, 3600)
    return written


async def test_two_users_with_one_session_id_are_never_merged(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(key_pattern=prefix + "{app}:{user}:{id}")
    sid = new_id()
    keys = {who: f"{prefix}shop:{who}:{sid}" for who in ("alice", "bob")}
    written = {who: await talk(redis, key, who.upper()) for who, key in keys.items()}
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        refs = {who: ref_of(rt, key) for who, key in keys.items()}
        # Both at once (one archive batch), then a second pass, as a daemon would.
        first = await asyncio.gather(*(rt.pipeline.consolidate(r) for r in refs.values()))
        second = {who: await rt.pipeline.consolidate(r) for who, r in refs.items()}

    assert {o.status for o in first} <= {"consolidated", "conflict", "quarantined"}
    assert [o.status for o in second.values()].count("quarantined") == 1, second
    owner = next(w for w, o in second.items() if o.status != "quarantined")
    other = next(w for w in keys if w != owner)
    assert "id_collision" in str(second[other].reason)
    # The archive holds the owner's conversation only; the other's value is as its agent wrote
    # it, and the owner's summary speaks of the owner's turns alone.
    assert await archived(pg, sid) == written[owner]
    assert await list_of(redis, keys[other]) == written[other]
    hot = b"".join(await list_of(redis, keys[owner]))
    assert other.upper().encode() not in hot
    row = await pg.fetchrow(
        "SELECT reason, detail FROM quarantine WHERE redis_key = $1", keys[other]
    )
    assert row is not None and row["reason"] == "id_collision" and keys[owner] in row["detail"]


async def test_two_layouts_in_one_database_are_never_merged(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    sid = new_id()
    listed = await talk(redis, f"{prefix}l:{sid}", "LIST")
    gemini_rows = [
        {"role": "user" if i % 2 == 0 else "model", "parts": [{"text": f"GEMINI turn {i}."}]}
        for i in range(8)
    ]
    await redis.set(f"{prefix}g:{sid}", json.dumps(gemini_rows).encode(), ex=3600)
    list_settings = make_settings(key_pattern=prefix + "l:{id}")
    gemini_settings = make_settings(layout="gemini", key_pattern=prefix + "g:{id}")
    async with open_runtime(list_settings, summarizer=ExtractiveSummarizer()) as rt:
        listed_outcome = await rt.pipeline.consolidate(ref_of(rt, f"{prefix}l:{sid}"))
    async with open_runtime(gemini_settings, summarizer=ExtractiveSummarizer()) as rt:
        gemini_outcome = await rt.pipeline.consolidate(ref_of(rt, f"{prefix}g:{sid}"))

    assert listed_outcome.status == "consolidated"
    assert gemini_outcome.status == "quarantined", gemini_outcome
    assert await archived(pg, sid) == listed
    assert json.loads(await redis.get(f"{prefix}g:{sid}") or b"") == gemini_rows


async def test_a_conversation_whose_key_moved_carries_on(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    sid = new_id()
    old_key, new_key = f"{prefix}old:{sid}", f"{prefix}new:{sid}"
    first = await talk(redis, old_key, "MOVED")
    async with open_runtime(
        make_settings(key_pattern=prefix + "old:{id}"), summarizer=ExtractiveSummarizer()
    ) as rt:
        assert (await rt.pipeline.consolidate(ref_of(rt, old_key))).status == "consolidated"
    # The agents move to a new key pattern, and so does the daemon's configuration.
    await redis.rename(old_key, new_key)
    later = [await agents.append(redis, new_key, "user", f"MOVED later turn {i}.") for i in (8, 9)]
    async with open_runtime(
        make_settings(key_pattern=prefix + "new:{id}"), summarizer=ExtractiveSummarizer()
    ) as rt:
        outcome = await rt.pipeline.consolidate(ref_of(rt, new_key))

    assert outcome.status == "consolidated", outcome
    assert await archived(pg, sid) == first + later
    assert await pg.fetchval("SELECT redis_key FROM sessions WHERE session_id = $1", sid) == new_key


async def test_erasing_one_of_two_users_with_one_session_id_spares_the_other(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(key_pattern=prefix + "{app}:{user}:{id}")
    sid = new_id()
    alice, bob = (f"{prefix}shop:{who}:{sid}" for who in ("alice", "bob"))
    written = await talk(redis, alice, "ALICE")
    await talk(redis, bob, "BOB")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        assert (await rt.pipeline.consolidate(ref_of(rt, alice))).status == "consolidated"
        assert (await rt.pipeline.consolidate(ref_of(rt, bob))).status == "quarantined"

        ambiguous = await cli(settings, "forget", sid)
        assert ambiguous.returncode == 2 and "add --user" in ambiguous.stderr, ambiguous.stderr
        assert await redis.exists(alice, bob) == 2

        # Bob's key carries the id of Alice's archived session: only Bob's own things go.
        await forget_user(rt.redis, rt.engine, settings, "bob")
        assert not await redis.exists(bob) and await redis.exists(alice)
        assert await archived(pg, sid) == written
        assert not await pg.fetchval("SELECT count(*) FROM quarantine WHERE redis_key = $1", bob)

    hers = await cli(settings, "forget", sid, "--user", "alice")
    assert hers.returncode == 0, hers.stderr
    assert not await redis.exists(alice)
    assert not await pg.fetchval("SELECT count(*) FROM turns WHERE session_id = $1", sid)
