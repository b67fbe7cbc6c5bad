"""The read API over the archive, for applications and for the command line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, literal_column, select, union_all
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.archive.search import DEFAULT_MARKS, SearchPage, SearchQuery
from worker.archive.search import search as run_search
from worker.archive.tables import gaps, quarantine, sessions, summaries, turns
from worker.domain import Kind

# The `summarizer` of a summary row `restore` recorded (worker.restore): a copy, not a new one.
RESTORED_SUMMARY = "restore"


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an archived conversation: a turn, a summary or a gap."""

    session_id: str
    seq: int
    kind: Kind
    role: str | None
    text: str
    created_at: datetime | None
    extra: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "session_id": self.session_id,
            "seq": self.seq,
            "role": self.role,
            "text": self.text,
            "kind": self.kind.value,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }
        data.update(self.extra)
        return data


@dataclass(frozen=True, slots=True)
class QuarantinedKey:
    redis_key: str
    session_id: str
    reason: str
    detail: str
    attempts: int
    last_seen: datetime
    saved_bytes: int | None  # the size of the key's saved copy (DUMP), None without one
    saved_at: datetime | None  # when the copy was taken
    saved_current: bool  # False: the key changed since, and could not be copied again


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """An archived session's bookkeeping."""

    session_id: str
    redis_key: str
    layout: str
    app_name: str | None
    user_id: str | None
    agent_id: str | None
    turn_count: int
    first_seen: datetime
    last_seen: datetime
    last_consolidated: datetime | None
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """A summary with its provenance: the turns it covers and what made it."""

    id: int
    session_id: str
    from_seq: int  # the first turn it folded itself; earlier ones it carries from its predecessor
    through_seq: int
    text: str
    applied: bool
    summarizer: str
    model: str | None
    model_version: str | None
    tokens_in: int | None
    tokens_out: int | None
    latency_ms: float | None
    cost_usd: float | None
    created_at: datetime


