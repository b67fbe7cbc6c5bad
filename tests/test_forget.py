"""Erasure: a session or a user leaves no trace in either tier, only a content-free audit row."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import cli
from worker.archive import writer
from worker.archive.erase import forget_session, forget_user
from worker.config import Settings
from worker.domain import SessionRef
from worker.hot.exclusive import LeaseBusy
from worker.hot.keys import lease_key
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

TABLES = ("turns", "summaries", "gaps", "quarantine", "sessions")


async def rows_of(pg: asyncpg.Connection, session_id: str) -> dict[str, int]:
    return {
        table: await pg.fetchval(f"SELECT count(*) FROM {table} WHERE session_id = $1", session_id)
        for table in TABLES
    }


async def audit_rows(pg: asyncpg.Connection, subject: str) -> list[asyncpg.Record]:
    digest = hashlib.sha256(subject.encode()).hexdigest()
    query = "SELECT * FROM erasures WHERE subject_sha256 = $1 ORDER BY id"
    return list(await pg.fetch(query, digest))


@pytest.fixture
def settings(make_settings: Callable[..., Settings], prefix: str) -> Settings:
    return make_settings(metadata_pattern=prefix + "session:{id}")


async def consolidated(
    rt: Runtime, redis: Redis, session_id: str, user_id: str, turns: int = 10
) -> SessionRef:
    """A session as the daemon leaves it: archived, summarized, with its metadata hash."""
    key = rt.pattern.key_for(session_id)
    assert rt.settings.metadata_pattern is not None
    await redis.hset(
        rt.settings.metadata_pattern.replace("{id}", session_id),
        mapping={"user_id": user_id, "agent_id": "support-bot"},
    )
    await agents.conversation(redis, key, turns)
    ref = rt.pattern.parse(key)
    assert ref is not None
    assert (await rt.pipeline.consolidate(ref)).status in ("consolidated", "archived")
    return ref


async def test_forget_session_erases_both_tiers_and_audits_without_content(
    settings: Settings, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    sid = f"{prefix}gone"
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        ref = await consolidated(rt, redis, sid, "alice")
        kept = await consolidated(rt, redis, f"{prefix}kept", "alice")
        async with rt.engine.begin() as conn:
            detail = "Alice said: my card 4111 1111 1111 1111"
            await writer.quarantine_session(conn, ref, "undecodable", detail)
            await conn.exec_driver_sql(
                f"INSERT INTO gaps (session_id, before_seq, reason) VALUES ('{sid}', 3, 'trimmed')"
            )
        # A stale lease left by a crashed replica: waited out, then gone.
        await redis.set(lease_key(ref.key), b"crashed-replica", px=600)
        assert all(n > 0 for n in (await rows_of(pg, sid)).values())

        done = await cli(settings, "forget", sid)

        assert done.returncode == 0, done.stderr
        assert "1 sessions, 10 turns" in done.stdout
        assert await rows_of(pg, sid) == dict.fromkeys(TABLES, 0)
        assert not await redis.exists(ref.key, f"{prefix}session:{sid}", lease_key(ref.key))
        # The other session of the same user is untouched.
        assert (await rows_of(pg, kept.session_id))["turns"] == 10
        assert await redis.exists(kept.key)

    [audit] = await audit_rows(pg, sid)
    assert audit["subject_kind"] == "session"
    assert (audit["sessions_deleted"], audit["turns_deleted"], audit["summaries_deleted"]) == (
        1,
        10,
        1,
    )
    assert (audit["gaps_deleted"], audit["quarantine_deleted"], audit["hot_keys_deleted"]) == (
        1,
        1,
        2,
    )
    stored = " ".join(str(v) for v in audit.values())
    # The audit keeps digests, hex, and "4111" alone turns up in one now and then: the card
    # number with its spaces cannot.
    assert sid not in stored and "alice" not in stored and "4111 1111" not in stored

    again = await cli(settings, "forget", sid)  # idempotent: nothing left, still audited
    assert again.returncode == 0, again.stderr
    assert "0 sessions, 0 turns" in again.stdout
    assert f"nothing of session {sid} was found" in again.stderr
    assert len(await audit_rows(pg, sid)) == 2


async def test_forget_user_erases_archived_and_hot_only_sessions(
    settings: Settings, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    user = f"{prefix}bob"
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        first = await consolidated(rt, redis, f"{prefix}b1", user)
        second = await consolidated(rt, redis, f"{prefix}b2", user, turns=3)
        other = await consolidated(rt, redis, f"{prefix}c1", f"{prefix}carol")
        # Not archived yet: found through its metadata hash.
        fresh = rt.pattern.key_for(f"{prefix}b3")
        await agents.conversation(redis, fresh, 2)
        await redis.hset(f"{prefix}session:{prefix}b3", mapping={"user_id": user})

        counts = await forget_user(rt.redis, rt.engine, settings, user)

        assert (counts.sessions, counts.turns) == (2, 13)
        assert counts.hot_keys == 6  # three histories, three metadata hashes
        for session_id in (first.session_id, second.session_id, f"{prefix}b3"):
            assert await rows_of(pg, session_id) == dict.fromkeys(TABLES, 0)
        assert not await redis.exists(first.key, second.key, fresh)
        assert not await pg.fetchval("SELECT count(*) FROM sessions WHERE user_id = $1", user)
        assert (await rows_of(pg, other.session_id))["turns"] == 10
        assert await redis.exists(other.key, f"{prefix}session:{prefix}c1") == 2
    [audit] = await audit_rows(pg, user)
    assert audit["subject_kind"] == "user" and audit["sessions_deleted"] == 2

    neither = await cli(settings, "forget")
    empty_user = await cli(settings, "forget", "x", "--user", " ")
    assert neither.returncode == 2 and empty_user.returncode == 2


async def test_a_session_being_consolidated_is_waited_for_then_reported_busy(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(lease_ttl_s=1)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for(f"{prefix}busy")
        await agents.conversation(redis, key, 6)
        ref = rt.pattern.parse(key)
        assert ref is not None
        await rt.pipeline.consolidate(ref)
        await redis.set(lease_key(key), b"another-replica", px=30_000)

        with pytest.raises(LeaseBusy):
            await forget_session(rt.redis, rt.engine, settings, f"{prefix}busy")
        # Nothing was erased half-way.
        assert await redis.exists(key)
        assert (await rows_of(pg, f"{prefix}busy"))["turns"] == 6

        # Once the consolidation finishes, the erasure goes through.
        async def finish() -> None:
            await asyncio.sleep(0.5)
            await redis.delete(lease_key(key))

        _, counts = await asyncio.gather(
            finish(), forget_session(rt.redis, rt.engine, settings, f"{prefix}busy")
        )
    assert counts.turns == 6 and not await redis.exists(key)


async def test_erasing_an_adk_user_takes_their_state_and_a_session_id_never_does(
    make_settings: Callable[..., Settings], redis: Redis, prefix: str
) -> None:
    settings = make_settings(layout="adk", key_pattern=prefix + "adk:session:{app}:{user}:{id}")
    keys = {
        "bob's session": f"{prefix}adk:session:shop:bob:s9",
        "bob's state": f"{prefix}adk:session:user_state:shop:bob",
        "alice's state": f"{prefix}adk:session:user_state:shop:alice",
        "the app's state": f"{prefix}adk:session:app_state:shop",
        "user team:bob's state": f"{prefix}adk:session:user_state:shop:team:bob",
    }
    for key in keys.values():
        await redis.set(key, b'{"id":"s9","events":[]}' if "s9" in key else b'{"user:n":"X"}')
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        await forget_user(rt.redis, rt.engine, settings, "bob")
        # "alice" read as a session id matches her state value's key: it is not a session.
        by_id = await forget_session(rt.redis, rt.engine, settings, "alice")

    assert not await redis.exists(keys["bob's session"], keys["bob's state"])
    spared = ("alice's state", "the app's state", "user team:bob's state")
    assert await redis.exists(*(keys[k] for k in spared)) == 3
    assert by_id.hot_keys == 0


async def test_forget_of_one_users_session_spares_a_session_of_that_id_owned_by_another(
    settings: Settings, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    # The list layout's key does not name the user: the archive and the metadata hash do.
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        hers = await consolidated(rt, redis, f"{prefix}x1", f"{prefix}alice")
        live = await redis.lrange(hers.key, 0, -1)
        wrong = await cli(settings, "forget", hers.session_id, "--user", f"{prefix}bob")
        assert wrong.returncode == 0, wrong.stderr
        assert await redis.lrange(hers.key, 0, -1) == live
        assert (await rows_of(pg, hers.session_id))["turns"] == 10
