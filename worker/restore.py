"""Putting an archived session back into Redis: its latest summary and its last turns.

The turns go back as the exact bytes the agent once wrote; the summary is written by the
session's layout, as consolidation writes it. The summary element is recorded in the archive
(like every summary the pipeline writes) before Redis is touched, so the next consolidation
pass recognises it by its digest and archives nothing twice.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.archive import writer
from worker.archive.reader import RESTORED_SUMMARY, ArchiveReader
from worker.archive.tables import sessions, summaries, turns
from worker.config import LayoutName, OnSummaryFailure, Settings
from worker.domain import SessionRef, SummaryText, Turn
from worker.hot.exclusive import holding
from worker.layouts.base import DecodeError, Layout, Storage, decode_turns
from worker.layouts.registry import layout_for

RESTORE_SUMMARIZER = RESTORED_SUMMARY
MARKER = OnSummaryFailure.MARKER.value


class RestoreStatus(enum.StrEnum):
    RESTORED = "restored"
    REFUSED = "refused"  # live state exists and --force was not given
    NOTHING = "nothing"  # no archived turn or summary for this session


class RestoreError(RuntimeError):
    """The archive cannot be put back (its layout is not available here)."""


@dataclass(frozen=True, slots=True)
class RestoreResult:
    status: RestoreStatus
    session_id: str
    key: str | None = None
    turns: int = 0
    first_seq: int | None = None  # of the first restored turn
    summary_through: int | None = None  # the restored summary covers turns 0..this
    # Archived turns between the summary and the first restored turn: in neither.
    left_out: int = 0
    ttl_s: int | None = None
    reason: str | None = None
    # A list whose order the archive did not record (archived before migration 0003): written
    # in the order this configuration says, which may not be the agents'.
    order_assumed: bool = False


@dataclass(frozen=True, slots=True)
class _Archived:
    ref: SessionRef
    layout: str
    newest_first: bool | None  # the list's order when archived; None: not recorded
    metadata: dict[str, Any]
    summary_text: str | None
    summary_from: int  # the turns it folded itself (earlier ones through its predecessors)
    summary_through: int
    summary_model: str | None
    summary_by: str | None  # its summarizer
    turns: list[tuple[int, bytes]]
    left_out: int
    samples: list[bytes]  # the last turns the summary covers, oldest first


async def restore(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    session_id: str,
    *,
    turns: int | None,
    ttl_s: int,
    force: bool = False,
    now: datetime | None = None,
) -> RestoreResult:
    """Write the session's latest summary and last `turns` turns to its Redis key, with a TTL.
    `turns` None: every turn after the summary, so that nothing falls between the two.

    Refuses (status REFUSED) when the key holds live state, unless `force`, which replaces it.
    """
    async with engine.connect() as conn:
        found = await _read_archive(conn, session_id, turns)
    if found is None:
        return RestoreResult(RestoreStatus.NOTHING, session_id, reason="nothing archived")
    if found.summary_text is None and not found.turns:
        reason = "no summary, and no turn asked for" if turns == 0 else "nothing archived"
        return RestoreResult(RestoreStatus.NOTHING, session_id, reason=reason)
    layout = _layout(settings, found.layout, found.newest_first)
    wanted = turns
    while wanted is not None and found.left_out and _orphaned_results(layout, found.turns):
        # The first turns put back are results whose calls are left out: a model API refuses
        # such a history. One more turn at a time until the calls are in.
        wanted += 1
        async with engine.connect() as conn:
            wider = await _read_archive(conn, session_id, wanted)
        if wider is None or wider.left_out >= found.left_out:
            break  # erased meanwhile, or no further back to go
        found = wider
    now = now or datetime.now(UTC)
    summary_elements: list[bytes] = []
    if found.summary_text is not None:
        # The turns on both sides show the layout how this agent writes its elements (key
        # order, JSON style), so that an agent which re-serializes its whole value writes the
        # summary back byte for byte and the next pass still recognises it.
        summary_elements = layout.summary_elements(
            found.summary_text,
            found.summary_through + 1,
            now,
            folded=_decoded(layout, found.samples),
            kept=_decoded(layout, [raw for _, raw in found.turns]),
        )
    elements = [*summary_elements, *(raw for _, raw in found.turns)]
    key = found.ref.key
    result = RestoreResult(
        RestoreStatus.RESTORED,
        session_id,
        key=key,
        turns=len(found.turns),
        first_seq=found.turns[0][0] if found.turns else None,
        summary_through=found.summary_through if summary_elements else None,
        left_out=found.left_out,
        ttl_s=ttl_s,
        order_assumed=found.newest_first is None and layout.name == LayoutName.LIST.value,
    )
    ttl_ms = ttl_s * 1000
    lease_ms = int(settings.lease_ttl_s * 1000)
    async with holding(redis, [key], lease_ms, wait_s=settings.lease_ttl_s + 2):
        if await redis.exists(key):
            if not force:
                return _refused(result, "live state exists (use --force to replace it)")
            if await ArchiveReader(engine).is_quarantined(key=key):
                # Not archived: the turns it holds past the archive would be lost for good.
                return _refused(
                    result,
                    "the live key is quarantined, and its turns since the archive are in no "
                    "archive: move it away (RENAME) first; --force does not replace it",
                )
        summary_id = await _record_summary(engine, found, summary_elements)
        value = None
        if layout.storage is Storage.STRING:
            value = layout.fresh_value(found.ref, elements, found.metadata)
        for _ in range(3 if force else 1):
            if await _write(redis, layout, key, elements, value, ttl_ms, force):
                break
        else:
            return _refused(result, "the agent wrote to the key during the restore")
    async with engine.begin() as conn:
        if summary_id is not None:
            await conn.execute(
                update(summaries).where(summaries.c.id == summary_id).values(applied=1)
            )
        # A restored session is active again: retention counts from now.
        await conn.execute(
            update(sessions).where(sessions.c.session_id == session_id).values(last_seen=func.now())
        )
    await _restore_metadata_hash(redis, settings, layout, found, ttl_ms, force)
    return result


async def _write(
    redis: Redis,
    layout: Layout,
    key: str,
    elements: Sequence[bytes],
    value: bytes | None,
    ttl_ms: int,
    force: bool,
) -> bool:
    """One WATCH/MULTI write of the whole state; False when the key changed meanwhile or (without
    force) turned out to exist: an agent's live state is never overwritten unasked."""
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            if await pipe.exists(key) and not force:
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(key)
            if value is not None:
                pipe.set(key, value, px=ttl_ms)
            else:
                # Elements are in conversation order: LPUSH of that order leaves the newest
                # first, RPUSH the oldest first, each as the agent's library keeps its list.
                push = pipe.lpush if layout.newest_first else pipe.rpush
                push(key, *elements)
                pipe.pexpire(key, ttl_ms)
            await pipe.execute()
        except WatchError:
            return False
    return True


