"""Restoring an archived session into Redis, in its layout, and consolidating it again after."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.archive_helpers import cli
from worker.archive.reader import ArchiveReader
from worker.config import DEFAULT_KEY_PATTERNS, LayoutName, Settings
from worker.domain import Kind, SessionRef, digest
from worker.layouts.base import Layout, Storage
from worker.restore import RestoreStatus, restore
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


def _text(i: int) -> str:
    return f"Turn {i}: order ORD-{1000 + i}, ships Monday."


def _langchain(i: int) -> bytes:
    # message_to_dict(HumanMessage | AIMessage) written with json.dumps, as
    # RedisChatMessageHistory does.
    kind = "human" if i % 2 == 0 else "ai"
    data: dict[str, object] = {
        "content": _text(i),
        "additional_kwargs": {},
        "response_metadata": {},
        "type": kind,
        "name": None,
        "id": None,
        "example": False,
    }
    return json.dumps({"type": kind, "data": data}).encode()


# An element as each layout's agent library writes it. A layout without an entry here is tested
# with elements its own `summary_elements` makes: valid for the layout, if not what an agent says.
AGENT_ELEMENTS: dict[str, Callable[[int], bytes]] = {
    "list": lambda i: agents.element("user" if i % 2 == 0 else "assistant", _text(i)),
    "gemini": lambda i: json.dumps(
        {"role": "user" if i % 2 == 0 else "model", "parts": [{"text": _text(i)}]}
    ).encode(),
    "langchain": _langchain,
    "llamaindex": lambda i: json.dumps(
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "additional_kwargs": {},
            "blocks": [{"block_type": "text", "text": _text(i)}],
        }
    ).encode(),
}


def _reserialize(value: bytes, raw: bytes) -> bytes:
    # Seed 003's agent: load the whole history, append, json.dumps it all back.
    return json.dumps([*json.loads(value), json.loads(raw)]).encode()


# STRING layouts whose agent rewrites the whole value on each write: how it appends.
AGENT_APPEND: dict[str, Callable[[bytes, bytes], bytes]] = {"gemini": _reserialize}


VARIANTS = [
    pytest.param(name.value, name is LayoutName.LIST and newest, id=f"{name.value}{suffix}")
    for name in LayoutName
    for newest, suffix in ((False, ""), (True, "-newest-first"))
    if name is LayoutName.LIST or not newest
]


def element_for(layout: Layout, i: int) -> bytes:
    make = AGENT_ELEMENTS.get(layout.name)
    if make is not None:
        return make(i)
    return layout.summary_elements(f"Turn {i}: order ORD-{1000 + i}.", 1, datetime.now(UTC))[0]


async def write_hot(redis: Redis, layout: Layout, ref: SessionRef, elements: list[bytes]) -> None:
    """The whole conversation, stored as the layout's agent stores it."""
    if layout.storage is Storage.LIST:
        for raw in elements:
            await (redis.lpush if layout.newest_first else redis.rpush)(ref.key, raw)
    elif layout.name in AGENT_APPEND:
        await redis.set(ref.key, b"[]")
        for raw in elements:
            await append_hot(redis, layout, ref, raw)
    else:
        await redis.set(ref.key, layout.fresh_value(ref, elements, {}))
    await redis.expire(ref.key, 3600)


async def append_hot(redis: Redis, layout: Layout, ref: SessionRef, raw: bytes) -> None:
    if layout.storage is Storage.LIST:
        await (redis.lpush if layout.newest_first else redis.rpush)(ref.key, raw)
        return
    value = await redis.get(ref.key)
    assert isinstance(value, bytes)
    rewrite = AGENT_APPEND.get(layout.name)
    new = rewrite(value, raw) if rewrite else layout.join(value, [*layout.split(value), raw])
    await redis.set(ref.key, new, keepttl=True)


async def read_hot(redis: Redis, layout: Layout, key: str) -> list[bytes]:
    """The hot state in conversation order."""
    if layout.storage is Storage.LIST:
        stored = [e for e in await redis.lrange(key, 0, -1) if isinstance(e, bytes)]
        return list(reversed(stored)) if layout.newest_first else stored
    value = await redis.get(key)
    return layout.split(value) if isinstance(value, bytes) else []


