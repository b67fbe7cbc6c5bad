"""Putting a quarantined key back into Redis from the copy its quarantine record keeps.

A quarantined session is not archived. Its record keeps the key's value as Redis DUMPs it
(the pipeline refreshes the copy whenever the value changed), so a key that expired before an
operator fixed it is not lost: RESTORE recreates it byte for byte, any type, and the operator
fixes it there. A key that exists is never replaced: its turns since the copy are in no
archive. The copy is in Redis's own serialization: a Redis older than the one that made it
refuses it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.archive.tables import quarantine
from worker.config import Settings
from worker.hot.exclusive import holding

NO_COPY = "too large to read, DUMP refused, or not read since schema 0004"
STALE_COPY = (
    "the key changed after this copy and could not be copied again (it grew too large to "
    "read, or DUMP was refused): turns written since are not in it"
)


class PutBackStatus(enum.StrEnum):
    RESTORED = "restored"
    REFUSED = "refused"  # the key exists
    NO_COPY = "no_copy"  # too large to read, DUMP refused, or quarantined before 0004
    FAILED = "failed"  # Redis refused the copy (made by a newer Redis, say)


@dataclass(frozen=True, slots=True)
class PutBack:
    key: str
    status: PutBackStatus
    reason: str  # why it was quarantined
    size: int = 0
    saved_at: datetime | None = None
    current: bool = True  # False: the key changed after the copy, and was not copied again
    error: str = ""


async def restore_quarantined(
    redis: Redis, engine: AsyncEngine, settings: Settings, session_id: str, *, ttl_s: int
) -> list[PutBack]:
    """Recreate each quarantined key of `session_id` that is gone from its saved copy, with a
    TTL of `ttl_s`; one result per quarantine record."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    quarantine.c.redis_key,
                    quarantine.c.reason,
                    quarantine.c.saved_value,
                    quarantine.c.saved_at,
                    quarantine.c.saved_sha256.is_not(None),
                )
                .where(quarantine.c.session_id == session_id)
                .order_by(quarantine.c.redis_key)
            )
        ).all()
    done: list[PutBack] = []
    lease_ms = int(settings.lease_ttl_s * 1000)
    # The daemon's lease: no consolidation reads the key half-restored.
    async with holding(redis, [r.redis_key for r in rows], lease_ms, settings.lease_ttl_s + 2):
        for key, reason, saved, saved_at, current in rows:
            if saved is None:
                done.append(PutBack(key, PutBackStatus.NO_COPY, reason))
                continue
            put = PutBack(key, PutBackStatus.RESTORED, reason, len(saved), saved_at, current)
            try:
                await redis.restore(key, ttl_s * 1000, saved)
            except ResponseError as exc:
                refused = str(exc).startswith("BUSYKEY")
                status = PutBackStatus.REFUSED if refused else PutBackStatus.FAILED
                put = PutBack(key, status, reason, len(saved), saved_at, current, str(exc))
            done.append(put)
    return done