def _refused(result: RestoreResult, reason: str) -> RestoreResult:
    return RestoreResult(RestoreStatus.REFUSED, result.session_id, key=result.key, reason=reason)


def _layout(settings: Settings, name: str, newest_first: bool | None) -> Layout:
    """The layout the session was archived with, in the order it was archived in: the
    configuration's CONSOLIDATOR_NEWEST_FIRST only where the archive did not record it."""
    try:
        wanted = LayoutName(name)
    except ValueError as exc:
        raise RestoreError(f"the session was archived with an unknown layout {name!r}") from exc
    update: dict[str, object] = {"layout": wanted}
    if newest_first is not None:
        update["newest_first"] = newest_first
    try:
        return layout_for(settings.model_copy(update=update))
    except ValueError as exc:  # the registry's UnknownLayout
        raise RestoreError(str(exc)) from exc


async def _read_archive(conn: AsyncConnection, session_id: str, n: int | None) -> _Archived | None:
    row = (
        await conn.execute(
            select(
                sessions.c.redis_key,
                sessions.c.layout,
                sessions.c.newest_first,
                sessions.c.app_name,
                sessions.c.user_id,
                sessions.c.metadata,
            ).where(sessions.c.session_id == session_id)
        )
    ).first()
    if row is None:
        return None
    latest = (
        await conn.execute(
            select(
                summaries.c.text,
                summaries.c.from_seq,
                summaries.c.through_seq,
                summaries.c.model,
                summaries.c.summarizer,
            )
            .where(summaries.c.session_id == session_id, summaries.c.applied == 1)
            .order_by(summaries.c.through_seq.desc(), summaries.c.id.desc())
            .limit(1)
        )
    ).first()
    through = latest.through_seq if latest is not None else -1
    # The last n turns (every one when n is None), but none the summary already covers.
    recent = (
        await conn.execute(
            select(turns.c.seq, turns.c.raw)
            .where(turns.c.session_id == session_id, turns.c.seq > through)
            .order_by(turns.c.seq.desc())
            .limit(n)
        )
    ).all()
    chosen = [(int(seq), bytes(raw)) for seq, raw in reversed(recent)]
    first = chosen[0][0] if chosen else None
    left_out = 0
    if first is None or first > through + 1:
        # Turns after the summary that are not put back (all of them with --turns 0).
        left = [turns.c.session_id == session_id, turns.c.seq > through]
        if first is not None:
            left.append(turns.c.seq < first)
        left_out = (await conn.execute(select(func.count()).where(*left))).scalar_one()
    samples = (
        await conn.execute(
            select(turns.c.raw)
            .where(turns.c.session_id == session_id, turns.c.seq <= through)
            .order_by(turns.c.seq.desc())
            .limit(2)
        )
    ).scalars()
    ref = SessionRef(session_id, row.redis_key, row.app_name, row.user_id)
    return _Archived(
        ref,
        row.layout,
        row.newest_first,
        dict(row.metadata or {}),
        latest.text if latest is not None else None,
        latest.from_seq if latest is not None else 0,
        through,
        latest.model if latest is not None else None,
        latest.summarizer if latest is not None else None,
        chosen,
        int(left_out),
        [bytes(raw) for raw in reversed(list(samples))],
    )


