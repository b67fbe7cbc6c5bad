"""Group commit: concurrent sessions share archive transactions with the per-session semantics
(idempotent seqs, the count only moves from the value read), and one bad session in a batch
fails alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import turn
from worker.archive.groupcommit import ArchiveRequest, GroupCommit, SummaryRequest
from worker.domain import SessionRef, SummaryText, Turn
from worker.runtime import Runtime


class Sizes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, bool]] = []

    def batch(self, kind: str, size: int, seconds: float, fell_back: bool) -> None:
        self.seen.append((kind, size, fell_back))


def request(session_id: str, turns: Sequence[Turn], expected: int = 0) -> ArchiveRequest:
    ref = SessionRef(session_id, f"gc:{session_id}")
    return ArchiveRequest(ref, "list", False, expected, list(turns), None, {"user_id": "u1"})


async def test_concurrent_archives_share_batches_and_stay_exact(
    runtime: Runtime, pg: asyncpg.Connection
) -> None:
    sizes = Sizes()
    group = GroupCommit(runtime.engine, observer=sizes)
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i}" for i in range(40)]
    results = await asyncio.gather(
        *(group.archive(request(i, [turn("user", f"{i} says {n}") for n in range(5)])) for i in ids)
    )
    assert all(results)
    assert max(size for kind, size, _ in sizes.seen if kind == "archive") > 1
    rows = await pg.fetch(
        "SELECT session_id, seq, text FROM turns WHERE session_id = ANY($1) ORDER BY 1, 2", ids
    )
    assert [(r["session_id"], r["seq"], r["text"]) for r in rows] == [
        (i, n, f"{i} says {n}") for i in sorted(ids) for n in range(5)
    ]
    counts = await pg.fetch(
        "SELECT turn_count, user_id FROM sessions WHERE session_id = ANY($1)", ids
    )
    assert {(r["turn_count"], r["user_id"]) for r in counts} == {(5, "u1")}

    # The next writers read the count: one of them is stale and archives nothing.
    fresh, stale = ids[0], ids[1]
    again = await asyncio.gather(
        group.archive(request(fresh, [turn("user", "sixth")], expected=5)),
        group.archive(request(stale, [turn("user", "lost race")], expected=3)),
    )
    assert list(again) == [True, False]
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id = $1", stale) == 5
    assert await pg.fetchval("SELECT max(seq) FROM turns WHERE session_id = $1", fresh) == 5


async def test_a_bad_session_fails_alone(runtime: Runtime, pg: asyncpg.Connection) -> None:
    sizes = Sizes()
    group = GroupCommit(runtime.engine, observer=sizes)
    tag = uuid.uuid4().hex[:8]
    good = [f"{tag}-ok{i}" for i in range(5)]
    bad = f"{tag}-nul"
    # PostgreSQL text cannot hold NUL: the batch's COPY fails, then each session goes alone.
    results = await asyncio.gather(
        *(group.archive(request(i, [turn("user", "fine")])) for i in good),
        group.archive(request(bad, [turn("user", "bad \x00 byte")])),
        return_exceptions=True,
    )
    assert results[:-1] == [True] * len(good)
    assert isinstance(results[-1], Exception)
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id = ANY($1)", good) == 5
    assert await pg.fetchval("SELECT count(*) FROM sessions WHERE session_id = $1", bad) == 0
    assert any(fell_back for _, _, fell_back in sizes.seen)


async def test_summaries_are_recorded_in_order_and_marked_applied(
    runtime: Runtime, pg: asyncpg.Connection
) -> None:
    group = GroupCommit(runtime.engine)
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i}" for i in range(12)]
    await asyncio.gather(*(group.archive(request(i, [turn("user", "x")] * 1)) for i in ids))
    made = await asyncio.gather(
        *(
            group.record_summary(
                SummaryRequest(i, 0, 0, SummaryText(f"summary of {i}", "test"), [i.encode()])
            )
            for i in ids
        )
    )
    rows = await pg.fetch("SELECT id, session_id, applied FROM summaries WHERE id = ANY($1)", made)
    assert {r["id"]: r["session_id"] for r in rows} == dict(zip(made, ids, strict=True))
    assert {r["applied"] for r in rows} == {0}
    await asyncio.gather(*(group.mark_applied(i, s) for i, s in zip(ids, made, strict=True)))
    rows = await pg.fetch(
        "SELECT m.applied, s.last_consolidated FROM summaries m JOIN sessions s USING "
        "(session_id) WHERE m.id = ANY($1)",
        made,
    )
    assert all(r["applied"] == 1 and r["last_consolidated"] is not None for r in rows)


async def test_a_crash_in_a_batch_reaches_every_waiter(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(BaseException):
        pass

    async def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    from worker.archive import writer

    monkeypatch.setattr(writer, "mark_applied", crash)
    group = GroupCommit(runtime.engine)
    outcomes = await asyncio.gather(
        *(group.mark_applied(f"nobody-{i}", i) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, Crash) for o in outcomes)


async def test_flush_of_many_sessions_batches_reads_and_writes(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    written = {}
    for i in range(24):
        key = runtime.pattern.key_for(f"{prefix}many{i}")
        written[f"{prefix}many{i}"] = await agents.conversation(redis, key, 8)
    work = await runtime.daemon.run_once()
    assert {o.status for o in work} == {"consolidated"} and len(work) == 24
    for session_id, raws in written.items():
        rows = await pg.fetch(
            "SELECT raw FROM turns WHERE session_id = $1 ORDER BY seq", session_id
        )
        assert [bytes(r["raw"]) for r in rows] == raws
    batches = runtime.metrics.registry.get_sample_value(
        "consolidator_archive_batch_size_count", {"kind": "archive"}
    )
    assert batches is not None and batches < 24  # sessions shared transactions


async def test_an_archive_batch_is_bounded_by_turns(
    runtime: Runtime, pg: asyncpg.Connection
) -> None:
    sizes = Sizes()
    group = GroupCommit(runtime.engine, observer=sizes, max_turns=10)
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i}" for i in range(6)]
    results = await asyncio.gather(
        *(group.archive(request(i, [turn("user", f"t{n}") for n in range(6)])) for i in ids)
    )
    assert all(results)
    assert {size for kind, size, _ in sizes.seen if kind == "archive"} == {1}
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id = ANY($1)", ids) == 36
