"""What the layout tests share: the archive as the pipeline left it, and a summarizer that lets
the agent write while the summary is being made."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from redis.asyncio import Redis

from worker.domain import SessionRef, SummaryText, Turn
from worker.runtime import Runtime
from worker.summarizers.extractive import ExtractiveSummarizer


async def archived(pg: asyncpg.Connection, session_id: str) -> list[bytes]:
    """The archived turns' raw bytes, in order; each seq once, from 0."""
    rows = await pg.fetch(
        "SELECT seq, raw FROM turns WHERE session_id = $1 ORDER BY seq", session_id
    )
    assert [r["seq"] for r in rows] == list(range(len(rows))), "seqs must be contiguous from 0"
    return [bytes(r["raw"]) for r in rows]


async def value_of(redis: Redis, key: str) -> bytes:
    """A STRING session's whole value (the key must exist)."""
    value = await redis.get(key)
    assert isinstance(value, bytes), f"{key} holds no value"
    return value


async def list_of(redis: Redis, key: str) -> list[bytes]:
    """A LIST session's elements, in Redis order."""
    elements = await redis.lrange(key, 0, -1)
    assert all(isinstance(e, bytes) for e in elements)
    return [bytes(e) for e in elements if isinstance(e, bytes)]


def ref_of(rt: Runtime, key: str) -> SessionRef:
    ref = rt.pattern.parse(key)
    assert ref is not None, key
    return ref


class MeanwhileSummarizer:
    """The extractive summarizer, running `meanwhile` (the agent writing) before it answers,
    on the first call only."""

    name = "meanwhile"

    def __init__(self, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self.meanwhile: Callable[[], Awaitable[None]] | None = meanwhile
        self.inner = ExtractiveSummarizer()

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return await self.inner.summarize(previous, turns, max_chars)

    async def aclose(self) -> None:
        pass
