"""Bad input: the daemon quarantines what it cannot read, touches none of it, and goes on.

Every kind of bad session sits beside good ones under a running daemon: malformed JSON, a key
of the wrong Redis type, a 20 MB value, invalid UTF-8, an unknown role, an element that is not
an object. Each must get a clear log line, a metric and a quarantine record with its reason;
its data stays byte for byte in Redis with its TTL; the good sessions are consolidated all the
while. `consolidator stats` lists the quarantined sessions with the way to retry them, and once
the operator has fixed a key, `consolidator flush ID` archives it and clears its record.

Keys no session id can be made of (not UTF-8, or holding a NUL, which PostgreSQL text cannot
store) are logged at each scan and left alone: there is no id to quarantine them under.

Not errors, and so not quarantined: an empty session (an empty value holds no turn: nothing to
archive, nothing to lose), a session that has only its metadata, session ids with odd
characters (spaces, braces, glob characters, newlines, emoji), a NUL character inside a
turn's text (valid JSON and UTF-8; the archive keeps the exact bytes), and a timestamp that
cannot be stored (the turn is archived without it).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.chaos import (
    REDIS_URL,
    Daemon,
    Figures,
    audit_session,
    consolidator,
    daemon_env,
    delete_prefix,
    fresh_database,
    key_for,
    plain_dsn,
    record,
)
from tests.servers import free_port

pytestmark = [pytest.mark.fault, pytest.mark.soak, pytest.mark.timeout(180)]

TTL_S = 3000
HUGE_BYTES = 20 * 1024 * 1024


def good(text: str, role: str = "user") -> bytes:
    return agents.element(role, text)


def huge_element() -> bytes:
    return json.dumps({"role": "user", "content": "x" * HUGE_BYTES, "timestamp": 1.0}).encode()


# session id -> (expected quarantine reason, how to write it, how the operator fixes it)
Writer = Callable[[Redis, str], Awaitable[None]]


async def _list(redis: Redis, key: str, *elements: bytes) -> None:
    await redis.rpush(key, *elements)
    await redis.expire(key, TTL_S)


async def bad_json(redis: Redis, key: str) -> None:
    await _list(redis, key, good("hello"), b'{"role": "user", "content": "unterminated')


async def wrong_type(redis: Redis, key: str) -> None:
    await redis.hset(key, mapping={"role": "user", "content": "a hash, not a list"})
    await redis.expire(key, TTL_S)


async def too_large(redis: Redis, key: str) -> None:
    await _list(redis, key, good("before the big one"), huge_element())


async def bad_utf8(redis: Redis, key: str) -> None:
    await _list(redis, key, good("fine"), b'{"role": "user", "content": "caf\xe9 cr\xe8me"}')


async def unknown_role(redis: Redis, key: str) -> None:
    element = json.dumps({"role": "wizard", "content": "abracadabra", "timestamp": 1.0})
    await _list(redis, key, good("hi"), element.encode())


async def not_an_object(redis: Redis, key: str) -> None:
    await _list(redis, key, good("hi"), b'["user", "an array, not an object"]')


async def tool_calls_not_a_list(redis: Redis, key: str) -> None:
    element = json.dumps({"role": "assistant", "content": "calling", "tool_calls": 5})
    await _list(redis, key, good("hi"), element.encode())


BAD: dict[str, tuple[str, Writer]] = {
    "bad-json": ("undecodable", bad_json),
    "wrong-type": ("wrong_type", wrong_type),
    "huge": ("too_large", too_large),
    "bad-utf8": ("undecodable", bad_utf8),
    "unknown-role": ("undecodable", unknown_role),
    "not-an-object": ("undecodable", not_an_object),
    "tool-calls-not-a-list": ("undecodable", tool_calls_not_a_list),
    "bad json, odd id {x}*": ("undecodable", bad_json),
}
ODD_IDS = ["odd id/with:colons", "br{ace}s*and?[glob]", "tab\tnew\nline", "émoji🙂-ü", "a\\b"]


async def fingerprint(redis: Redis, key: str | bytes) -> tuple[bytes, bytes | None, int]:
    """TYPE, DUMP (the value byte for byte, with its encoding) and PTTL of a key."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.type(key)
        pipe.dump(key)
        pipe.pttl(key)
        kind, dump, pttl = await pipe.execute()
    return kind, dump, int(pttl)


