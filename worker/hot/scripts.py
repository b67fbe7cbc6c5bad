"""Typed wrappers around the Lua scripts: each Python signature is the KEYS/ARGV contract."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


class Swap(enum.IntEnum):
    DONE = 1
    CHANGED = 0
    LEASE_LOST = -1
    LOCKED = -2  # the agent held its own lock (settings.agent_lock_pattern): not attempted


@dataclass(frozen=True, slots=True)
class SwapResult:
    swap: Swap
    memory_after: int  # MEMORY USAGE of the key right after the write (0: gone or not written)


def _swap_result(reply: object) -> SwapResult:
    assert isinstance(reply, list | tuple), reply  # the scripts return {code, memory}
    return SwapResult(Swap(int(reply[0])), int(reply[1] or 0))


def value_sha1(value: bytes) -> str:
    return hashlib.sha1(value, usedforsecurity=False).hexdigest()


def _load(name: str) -> str:
    return files("worker.hot").joinpath(name).read_text(encoding="utf-8")


class Scripts:
    """The scripts registered on one client (EVALSHA, loading on first use)."""

    def __init__(self, redis: Redis) -> None:
        self._replace_prefix: AsyncScript = redis.register_script(_load("replace_prefix.lua"))
        self._replace_value: AsyncScript = redis.register_script(_load("replace_value.lua"))
        self._delete_list: AsyncScript = redis.register_script(_load("delete_list.lua"))
        self._release: AsyncScript = redis.register_script(_load("release_lease.lua"))
        self._renew: AsyncScript = redis.register_script(_load("renew_lease.lua"))

    async def replace_prefix(
        self,
        key: str,
        lease: str,
        token: str,
        prefix: Sequence[bytes],
        replacement: Sequence[bytes],
        *,
        newest_first: bool,
    ) -> SwapResult:
        args: list[str | bytes | int] = [
            token,
            len(prefix),
            "1" if newest_first else "0",
            *prefix,
            *replacement,
        ]
        return _swap_result(await self._replace_prefix(keys=[key, lease], args=args))

    async def replace_value(
        self, key: str, lease: str, token: str, old: bytes, new: bytes | None
    ) -> SwapResult:
        args: list[str | bytes] = [token, value_sha1(old), new or b""]
        return _swap_result(await self._replace_value(keys=[key, lease], args=args))

    async def delete_list(self, key: str, lease: str, token: str, stored: Sequence[bytes]) -> Swap:
        args: list[str | bytes] = [token, *stored]
        return Swap(int(await self._delete_list(keys=[key, lease], args=args)))

    async def release(self, lease: str, token: str) -> bool:
        return bool(await self._release(keys=[lease], args=[token]))

    async def renew(self, lease: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[lease], args=[token, ttl_ms]))
