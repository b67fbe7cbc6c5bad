"""An agent as seed 004 writes its history: RPUSH of JSON, optional LTRIM, EXPIRE."""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis


def element(role: str, content: str, ts: float | None = None) -> bytes:
    # json.dumps with its default separators and ASCII escapes, exactly like the seed.
    payload = {"role": role, "content": content, "timestamp": ts if ts is not None else time.time()}
    return json.dumps(payload).encode()


async def append(
    redis: Redis,
    key: str,
    role: str,
    content: str,
    *,
    ttl_s: int | None = 3600,
    trim: int | None = None,
) -> bytes:
    raw = element(role, content)
    await redis.rpush(key, raw)
    if trim is not None:
        await redis.ltrim(key, -trim, -1)
    if ttl_s is not None:
        await redis.expire(key, ttl_s)
    return raw


async def conversation(
    redis: Redis, key: str, turns: int, *, ttl_s: int | None = 3600, start: int = 0
) -> list[bytes]:
    """`turns` alternating user/assistant turns with names, numbers and tasks in them."""
    written = []
    for i in range(start, start + turns):
        if i % 2 == 0:
            text = f"Turn {i}: my order ORD-{1000 + i} for Café Zoë costs ${i}.50, can you check?"
            written.append(await append(redis, key, "user", text, ttl_s=ttl_s))
        else:
            text = f"Turn {i}: I checked ORD-{999 + i}; it ships Monday. Next step: email Priya."
            written.append(await append(redis, key, "assistant", text, ttl_s=ttl_s))
    return written
