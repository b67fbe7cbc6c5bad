"""The invariants of consolidating one session (DESIGN 5), against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from worker.archive import writer
from worker.config import Settings
from worker.domain import SummaryText, Turn
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


async def archived(pg: asyncpg.Connection, session_id: str) -> list[bytes]:
    rows = await pg.fetch(
        "SELECT seq, raw FROM turns WHERE session_id = $1 ORDER BY seq", session_id
    )
    assert [r["seq"] for r in rows] == list(range(len(rows))), "seqs must be contiguous from 0"
    return [bytes(r["raw"]) for r in rows]


def is_summary(raw: bytes | str) -> bool:
    obj = json.loads(raw)
    return bool(obj["role"] == "system" and obj["content"].startswith("[Summary of the"))


async def test_archives_every_turn_once_and_keeps_recent_turns_verbatim(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("s1")
    written = await agents.conversation(redis, key, 12, ttl_s=5000)
    ttl_before = await redis.pttl(key)

    outcome = await runtime.pipeline.consolidate(runtime.pattern.parse(key))  # type: ignore[arg-type]

    assert outcome.status == "consolidated"
    assert await archived(pg, "s1") == written  # byte for byte, in order
    hot = await redis.lrange(key, 0, -1)
    assert len(hot) == 1 + 4
    assert is_summary(hot[0])
    assert hot[1:] == written[-4:]
    summary = json.loads(hot[0])["content"]
    assert "ORD-1000" in summary or "Café Zoë" in summary  # facts of the folded turns survive
    ttl_after = await redis.pttl(key)
    assert 0 < ttl_before - ttl_after < 5000  # the TTL is kept, not reset or removed


async def test_second_pass_archives_only_new_turns_and_rolls_the_summary(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("s2")
    first = await agents.conversation(redis, key, 10)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    await runtime.pipeline.consolidate(ref)
    unchanged = await runtime.pipeline.consolidate(ref)
    assert unchanged.turns_archived == 0 and unchanged.status == "unchanged"

    second = await agents.conversation(redis, key, 6, start=10)
    outcome = await runtime.pipeline.consolidate(ref)

    assert outcome.turns_archived == 6
    assert await archived(pg, "s2") == first + second
    hot = await redis.lrange(key, 0, -1)
    assert is_summary(hot[0]) and hot[1:] == second[-4:]
    assert json.loads(hot[0])["content"].startswith("[Summary of the 12 earlier turns]")
    rows = await pg.fetch(
        "SELECT through_seq, applied FROM summaries WHERE session_id='s2' ORDER BY id"
    )
    assert [(r["through_seq"], r["applied"]) for r in rows] == [(5, 1), (11, 1)]


class SlowSummarizer:
    """Holds the summary until the test has appended turns: the agent writing meanwhile."""

    name = "slow"

    def __init__(self, during: Callable[[], asyncio.Future[None]]) -> None:
        self.during = during
        self.inner = ExtractiveSummarizer()

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        await self.during()
        return await self.inner.summarize(previous, turns, max_chars)

    async def aclose(self) -> None:
        pass


async def test_turns_appended_during_the_summary_survive_the_rewrite(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    appended: list[bytes] = []

    async def agent_writes() -> None:
        if appended:  # only while the first summary is being made
            return
        for i in range(3):
            appended.append(await agents.append(redis, key, "user", f"late turn {i}"))

    def during() -> asyncio.Future[None]:
        return asyncio.ensure_future(agent_writes())

    async with open_runtime(settings, summarizer=SlowSummarizer(during)) as rt:
        key = rt.pattern.key_for("slow")
        written = await agents.conversation(redis, key, 10)
        ref = rt.pattern.parse(key)
        assert ref is not None
        outcome = await rt.pipeline.consolidate(ref)
        assert outcome.status == "consolidated"
        hot = await redis.lrange(key, 0, -1)
        assert hot[1:] == written[-4:] + appended
        again = await rt.pipeline.consolidate(ref)
    assert again.turns_archived == 3 and len(appended) == 3
    assert await archived(pg, "slow") == written + appended


async def test_crash_between_archive_commit_and_rewrite_loses_and_duplicates_nothing(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = runtime.pattern.key_for("crash1")
    written = await agents.conversation(redis, key, 10)
    ref = runtime.pattern.parse(key)
    assert ref is not None

    class Crash(BaseException):
        pass

    async def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(runtime.pipeline.store, "replace_prefix", crash)
        with pytest.raises(Crash):
            await runtime.pipeline.consolidate(ref)
    assert await redis.lrange(key, 0, -1) == written  # Redis untouched
    assert await archived(pg, "crash1") == written  # the archive committed

    more = await agents.conversation(redis, key, 2, start=10)
    outcome = await runtime.pipeline.consolidate(ref)
    assert outcome.status == "consolidated" and outcome.turns_archived == 2
    assert await archived(pg, "crash1") == written + more


async def test_crash_after_rewrite_before_bookkeeping_recognises_its_own_summary(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = runtime.pattern.key_for("crash2")
    written = await agents.conversation(redis, key, 10)
    ref = runtime.pattern.parse(key)
    assert ref is not None

    class Crash(BaseException):
        pass

    async def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(writer, "mark_applied", crash)
        with pytest.raises(Crash):
            await runtime.pipeline.consolidate(ref)
    hot = await redis.lrange(key, 0, -1)
    assert is_summary(hot[0])  # the rewrite happened

    more = await agents.conversation(redis, key, 6, start=10)
    outcome = await runtime.pipeline.consolidate(ref)
    assert outcome.status == "consolidated"
    # The summary the crashed pass wrote is not archived as if the agent had written it.
    assert await archived(pg, "crash2") == written + more


async def test_two_daemons_at_once_give_the_result_of_one(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    settings = make_settings(concurrency=8)
    async with (
        open_runtime(settings, summarizer=ExtractiveSummarizer()) as a,
        open_runtime(settings, summarizer=ExtractiveSummarizer()) as b,
    ):
        written = {}
        for i in range(30):
            key = a.pattern.key_for(f"{prefix}pair{i}")
            written[f"{prefix}pair{i}"] = await agents.conversation(redis, key, 9 + i % 5)
        for _ in range(3):
            await asyncio.gather(a.daemon.run_once(), b.daemon.run_once())
    for session_id, turns in written.items():
        assert await archived(pg, session_id) == turns
        hot = await redis.lrange(a.pattern.key_for(session_id), 0, -1)
        assert is_summary(hot[0]) and hot[1:] == turns[-4:]
        assert (
            await pg.fetchval(
                "SELECT count(*) FROM summaries WHERE session_id=$1 AND applied=1", session_id
            )
            == 1
        )
    assert not [k async for k in redis.scan_iter(match=f"consolidator:lease:*{prefix}*")]


async def test_concurrency_beyond_a_hundred_connections_fails_no_session(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    # redis-py's asyncio pool refuses its 101st connection (MaxConnectionsError) instead of
    # waiting: with more sessions in flight than that, most of a flush used to fail.
    settings = make_settings(concurrency=160)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        written = {}
        for i in range(240):
            key = rt.pattern.key_for(f"{prefix}wide{i}")
            written[f"{prefix}wide{i}"] = await agents.conversation(redis, key, 9)
        await rt.daemon.run_once()
    for session_id, turns in written.items():
        assert await archived(pg, session_id) == turns
        hot = await redis.lrange(rt.pattern.key_for(session_id), 0, -1)
        assert is_summary(hot[0]) and hot[1:] == turns[-4:]


async def test_agent_that_trims_its_own_list_causes_no_duplicates_and_records_the_gap(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("trim")
    ref = runtime.pattern.parse(key)
    assert ref is not None
    seen: list[bytes] = []
    for i in range(30):
        seen.append(await agents.append(redis, key, "user", f"message {i}", trim=20))
    await runtime.pipeline.consolidate(ref)  # sees only the last 20
    for i in range(30, 40):  # list: summary + 4 kept + 10 new = 15 <= 20: nothing trimmed
        seen.append(await agents.append(redis, key, "user", f"message {i}", trim=20))
    await runtime.pipeline.consolidate(ref)
    assert await archived(pg, "trim") == seen[10:40]

    for i in range(40, 70):  # 30 more through a 20-window: 10 of them are never seen
        seen.append(await agents.append(redis, key, "user", f"message {i}", trim=20))
    outcome = await runtime.pipeline.consolidate(ref)
    assert outcome.gap
    assert await archived(pg, "trim") == seen[10:40] + seen[50:70]
    gaps = await pg.fetch("SELECT before_seq FROM gaps WHERE session_id='trim'")
    assert [g["before_seq"] for g in gaps] == [30]


async def test_agent_trim_of_already_archived_turns_is_not_a_gap(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("trim2")
    ref = runtime.pattern.parse(key)
    assert ref is not None
    seen = [await agents.append(redis, key, "user", f"m {i}") for i in range(3)]
    await runtime.pipeline.consolidate(ref)  # 3 <= keep_recent: archived, not folded
    for i in range(3, 8):
        seen.append(await agents.append(redis, key, "user", f"m {i}", trim=6))
    outcome = await runtime.pipeline.consolidate(ref)
    assert not outcome.gap
    assert await archived(pg, "trim2") == seen


async def test_newest_first_lists_are_consolidated_in_their_own_order(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings(newest_first=True)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for("lpush")
        written = [agents.element("user" if i % 2 else "assistant", f"t{i}") for i in range(9)]
        for raw in written:
            await redis.lpush(key, raw)
        ref = rt.pattern.parse(key)
        assert ref is not None
        await rt.pipeline.consolidate(ref)
        await redis.lpush(key, late := agents.element("user", "late"))
        await rt.pipeline.consolidate(ref)
    assert await archived(pg, "lpush") == [*written, late]
    hot = await redis.lrange(key, 0, -1)
    assert is_summary(hot[-1])  # the summary is the oldest element
    assert hot[:-1] == [late, *reversed(written[-3:])]


async def test_a_list_read_in_the_wrong_order_is_quarantined_not_archived_again(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    agents_order = make_settings(newest_first=True)
    shell = agents_order.model_copy(update={"newest_first": False})  # an operator's, unset
    written = [agents.element("user" if i % 2 else "assistant", f"t{i}") for i in range(9)]
    async with open_runtime(agents_order, summarizer=ExtractiveSummarizer()) as rt:
        key = rt.pattern.key_for("order")
        ref = rt.pattern.parse(key)
        assert ref is not None
        for raw in written:
            await redis.lpush(key, raw)
        assert (await rt.pipeline.consolidate(ref)).status == "consolidated"
    lean = await redis.lrange(key, 0, -1)
    await redis.lpush(key, late := agents.element("user", "late"))

    async with open_runtime(shell, summarizer=ExtractiveSummarizer()) as rt:
        misread = await rt.pipeline.consolidate(ref)
    assert misread.status == "quarantined" and "list_order" in (misread.reason or ""), misread
    assert await redis.lrange(key, 0, -1) == [late, *lean]  # left as it is
    assert await archived(pg, "order") == written  # nothing archived again, reversed

    async with open_runtime(agents_order, summarizer=ExtractiveSummarizer()) as rt:
        again = await rt.pipeline.consolidate(ref)
    assert again.turns_archived == 1 and not again.gap, again
    assert await archived(pg, "order") == [*written, late]
    assert await pg.fetchval("SELECT count(*) FROM quarantine WHERE redis_key = $1", key) == 0


async def test_tool_call_and_its_result_stay_on_one_side_of_the_cut(
    runtime: Runtime, redis: Redis
) -> None:
    key = runtime.pattern.key_for("tools")
    turns = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Rome 21C"},
        {"role": "assistant", "content": "Rome is 21C"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"},
    ]
    raws = [json.dumps(t).encode() for t in turns]
    await redis.rpush(key, *raws)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    await runtime.pipeline.consolidate(ref)  # keep 4 would keep the result but fold its call
    hot = await redis.lrange(key, 0, -1)
    assert hot[1:] == raws[3:]


async def test_pending_tool_call_is_never_folded(runtime: Runtime, redis: Redis) -> None:
    key = runtime.pattern.key_for("pending")
    turns = [
        {"role": "user", "content": "book a table"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "p1", "type": "function"}]},
        *({"role": "user", "content": f"still there? {i}"} for i in range(8)),
    ]
    raws = [json.dumps(t).encode() for t in turns]
    await redis.rpush(key, *raws)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    outcome = await runtime.pipeline.consolidate(ref)
    assert outcome.turns_folded == 1
    hot = await redis.lrange(key, 0, -1)
    assert hot[1:] == raws[1:]


async def test_evict_archives_then_deletes(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    from worker.pipeline import Options

    key = runtime.pattern.key_for("evict")
    written = await agents.conversation(redis, key, 7)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    outcome = await runtime.pipeline.consolidate(ref, Options(evict=True))
    assert outcome.status == "evicted"
    assert not await redis.exists(key)
    assert await archived(pg, "evict") == written


async def test_a_key_in_quarantine_is_counted_once_across_restarts_and_replicas(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = make_settings()
    seen, key = [], ""
    for _ in range(2):  # a restart, or a second replica: a process with fresh counters
        async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
            key = rt.pattern.key_for("bad")
            if not await redis.exists(key):
                await redis.rpush(key, agents.element("user", "hi"), b"{not json")
            ref = rt.pattern.parse(key)
            assert ref is not None
            outcome = await rt.pipeline.consolidate(ref)
            counted = rt.metrics.registry.get_sample_value(
                "consolidator_sessions_quarantined_total", {"reason": "undecodable"}
            )
            seen.append((outcome.status, counted or 0))
    assert seen == [("quarantined", 1), ("quarantined", 0)]
    attempts = await pg.fetchval("SELECT attempts FROM quarantine WHERE redis_key = $1", key)
    assert attempts == 2  # both visits recorded