class ArchiveReader:
    """Read-only queries over the archive, for applications and the command line.

    `history`, `search`, `summaries`, `session` and `sessions_of_user` are the stable API.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def history(self, session_id: str) -> list[Entry]:
        """The whole archived conversation, oldest first; a summary follows the last turn it
        covers, a gap stands before the first turn after it."""
        async with self._engine.connect() as conn:
            turn_rows = (
                await conn.execute(
                    select(turns.c.seq, turns.c.role, turns.c.text, turns.c.created_at)
                    .where(turns.c.session_id == session_id)
                    .order_by(turns.c.seq)
                )
            ).all()
            summary_rows = (
                await conn.execute(
                    select(
                        summaries.c.through_seq,
                        summaries.c.text,
                        summaries.c.created_at,
                        summaries.c.summarizer,
                        summaries.c.model,
                        summaries.c.tokens_in,
                        summaries.c.tokens_out,
                    )
                    .where(
                        summaries.c.session_id == session_id,
                        summaries.c.applied == 1,
                        # A restore writes an earlier summary again: not a new one to show.
                        summaries.c.summarizer != RESTORED_SUMMARY,
                    )
                    .order_by(summaries.c.id)
                )
            ).all()
            gap_rows = (
                await conn.execute(
                    select(gaps.c.before_seq, gaps.c.reason, gaps.c.detected_at).where(
                        gaps.c.session_id == session_id
                    )
                )
            ).all()
        keyed: list[tuple[tuple[int, int], Entry]] = []
        for seq, role, text, created in turn_rows:
            entry = Entry(session_id, seq, Kind.TURN, role, text, created, {})
            keyed.append(((seq, 1), entry))
        for before, reason, detected in gap_rows:
            entry = Entry(session_id, before, Kind.GAP, None, reason, detected, {})
            keyed.append(((before, 0), entry))
        for through, text, created, summarizer, model, t_in, t_out in summary_rows:
            extra = {"summarizer": summarizer, "model": model, "covers_through_seq": through}
            if t_in is not None:
                extra.update(tokens_in=t_in, tokens_out=t_out)
            entry = Entry(session_id, through, Kind.SUMMARY, "summary", text, created, extra)
            keyed.append(((through, 2), entry))
        keyed.sort(key=lambda pair: pair[0])
        return [entry for _, entry in keyed]

    async def counts(self) -> dict[str, int]:
        async with self._engine.connect() as conn:
            parts = union_all(
                select(literal("sessions"), func.count()).select_from(sessions),
                select(literal("turns"), func.count()).select_from(turns),
                select(literal("summaries"), func.count()).select_from(summaries),
                select(literal("gaps"), func.count()).select_from(gaps),
                select(literal("quarantined"), func.count()).select_from(quarantine),
            )
            rows = (await conn.execute(parts)).all()
            size = (
                await conn.execute(
                    select(
                        _TURNS_BYTES
                        + func.pg_total_relation_size("summaries")
                        + func.pg_total_relation_size("sessions")
                    )
                )
            ).scalar_one()
        result = {str(name): int(n) for name, n in rows}
        result["archive_bytes"] = int(size)
        return result

    async def is_quarantined(
        self, *, session_id: str | None = None, key: str | None = None
    ) -> bool:
        """Whether a quarantine record names this session id, or this key."""
        where = (
            quarantine.c.session_id == session_id if key is None else quarantine.c.redis_key == key
        )
        async with self._engine.connect() as conn:
            found = await conn.scalar(select(quarantine.c.redis_key).where(where).limit(1))
        return found is not None

    async def quarantined(self, limit: int = 50) -> list[QuarantinedKey]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        quarantine.c.redis_key,
                        quarantine.c.session_id,
                        quarantine.c.reason,
                        quarantine.c.detail,
                        quarantine.c.attempts,
                        quarantine.c.last_seen,
                        func.octet_length(quarantine.c.saved_value),
                        quarantine.c.saved_at,
                        quarantine.c.saved_sha256.is_not(None),
                    )
                    .order_by(quarantine.c.last_seen.desc())
                    .limit(limit)
                )
            ).all()
        return [QuarantinedKey(*row) for row in rows]

    async def search(
        self,
        text: str,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        role: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 20,
        after: str | None = None,
        marks: tuple[str, str] = DEFAULT_MARKS,
    ) -> SearchPage:
        """Turns matching `text` (web search syntax: "a phrase", or, -not), best first.

        Pass the returned page's `cursor` as `after` for the next page. Raises EmptyQuery when
        `text` has no searchable word, BadCursor for a cursor this function did not make.
        """
        query = SearchQuery(text, session_id, user_id, role, since, until, limit, after, marks)
        async with self._engine.connect() as conn:
            return await run_search(conn, query)

    async def summaries(self, session_id: str, *, applied_only: bool = True) -> list[SummaryRecord]:
        """The session's summaries, oldest first; by default only those written to Redis."""
        stmt = select(
            summaries.c.id,
            summaries.c.session_id,
            summaries.c.from_seq,
            summaries.c.through_seq,
            summaries.c.text,
            summaries.c.applied,
            summaries.c.summarizer,
            summaries.c.model,
            summaries.c.model_version,
            summaries.c.tokens_in,
            summaries.c.tokens_out,
            summaries.c.latency_ms,
            summaries.c.cost_usd,
            summaries.c.created_at,
        ).where(summaries.c.session_id == session_id)
        if applied_only:
            stmt = stmt.where(summaries.c.applied == 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(summaries.c.id))).all()
        return [SummaryRecord(**{**row._asdict(), "applied": bool(row.applied)}) for row in rows]

    async def session(self, session_id: str) -> SessionInfo | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(*_SESSION_COLUMNS).where(sessions.c.session_id == session_id)
                )
            ).first()
        return SessionInfo(**row._asdict()) if row is not None else None

    async def sessions_of_user(self, user_id: str) -> list[SessionInfo]:
        """The user's archived sessions, most recently active first."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(*_SESSION_COLUMNS)
                    .where(sessions.c.user_id == user_id)
                    .order_by(sessions.c.last_seen.desc(), sessions.c.session_id)
                )
            ).all()
        return [SessionInfo(**row._asdict()) for row in rows]


# `turns` is partitioned (migration 0002): the parent has no storage of its own.
_TURNS_BYTES = (
    select(func.coalesce(func.sum(func.pg_total_relation_size(literal_column("relid"))), 0))
    .select_from(func.pg_partition_tree("turns"))
    .scalar_subquery()
)

_SESSION_COLUMNS = (
    sessions.c.session_id,
    sessions.c.redis_key,
    sessions.c.layout,
    sessions.c.app_name,
    sessions.c.user_id,
    sessions.c.agent_id,
    sessions.c.turn_count,
    sessions.c.first_seen,
    sessions.c.last_seen,
    sessions.c.last_consolidated,
    sessions.c.metadata,
)
