"""Reading a session's hot state and rewriting it by compare-and-swap."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.domain import SessionRef, Snapshot
from worker.hot.leases import Lease
from worker.hot.scripts import Scripts, Swap, SwapResult
from worker.layouts.base import DecodeError, Layout, Storage

log = structlog.get_logger(__name__)


class BadKey(Exception):
    """The key cannot be read as the layout says (wrong type, too large): quarantine it.

    `small` says whether its value is within CONSOLIDATOR_MAX_VALUE_BYTES, so a copy of it
    may be taken for the quarantine record."""

    def __init__(self, reason: str, detail: str, small: bool = True) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.small = small


@dataclass(frozen=True, slots=True)
class Stored:
    """A snapshot plus what the rewrite must compare against: the value or elements as stored."""

    snapshot: Snapshot
    value: bytes | None  # STRING layouts: the whole value
    stored_order: tuple[bytes, ...]  # LIST layouts: elements in Redis order
    # MEMORY USAGE taken before the value was read: a later probe that finds the same figure
    # (and no touch since) knows nothing was written. Taken before, so a write in between
    # errs towards reading the session once more, never towards missing it.
    memory: int | None


_TYPE_OF = {Storage.LIST: b"list", Storage.STRING: b"string"}
# How long the agent's lock is taken for one swap: the agent waits at most this long should this
# process die holding it.
_AGENT_LOCK_MS = 2000
# Whole-value swaps redone on the agent's newer value when it only appended meanwhile.
_STRING_ATTEMPTS = 3


class HotStore:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        layout: Layout,
        max_value_bytes: int,
        metadata_pattern: str | None = None,
        agent_lock_pattern: str | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._layout = layout
        self._max_bytes = max_value_bytes
        self._metadata_pattern = metadata_pattern
        self._agent_lock_pattern = agent_lock_pattern

    async def read(self, ref: SessionRef) -> Stored | None:
        """The session as it is now, or None when the key does not exist."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.type(ref.key)
            pipe.memory_usage(ref.key, samples=0)
            kind, size = await pipe.execute()
        if kind == b"none":
            return None
        if kind == b"string" and not await self._redis.strlen(ref.key):
            return None  # an empty value is an empty session: nothing to archive, nothing to lose
        small = size is not None and size <= self._max_bytes
        if kind != _TYPE_OF[self._layout.storage]:
            raise BadKey(
                "wrong_type",
                f"{ref.key} is a {kind.decode()}, the layout needs a "
                f"{_TYPE_OF[self._layout.storage].decode()}",
                small,
            )
        if not small and size is not None:
            raise BadKey(
                "too_large", f"{ref.key} uses {size} bytes, more than {self._max_bytes}", False
            )
        # One MULTI so the elements and the TTL belong to the same instant.
        async with self._redis.pipeline(transaction=True) as pipe:
            if self._layout.storage is Storage.LIST:
                pipe.lrange(ref.key, 0, -1)
            else:
                pipe.get(ref.key)
            pipe.pttl(ref.key)
            if self._metadata_pattern:
                pipe.hgetall(self._metadata_key(ref))
            results = await pipe.execute(raise_on_error=False)
        for result in results[:2]:
            if isinstance(result, Exception):
                raise result
        data, ttl_ms = results[0], int(results[1])
        metadata = self._metadata(ref, results[2]) if self._metadata_pattern else {}
        if data is None or ttl_ms == -2:
            return None
        if self._layout.storage is Storage.LIST:
            stored = tuple(data)
            ordered = tuple(reversed(stored)) if self._layout.newest_first else stored
            snap = Snapshot(ref, ordered, ttl_ms, metadata)
            return Stored(snap, None, stored, size)
        try:
            metadata = {**self._layout.value_metadata(data), **metadata}
            elements = tuple(self._layout.split(data))
        except DecodeError as exc:
            raise BadKey("undecodable", f"{ref.key}: {exc}") from exc
        return Stored(Snapshot(ref, elements, ttl_ms, metadata), data, (), size)

    def _metadata(self, ref: SessionRef, found: object) -> dict[str, str]:
        """The metadata HASH, or nothing when its key holds something else: the history is what
        must be archived before it expires, and an unreadable extra must not stop that."""
        if isinstance(found, Exception):
            log.warning(
                "metadata_unreadable",
                key=self._metadata_key(ref),
                detail=f"metadata key unreadable, archived without it: {found}",
            )
            return {}
        assert isinstance(found, dict)
        return _decode_hash(found)

    async def owner(self, ref: SessionRef) -> str | None:
        """The user the session belongs to: its key's `{user}`, else its metadata's `user_id`
        (None when neither says). A WRONGTYPE metadata key names nobody."""
        if ref.user is not None or not self._metadata_pattern:
            return ref.user
        try:
            found = await self._redis.hget(self._metadata_key(ref), "user_id")
        except ResponseError:
            return None
        return found.decode("utf-8", "replace") if isinstance(found, bytes) else None

    def _metadata_key(self, ref: SessionRef) -> str:
        assert self._metadata_pattern is not None
        return self._metadata_pattern.replace("{id}", ref.session_id)

    async def replace_prefix(
        self, stored: Stored, lease: Lease, prefix_len: int, replacement: Sequence[bytes]
    ) -> SwapResult:
        """Replace the first `prefix_len` elements (conversation order) by `replacement`."""
        if lease.lost:
            return SwapResult(Swap.LEASE_LOST, 0)
        snap = stored.snapshot
        async with self._agent_lock(snap.ref) as held:
            if not held:
                return SwapResult(Swap.LOCKED, 0)
            if self._layout.storage is Storage.STRING:
                return await self._swap_value(stored, lease, prefix_len, replacement)
            return await self._scripts.replace_prefix(
                snap.ref.key,
                lease.key,
                lease.token,
                snap.elements[:prefix_len],
                replacement,
                newest_first=self._layout.newest_first,
            )

    async def _swap_value(
        self, stored: Stored, lease: Lease, prefix_len: int, replacement: Sequence[bytes]
    ) -> SwapResult:
        """Whole-value compare-and-swap. An agent that wrote meanwhile without touching the folded
        prefix (it appended a turn) gets the swap redone on its newer value, keeping what it
        wrote; any other change abandons the rewrite, never overwriting the newer value."""
        key = stored.snapshot.ref.key
        value, elements = stored.value, stored.snapshot.elements
        assert value is not None
        prefix = elements[:prefix_len]
        for _ in range(_STRING_ATTEMPTS):
            new_value = self._layout.join(value, [*replacement, *elements[prefix_len:]])
            result = await self._scripts.replace_value(
                key, lease.key, lease.token, value, new_value
            )
            if result.swap is not Swap.CHANGED:
                return result
            current = await self._redis.get(key)
            if not isinstance(current, bytes):  # gone
                return result
            try:
                elements = tuple(self._layout.split(current))
            except DecodeError:
                return result
            if elements[:prefix_len] != prefix:
                return result
            value = current
        return result

    @contextlib.asynccontextmanager
    async def _agent_lock(self, ref: SessionRef) -> AsyncIterator[bool]:
        """The agent's own lock, when configured, held for the instant of a rewrite: yields
        False (nothing to do) while the agent holds it.

        Taken with SET NX PX and a token of our own rather than checked inside the swap script:
        the agent's lock key need not share the session key's hash slot, and one script may only
        touch keys of one slot in a Redis Cluster. An agent polling for it (seed 003) waits one
        script call.
        """
        if not self._agent_lock_pattern:
            yield True
            return
        lock = self._agent_lock_pattern.replace("{id}", ref.session_id)
        token = uuid.uuid4().hex
        if not await self._redis.set(lock, token, nx=True, px=_AGENT_LOCK_MS):
            yield False
            return
        try:
            yield True
        finally:
            await self._scripts.release(lock, token)  # compare-and-delete: only our own

    async def evict(self, stored: Stored, lease: Lease) -> Swap:
        """Delete the hot state, only if it is still exactly what was archived."""
        if lease.lost:
            return Swap.LEASE_LOST
        key = stored.snapshot.ref.key
        async with self._agent_lock(stored.snapshot.ref) as held:
            if not held:
                return Swap.LOCKED
            if self._layout.storage is Storage.LIST:
                return await self._scripts.delete_list(
                    key, lease.key, lease.token, stored.stored_order
                )
            assert stored.value is not None
            result = await self._scripts.replace_value(
                key, lease.key, lease.token, stored.value, None
            )
            return result.swap


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}
