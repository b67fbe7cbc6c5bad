"""Retention: old data goes, what live sessions still need stays, and they keep working."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import cli
from worker.archive import writer
from worker.archive.reader import ArchiveReader
from worker.archive.retention import prune
from worker.config import Settings
from worker.domain import SessionRef
from worker.restore import RestoreStatus, restore
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

OLD = "now() - interval '100 days'"


async def seqs(pg: asyncpg.Connection, session_id: str) -> list[int]:
    rows = await pg.fetch("SELECT seq FROM turns WHERE session_id = $1 ORDER BY seq", session_id)
    return [r["seq"] for r in rows]


async def make_old(pg: asyncpg.Connection, session_id: str, *, through_seq: int) -> None:
    await pg.execute(
        f"UPDATE turns SET archived_at = {OLD} WHERE session_id = $1 AND seq <= $2",
        session_id,
        through_seq,
    )


async def session(
    rt: Runtime, redis: Redis, name: str, turns: int
) -> tuple[SessionRef, list[bytes]]:
    key = rt.pattern.key_for(name)
    written = await agents.conversation(redis, key, turns)
    ref = rt.pattern.parse(key)
    assert ref is not None
    await rt.pipeline.consolidate(ref)
    return ref, written


async def test_prune_forgets_idle_sessions_and_folded_old_turns_only(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    rt = runtime
    idle, _ = await session(rt, redis, f"{prefix}idle", 10)
    await pg.execute(
        f"UPDATE sessions SET last_seen = {OLD} WHERE session_id = $1", idle.session_id
    )
    await make_old(pg, idle.session_id, through_seq=99)
    async with rt.engine.begin() as conn:
        await writer.quarantine_session(conn, idle, "undecodable", "old detail")
    # As old as its session: a fresh record under the id is a live key's, and stays
    # (test_quarantine_copy.py).
    await pg.execute(
        f"UPDATE quarantine SET last_seen = {OLD} WHERE session_id = $1", idle.session_id
    )

    active, first = await session(rt, redis, f"{prefix}active", 10)  # summary through #5
    second = await agents.conversation(redis, active.key, 6, start=10)
    await rt.pipeline.consolidate(active)  # summary through #11; #12-#15 verbatim in Redis
    await make_old(pg, active.session_id, through_seq=13)
    await pg.execute(
        f"UPDATE summaries SET created_at = {OLD} WHERE session_id = $1", active.session_id
    )

    plain, _ = await session(rt, redis, f"{prefix}plain", 3)  # never summarized
    await make_old(pg, plain.session_id, through_seq=99)

    result = await prune(rt.engine, timedelta(days=90))

    assert not result.skipped
    assert result.sessions >= 1 and result.turns >= 10 + 12 and result.summaries >= 2
    assert result.quarantine >= 1
    for table in ("sessions", "turns", "summaries", "quarantine"):
        count = await pg.fetchval(
            f"SELECT count(*) FROM {table} WHERE session_id = $1", idle.session_id
        )
        assert count == 0, table
    # Folded and old: gone. Old but still verbatim in Redis (#12, #13), and recent: kept.
    assert await seqs(pg, active.session_id) == [12, 13, 14, 15]
    summaries = await ArchiveReader(rt.engine).summaries(active.session_id)
    assert [s.through_seq for s in summaries] == [11]  # the superseded summary went
    assert await seqs(pg, plain.session_id) == [0, 1, 2]

    # The live session goes on as if nothing happened: no duplicate, no gap.
    more = await agents.conversation(redis, active.key, 2, start=16)
    outcome = await rt.pipeline.consolidate(active)
    assert outcome.turns_archived == 2 and not outcome.gap
    assert await seqs(pg, active.session_id) == [12, 13, 14, 15, 16, 17]
    raws = await pg.fetch(
        "SELECT raw FROM turns WHERE session_id = $1 AND seq >= 16 ORDER BY seq",
        active.session_id,
    )
    assert [bytes(r["raw"]) for r in raws] == more
    assert first and second

    # And it can still be restored.
    await redis.delete(active.key)
    back = await restore(rt.redis, rt.engine, rt.settings, active.session_id, turns=4, ttl_s=60)
    assert back.status is RestoreStatus.RESTORED
    assert (await rt.pipeline.consolidate(active)).turns_archived == 0


async def test_turns_no_summary_folded_are_kept_however_old(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    rt = runtime
    # Three turns archived only (too few to fold), then the key expired and came back: the
    # summary made after the gap folds the new turns alone, not these.
    gone, before = await session(rt, redis, f"{prefix}gap", 3)
    await redis.delete(gone.key)
    await agents.conversation(redis, gone.key, 10, start=3)
    after = await rt.pipeline.consolidate(gone)
    assert after.gap and after.turns_folded == 6, after  # #3-#8 folded, #9-#12 verbatim
    await make_old(pg, gone.session_id, through_seq=99)

    await prune(rt.engine, timedelta(days=90))

    assert await seqs(pg, gone.session_id) == [0, 1, 2, 9, 10, 11, 12]
    raws = await pg.fetch(
        "SELECT raw FROM turns WHERE session_id = $1 AND seq < 3 ORDER BY seq", gone.session_id
    )
    assert [bytes(r["raw"]) for r in raws] == before


async def test_only_one_pruner_at_a_time(runtime: Runtime, pg: asyncpg.Connection) -> None:
    await pg.execute("SELECT pg_advisory_lock(7312006)")
    try:
        result = await prune(runtime.engine, timedelta(days=90))
    finally:
        await pg.execute("SELECT pg_advisory_unlock(7312006)")
    assert result.skipped


async def test_cli_prune(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    idle, _ = await session(runtime, redis, f"{prefix}cli-idle", 5)
    await pg.execute(
        "UPDATE sessions SET last_seen = now() - interval '3 hours' WHERE session_id = $1",
        idle.session_id,
    )
    kept = await cli(runtime.settings, "prune", "--older-than", "4h")
    assert kept.returncode == 0, kept.stderr
    assert await seqs(pg, idle.session_id) == [0, 1, 2, 3, 4]

    done = await cli(runtime.settings, "prune", "--older-than", "2h30m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned ") and "5 turns" in done.stdout
    assert await seqs(pg, idle.session_id) == []

    for bad in ("90", "ninety days", "0d"):
        usage = await cli(runtime.settings, "prune", "--older-than", bad)
        assert usage.returncode == 2, (bad, usage.stderr)


async def test_the_daemon_prunes_at_most_once_an_hour(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(retention="90d", scan_interval_s=0.05)
    assert settings.retention == timedelta(days=90)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:

        async def old_session(name: str) -> str:
            ref, _ = await session(rt, redis, name, 3)
            await redis.delete(ref.key)
            await pg.execute(
                f"UPDATE sessions SET last_seen = {OLD} WHERE session_id = $1", ref.session_id
            )
            return ref.session_id

        async def run_until(done: Callable[[], Awaitable[bool]]) -> bool:
            """Run the daemon until `done` or two seconds; whether `done` came true."""
            stop = asyncio.Event()
            task = asyncio.create_task(rt.daemon.run_forever(stop))
            try:
                for _ in range(40):
                    await asyncio.sleep(0.05)
                    if await done():
                        return True
                return False
            finally:
                stop.set()
                await task

        async def gone(session_id: str) -> bool:
            return not await seqs(pg, session_id)

        first = await old_session(f"{prefix}d1")
        assert await run_until(lambda: gone(first))

        second = await old_session(f"{prefix}d2")
        # Within the hour: left for the next run.
        assert not await run_until(lambda: gone(second))
        assert await seqs(pg, second) == [0, 1, 2]
