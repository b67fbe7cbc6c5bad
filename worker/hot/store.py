"""Reading a session's hot state and rewriting it by compare-and-swap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from worker.domain import SessionRef, Snapshot
from worker.hot.leases import Lease
from worker.hot.scripts import Scripts, Swap, SwapResult
from worker.layouts.base import Layout, Storage


class BadKey(Exception):
    """The key cannot be read as the layout says (wrong type, too large): quarantine it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


class HotStore:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        layout: Layout,
        max_value_bytes: int,
        metadata_pattern: str | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._layout = layout
        self._max_bytes = max_value_bytes
        self._metadata_pattern = metadata_pattern

    async def read(self, ref: SessionRef) -> Stored | None:
        """The session as it is now, or None when the key does not exist."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.type(ref.key)
            pipe.memory_usage(ref.key, samples=0)
            kind, size = await pipe.execute()
        if kind == b"none":
            return None
        if kind != _TYPE_OF[self._layout.storage]:
            raise BadKey(
                "wrong_type",
                f"{ref.key} is a {kind.decode()}, the layout needs a "
                f"{_TYPE_OF[self._layout.storage].decode()}",
            )
        if size is not None and size > self._max_bytes:
            raise BadKey("too_large", f"{ref.key} uses {size} bytes, more than {self._max_bytes}")
        # One MULTI so the elements and the TTL belong to the same instant.
        async with self._redis.pipeline(transaction=True) as pipe:
            if self._layout.storage is Storage.LIST:
                pipe.lrange(ref.key, 0, -1)
            else:
                pipe.get(ref.key)
            pipe.pttl(ref.key)
            if self._metadata_pattern:
                pipe.hgetall(self._metadata_key(ref))
            results = await pipe.execute()
        data, ttl_ms = results[0], int(results[1])
        metadata = _decode_hash(results[2]) if self._metadata_pattern else {}
        if data is None or ttl_ms == -2:
            return None
        if self._layout.storage is Storage.LIST:
            stored = tuple(data)
            ordered = tuple(reversed(stored)) if self._layout.newest_first else stored
            snap = Snapshot(ref, ordered, ttl_ms, metadata)
            return Stored(snap, None, stored, size)
        metadata = {**self._layout.value_metadata(data), **metadata}
        snap = Snapshot(ref, tuple(self._layout.split(data)), ttl_ms, metadata)
        return Stored(snap, data, (), size)

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
        if self._layout.storage is Storage.LIST:
            return await self._scripts.replace_prefix(
                snap.ref.key,
                lease.key,
                lease.token,
                snap.elements[:prefix_len],
                replacement,
                newest_first=self._layout.newest_first,
            )
        assert stored.value is not None
        new_elements = [*replacement, *snap.elements[prefix_len:]]
        new_value = self._layout.join(stored.value, new_elements)
        return await self._scripts.replace_value(
            snap.ref.key, lease.key, lease.token, stored.value, new_value
        )

    async def evict(self, stored: Stored, lease: Lease) -> Swap:
        """Delete the hot state, only if it is still exactly what was archived."""
        if lease.lost:
            return Swap.LEASE_LOST
        key = stored.snapshot.ref.key
        if self._layout.storage is Storage.LIST:
            return await self._scripts.delete_list(key, lease.key, lease.token, stored.stored_order)
        assert stored.value is not None
        result = await self._scripts.replace_value(key, lease.key, lease.token, stored.value, None)
        return result.swap


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}
