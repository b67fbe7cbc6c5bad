"""Finding sessions worth consolidating without disturbing the agents.

SCAN walks the keyspace in small steps (never KEYS), and each step's matching keys are probed in
one pipeline: remaining TTL, idle time, length and memory. Nothing here reads a session's value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from worker.domain import SessionRef
from worker.hot.keys import KeyPattern
from worker.layouts.base import Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Probe:
    ref: SessionRef
    ttl_ms: int  # -1 no expiry, -2 gone
    idle_s: int | None
    length: int | None  # elements (LIST) or bytes (STRING); None for another type
    size_bytes: int | None


async def scan_keys(
    redis: Redis, pattern: KeyPattern, count: int
) -> AsyncIterator[list[SessionRef]]:
    """Batches of session keys matching the pattern; every key is seen at least once."""
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=pattern.glob, count=count)
        refs = []
        for raw in keys:
            try:
                key = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                log.warning("key_not_utf8", key=repr(raw)[:200])
                continue
            ref = pattern.parse(key)
            if ref is not None:
                refs.append(ref)
        if refs:
            yield refs
        if cursor == 0:
            return


async def probe(redis: Redis, refs: list[SessionRef], storage: Storage) -> list[Probe]:
    async with redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.pttl(ref.key)
            pipe.object("idletime", ref.key)
            if storage is Storage.LIST:
                pipe.llen(ref.key)
            else:
                pipe.strlen(ref.key)
            pipe.memory_usage(ref.key)
        # Errors stay per key: a wrong-type key (length) or an LFU policy (idle time) must not
        # hide the others.
        replies = await pipe.execute(raise_on_error=False)
    probes = []
    for i, ref in enumerate(refs):
        ttl, idle, length, size = replies[4 * i : 4 * i + 4]
        if not isinstance(ttl, int) or ttl == -2:
            continue
        probes.append(
            Probe(
                ref,
                ttl,
                idle if isinstance(idle, int) else None,
                length if isinstance(length, int) else None,
                size if isinstance(size, int) else None,
            )
        )
    return probes
