"""SIGTERM during heavy work: in-flight sessions finish or are abandoned cleanly, exit 0 in time.

The daemon's summarizer is Gemini, served by a local Gemini-protocol server that answers slowly,
so that when SIGTERM arrives a full set of sessions is in flight, waiting on the model. With a
grace period longer than the model's answers, they finish; with a shorter one, they are
abandoned. Either way the daemon exits 0 within the grace period (plus its own shutdown), every
lease is released (not left to expire: the lease TTL is far longer than the test), and each
session is in one of two states, never in between: consolidated (archive complete, hot state =
summary + recent turns) or untouched in Redis (byte for byte, TTL kept), with its turns
archived if the daemon got that far.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.chaos import (
    REDIS_URL,
    Daemon,
    Figures,
    audit_session,
    daemon_env,
    delete_prefix,
    fresh_database,
    hot_list,
    key_for,
    lease_glob,
    plain_dsn,
    record,
    wait_until,
)
from worker.testing.gemini_server import GeminiServer, RecordedRequest, Reply

pytestmark = [pytest.mark.fault, pytest.mark.soak]

SESSIONS = 24
CONCURRENCY = 6


@pytest.mark.parametrize(
    ("case", "model_delay_s", "grace_s", "args"),
    [
        ("in-flight sessions finish", 1.0, 6.0, ()),
        ("in-flight sessions abandoned", 30.0, 1.0, ()),
        # A one-shot pass (a cron job) keeps the same grace, not its slowest model call's.
        ("run --once, in-flight sessions abandoned", 30.0, 1.0, ("--once",)),
    ],
)
async def test_sigterm_during_heavy_work(
    tmp_path: Path, case: str, model_delay_s: float, grace_s: float, args: tuple[str, ...]
) -> None:
    prefix = f"term{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)

    def slow(request: RecordedRequest) -> Reply:
        return Reply(text=None, delay_s=model_delay_s)

    async with GeminiServer(default=slow) as model, fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=database_url,
            prefix=prefix,
            concurrency=CONCURRENCY,
            drain_grace_s=grace_s,
            lease_ttl_s=120,
            summarizer="gemini",
            gemini_max_attempts=1,
            gemini_timeout_s=60,
            GEMINI_API_KEY="local-test-key",
            GOOGLE_GEMINI_BASE_URL=model.base_url,
        )
        daemon = Daemon("daemon", env, tmp_path, args)
        try:
            written = {
                f"s{i:02d}": await agents.conversation(redis, key_for(prefix, f"s{i:02d}"), 12)
                for i in range(SESSIONS)
            }
            before = {s: await redis.dump(key_for(prefix, s)) for s in written}

            async def in_flight() -> bool:
                return len(model.generate_requests) >= CONCURRENCY

            daemon.start()
            await daemon.wait_started()
            await wait_until(in_flight, 60, "a full set of sessions in flight")
            code, took = await daemon.terminate(timeout_s=grace_s + 30)
            leases = [k async for k in redis.scan_iter(match=lease_glob(prefix), count=1000)]
            states: dict[str, str] = {}
            problems: list[str] = []
            lost = duplicates = 0
            for s, turns in written.items():
                key = key_for(prefix, s)
                hot = await hot_list(redis, key)
                archived = [
                    bytes(r["raw"])
                    for r in await pg.fetch(
                        "SELECT raw FROM turns WHERE session_id = $1 ORDER BY seq", s
                    )
                ]
                lost += len(set(turns) - set(hot) - set(archived))  # in neither tier
                duplicates += len(archived) - len(set(archived))
                if hot == turns:
                    states[s] = "archived, untouched" if archived else "untouched"
                    if await redis.dump(key) != before[s]:
                        problems.append(f"{s}: hot state changed")
                    if archived not in ([], turns):
                        problems.append(f"{s}: partly archived")
                    if not 0 < await redis.ttl(key) <= 3600:
                        problems.append(f"{s}: TTL lost")
                else:
                    states[s] = "consolidated"
                    audited = await audit_session(redis, pg, prefix, s, {0: turns})
                    problems += audited.problems
            events = [e.get("event") for e in daemon.events()]
            abandoned = sum(1 for e in daemon.events() if e.get("status") == "abandoned")
            counts = {state: list(states.values()).count(state) for state in set(states.values())}
            record(
                Figures(
                    f"SIGTERM mid-work, {case} (grace {grace_s:.0f} s, model {model_delay_s} s)",
                    took,
                    turns_written=sum(len(t) for t in written.values()),
                    turns_archived=int(await pg.fetchval("SELECT count(*) FROM turns")),
                    turns_lost=lost,
                    duplicates=duplicates,
                    seen=(
                        f"exit {code} after {took:.1f} s; {len(leases)} leases left; "
                        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                    ),
                )
            )
        finally:
            daemon.stop_quietly()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()

    assert code == 0
    assert took <= grace_s + 3.0, f"took {took:.1f}s to exit, grace {grace_s}s"
    assert not leases, f"leases left behind: {leases}"
    assert not problems, problems
    assert lost == 0 and duplicates == 0
    assert "draining" in events and "daemon_stopped" in events
    if model_delay_s < grace_s:
        assert "drain_timeout" not in events
        assert counts.get("consolidated", 0) >= CONCURRENCY  # those in flight finished
    else:
        assert "drain_timeout" in events
        assert counts.get("archived, untouched", 0) >= CONCURRENCY  # abandoned after archiving
        assert "consolidated" not in counts
        # Each abandoned session still has its one line, saying so.
        assert abandoned >= CONCURRENCY
