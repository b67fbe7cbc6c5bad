"""Redis restarted mid-run (a private instance): the daemon reconnects with backoff and goes on.

The Redis here is a private `redis-server` (tests/servers.py) with an append-only file synced
at every write, as an agent fleet that must not lose a turn runs it. It is crashed (SIGKILL) or
shut down while agents write and the daemon consolidates, kept down for a while, and started
again. Then the daemon's connections (it reaches Redis through tests/proxy.py) are cut again
and again for short moments, so that some die in the middle of a command or a Lua script.

A push that was in flight when Redis died may or may not have landed (the agent got no answer):
the audit accepts it either way, but only once, and in order. Every acknowledged turn must be
archived exactly once.
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
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.chaos import (
    Daemon,
    Figures,
    Monitor,
    WriterFleet,
    applied_summaries,
    assign_sessions,
    audit,
    daemon_env,
    final_flush,
    flaps_then_partition,
    fresh_database,
    more_than,
    plain_dsn,
    record,
    scaled,
    wait_until,
)
from tests.proxy import FaultProxy
from tests.servers import PrivateRedis, free_port
from worker.hot.keys import lease_key
from worker.hot.leases import claim
from worker.hot.scripts import Scripts

pytestmark = [pytest.mark.fault, pytest.mark.soak, pytest.mark.timeout(scaled(120, 3600))]

LEASE_TTL_S = 3.0


async def test_redis_restarted_mid_run_daemon_reconnects_and_goes_on(tmp_path: Path) -> None:
    restarts = int(scaled(1, 6))
    down_s = scaled(1.5, 15.0)
    prefix = f"rr{uuid.uuid4().hex[:8]}:"
    flaps = int(scaled(2, 150))
    partition_s = scaled(3.0, 60.0)
    server = PrivateRedis(persistent=True)
    await asyncio.to_thread(server.start)
    # The daemon reaches Redis through a proxy too, which can cut its connections mid-script.
    proxy = FaultProxy("127.0.0.1", server.port)
    proxy.start()
    redis = Redis.from_url(server.url, socket_timeout=5)
    async with fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=f"redis://{proxy.host}:{proxy.port}/0",
            database_url=database_url,
            prefix=prefix,
            lease_ttl_s=LEASE_TTL_S,
            metrics_port=free_port(),
            redis_timeout_s=1,
        )
        daemon = Daemon("daemon", env, tmp_path)
        fleet = WriterFleet(
            redis_url=server.url,
            prefix=prefix,
            assignments=assign_sessions(writers=2, per_writer=6, shared=1, tag="r"),
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
        resumed_after: list[float] = []
        started = time.monotonic()
        try:
            daemon.start()
            fleet.start()
            await monitor.start()
            await daemon.wait_started()
            await wait_until(daemon.ready, 30, "the daemon to be ready")
            await wait_until(lambda: more_than(applied, 0), 60, "first consolidations")
            for i in range(restarts):
                # Alternately a crash and a clean shutdown of Redis.
                await asyncio.to_thread(server.kill if i % 2 == 0 else server.stop)
                await wait_until(daemon.not_ready, 10, "/readyz to say 503")
                await asyncio.sleep(down_s)
                assert daemon.running, daemon.tail()
                done_before = await applied()
                await asyncio.to_thread(server.start)
                await wait_until(daemon.ready, 30, "/readyz to say 200 again")
                resumed_after.append(
                    await wait_until(
                        lambda n=done_before: more_than(applied, n),  # type: ignore[misc]
                        90,
                        "the daemon to consolidate again",
                    )
                )
            # Then short cuts of the daemon's connections, and a partition.
            disruption = await flaps_then_partition(
                proxy, daemon, applied, flaps=flaps, partition_s=partition_s
            )
            resumed_after += disruption.resumed_after
            await fleet.finish()
            code, took = await daemon.terminate()
            await monitor.stop()
            final = await final_flush(env)
            written = fleet.written()
            result = await audit(redis, pg, prefix, written)
            events = daemon.events()
            backed_off = sum(1 for e in events if e.get("event") == "pass_failed")
            record(
                Figures(
                    "Redis (private, AOF) restarted, flapping, then partitioned",
                    time.monotonic() - started,
                    turns_written=written.total + result.uncertain_landed,
                    turns_archived=result.archived,
                    turns_lost=result.lost,
                    duplicates=result.duplicates,
                    outage=(
                        f"{restarts}× {down_s:.1f} s down, {flaps} cuts of 0.05-0.6 s, "
                        f"{partition_s:.0f} s partition"
                    ),
                    seen=(
                        f"resumed {max(resumed_after):.1f} s after Redis returned; "
                        f"{backed_off} passes backed off; {disruption.severed} connections cut "
                        f"mid-flight; partition noticed after {disruption.noticed_s:.1f} s; "
                        f"{written.total_uncertain} pushes unanswered by the dying Redis, "
                        f"{result.uncertain_landed} of which had landed (archived once)"
                    ),
                )
            )
        finally:
            await monitor.stop()
            fleet.stop()
            daemon.stop_quietly()
            await redis.aclose()
            await pg.close()
            proxy.close()
            await asyncio.to_thread(server.close)

    assert not monitor.violations, monitor.violations[:10]
    assert code == 0 and took < 10
    assert final == 0
    assert not result.problems, result.problems[:20]
    assert written.total > 100
    assert backed_off >= restarts


@pytest.mark.timeout(30)
async def test_lease_renewer_stops_even_when_a_redis_timeout_swallows_its_cancellation(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the partition above found, made deterministic.

    A session's lease is renewed in the background while the session is worked on. When the
    session is done the renewer is cancelled; but a cancellation that arrives just as a Redis
    call times out can come back as that call's TimeoutError, which the renewer logs and
    survives. It must stop all the same: the session, and the pass waiting for it, would
    otherwise never end.
    """
    scripts = Scripts(redis)

    async def renew_behind_a_partition(lease: str, token: str, ttl_ms: int) -> bool:
        try:
            await asyncio.sleep(3600)  # no answer...
        except asyncio.CancelledError:
            raise RedisTimeoutError("Timeout reading from socket") from None  # ...and a timeout
        return True

    monkeypatch.setattr(scripts, "renew", renew_behind_a_partition)
    session_key = f"{prefix}conversation:renewed:history"
    async with asyncio.timeout(5):
        async with claim(redis, scripts, session_key, ttl_ms=90) as lease:
            assert lease is not None
            await asyncio.sleep(0.2)  # the renewer is waiting on Redis now
    assert not await redis.exists(lease_key(session_key))  # released, not left to expire