async def test_bad_sessions_are_quarantined_untouched_and_the_daemon_goes_on(
    tmp_path: Path,
) -> None:
    prefix = f"bad{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)
    async with fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=database_url,
            prefix=prefix,
            metrics_port=free_port(),
            metadata_pattern=prefix + "session:{id}",
        )
        daemon = Daemon("daemon", env, tmp_path)
        try:
            for session, (_, write) in BAD.items():
                await write(redis, key_for(prefix, session))
            # Not errors: an empty value, metadata only, odd ids, a NUL in a turn's text, and
            # (below) a timestamp out of range.
            await redis.set(key_for(prefix, "empty"), b"", ex=TTL_S)
            await redis.hset(prefix + "session:meta-only", mapping={"user_id": "u1"})
            good_turns: dict[str, list[bytes]] = {}
            for session in ODD_IDS:
                good_turns[session] = await agents.conversation(redis, key_for(prefix, session), 9)
            nul = [good("a NUL \u0000 inside"), good("and after it", "assistant")]
            await _list(redis, key_for(prefix, "nul-char"), *nul)
            await redis.hset(prefix + "session:nul-char", mapping={"agent_id": "a\x00b"})
            good_turns["nul-char"] = nul
            # A timestamp that parses but lies outside what PostgreSQL stores (year 0 in UTC):
            # archived without it, not failed on every pass until the key expires.
            year_one = '{"role": "user", "content": "old", "timestamp": "0001-01-01T00:00+05:00"}'
            far = [good("before"), year_one.encode(), good("after", "assistant")]
            await _list(redis, key_for(prefix, "far-timestamp"), *far)
            good_turns["far-timestamp"] = far
            # Keys no session id can be made of: not UTF-8, or holding a NUL (PostgreSQL text
            # cannot). Logged and left alone: there is nothing to quarantine them under.
            unnamable = [
                prefix.encode() + b"conversation:\xff\xfe:history",
                key_for(prefix, "nul\x00id").encode(),
            ]
            for raw_key in unnamable:
                await redis.rpush(raw_key, good("unreachable"))
                await redis.expire(raw_key, TTL_S)
            before = {s: await fingerprint(redis, key_for(prefix, s)) for s in [*BAD, "empty"]}
            unnamable_before = [await fingerprint(redis, k) for k in unnamable]
            written_at = time.monotonic()

            daemon.start()
            await daemon.wait_started()
            # Good sessions keep coming while the bad ones sit there.
            late = "late-good"
            good_turns[late] = []
            for i in range(2):
                await asyncio.sleep(0.5)
                good_turns[late] += await agents.conversation(
                    redis, key_for(prefix, late), 4, start=4 * i
                )
            deadline = time.monotonic() + 60
            while True:
                rows = await pg.fetch("SELECT session_id, reason, detail, attempts FROM quarantine")
                archived = await pg.fetchval(
                    "SELECT count(*) FROM turns WHERE session_id = $1", late
                )
                if len(rows) >= len(BAD) and archived == len(good_turns[late]):
                    break
                assert time.monotonic() < deadline, (rows, archived, daemon.tail())
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # a few more passes over the bad keys
            assert daemon.running, daemon.tail()
            metrics = {
                reason: await daemon.metric(
                    "consolidator_sessions_quarantined_total", reason=reason
                )
                for reason in {r for r, _ in BAD.values()}
            }
            after = {s: await fingerprint(redis, key_for(prefix, s)) for s in before}
            unnamable_after = [await fingerprint(redis, k) for k in unnamable]
            elapsed_ms = (time.monotonic() - written_at) * 1000
            stats = await consolidator("stats", env=env)
            stats_json = json.loads((await consolidator("stats", "--json", env=env)).stdout)
            code, _ = await daemon.terminate()
            logged = {str(e.get("event")) for e in daemon.events()}
            events = [e for e in daemon.events() if e.get("status") == "quarantined"]
            quarantine = {r["session_id"]: r for r in rows}

            # The operator fixes each key, then retries it by hand.
            fixed: dict[str, list[bytes]] = {}
            for session in BAD:
                key = key_for(prefix, session)
                await redis.delete(key)
                fixed[session] = await agents.conversation(redis, key, 3)
            retried = await consolidator("flush", *BAD, env=env)
            left = await pg.fetchval("SELECT count(*) FROM quarantine")
            audits = [
                await audit_session(redis, pg, prefix, s, {0: turns})
                for s, turns in [*good_turns.items(), *fixed.items()]
            ]
            record(
                Figures(
                    "bad input beside good sessions",
                    elapsed_ms / 1000,
                    turns_written=sum(len(t) for t in good_turns.values()),
                    turns_archived=sum(a.archived for a in audits[: len(good_turns)]),
                    turns_lost=sum(a.lost for a in audits),
                    duplicates=sum(a.duplicates for a in audits),
                    seen=(
                        f"{len(quarantine)} of {len(BAD)} bad sessions quarantined, data and "
                        "TTL untouched; empty, metadata-only, odd ids, NUL text and a "
                        "timestamp out of range not"
                    ),
                )
            )
        finally:
            daemon.stop_quietly()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()

    assert code == 0
    for session, (reason, _) in BAD.items():
        row = quarantine.get(session)
        assert row is not None, f"{session} was not quarantined"
        assert row["reason"] == reason, (session, row)
        assert row["detail"], session
        # Once per key, however many passes met it.
        assert metrics[reason] == [r for r, _ in BAD.values()].count(reason), (reason, metrics)
        assert any(e["session_id"] == session for e in events), f"no log line for {session}"
        kind, dump, pttl = after[session]
        assert (kind, dump) == before[session][:2], f"{session} was changed in Redis"
        assert before[session][2] - elapsed_ms - 1000 < pttl <= before[session][2], session
        retry = f"consolidator flush {shlex.quote(session)}"
        assert f"retry: {retry}" in stats.stdout, stats.stdout
        listed = {q["session_id"]: q for q in stats_json["quarantined"]}
        assert listed[session]["reason"] == reason and listed[session]["retry"] == retry
    assert set(quarantine) == set(BAD), f"quarantined what it should not: {set(quarantine)}"
    assert after["empty"][:2] == before["empty"][:2]
    assert [f[:2] for f in unnamable_after] == [f[:2] for f in unnamable_before]
    assert {"key_not_utf8", "key_has_nul"} <= logged
    assert f"quarantined {len(BAD)}" in stats.stdout, stats.stdout
    assert retried.code == 0, retried.stdout + retried.stderr
    assert left == 0
    problems = [p for a in audits for p in a.problems]
    assert not problems, problems
