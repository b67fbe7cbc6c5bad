"""Chaos: agents writing, replicas consolidating, replicas SIGKILLed; nothing lost or doubled.

Several agent processes append turns to many sessions (some sessions written by every agent at
once), two daemon replicas consolidate them while one-off `consolidator flush --all` runs come
and go, and a seeded RNG SIGKILLs replicas (and some flushes) at random moments and restarts
them, or freezes a replica (SIGSTOP) past its lease TTL and lets it wake up with work it no
longer owns. Then the replicas get SIGTERM, a final flush runs, and both tiers are audited.
`SOAK=1` runs it for minutes instead of seconds; `CHAOS_SEED` replays another sequence.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.chaos import (
    REDIS_URL,
    SEED,
    ChaosStats,
    Daemon,
    Figures,
    Monitor,
    WriterFleet,
    assign_sessions,
    audit,
    audit_session,
    daemon_env,
    delete_prefix,
    final_flush,
    fresh_database,
    kill_and_restart,
    one_off_flushes,
    plain_dsn,
    record,
    scaled,
    status_counts,
    wait_for_no_leases,
)
from worker.config import Settings
from worker.hot.keys import lease_key
from worker.runtime import open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

pytestmark = [pytest.mark.fault, pytest.mark.soak, pytest.mark.timeout(scaled(150, 3600))]

LEASE_TTL_S = 2.0
GRACE_S = 5.0
MIN_KILLS = int(scaled(4, 100))
WRITERS = int(scaled(4, 6))
REPLICAS = int(scaled(2, 3))


async def test_replicas_killed_at_random_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    duration = scaled(10, 600)
    rng = random.Random(SEED)
    prefix = f"chaos{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)
    async with fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=database_url,
            prefix=prefix,
            lease_ttl_s=LEASE_TTL_S,
            drain_grace_s=GRACE_S,
        )
        daemons = [Daemon(f"replica{i}", env, tmp_path) for i in range(REPLICAS)]
        fleet = WriterFleet(
            redis_url=REDIS_URL,
            prefix=prefix,
            assignments=assign_sessions(writers=WRITERS, per_writer=int(scaled(8, 12)), shared=2),
            duration_s=duration,
            rate=25,
            log_dir=tmp_path,
        )
        monitor = Monitor(
            redis=redis,
            database_url=database_url,
            fleet=fleet,
            lease_ttl_ms=int(LEASE_TTL_S * 1000),
        )
        stats = ChaosStats()
        started = time.monotonic()
        try:
            for daemon in daemons:
                daemon.start()
            fleet.start()
            await monitor.start()
            until = started + duration
            await asyncio.gather(
                kill_and_restart(
                    daemons,
                    until=until,
                    rng=rng,
                    stats=stats,
                    min_kills=MIN_KILLS,
                    freeze_chance=0.25,
                    min_freezes=1,
                    freeze_s=(LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.0),
                ),
                one_off_flushes(env, until=until, rng=rng, stats=stats, log_dir=tmp_path),
            )
            await fleet.wait(timeout_s=60)

            exits = []
            for daemon in daemons:
                await daemon.wait_started()
                exits.append(await daemon.terminate())
            # Leases of SIGKILLed replicas and flushes expire by their TTL; none may outlive it.
            leases_left = await wait_for_no_leases(redis, prefix, LEASE_TTL_S + 1.0)
            await monitor.stop()
            final = await final_flush(env)
            written = fleet.written()
            result = await audit(redis, pg, prefix, written)
            elapsed = time.monotonic() - started
            statuses = status_counts(daemons)
            record(
                Figures(
                    f"chaos: {WRITERS} agents, {REPLICAS} replicas + flushes, killed at random",
                    duration,
                    kills=stats.kills + stats.flush_kills,
                    turns_written=written.total,
                    turns_archived=result.archived,
                    turns_lost=result.lost,
                    duplicates=result.duplicates,
                    outage="replica restarts",
                    seen=(
                        f"{stats.kills} replica + {stats.flush_kills} flush kills, "
                        f"{stats.freezes} freezes past the lease, "
                        f"{stats.flushes} flushes, {statuses['consolidated']} rewrites, "
                        f"{statuses['conflict']} stale writes refused, {monitor.samples} "
                        f"invariant checks, {len(monitor.violations)} violations"
                    ),
                )
            )
            print(
                f"elapsed {elapsed:.1f}s statuses {dict(statuses)} flush codes {stats.flush_codes}"
            )
        finally:
            await monitor.stop()
            fleet.stop()
            for daemon in daemons:
                daemon.stop_quietly()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()

    assert stats.kills >= MIN_KILLS and stats.freezes >= 1, "the chaos never got going"
    assert not stats.flush_hangs, f"flushes hung: {stats.flush_hangs}"
    assert not monitor.violations, monitor.violations[:10]
    assert monitor.samples > 5
    assert written.total > 200 and written.total_uncertain == 0
    assert final == 0
    assert not result.problems, result.problems[:20]
    assert result.lost == 0 and result.duplicates == 0
    assert leases_left == 0
    assert monitor.max_lease_pttl <= LEASE_TTL_S * 1000
    for code, took in exits:
        assert code == 0
        assert took <= GRACE_S + 5.0
    assert statuses["consolidated"] > 0, "nothing was ever folded: the test proves too little"
    assert sum(a.folded for a in result.sessions) > 0


async def test_replica_frozen_past_its_lease_after_reading_archives_nothing_twice(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the chaos above found, made deterministic.

    Replica A reads a session, then stalls (SIGSTOP, a VM pause) past its lease. The agent
    writes on; replica B claims the session, archives it all and folds it into a summary. A
    wakes up holding a snapshot older than the archive it then reads: it must notice it no
    longer owns the session, rather than take its stale turns for new ones (archiving them a
    second time, behind a false gap).
    """
    settings = make_settings()
    session = f"{prefix}frozen"
    async with (
        open_runtime(settings, summarizer=ExtractiveSummarizer()) as a,
        open_runtime(settings, summarizer=ExtractiveSummarizer()) as b,
    ):
        key = a.pattern.key_for(session)
        ref = a.pattern.parse(key)
        assert ref is not None
        written = await agents.conversation(redis, key, 10)
        await a.pipeline.consolidate(ref)  # an earlier pass: a summary is at the head
        written += await agents.conversation(redis, key, 6, start=10)
        read = a.pipeline.store.read
        b_outcomes = []

        async def read_then_stall(*args: Any, **kwargs: Any) -> Any:
            stored = await read(*args, **kwargs)
            # A's lease lapses while it is frozen; B does a whole consolidation meanwhile.
            await redis.delete(lease_key(key))
            written.extend(await agents.conversation(redis, key, 2, start=16))
            b_outcomes.append(await b.pipeline.consolidate(ref))
            return stored

        monkeypatch.setattr(a.pipeline.store, "read", read_then_stall)
        outcome = await a.pipeline.consolidate(ref)
        monkeypatch.undo()
        assert [o.status for o in b_outcomes] == ["consolidated"]
        assert outcome.status == "conflict" and outcome.turns_archived == 0, outcome
        written += await agents.conversation(redis, key, 3, start=18)
        again = await a.pipeline.consolidate(ref)
        assert again.status in ("archived", "consolidated") and not again.gap
    result = await audit_session(redis, pg, prefix, session, {0: written})
    assert not result.problems, result.problems