async def archived(pg: asyncpg.Connection, session_id: str) -> list[bytes]:
    rows = await pg.fetch(
        "SELECT seq, raw FROM turns WHERE session_id = $1 ORDER BY seq", session_id
    )
    assert [r["seq"] for r in rows] == list(range(len(rows))), "each turn archived once"
    return [bytes(r["raw"]) for r in rows]


@pytest.mark.parametrize(("layout_name", "newest_first"), VARIANTS)
async def test_restore_round_trip_is_recognised_by_the_next_pass(
    layout_name: str,
    newest_first: bool,
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
) -> None:
    settings = make_settings(
        layout=layout_name,
        newest_first=newest_first,
        key_pattern=prefix + DEFAULT_KEY_PATTERNS[LayoutName(layout_name)],
    )
    session_id = f"{prefix}rt"
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        layout = rt.pipeline.layout
        ref = rt.pattern.parse(rt.pattern.key_for(session_id, app="shop", user="u1"))
        assert ref is not None
        written = [element_for(layout, i) for i in range(10)]
        await write_hot(redis, layout, ref, written)
        assert (await rt.pipeline.consolidate(ref)).status == "consolidated"
        before = await read_hot(redis, layout, ref.key)
        assert before[-4:] == written[-4:]
        summary_len = len(before) - 4

        await redis.delete(ref.key)  # the key expired; the user comes back
        result = await restore(rt.redis, rt.engine, settings, session_id, turns=4, ttl_s=900)

        assert result.status is RestoreStatus.RESTORED and result.turns == 4
        after = await read_hot(redis, layout, ref.key)
        assert after[summary_len:] == written[-4:]  # the turns: the exact archived bytes
        assert [layout.decode(e).text for e in after[:summary_len]] == [
            layout.decode(e).text for e in before[:summary_len]
        ]
        if layout.storage is Storage.LIST:
            # Stored in the layout's own order: an LPUSH list keeps the newest first.
            stored = await redis.lrange(ref.key, 0, -1)
            if layout.newest_first:
                assert stored[:-summary_len] == list(reversed(written[-4:]))
            else:
                assert stored[summary_len:] == written[-4:]
        assert 0 < await redis.pttl(ref.key) <= 900_000

        # The next pass recognises the restored state: nothing is archived again ...
        again = await rt.pipeline.consolidate(ref)
        assert again.turns_archived == 0, again
        assert await archived(pg, session_id) == written
        # ... and what the agent says next is archived once, after the rest.
        later = [element_for(layout, i) for i in range(10, 16)]
        for raw in later:
            await append_hot(redis, layout, ref, raw)
        outcome = await rt.pipeline.consolidate(ref)
    assert outcome.turns_archived == 6 and not outcome.gap, outcome
    assert await archived(pg, session_id) == written + later
    final = await read_hot(redis, layout, ref.key)
    assert final[-4:] == later[-4:]


