"""One agent process for the fault suite: appends seed-004 turns to its sessions, and logs them.

    python -m tests.chaos_writer --redis-url URL --key-pattern 'p:conversation:{id}:history' \
        --writer 3 --sessions a,b,c --duration 20 --rate 40 --seed 7 --log w3.jsonl

Each element is what seed 004 writes (RPUSH of `json.dumps({"role","content","timestamp"})`,
then EXPIRE), with the writer's number and its running sequence number inside the content, so
an audit can prove order and completeness. Now and then an assistant turn calls a tool and the
tool's answer follows, as two separate pushes, like an agent does it.

The log has one JSON line per element once Redis has acknowledged it (`"ok": true`). A push that
fails on a broken connection may or may not have reached Redis: it is logged `"ok": false` and
never re-sent (re-sending could write it twice), and the writer waits for Redis to answer again.
The client retries nothing by itself, for the same reason. The writer never trims.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from types import FrameType
from typing import IO, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.agents import element

_stop = False


def _on_term(signum: int, frame: FrameType | None) -> None:
    global _stop
    _stop = True


def _tool_pair(writer: int, n: int, ts: float) -> tuple[bytes, bytes]:
    call_id = f"call_w{writer}_{n}"
    call = {
        "role": "assistant",
        "content": f"w{writer}#{n} looking up ORD-{1000 + n}",
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "lookup_order", "arguments": json.dumps({"id": n})},
            }
        ],
        "timestamp": ts,
    }
    result = {
        "role": "tool",
        "tool_call_id": call_id,
        "content": f"w{writer}#{n + 1} ORD-{1000 + n} ships Monday from Lyon",
        "timestamp": ts,
    }
    return json.dumps(call).encode(), json.dumps(result).encode()


def _text(writer: int, n: int, session: str, k: int, role: str) -> str:
    if role == "user":
        return (
            f"w{writer}#{n} {session}/{k}: my order ORD-{1000 + n} for Café Zoë "
            f"costs ${k}.50, can you check?"
        )
    return f"w{writer}#{n} {session}/{k}: I checked ORD-{999 + n}; it ships Monday. Email Priya."


class Writer:
    def __init__(self, args: argparse.Namespace, log: IO[str]) -> None:
        self.args = args
        self.log = log
        self.client = redis.Redis.from_url(
            args.redis_url,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self.written = 0
        self.uncertain = 0
        self.outages = 0

    def wait_for_redis(self) -> None:
        delay = 0.05
        while not _stop:
            try:
                self.client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def push(self, session: str, key: str, raw: bytes) -> bool:
        try:
            self.client.rpush(key, raw)
        except (redis.ConnectionError, redis.TimeoutError):
            self.uncertain += 1
            self._record(session, raw, ok=False)
            self.outages += 1
            self.wait_for_redis()
            return False
        self.written += 1
        self._record(session, raw, ok=True)
        if self.args.ttl > 0:
            try:
                self.client.expire(key, self.args.ttl)
            except (redis.ConnectionError, redis.TimeoutError):
                self.wait_for_redis()
        return True

    def _record(self, session: str, raw: bytes, *, ok: bool) -> None:
        line: dict[str, Any] = {"s": session, "raw": raw.decode(), "ok": ok}
        self.log.write(json.dumps(line) + "\n")
        self.log.flush()

    def run(self) -> None:
        args = self.args
        rng = random.Random(args.seed * 1000 + args.writer)
        sessions = args.sessions.split(",")
        per_session = dict.fromkeys(sessions, 0)
        interval = 1.0 / args.rate
        deadline = time.monotonic() + args.duration
        n = 0
        next_at = time.monotonic()
        while not _stop and time.monotonic() < deadline:
            session = rng.choice(sessions)
            key = args.key_pattern.replace("{id}", session)
            k = per_session[session]
            ts = time.time()
            if args.tool_every and rng.randrange(args.tool_every) == 0:
                call, result = _tool_pair(args.writer, n, ts)
                if self.push(session, key, call):
                    self.push(session, key, result)
                n += 2
            else:
                role = "user" if k % 2 == 0 else "assistant"
                self.push(session, key, element(role, _text(args.writer, n, session, k, role), ts))
                n += 1
            per_session[session] = k + 1
            next_at += interval * rng.uniform(0.5, 1.5)
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()
        self.client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key-pattern", required=True)
    parser.add_argument("--writer", type=int, required=True)
    parser.add_argument("--sessions", required=True, help="comma-separated session ids")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rate", type=float, default=20.0, help="turns per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttl", type=int, default=3600, help="EXPIRE after each push; 0: none")
    parser.add_argument("--tool-every", type=int, default=12, help="1 in N turns is a tool call")
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    with open(args.log, "a", encoding="utf-8") as log:
        writer = Writer(args, log)
        writer.wait_for_redis()
        writer.run()
    summary = {
        "writer": args.writer,
        "written": writer.written,
        "uncertain": writer.uncertain,
        "outages": writer.outages,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
