"""Keys that expire or are deleted while they are being consolidated.

The pipeline reads a snapshot, archives it, summarizes, then rewrites by compare-and-swap. At
each of those moments the agent (or Redis) may delete the key, let it expire, or replace the
conversation with a new one under the same id. Whatever happens: what was read is archived
once, a key that went away is never brought back by the rewrite, and a new conversation under
the same key is left exactly as the agent wrote it, then archived after it (with a gap, since
it does not continue the archive).

Then a daemon-level scenario: agents write sessions with a short TTL and walk away; the daemon
(idle trigger off, expiry trigger on) must archive every turn before Redis deletes the key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.chaos import (
    REDIS_URL,
    Daemon,
    Figures,
    Monitor,
    WriterFleet,
    assign_sessions,
    audit_session,
    daemon_env,
    delete_prefix,
    fresh_database,
    key_for,
    plain_dsn,
    record,
    scaled,
)
from worker.config import Settings
from worker.domain import SummaryText, Turn
from worker.runtime import open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

pytestmark = pytest.mark.fault

Action = Callable[[], Awaitable[None]]


class HookedSummarizer:
    """The extractive summarizer, running `hook` first (the agent acting meanwhile)."""

    name = "hooked"

    def __init__(self) -> None:
        self.hook: Action | None = None
        self.inner = ExtractiveSummarizer()

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        if self.hook is not None:
            await self.hook()
        return await self.inner.summarize(previous, turns, max_chars)

    async def aclose(self) -> None:
        pass


MOMENTS = ("after the read", "while summarizing", "before the rewrite")
ACTIONS = ("deleted", "expired", "replaced")


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("moment", MOMENTS)
async def test_key_gone_or_replaced_mid_consolidation(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    moment: str,
    action: str,
) -> None:
    session = f"{prefix}{moment.split()[0]}-{action}"
    summarizer = HookedSummarizer()
    async with open_runtime(make_settings(), summarizer=summarizer) as rt:
        key = rt.pattern.key_for(session)
        ref = rt.pattern.parse(key)
        assert ref is not None
        written = await agents.conversation(redis, key, 10, ttl_s=600)
        replacement: list[bytes] = []
        fired: list[str] = []

        async def act() -> None:
            if fired:
                return
            fired.append(action)
            if action == "deleted":
                await redis.delete(key)
            elif action == "expired":
                await redis.pexpire(key, 1)
                for _ in range(500):  # until Redis has let it expire
                    if not await redis.exists(key):
                        break
                    await asyncio.sleep(0.002)
            else:  # the agent starts over under the same id
                await redis.delete(key)
                for i in range(6):
                    replacement.append(
                        await agents.append(redis, key, "user", f"new conversation {i}")
                    )

        store = rt.pipeline.store
        if moment == "while summarizing":
            summarizer.hook = act
        elif moment == "after the read":  # before the archive commit
            read = store.read

            async def read_then_act(*args: Any, **kwargs: Any) -> Any:
                snapshot = await read(*args, **kwargs)
                await act()
                return snapshot

            monkeypatch.setattr(store, "read", read_then_act)
        else:  # the summary is recorded, the compare-and-swap comes next
            rewrite = store.replace_prefix

            async def act_then_rewrite(*args: Any, **kwargs: Any) -> Any:
                await act()
                return await rewrite(*args, **kwargs)

            monkeypatch.setattr(store, "replace_prefix", act_then_rewrite)

        outcome = await rt.pipeline.consolidate(ref)
        assert fired, "the fault was never injected"
        assert outcome.status in ("conflict", "archived"), outcome
        hot = await redis.lrange(key, 0, -1)
        # Never resurrected, never rewritten over the agent's new conversation.
        assert hot == replacement
        rows = await pg.fetch("SELECT raw FROM turns WHERE session_id = $1 ORDER BY seq", session)
        assert [bytes(r["raw"]) for r in rows] == written  # what was read is archived, once

        monkeypatch.undo()
        summarizer.hook = None
        again = await rt.pipeline.consolidate(ref)
    rows = await pg.fetch("SELECT raw FROM turns WHERE session_id = $1 ORDER BY seq", session)
    assert [bytes(r["raw"]) for r in rows] == written + replacement
    gaps = await pg.fetch("SELECT before_seq FROM gaps WHERE session_id = $1", session)
    if replacement:
        assert again.status == "consolidated"
        assert [g["before_seq"] for g in gaps] == [len(written)]  # a new start, not glued on
        assert (await redis.lrange(key, 0, -1))[1:] == replacement[-4:]
        assert 0 < await redis.ttl(key) <= 3600
    else:
        assert again.status == "unchanged" and not gaps
        assert not await redis.exists(key)


@pytest.mark.soak
@pytest.mark.timeout(scaled(120, 900))
async def test_sessions_about_to_expire_are_archived_before_redis_deletes_them(
    tmp_path: Path,
) -> None:
    """Agents write with a short TTL and walk away: every turn must reach the archive first."""
    ttl_s = 3
    duration = scaled(3.0, 120.0)
    prefix = f"exp{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)
    async with fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=database_url,
            prefix=prefix,
            idle_after_s=3600,  # only the expiry trigger picks sessions
            expiry_margin_s=ttl_s + 5,
        )
        daemon = Daemon("daemon", env, tmp_path)
        assignments = assign_sessions(writers=2, per_writer=10, shared=0, tag="e")
        fleet = WriterFleet(
            redis_url=REDIS_URL,
            prefix=prefix,
            assignments=assignments,
            duration_s=duration,
            rate=20,
            ttl_s=ttl_s,
            log_dir=tmp_path,
        )
        monitor = Monitor(
            redis=redis,
            database_url=database_url,
            fleet=fleet,
            lease_ttl_ms=2000,
        )
        started = time.monotonic()
        try:
            daemon.start()
            await daemon.wait_started()
            fleet.start()
            await monitor.start()
            await fleet.wait(timeout_s=duration + 30)
            # Every key expires at most ttl_s after its last write; give Redis the time.
            deadline = time.monotonic() + ttl_s + 5
            keys = [key_for(prefix, s) for ss in assignments.values() for s in ss]
            while await redis.exists(*keys):
                assert time.monotonic() < deadline, "keys outlived their TTL"
                await asyncio.sleep(0.2)
            code, _ = await daemon.terminate()
            await monitor.stop()
            written = fleet.written()
            audits = [
                await audit_session(
                    redis, pg, prefix, s, written.by_session[s], hot_expected=False, allow_gaps=True
                )
                for s in written.sessions()
            ]
            lost = sum(a.lost for a in audits)
            # An agent may come back to a session after Redis expired it: the new list does not
            # continue the archive, and the archive says so with a gap record. Nothing is
            # missing there (every turn is checked above), so such gaps are allowed here.
            restarted = sum(1 for a in audits if a.gaps)
            record(
                Figures(
                    f"keys expiring: TTL {ttl_s} s, agents walk away",
                    time.monotonic() - started,
                    turns_written=written.total,
                    turns_archived=sum(a.archived for a in audits),
                    turns_lost=lost,
                    duplicates=sum(a.duplicates for a in audits),
                    seen=(
                        f"{len(audits)} sessions expired in Redis, every turn archived first; "
                        f"{restarted} came back after expiring (a gap marks the new start)"
                    ),
                )
            )
        finally:
            await monitor.stop()
            fleet.stop()
            daemon.stop_quietly()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()
    assert code == 0
    assert not monitor.violations, monitor.violations[:10]
    problems = [p for a in audits for p in a.problems]
    assert not problems, problems[:20]