async def test_restore_writes_a_list_back_in_the_order_it_was_archived_in(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    # The daemon keeps LPUSH lists; an operator restores from a shell without its
    # CONSOLIDATOR_NEWEST_FIRST.
    daemon = make_settings(
        newest_first=True, key_pattern=prefix + DEFAULT_KEY_PATTERNS[LayoutName.LIST]
    )
    operator = daemon.model_copy(update={"newest_first": False})
    session_id = f"{prefix}order"
    async with open_runtime(daemon, summarizer=ExtractiveSummarizer()) as rt:
        layout = rt.pipeline.layout
        ref = rt.pattern.parse(rt.pattern.key_for(session_id))
        assert ref is not None
        written = [element_for(layout, i) for i in range(10)]
        await write_hot(redis, layout, ref, written)
        assert (await rt.pipeline.consolidate(ref)).status == "consolidated"
        await redis.delete(ref.key)

        result = await restore(rt.redis, rt.engine, operator, session_id, turns=4, ttl_s=900)
        assert result.status is RestoreStatus.RESTORED and not result.order_assumed
        assert (await redis.lrange(ref.key, 0, 3)) == list(reversed(written[-4:]))
        again = await rt.pipeline.consolidate(ref)  # the daemon reads it as it wrote it
        assert again.turns_archived == 0 and not again.gap, again

        # Archived before the order was recorded: the configuration is all there is to go by.
        await pg.execute(
            "UPDATE sessions SET newest_first = NULL WHERE session_id = $1", session_id
        )
        await redis.delete(ref.key)
        assumed = await cli(operator, "restore", session_id, "--turns", "4")
        assert assumed.returncode == 0, assumed.stderr
        assert "does not record this list's order" in assumed.stderr
        assert "oldest first (RPUSH)" in assumed.stderr
        assert (await redis.lrange(ref.key, -4, -1)) == written[-4:]
        # That was not the agents' order: the daemon says so instead of archiving it again.
        misread = await rt.pipeline.consolidate(ref)
        assert misread.status == "quarantined" and "list_order" in (misread.reason or "")
        assert (
            await pg.fetchval("SELECT turn_count FROM sessions WHERE session_id = $1", session_id)
        ) == 10


async def test_restore_refuses_live_state_unless_forced(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("r-live")
    written = await agents.conversation(redis, key, 10)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    await runtime.pipeline.consolidate(ref)
    live = await redis.lrange(key, 0, -1)

    refused = await cli(runtime.settings, "restore", "r-live")
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert await redis.lrange(key, 0, -1) == live  # untouched

    await redis.rpush(key, b"not a turn the archive knows")
    forced = await cli(
        runtime.settings, "restore", "r-live", "--force", "--turns", "2", "--ttl", "60"
    )
    assert forced.returncode == 0, forced.stderr
    hot = await redis.lrange(key, 0, -1)
    assert len(hot) == 3 and hot[1:] == written[-2:]
    assert json.loads(hot[0])["content"].startswith("[Summary of the 6 earlier turns]")
    assert 0 < await redis.ttl(key) <= 60
    # Turns 6 and 7 are neither in the summary nor restored: the operator is told.
    assert "2 archived turns" in forced.stderr
    assert (await runtime.pipeline.consolidate(ref)).turns_archived == 0
    assert len(await archived(pg, "r-live")) == 10

    summary_only = await cli(runtime.settings, "restore", "r-live", "--force", "--turns", "0")
    assert summary_only.returncode == 0, summary_only.stderr
    assert "note: 4 archived turns lie after the summary" in summary_only.stderr


async def test_restore_without_a_summary_puts_back_the_last_turns(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = runtime.pattern.key_for("r-plain")
    written = await agents.conversation(redis, key, 3)  # fewer than keep_recent: nothing folded
    ref = runtime.pattern.parse(key)
    assert ref is not None
    await runtime.pipeline.consolidate(ref)
    await redis.delete(key)

    done = await cli(runtime.settings, "restore", "r-plain")
    assert done.returncode == 0, done.stderr
    assert await redis.lrange(key, 0, -1) == written
    assert (await runtime.pipeline.consolidate(ref)).turns_archived == 0
    assert await archived(pg, "r-plain") == written


async def test_restore_of_a_session_never_summarized_puts_every_turn_back(
    runtime: Runtime, redis: Redis
) -> None:
    # Archived and evicted without a summary: restoring only the last few turns would drop the
    # rest from the agent's context, and the next pass would fold them as if it had them.
    key = runtime.pattern.key_for("r-long")
    written = await agents.conversation(redis, key, 9)
    flushed = await cli(runtime.settings, "flush", "r-long", "--no-summarize", "--evict")
    assert flushed.returncode == 0, flushed.stderr

    whole = await cli(runtime.settings, "restore", "r-long")
    assert whole.returncode == 0 and "note:" not in whole.stderr, whole.stderr
    assert await redis.lrange(key, 0, -1) == written
    last = await cli(runtime.settings, "restore", "r-long", "--turns", "2", "--force")
    assert await redis.lrange(key, 0, -1) == written[-2:]
    assert "7 archived turns lie between the start and the restored turns" in last.stderr
    none = await cli(runtime.settings, "restore", "r-long", "--turns", "0", "--force")
    assert none.returncode == 1 and "no summary, and no turn asked for" in none.stderr


async def test_restore_of_an_unknown_session_fails(runtime: Runtime, redis: Redis) -> None:
    missing = await cli(runtime.settings, "restore", "never-archived")
    assert missing.returncode == 1 and "nothing archived" in missing.stderr
    assert not await redis.exists(runtime.pattern.key_for("never-archived"))
    bad = await cli(runtime.settings, "restore", "x", "--ttl", "0")
    assert bad.returncode == 2


async def consolidated_then_expired(runtime: Runtime, redis: Redis, session_id: str) -> str:
    """10 turns written, consolidated, then the key gone (expired): what restore starts from."""
    key = runtime.pattern.key_for(session_id)
    await agents.conversation(redis, key, 10)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    await runtime.pipeline.consolidate(ref)
    await redis.delete(key)
    return key


async def test_restore_records_its_summary_as_applied(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    key = await consolidated_then_expired(runtime, redis, "r-rec")
    result = await restore(
        runtime.redis, runtime.engine, runtime.settings, "r-rec", turns=4, ttl_s=60
    )
    assert result.status is RestoreStatus.RESTORED
    rows = await pg.fetch(
        "SELECT summarizer, applied, through_seq, head_sha FROM summaries "
        "WHERE session_id = 'r-rec' ORDER BY id"
    )
    assert [(r["summarizer"], r["applied"], r["through_seq"]) for r in rows] == [
        ("extractive", 1, 5),
        ("restore", 1, 5),
    ]
    history = await ArchiveReader(runtime.engine).history("r-rec")
    assert [e.seq for e in history if e.kind is Kind.SUMMARY] == [5]  # shown once, not twice
    head = (await redis.lrange(key, 0, 0))[0]
    assert isinstance(head, bytes)
    assert bytes(rows[-1]["head_sha"]) == digest(head)


async def test_restore_never_starts_with_a_tool_result_whose_call_stays_out(
    runtime: Runtime, redis: Redis
) -> None:
    key = runtime.pattern.key_for("r-tool")
    written = await agents.conversation(redis, key, 10)
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "track"}}],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "ORD-1004: out for delivery"}
    pair = [json.dumps(call).encode(), json.dumps(result).encode()]
    await redis.rpush(key, *pair)
    written += pair + await agents.conversation(redis, key, 2, start=12)  # 14 turns
    ref = runtime.pattern.parse(key)
    assert ref is not None
    assert (await runtime.pipeline.consolidate(ref)).status == "consolidated"
    await redis.delete(key)

    # The last 3 turns would start with the result (#11): its call (#10) comes back with it.
    done = await restore(
        runtime.redis, runtime.engine, runtime.settings, "r-tool", turns=3, ttl_s=60
    )

    assert done.status is RestoreStatus.RESTORED and done.first_seq == 10
    assert (await redis.lrange(key, 0, -1))[1:] == written[10:]


async def test_a_restored_marker_stays_a_marker_for_retention(
    runtime: Runtime, redis: Redis, pg: asyncpg.Connection
) -> None:
    # A marker ("N earlier turns archived") carries nothing of its turns: retention keeps them,
    # and must go on keeping them once the marker is restored.
    await consolidated_then_expired(runtime, redis, "r-marker")
    await pg.execute("UPDATE summaries SET summarizer = 'marker' WHERE session_id = 'r-marker'")

    done = await restore(
        runtime.redis, runtime.engine, runtime.settings, "r-marker", turns=None, ttl_s=60
    )

    assert done.status is RestoreStatus.RESTORED
    rows = await pg.fetch("SELECT summarizer FROM summaries WHERE session_id = 'r-marker'")
    assert [r["summarizer"] for r in rows] == ["marker", "marker"]
