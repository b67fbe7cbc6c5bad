"""Finding sessions worth consolidating without disturbing the agents.

SCAN walks the keyspace in small steps (never KEYS), and each step's matching keys are probed in
one pipeline: remaining TTL, idle time, length and memory. Nothing here reads a session's value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from worker.cancel import cancel_and_wait
from worker.domain import SessionRef
from worker.hot.keys import KeyPattern
from worker.layouts.base import parse_timestamp

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Probe:
    ref: SessionRef
    ttl_ms: int  # -1 no expiry, -2 gone
    idle_s: int | None  # None where the eviction policy (LFU) keeps no idle time
    size_bytes: int | None
    probed_at: float  # wall clock of the reply, to turn the TTL into an absolute expiry

    @property
    def expires_at(self) -> float | None:
        return self.probed_at + self.ttl_ms / 1000 if self.ttl_ms >= 0 else None


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
            if "\x00" in key:  # PostgreSQL text cannot hold a NUL: never archivable, so skipped
                log.warning("key_has_nul", key=repr(key)[:200])
                continue
            ref = pattern.parse(key)
            if ref is not None:
                refs.append(ref)
        if refs:
            yield refs
        if cursor == 0:
            return


async def scan_and_probe(
    redis: Redis,
    pattern: KeyPattern,
    count: int,
    metadata_pattern: str | None = None,
    batch: int = 200,
) -> AsyncIterator[list[Probe]]:
    """Probes of every session key, in batches of about `batch` keys.

    A full scan's time is its SCAN round trips, so the probes must add nothing to it: a batch
    of keys is probed by one script call (`probe.lua`: one command to send and one reply to
    parse instead of three or four per key, which is what the daemon's CPU would otherwise
    spend a full scan on), on another connection while the scan goes on. A batch keeps Redis
    busy about as long as one SCAN step. Where the script cannot run (scripting disabled, a
    Redis Cluster's slots), the batch is probed by a pipeline instead."""
    script = redis.register_script(_PROBE_SCRIPT)
    pending: asyncio.Task[list[Probe]] | None = None
    refs: list[SessionRef] = []
    try:
        async for found in scan_keys(redis, pattern, count):
            refs.extend(found)
            if len(refs) < batch:
                continue
            if pending is not None:
                yield await pending
            pending = asyncio.create_task(_probe_batch(redis, script, refs, metadata_pattern))
            refs = []
        if pending is not None:
            yield await pending
            pending = None
        if refs:
            yield await _probe_batch(redis, script, refs, metadata_pattern)
    finally:
        if pending is not None and not pending.done():
            await cancel_and_wait(pending)


_PROBE_SCRIPT = files("worker.hot").joinpath("probe.lua").read_text(encoding="utf-8")


async def _probe_batch(
    redis: Redis, script: AsyncScript, refs: list[SessionRef], metadata_pattern: str | None
) -> list[Probe]:
    keys = [ref.key for ref in refs]
    if metadata_pattern:
        keys += [metadata_pattern.replace("{id}", ref.session_id) for ref in refs]
    try:
        replies = await script(keys=keys, args=["1" if metadata_pattern else "0"])
    except ResponseError as exc:
        log.debug("probe_script_unavailable", error=str(exc)[:200])
        return await probe(redis, refs, metadata_pattern)
    now = time.time()
    probes = []
    for i, ref in enumerate(refs):
        ttl, idle, size, active = replies[4 * i : 4 * i + 4]
        if not isinstance(ttl, int) or ttl == -2:
            continue
        since = _idle_since(active, now)
        probes.append(
            Probe(
                ref,
                ttl,
                since if since is not None else idle if isinstance(idle, int) else None,
                size if isinstance(size, int) else None,
                now,
            )
        )
    return probes


async def probe(
    redis: Redis, refs: list[SessionRef], metadata_pattern: str | None = None
) -> list[Probe]:
    """TTL, idle time and memory of each key. Only commands that do not count as an access
    (PTTL, OBJECT, MEMORY USAGE): probing must not make a session look active.

    With seed 002's metadata hash configured, its `last_active` is the idle signal where set:
    the agent's own word, which neither readers of the key nor an LFU policy disturb."""
    step = 4 if metadata_pattern else 3
    async with redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.pttl(ref.key)
            pipe.object("idletime", ref.key)
            pipe.memory_usage(ref.key, samples=0)
            if metadata_pattern:
                pipe.hget(metadata_pattern.replace("{id}", ref.session_id), "last_active")
        # Errors stay per key: an LFU policy (no idle time) must not hide the rest.
        replies = await pipe.execute(raise_on_error=False)
    now = time.time()
    probes = []
    for i, ref in enumerate(refs):
        ttl, idle, size, *active = replies[step * i : step * i + step]
        if not isinstance(ttl, int) or ttl == -2:
            continue
        since = _idle_since(active[0], now) if active else None
        idle = since if since is not None else idle
        probes.append(
            Probe(
                ref,
                ttl,
                idle if isinstance(idle, int) else None,
                size if isinstance(size, int) else None,
                now,
            )
        )
    return probes


def _idle_since(last_active: object, now: float) -> int | None:
    if isinstance(last_active, bytes):
        text = last_active.decode("ascii", "replace")
        try:
            value: object = float(text)
        except ValueError:
            value = text  # ISO 8601
        stamp = parse_timestamp(value)
        if stamp is not None:
            return max(int(now - stamp.timestamp()), 0)
    return None
