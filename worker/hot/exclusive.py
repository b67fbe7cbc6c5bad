"""Holding the leases of sessions for an operator's command (restore, forget).

A command that rewrites or erases a session takes the same lease the daemon takes, so no
consolidation can archive the session's turns again between an erasure's two tiers, or
interleave with a restore. A lease held by a running consolidation is waited for (it is
short); one left by a crashed replica expires by its TTL within the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable

from redis.asyncio import Redis

from worker.hot.leases import claim
from worker.hot.scripts import Scripts


class LeaseBusy(RuntimeError):
    """A session stayed claimed by someone else for the whole wait."""


@contextlib.asynccontextmanager
async def holding(
    redis: Redis, keys: Iterable[str], ttl_ms: int, wait_s: float
) -> AsyncIterator[None]:
    """Hold the lease of every session key in `keys` (sorted, so two commands never deadlock)."""
    scripts = Scripts(redis)
    deadline = time.monotonic() + wait_s
    async with contextlib.AsyncExitStack() as stack:
        for key in sorted(set(keys)):
            while True:
                attempt = contextlib.AsyncExitStack()
                lease = await attempt.enter_async_context(claim(redis, scripts, key, ttl_ms))
                if lease is not None:
                    stack.push_async_exit(attempt)
                    break
                await attempt.aclose()
                if time.monotonic() >= deadline:
                    raise LeaseBusy(f"{key} is being consolidated; try again shortly")
                await asyncio.sleep(0.2)
        yield
