"""PostgreSQL unreachable mid-run: nothing in Redis is rewritten without a durable archive.

The daemon reaches PostgreSQL through a fault-injecting proxy (tests/proxy.py), so the shared
server is never stopped: `cut()` resets every connection and every new one. While it is cut,
agents keep writing; the daemon must report not-ready on /readyz, back off instead of
hammering, and rewrite nothing in Redis; once the proxy lets connections through again it
must resume by itself. A monitor with its own, direct connection checks throughout that no
turn is ever missing from both tiers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from tests.chaos import (
    REDIS_URL,
    Daemon,
    Figures,
    Monitor,
    WriterFleet,
    applied_summaries,
    assign_sessions,
    audit,
    daemon_env,
    delete_prefix,
    final_flush,
    flaps_then_partition,
    fresh_database,
    key_for,
    more_than,
    plain_dsn,
    record,
    scaled,
    wait_until,
)
from tests.proxy import FaultProxy
from tests.servers import free_port

pytestmark = [pytest.mark.fault, pytest.mark.soak, pytest.mark.timeout(scaled(120, 3600))]

LEASE_TTL_S = 3.0


def through(proxy: FaultProxy, database_url: str) -> str:
    url = make_url(database_url).set(host=proxy.host, port=proxy.port)
    return url.render_as_string(hide_password=False)


async def hot_lists(redis: Redis, prefix: str, sessions: list[str]) -> dict[str, list[bytes]]:
    async with redis.pipeline(transaction=False) as pipe:
        for s in sessions:
            pipe.lrange(key_for(prefix, s), 0, -1)
        lists = await pipe.execute()
    return dict(zip(sessions, lists, strict=True))


async def test_postgres_cut_mid_run_rewrites_nothing_and_resumes_by_itself(
    tmp_path: Path,
) -> None:
    outage_s = scaled(2.5, 30.0)
    outages = int(scaled(1, 3))
    flaps = int(scaled(2, 150))
    partition_s = scaled(3.0, 60.0)
    prefix = f"pgcut{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)
    async with fresh_database() as database_url:
        target = make_url(database_url)
        proxy = FaultProxy(target.host or "127.0.0.1", target.port or 5432)
        proxy.start()
        pg = await asyncpg.connect(plain_dsn(database_url))  # the audit's own, direct line
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=through(proxy, database_url),
            prefix=prefix,
            lease_ttl_s=LEASE_TTL_S,
            metrics_port=free_port(),
            database_timeout_s=1,
        )
        daemon = Daemon("daemon", env, tmp_path)
        assignments = assign_sessions(writers=2, per_writer=6, shared=1, tag="p")
        sessions = sorted({s for ss in assignments.values() for s in ss})
        fleet = WriterFleet(
            redis_url=REDIS_URL,
            prefix=prefix,
            assignments=assignments,
            duration_s=3600,
            rate=15,
            log_dir=tmp_path,
        )
        monitor = Monitor(
            redis=redis,
            database_url=database_url,
            fleet=fleet,
            lease_ttl_ms=int(LEASE_TTL_S * 1000),
        )

        applied = partial(applied_summaries, pg)
        not_ready_after: list[float] = []
        resumed_after: list[float] = []
        attempts_per_s: list[float] = []
        rewritten_during: list[str] = []
        started = time.monotonic()
        try:
            daemon.start()
            fleet.start()
            await monitor.start()
            await daemon.wait_started()
            await wait_until(daemon.ready, 30, "the daemon to be ready")
            await wait_until(lambda: more_than(applied, 0), 60, "first consolidations")

            for _ in range(outages):
                proxy.cut()
                cut_at = time.monotonic()
                not_ready_after.append(await wait_until(daemon.not_ready, 10, "/readyz to say 503"))
                await asyncio.sleep(1.0)  # a rewrite whose summary was recorded may still land
                before = await hot_lists(redis, prefix, sessions)
                settled_at = time.monotonic()
                await asyncio.sleep(max(outage_s - (settled_at - cut_at), 0.5))
                after = await hot_lists(redis, prefix, sessions)
                for s in sessions:
                    if after[s][: len(before[s])] != before[s]:
                        rewritten_during.append(s)
                now = time.monotonic()
                attempts_per_s.append(proxy.refusals_between(settled_at, now) / (now - settled_at))
                assert daemon.running, daemon.tail()
                done_before = await applied()
                proxy.restore()
                await wait_until(daemon.ready, 30, "/readyz to say 200 again")
                resumed_after.append(
                    await wait_until(
                        lambda n=done_before: more_than(applied, n),  # type: ignore[misc]
                        90,
                        "the daemon to consolidate again",
                    )
                )

            # Then short cuts in quick succession, and a partition.
            disruption = await flaps_then_partition(
                proxy, daemon, applied, flaps=flaps, partition_s=partition_s
            )
            resumed_after += disruption.resumed_after
            await fleet.finish()
            code, took = await daemon.terminate()
            await monitor.stop()
            final = await final_flush({**env, "CONSOLIDATOR_DATABASE_URL": database_url})
            written = fleet.written()
            result = await audit(redis, pg, prefix, written)
            events = daemon.events()
            failed_sessions = sum(
                1
                for e in events
                if e.get("event") == "session_consolidated" and e.get("status") == "failed"
            )
            failed_passes = sum(1 for e in events if e.get("event") == "pass_failed")
            record(
                Figures(
                    "PostgreSQL cut, flapping, then partitioned (proxy)",
                    time.monotonic() - started,
                    turns_written=written.total,
                    turns_archived=result.archived,
                    turns_lost=result.lost,
                    duplicates=result.duplicates,
                    outage=(
                        f"{outages}× {outage_s:.0f} s cut, {flaps} cuts of 0.05-0.6 s, "
                        f"{partition_s:.0f} s partition"
                    ),
                    seen=(
                        f"/readyz 503 after {max(not_ready_after):.1f} s; resumed "
                        f"{max(resumed_after):.1f} s after the database returned; "
                        f"{max(attempts_per_s):.1f} connection attempts/s while away; "
                        f"{len(rewritten_during)} rewrites while away; {disruption.severed} "
                        "connections cut mid-flight; partition noticed after "
                        f"{disruption.noticed_s:.1f} s; "
                        f"{failed_sessions} sessions failed, {failed_passes} passes backed off"
                    ),
                )
            )
        finally:
            await monitor.stop()
            fleet.stop()
            daemon.stop_quietly()
            proxy.close()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()

    assert not monitor.violations, monitor.violations[:10]
    assert not rewritten_during, f"rewritten while the archive was away: {rewritten_during}"
    assert code == 0 and took < 10
    assert final == 0
    assert not result.problems, result.problems[:20]
    assert written.total > 100
    assert max(attempts_per_s) <= 5, f"the daemon hammers the database: {attempts_per_s}"
