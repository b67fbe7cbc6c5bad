"""What the pipeline reads from and writes to the archive for one session.

Every write is one transaction. Turns are idempotent by `(session_id, seq)`, and the session's
`turn_count` only moves forward from the value the writer read, so two writers that raced past
their leases cannot both archive the same turns: the second one's transaction changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.archive.tables import gaps, quarantine, sessions, summaries, turns
from worker.domain import SessionRef, SummaryText, Turn, digest, same_json
from worker.policy import HeadSummary


@dataclass(frozen=True, slots=True)
class ArchivedFrom:
    """Where an archived session's turns came from: its Redis key, layout, and the app and
    user its key named (ADK's `{app}` and `{user}`)."""

    redis_key: str
    layout: str
    app_name: str | None
    user_id: str | None


@dataclass(frozen=True, slots=True)
class ArchiveState:
    """What alignment needs to know about a session's archive."""

    turn_count: int
    head: HeadSummary | None
    tail: dict[int, bytes]
    previous_summary: str | None
    origin: ArchivedFrom | None = None  # None: nothing archived yet


async def read_state(
    conn: AsyncConnection, session_id: str, hot_head: bytes | None, hot_len: int
) -> ArchiveState:
    """What the archive holds of a session, and which summary `hot_head` (the hot state's
    first element) is, if it is one of ours."""
    found = (
        await conn.execute(
            select(
                sessions.c.turn_count,
                sessions.c.redis_key,
                sessions.c.layout,
                sessions.c.app_name,
                sessions.c.user_id,
            ).where(sessions.c.session_id == session_id)
        )
    ).first()
    if found is None:
        return ArchiveState(0, None, {}, None)
    count = found.turn_count
    origin = ArchivedFrom(found.redis_key, found.layout, found.app_name, found.user_id)
    head = None
    if hot_head is not None:
        row = (
            await conn.execute(
                select(
                    summaries.c.through_seq,
                    func.cardinality(summaries.c.elements),
                    summaries.c.text,
                )
                .where(
                    summaries.c.session_id == session_id, summaries.c.head_sha == digest(hot_head)
                )
                .order_by(summaries.c.id.desc())
                .limit(1)
            )
        ).first()
        if row is not None:
            head = HeadSummary(through_seq=row[0], element_count=row[1], text=row[2])
    previous = head.text if head else None
    if head is None:
        latest = (
            await conn.execute(
                select(
                    summaries.c.text,
                    summaries.c.through_seq,
                    func.cardinality(summaries.c.elements),
                    summaries.c.elements[1],
                )
                .where(summaries.c.session_id == session_id, summaries.c.applied == 1)
                .order_by(summaries.c.through_seq.desc(), summaries.c.id.desc())
                .limit(1)
            )
        ).first()
        if latest is not None:
            previous = latest[0]
            if hot_head is not None:
                head = respelled(hot_head, bytes(latest[3]), latest[1], latest[2], latest[0])
    tail_rows = await conn.execute(
        select(turns.c.seq, turns.c.raw_sha).where(
            turns.c.session_id == session_id, turns.c.seq >= count - hot_len
        )
    )
    tail = {seq: sha for seq, sha in tail_rows}
    return ArchiveState(count, head, tail, previous, origin)


def respelled(
    hot_head: bytes, latest_head: bytes, through_seq: int, element_count: int, text: str
) -> HeadSummary | None:
    """The latest applied summary, when the hot state starts with it spelled anew: an agent
    that re-saves its whole history (the gemini layout) writes it back in its own JSON style,
    and the bytes it was recorded by no longer match."""
    if same_json(hot_head, latest_head):
        return HeadSummary(through_seq=through_seq, element_count=element_count, text=text)
    return None


async def archive_turns(
    conn: AsyncConnection,
    ref: SessionRef,
    *,
    layout: str,
    newest_first: bool,
    expected_count: int,
    new_turns: Sequence[Turn],
    gap_reason: str | None,
    metadata: Mapping[str, Any],
) -> bool:
    """Archive `new_turns` as seqs expected_count.. in the caller's transaction.

    Returns False, writing nothing, when another writer moved the session on meanwhile.
    """
    n = len(new_turns)
    values: dict[str, Any] = {
        "session_id": ref.session_id,
        "redis_key": ref.key,
        "layout": layout,
        "newest_first": newest_first,
        "app_name": ref.app,
        "user_id": ref.user or _text(metadata.get("user_id")),
        "agent_id": _text(metadata.get("agent_id")),
        "turn_count": expected_count + n,
        "metadata": dict(metadata),
    }
    upsert = pg_insert(sessions).values(**values)
    guarded = upsert.on_conflict_do_update(
        index_elements=[sessions.c.session_id],
        set_={
            "turn_count": upsert.excluded.turn_count,
            "last_seen": func.now(),
            "redis_key": upsert.excluded.redis_key,
            "newest_first": upsert.excluded.newest_first,
            "user_id": func.coalesce(upsert.excluded.user_id, sessions.c.user_id),
            "agent_id": func.coalesce(upsert.excluded.agent_id, sessions.c.agent_id),
            "metadata": sessions.c.metadata.op("||")(upsert.excluded.metadata),
        },
        where=sessions.c.turn_count == expected_count,
    ).returning(sessions.c.turn_count)
    if (await conn.execute(guarded)).first() is None:
        return False
    if expected_count == 0 and n == 0:
        return True
    if n:
        await conn.execute(
            insert(turns),
            [
                {
                    "session_id": ref.session_id,
                    "seq": expected_count + i,
                    "role": turn.role,
                    "text": turn.text,
                    "raw": turn.raw,
                    "raw_sha": turn.sha,
                    "created_at": turn.created_at,
                }
                for i, turn in enumerate(new_turns)
            ],
        )
    if gap_reason is not None:
        await conn.execute(
            pg_insert(gaps)
            .values(session_id=ref.session_id, before_seq=expected_count, reason=gap_reason)
            .on_conflict_do_nothing()
        )
    return True


async def record_summary(
    conn: AsyncConnection,
    session_id: str,
    *,
    from_seq: int,
    through_seq: int,
    summary: SummaryText,
    elements: Sequence[bytes],
) -> int:
    """Store a summary before it is written to Redis, so its element is recognised after a crash."""
    row = await conn.execute(
        insert(summaries)
        .values(
            session_id=session_id,
            from_seq=from_seq,
            through_seq=through_seq,
            text=summary.text,
            elements=list(elements),
            head_sha=digest(elements[0]),
            summarizer=summary.summarizer,
            model=summary.model,
            model_version=summary.model_version,
            tokens_in=summary.tokens_in,
            tokens_out=summary.tokens_out,
            latency_ms=summary.latency_ms,
            cost_usd=summary.cost_usd,
        )
        .returning(summaries.c.id)
    )
    return int(row.scalar_one())


async def mark_applied(conn: AsyncConnection, applied: Sequence[tuple[str, int]]) -> None:
    """Record that summaries are in Redis: `(session_id, summary_id)` pairs, any number."""
    if not applied:
        return
    ids = sorted(summary_id for _, summary_id in applied)
    done = (
        update(summaries)
        .where(summaries.c.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger))))
        .values(applied=1)
        .returning(summaries.c.session_id)
        .cte("done")
    )
    await conn.execute(
        update(sessions)
        .where(sessions.c.session_id.in_(select(done.c.session_id)))
        .values(last_consolidated=func.now())
    )