def _orphaned_results(layout: Layout, chosen: Sequence[tuple[int, bytes]]) -> bool:
    decoded = _decoded(layout, [raw for _, raw in chosen])
    calls = {call for turn in decoded for call in turn.tool_calls}
    return any(not turn.tool_results <= calls for turn in decoded)


def _decoded(layout: Layout, elements: Sequence[bytes]) -> list[Turn]:
    try:
        return decode_turns(layout, elements)
    except DecodeError:
        return []  # only a style hint: the layout's defaults do without it


async def _record_summary(
    engine: AsyncEngine, found: _Archived, elements: Sequence[bytes]
) -> int | None:
    if not elements or found.summary_text is None:
        return None
    async with engine.begin() as conn:
        return await writer.record_summary(
            conn,
            found.ref.session_id,
            from_seq=found.summary_from,
            through_seq=found.summary_through,
            summary=SummaryText(
                found.summary_text,
                # A marker stays one: it carries nothing of its turns, which retention keeps.
                summarizer=MARKER if found.summary_by == MARKER else RESTORE_SUMMARIZER,
                model=found.summary_model,
            ),
            elements=elements,
        )


async def _restore_metadata_hash(
    redis: Redis, settings: Settings, layout: Layout, found: _Archived, ttl_ms: int, force: bool
) -> None:
    """Seed 002's metadata HASH, when configured. Only for LIST layouts: for STRING layouts the
    archived metadata also holds what the value itself carried, which does not belong in it."""
    if not settings.metadata_pattern or layout.storage is not Storage.LIST or not found.metadata:
        return
    hash_key = settings.metadata_pattern.replace("{id}", found.ref.session_id)
    if await redis.exists(hash_key) and not force:
        return
    fields: list[str] = []
    for name, value in found.metadata.items():
        fields += [name, value if isinstance(value, str) else str(value)]
    # Its own MULTI: in a Redis Cluster the hash may live in another slot than the history.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(hash_key)
        pipe.hset(hash_key, items=fields)
        pipe.pexpire(hash_key, ttl_ms)
        await pipe.execute()
