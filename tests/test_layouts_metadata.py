"""Seed 002's metadata hash beside the history (`session:{id}`: user_id, agent_id, last_active):
archived with the session, and `last_active` is what tells the daemon a session is idle."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from worker.config import Settings
from worker.runtime import open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


def contents(n: int) -> bytes:
    rows = [
        {"role": "user" if i % 2 == 0 else "model", "parts": [{"text": f"Turn {i}: ORD-{i}"}]}
        for i in range(n)
    ]
    return json.dumps(rows).encode()


async def test_last_active_is_the_idle_signal_and_the_hash_is_archived(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(
        layout="gemini",
        key_pattern=prefix + "chat:{id}",
        metadata_pattern=prefix + "session:{id}",
        idle_after_s=1,
    )
    for session_id in ("quiet", "busy"):
        await redis.set(f"{prefix}chat:{session_id}", contents(10), ex=3600)
    await asyncio.sleep(2.1)  # both keys untouched long enough to look idle to Redis itself
    now = time.time()
    await redis.hset(
        f"{prefix}session:quiet",
        mapping={"user_id": "u-zoe", "agent_id": "support-bot", "last_active": now - 3600},
    )
    # The agent was active a moment ago (it may have read the history, or written elsewhere).
    await redis.hset(f"{prefix}session:busy", mapping={"user_id": "u-ada", "last_active": now})

    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        work = await rt.daemon.find_work()
        assert [c.ref.session_id for c, _ in work] == ["quiet"]
        outcomes = await rt.daemon.run_once()
    assert [(o.session_id, o.status) for o in outcomes] == [("quiet", "consolidated")]

    row = await pg.fetchrow(
        "SELECT user_id, agent_id, metadata FROM sessions WHERE session_id = 'quiet'"
    )
    assert (row["user_id"], row["agent_id"]) == ("u-zoe", "support-bot")
    assert float(json.loads(row["metadata"])["last_active"]) == now - 3600


async def test_a_metadata_key_of_the_wrong_type_does_not_keep_the_history_from_the_archive(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    # The history must be archived before it expires; a broken extra beside it must not stop it.
    settings = make_settings(
        layout="gemini", key_pattern=prefix + "chat:{id}", metadata_pattern=prefix + "meta:{id}"
    )
    await redis.set(f"{prefix}chat:odd-meta", contents(10), ex=3600)
    await redis.set(f"{prefix}meta:odd-meta", b"a string, not a hash")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        outcomes = await rt.daemon.run_once()
    assert [(o.session_id, o.status) for o in outcomes] == [("odd-meta", "consolidated")]
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id = 'odd-meta'") == 10
    assert await redis.get(f"{prefix}meta:odd-meta") == b"a string, not a hash"