async def quarantine_session(
    conn: AsyncConnection,
    ref: SessionRef,
    reason: str,
    detail: str,
    saved: bytes | None = None,
    user_id: str | None = None,
    lapsed: bool = False,
) -> bool:
    """Record the key in quarantine; True when it was not there yet (every replica and every
    restart meets a quarantined key again, and only its first record is news).

    `saved` is the key's value as Redis DUMPs it: it replaces the record's copy when it
    differs. None keeps an earlier copy; with `lapsed` (the key as it is now could not be
    copied: too large, or DUMP refused) it is marked as older than the key by a NULL digest.
    It is still the latest state there is."""
    values: dict[str, Any] = {
        "redis_key": ref.key,
        "session_id": ref.session_id,
        "reason": reason,
        "detail": detail[:2000],
        "user_id": user_id,
    }
    if saved is not None:
        sha = digest(saved)
        held = await conn.scalar(
            select(quarantine.c.saved_sha256).where(quarantine.c.redis_key == ref.key)
        )
        if held != sha:  # the same copy is not sent again on every visit
            values |= {"saved_value": saved, "saved_sha256": sha, "saved_at": func.now()}
    elif lapsed:
        values["saved_sha256"] = None
    stmt = pg_insert(quarantine).values(**values)
    refreshed = {name: stmt.excluded[name] for name in values if name.startswith("saved_")}
    attempts = await conn.scalar(
        stmt.on_conflict_do_update(
            index_elements=[quarantine.c.redis_key],
            set_={
                "reason": stmt.excluded.reason,
                "detail": stmt.excluded.detail,
                "attempts": quarantine.c.attempts + 1,
                "last_seen": func.now(),
                "user_id": func.coalesce(stmt.excluded.user_id, quarantine.c.user_id),
                **refreshed,
            },
        ).returning(quarantine.c.attempts)
    )
    return bool(attempts == 1)


async def release_quarantine(conn: AsyncConnection, key: str, session_id: str) -> None:
    """Delete the key's quarantine record once its session is archived. The user the record
    named goes on the session's row if it names none: a key put back from its quarantine
    copy lacks the metadata (another key) that named its user."""
    user_id = await conn.scalar(
        delete(quarantine).where(quarantine.c.redis_key == key).returning(quarantine.c.user_id)
    )
    if user_id is not None:
        await conn.execute(
            update(sessions)
            .where(sessions.c.session_id == session_id, sessions.c.user_id.is_(None))
            .values(user_id=user_id)
        )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
