"""Retention: forgetting what is older than the configured age, in small transactions.

Two rules, both safe for sessions that are still alive:

1. A session with no activity for longer than the retention (`sessions.last_seen`) goes
   entirely: turns, summaries, gaps, quarantine records and the session row.
2. In the sessions that remain, turns archived before the cutoff go once a summary written to
   Redis folded them (they are no longer in the hot state, and the summary carries their
   meaning), as do summaries before the cutoff that a later applied one supersedes. The turns
   still verbatim in Redis and the latest summary stay: alignment and `restore` need them. So
   do turns no summary folded: those before a gap that were only archived, and those a marker
   ("N earlier turns archived") stands for, which carries nothing of what they said.

Turns are found by age through the (archived_at, session_id, seq) index, walked as a keyset, so
each run reads every old turn at most once, however many of them must stay. Only one replica
prunes at a time (an advisory lock); the others skip the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Executable, Select, and_, delete, func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.archive.tables import gaps, quarantine, sessions, summaries, turns
from worker.config import OnSummaryFailure

log = structlog.get_logger(__name__)

_LOCK_ID = 7312006  # pg_try_advisory_lock key: one pruning replica at a time


@dataclass(frozen=True, slots=True)
class PruneResult:
    sessions: int = 0
    turns: int = 0
    summaries: int = 0
    gaps: int = 0
    quarantine: int = 0
    skipped: bool = False  # another replica was pruning

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def prune(
    engine: AsyncEngine,
    older_than: timedelta,
    *,
    now: datetime | None = None,
    batch_size: int = 2000,
) -> PruneResult:
    """Delete what retention no longer keeps (see the module's rules); returns the counts."""
    if older_than <= timedelta(0):
        raise ValueError("retention must be a positive duration")
    cutoff = (now or datetime.now(UTC)) - older_than
    async with engine.connect() as conn:
        got = (await conn.execute(select(func.pg_try_advisory_lock(_LOCK_ID)))).scalar_one()
        await conn.commit()
        if not got:
            return PruneResult(skipped=True)
        try:
            # Few sessions per transaction: each may hold thousands of turns, and every statement
            # must finish well within the connection's command timeout.
            total = await _prune_sessions(conn, cutoff, max(batch_size // 40, 1))
            total = _add(total, await _prune_folded_turns(conn, cutoff, batch_size))
            async with conn.begin():
                superseded = await _count(conn, _superseded_summaries(cutoff))
                stale = await _count(
                    conn, delete(quarantine).where(quarantine.c.last_seen < cutoff)
                )
            total = _add(total, PruneResult(summaries=superseded, quarantine=stale))
        finally:
            try:
                await conn.execute(select(func.pg_advisory_unlock(_LOCK_ID)))
                await conn.commit()
            except BaseException:
                # The lock belongs to this connection: one that may still hold it must not go
                # back to the pool, or no prune could run again until it is recycled.
                await conn.invalidate()
                raise
    log.info("archive_pruned", cutoff=cutoff.isoformat(), **total.as_json())
    return total


async def _prune_sessions(conn: AsyncConnection, cutoff: datetime, batch: int) -> PruneResult:
    total = PruneResult()
    while True:
        async with conn.begin():
            # SKIP LOCKED: a session the pipeline is archiving right now is not waited for.
            ids = list(
                (
                    await conn.execute(
                        select(sessions.c.session_id)
                        .where(sessions.c.last_seen < cutoff)
                        .order_by(sessions.c.last_seen)
                        .limit(batch)
                        .with_for_update(skip_locked=True)
                    )
                ).scalars()
            )
            if not ids:
                return total
            done = PruneResult(
                turns=await _count(conn, delete(turns).where(turns.c.session_id.in_(ids))),
                summaries=await _count(
                    conn, delete(summaries).where(summaries.c.session_id.in_(ids))
                ),
                gaps=await _count(conn, delete(gaps).where(gaps.c.session_id.in_(ids))),
                # Only records as old as the session: a fresh one under the same id is another
                # live key (an id collision), and its copy is that conversation's only record.
                quarantine=await _count(
                    conn,
                    delete(quarantine).where(
                        quarantine.c.session_id.in_(ids), quarantine.c.last_seen < cutoff
                    ),
                ),
                sessions=await _count(conn, delete(sessions).where(sessions.c.session_id.in_(ids))),
            )
        total = _add(total, done)
        if len(ids) < batch:
            return total


_Key = tuple[datetime, str, int]  # (archived_at, session_id, seq): the retention walk's order


def old_turns_page(cutoff: datetime, after: _Key | None, batch: int) -> Select[Any]:
    """The next `batch` turns archived before the cutoff, in the index's order."""
    key = tuple_(turns.c.archived_at, turns.c.session_id, turns.c.seq)
    page = select(turns.c.archived_at, turns.c.session_id, turns.c.seq).where(
        turns.c.archived_at < cutoff
    )
    if after is not None:
        page = page.where(key > tuple_(*after))
    return page.order_by(turns.c.archived_at, turns.c.session_id, turns.c.seq).limit(batch)


def delete_folded(cutoff: datetime, after: _Key | None, through: _Key) -> Executable:
    """Delete, within one page's key range, the turns an applied summary folded. The range is
    an index range scan; no list of keys to send back."""
    key = tuple_(turns.c.archived_at, turns.c.session_id, turns.c.seq)
    folded = (
        select(summaries.c.id)
        .where(
            summaries.c.session_id == turns.c.session_id,
            summaries.c.applied == 1,
            summaries.c.summarizer != OnSummaryFailure.MARKER.value,
            turns.c.seq.between(summaries.c.from_seq, summaries.c.through_seq),
        )
        .exists()
    )
    conditions = [turns.c.archived_at < cutoff, key <= tuple_(*through)]
    if after is not None:
        conditions.append(key > tuple_(*after))
    return delete(turns).where(*conditions, folded)


async def _prune_folded_turns(conn: AsyncConnection, cutoff: datetime, batch: int) -> PruneResult:
    deleted = 0
    position: _Key | None = None
    while True:
        async with conn.begin():
            # The delete's estimate crosses the JIT threshold, whose compile time would cost
            # more than the small batch itself.
            await conn.execute(text("SET LOCAL jit = off"))
            rows = (await conn.execute(old_turns_page(cutoff, position, batch))).all()
            if not rows:
                break
            last: _Key = (rows[-1].archived_at, rows[-1].session_id, rows[-1].seq)
            deleted += await _count(conn, delete_folded(cutoff, position, last))
        position = last
        if len(rows) < batch:
            break
    return PruneResult(turns=deleted)


def _superseded_summaries(cutoff: datetime) -> Executable:
    newer = summaries.alias("newer")
    return delete(summaries).where(
        summaries.c.created_at < cutoff,
        select(newer.c.id)
        .where(
            and_(
                newer.c.session_id == summaries.c.session_id,
                newer.c.applied == 1,
                # Strictly more turns covered: a restore's copy of a summary (same turns)
                # does not make the original superseded.
                newer.c.through_seq > summaries.c.through_seq,
            )
        )
        .exists(),
    )


async def _count(conn: AsyncConnection, stmt: Executable) -> int:
    return int((await conn.execute(stmt)).rowcount)


def _add(a: PruneResult, b: PruneResult) -> PruneResult:
    return PruneResult(
        sessions=a.sessions + b.sessions,
        turns=a.turns + b.turns,
        summaries=a.summaries + b.summaries,
        gaps=a.gaps + b.gaps,
        quarantine=a.quarantine + b.quarantine,
    )
