"""One lease per session: any number of replicas, never two on one session at once."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.cancel import cancel_and_wait
from worker.hot.keys import lease_key
from worker.hot.scripts import Scripts

log = structlog.get_logger(__name__)


class Lease:
    def __init__(self, key: str, token: str) -> None:
        self.key = key
        self.token = token
        self.lost = False


async def still_held(redis: Redis, lease: Lease) -> bool:
    """Whether the lease is ours right now. Its key only ever holds our token while we have held
    it without a break (a token is never reused), so True also means that no other worker can
    have touched the session since we claimed it."""
    if not lease.lost and await redis.get(lease.key) != lease.token.encode():
        lease.lost = True
    return not lease.lost


@contextlib.asynccontextmanager
async def claim(
    redis: Redis, scripts: Scripts, session_key: str, ttl_ms: int
) -> AsyncIterator[Lease | None]:
    """Yield a held lease, or None when another worker holds it. Renewed while held.

    The renewal keeps a long summary from outliving the lease; if a renewal finds the lease gone,
    `lost` is set and the compare-and-swap (which checks the token) refuses to write.
    """
    lease = Lease(lease_key(session_key), secrets.token_hex(16))
    if not await redis.set(lease.key, lease.token, nx=True, px=ttl_ms):
        yield None
        return
    done = asyncio.Event()
    renewer = asyncio.create_task(_keep_alive(redis, scripts, lease, ttl_ms, done))
    try:
        yield lease
    finally:
        # Told to stop, not only cancelled: a cancellation that arrives as a Redis call times
        # out can be swallowed (turned into the call's TimeoutError), and a renewer that went on
        # would hold this session, and the whole pass waiting for it, for ever.
        done.set()
        try:
            await cancel_and_wait(renewer)
        finally:
            await _release(scripts, lease)


# Leases whose release failed (Redis away): lease key -> token. Their sessions would wait out
# the lease's TTL (a minute by default) after Redis returns, held back by this very process;
# the daemon gives them back as soon as Redis answers again (release_leftovers).
_UNRELEASED: dict[str, str] = {}
_MAX_UNRELEASED = 10_000  # beyond this, the TTL alone frees them


async def _release(scripts: Scripts, lease: Lease) -> None:
    try:
        await asyncio.shield(scripts.release(lease.key, lease.token))
    except (RedisError, OSError) as exc:
        # It expires by its TTL anyway; nothing is lost by leaving it.
        log.warning("lease_release_failed", lease=lease.key, error=str(exc))
        if len(_UNRELEASED) < _MAX_UNRELEASED:
            _UNRELEASED[lease.key] = lease.token


async def release_leftovers(scripts: Scripts) -> int:
    """Give back the leases whose release failed; how many were still ours. Compare-and-delete:
    one that expired, or that another worker took since, is left alone."""
    released = 0
    for key, token in list(_UNRELEASED.items()):
        released += await scripts.release(key, token)  # RedisError: still away, try next time
        del _UNRELEASED[key]
    if released:
        log.info("leases_released_late", leases=released)
    return released


async def _keep_alive(
    redis: Redis, scripts: Scripts, lease: Lease, ttl_ms: int, done: asyncio.Event
) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), ttl_ms / 3000)
        if done.is_set():
            return
        try:
            if not await scripts.renew(lease.key, lease.token, ttl_ms):
                lease.lost = True
                log.warning("lease_lost", lease=lease.key)
                return
        except (RedisError, OSError) as exc:
            log.warning("lease_renew_failed", lease=lease.key, error=str(exc))
