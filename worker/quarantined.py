"""Putting a quarantined key back into Redis from the copy its quarantine record keeps.

A quarantined session is not archived. Its record keeps the key's value as Redis DUMPs it
(the pipeline refreshes the copy whenever the value changed), so a key that expired before an
operator fixed it is not lost: RESTORE recreates it byte for byte, any type, and the operator
fixes it there. The copy is in Redis's own serialization: a Redis older than the one that
made it refuses it.
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


class PutBackStatus(enum.StrEnum):
    RESTORED = "restored"
    REFUSED = "refused"  # the key exists and --force was not given
    NO_COPY = "no_copy"  # too large to read when quarantined, or quarantined before 0004


@dataclass(frozen=True, slots=True)
class PutBack:
    key: str
    status: PutBackStatus
    reason: str  # why it was quarantined
    size: int = 0
    saved_at: datetime | None = None


class PutBackError(RuntimeError):
    """Redis refused the saved copy (made by a newer Redis, say)."""


async def restore_quarantined(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    session_id: str,
    *,
    ttl_s: int,
    force: bool,
) -> list[PutBack]:
    """Recreate each quarantined key of `session_id` from its saved copy, with a TTL of `ttl_s`.
    A key that exists is left alone (REFUSED) unless `force`, which replaces it."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    quarantine.c.redis_key,
                    quarantine.c.reason,
                    quarantine.c.saved_value,
                    quarantine.c.saved_at,
                )
                .where(quarantine.c.session_id == session_id)
                .order_by(quarantine.c.redis_key)
            )
        ).all()
    done: list[PutBack] = []
    lease_ms = int(settings.lease_ttl_s * 1000)
    # The daemon's lease: no consolidation reads the key half-restored.
    async with holding(redis, [r.redis_key for r in rows], lease_ms, settings.lease_ttl_s + 2):
        for key, reason, saved, saved_at in rows:
            if saved is None:
                done.append(PutBack(key, PutBackStatus.NO_COPY, reason))
                continue
            try:
                await redis.restore(key, ttl_s * 1000, saved, replace=force)
            except ResponseError as exc:
                if str(exc).startswith("BUSYKEY"):
                    done.append(PutBack(key, PutBackStatus.REFUSED, reason, len(saved), saved_at))
                    continue
                raise PutBackError(f"{key}: Redis refused the saved copy: {exc}") from exc
            done.append(PutBack(key, PutBackStatus.RESTORED, reason, len(saved), saved_at))
    return done
