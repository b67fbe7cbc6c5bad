"""The read API over the archive, for applications and for the command line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.archive.tables import gaps, quarantine, sessions, summaries, turns
from worker.domain import Kind


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


class ArchiveReader:
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
                    .where(summaries.c.session_id == session_id, summaries.c.applied == 1)
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
                        func.pg_total_relation_size("turns")
                        + func.pg_total_relation_size("summaries")
                        + func.pg_total_relation_size("sessions")
                    )
                )
            ).scalar_one()
        result = {str(name): int(n) for name, n in rows}
        result["archive_bytes"] = int(size)
        return result

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
                    )
                    .order_by(quarantine.c.last_seen.desc())
                    .limit(limit)
                )
            ).all()
        return [QuarantinedKey(*row) for row in rows]
