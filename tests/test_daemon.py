"""Which sessions the daemon picks, in which order, and what it never touches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from worker.config import Settings
from worker.daemon import VisitCache
from worker.domain import Outcome, SessionRef, Trigger
from worker.hot.scanner import Probe
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


async def make_idle(redis: Redis, key: str, seconds: int) -> None:
    """Give a key an idle time, as if nobody had touched it for `seconds` (RESTORE IDLETIME)."""
    ttl = await redis.pttl(key)
    dump = await redis.dump(key)
    assert dump is not None
    await redis.restore(key, max(ttl, 0), dump, replace=True, idletime=seconds)


async def test_triggers_pick_expiring_soonest_first_then_oversize_then_idle(
    make_settings: Callable[..., Settings], redis: Redis, prefix: str
) -> None:
    settings = make_settings(idle_after_s=600, expiry_margin_s=120, max_hot_tokens=2000)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for
        await agents.conversation(redis, key("active"), 6)
        await agents.conversation(redis, key("idle"), 6)
        await make_idle(redis, key("idle"), 3600)
        await agents.conversation(redis, key("expiring-late"), 6, ttl_s=100)
        await agents.conversation(redis, key("expiring-soon"), 6, ttl_s=30)
        await agents.append(redis, key("huge"), "user", "lorem ipsum " * 1500)
        unrelated = f"{prefix}conversation:x:other"
        await redis.set(unrelated, b"not a session", ex=500)

        work = await rt.daemon.find_work()
        assert rt.metrics.registry.get_sample_value("consolidator_sessions_due") == 4

        picked = [(c.ref.session_id, c.trigger) for c, _ in work]
        assert picked == [
            ("expiring-soon", Trigger.EXPIRING),
            ("expiring-late", Trigger.EXPIRING),
            ("huge", Trigger.OVERSIZE),
            ("idle", Trigger.IDLE),
        ]
        outcomes = await rt.daemon.run_once()
    assert {o.session_id for o in outcomes} == {s for s, _ in picked}
    assert await redis.get(unrelated) == b"not a session"
    assert 0 < await redis.ttl(unrelated) <= 500


async def test_keys_outside_the_pattern_are_never_touched(
    make_settings: Callable[..., Settings], redis: Redis, prefix: str, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    others = {
        f"{prefix}conversation:a:historyX": agents.element("user", "near miss"),
        f"{prefix}conversation:a": agents.element("user", "prefix only"),
        f"{prefix}other:b:history": agents.element("user", "other family"),
    }
    for key, raw in others.items():
        await redis.rpush(key, raw, raw)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        await agents.conversation(redis, rt.pattern.key_for("mine"), 8)
        outcomes = await rt.daemon.run_once()
    assert [o.session_id for o in outcomes] == ["mine"]
    for key, raw in others.items():
        assert await redis.lrange(key, 0, -1) == [raw, raw]
    assert (
        await pg.fetchval("SELECT count(*) FROM sessions WHERE redis_key = ANY($1)", list(others))
        == 0
    )


async def test_an_untouched_session_is_not_read_again_but_a_new_turn_is_seen(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings()
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for("quiet")
        await agents.conversation(redis, key, 8, ttl_s=3000)
        first = await rt.daemon.run_once()
        assert [o.status for o in first] == ["consolidated"]
        assert await rt.daemon.find_work() == []  # nothing changed since
        await agents.append(redis, key, "user", "one more thing", ttl_s=3000)
        again = await rt.daemon.run_once()
    assert [(o.status, o.turns_archived) for o in again] == [("consolidated", 1)]


async def test_run_forever_stops_when_asked(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(scan_interval_s=0.05)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        await agents.conversation(redis, rt.pattern.key_for("loop"), 9)
        stop = asyncio.Event()
        task = asyncio.create_task(rt.daemon.run_forever(stop))
        for _ in range(100):
            if len(await redis.lrange(rt.pattern.key_for("loop"), 0, -1)) == 5:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert len(await redis.lrange(rt.pattern.key_for("loop"), 0, -1)) == 5


async def test_a_ceiling_on_sessions_per_second_paces_idle_sessions_but_not_expiring_ones(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    # 2 sessions a second: five idle sessions cannot all start within 2 s, whereas six
    # sessions about to expire, taken first, are not held back at all.
    settings = make_settings(max_sessions_per_s=2, expiry_margin_s=120)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for
        for i in range(6):
            await agents.conversation(redis, key(f"expiring{i}"), 8, ttl_s=60)
        for i in range(5):
            await agents.conversation(redis, key(f"idle{i}"), 8)
        started = time.monotonic()
        finished: dict[str, float] = {}

        def note(outcome: Outcome) -> None:
            finished[outcome.session_id] = time.monotonic() - started

        outcomes = await rt.daemon.run_once(on_outcome=note)
    assert sorted(o.status for o in outcomes) == ["consolidated"] * 11
    expiring = [t for s, t in finished.items() if s.startswith("expiring")]
    idle = sorted(t for s, t in finished.items() if s.startswith("idle"))
    assert max(expiring) < 1.5  # unpaced: at 2 a second they would need 2.5 s at least
    # The first idle session may start at once, each of the other four half a second later.
    assert idle[-1] - idle[0] >= 1.5
    for i in range(5):
        assert len(await redis.lrange(key(f"idle{i}"), 0, -1)) == 5  # summary + 4 kept


async def test_a_slow_pace_does_not_hold_up_a_stop(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(max_sessions_per_s=0.2)  # one session every 5 s
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        for i in range(3):
            await agents.conversation(redis, rt.pattern.key_for(f"idle{i}"), 8)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(rt.daemon.run_once(stop), 10)
        stopped_after = time.monotonic() - started
    assert [o.status for o in outcomes] == ["consolidated"]  # the first, before the stop
    assert stopped_after < 2.5


async def test_a_pass_ends_within_half_the_expiry_margin_and_the_next_one_follows_at_once(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    # A pass longer than the margin could let a session's TTL run out while it waits for its
    # turn; ending the pass lets a fresh scan take it first, as expiring. Here the pass may
    # last 1 s (margin 2 s) and the pace lets only a few sessions start in that time.
    settings = make_settings(max_sessions_per_s=2, expiry_margin_s=2, scan_interval_s=60)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        # Enough that the second pass is cut short too, whatever the first one managed.
        keys = [rt.pattern.key_for(f"idle{i}") for i in range(10)]
        for key in keys:
            await agents.conversation(redis, key, 8)
        first = await rt.daemon.run_once()
        assert 1 <= len(first) <= 4
        assert _sample(rt, "consolidator_passes_cut_short_total") == 1
        folded = [len(await redis.lrange(key, 0, -1)) == 5 for key in keys]
        assert sum(folded) == len(first)  # the others were not touched
        # run_forever scans again at once instead of waiting out the 60 s scan interval.
        before = _sample(rt, "consolidator_scan_seconds_count")
        stop = asyncio.Event()
        task = asyncio.create_task(rt.daemon.run_forever(stop))
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert _sample(rt, "consolidator_scan_seconds_count") - before >= 2


async def test_without_a_pace_a_pass_is_cut_short_all_the_same(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    # One session at a time and a pass limit of 0.1 s (margin 0.2 s): 100 sessions take longer,
    # at a few ms each for their Redis round trips and archive commit.
    settings = make_settings(concurrency=1, expiry_margin_s=0.2)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        keys = [rt.pattern.key_for(f"idle{i}") for i in range(100)]
        for key in keys:
            await agents.conversation(redis, key, 8)
        first = await rt.daemon.run_once()
        assert 1 <= len(first) < 100
        assert _sample(rt, "consolidator_passes_cut_short_total") == 1
        folded = [len(await redis.lrange(key, 0, -1)) == 5 for key in keys]
        assert sum(folded) == len(first)


def _sample(rt: Runtime, name: str) -> float:
    """A metric's value as /metrics would show it."""
    value = rt.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_a_visit_is_trusted_for_a_bounded_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A write in the same second as the daemon's own last access, with no TTL refresh and too
    # small to move the memory figure, looks like no write at all: re-read it after a while.
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    ref = SessionRef("s", "conversation:s:history")
    visits = VisitCache(max_age_s=600)
    visits.remember(Probe(ref, 60_000_000, 0, 3000, clock[0]), 3000)

    def probe_after(seconds: float) -> Probe:
        clock[0] = 1_000_000.0 + seconds  # idle all along, same expiry, same memory
        return Probe(ref, 60_000_000 - int(seconds * 1000), int(seconds), 3000, clock[0])

    assert visits.unchanged(probe_after(30))
    assert visits.unchanged(probe_after(599))
    assert not visits.unchanged(probe_after(601))
