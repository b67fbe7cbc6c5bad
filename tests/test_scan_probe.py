"""Finding work: the batched probe script says what the per-key pipeline says, touches nothing,
and a full scan finds every session among unrelated keys."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from worker.hot.keys import KeyPattern
from worker.hot.scanner import _PROBE_SCRIPT, _probe_batch, probe, scan_and_probe


async def test_probe_script_agrees_with_the_pipeline(redis: Redis, prefix: str) -> None:
    pattern = KeyPattern.compile(prefix + "conversation:{id}:history")
    meta = prefix + "session:{id}"
    await redis.rpush(pattern.key_for("ttl"), b"a", b"b")
    await redis.expire(pattern.key_for("ttl"), 500)
    await redis.rpush(pattern.key_for("forever"), b"c")
    await redis.hset(meta.replace("{id}", "forever"), "last_active", str(time.time() - 90))
    await redis.set(pattern.key_for("string"), b"not a list")
    refs = [
        ref
        for ref in map(pattern.parse, map(pattern.key_for, ["ttl", "forever", "string", "gone"]))
        if ref is not None
    ]
    await asyncio.sleep(1.1)  # idle times of a second or more
    script = redis.register_script(_PROBE_SCRIPT)
    for metadata in (None, meta):
        by_script = await _probe_batch(redis, script, refs, metadata)
        by_pipeline = await probe(redis, refs, metadata)
        assert [p.ref.session_id for p in by_script] == ["ttl", "forever", "string"]
        for a, b in zip(by_script, by_pipeline, strict=True):
            assert a.ref == b.ref and a.size_bytes == b.size_bytes
            assert abs(a.ttl_ms - b.ttl_ms) < 1000 and (a.ttl_ms < 0) == (b.ttl_ms < 0)
            assert a.idle_s == b.idle_s
        idle = by_script[1].idle_s
        assert idle is not None
        if metadata:
            assert 89 <= idle <= 120  # the agent's own last_active
        else:
            assert idle >= 1
    # Probing is not an access: the keys are still idle.
    assert await redis.object("idletime", pattern.key_for("ttl")) >= 1


async def test_full_scan_finds_every_session_among_other_keys(redis: Redis, prefix: str) -> None:
    pattern = KeyPattern.compile(prefix + "conversation:{id}:history")
    await redis.mset({f"{prefix}cache:{i}": b"x" for i in range(3000)})
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(450):
            pipe.rpush(pattern.key_for(f"s{i}"), b"turn")
        await pipe.execute()
    seen = [p.ref.session_id async for batch in scan_and_probe(redis, pattern, 100) for p in batch]
    assert sorted(seen) == sorted(f"s{i}" for i in range(450))
