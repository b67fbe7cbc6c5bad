"""Realistic agent conversations, written to Redis the way seed 004's agent writes them.

Deterministic for a given seed: support, travel and coding conversations with names, order
numbers, amounts, dates, questions, decisions and tool calls, of varied length.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

from redis.asyncio import Redis

NAMES = ["Priya Nair", "Jonas Berg", "Amélie Roux", "Kenji Sato", "Lucía Gómez", "Omar Haddad"]
CITIES = ["Lisbon", "Kyoto", "Montréal", "Nairobi", "Reykjavík", "São Paulo"]
PRODUCTS = ["standing desk", "noise-cancelling headphones", "espresso machine", "e-bike"]


@dataclass(frozen=True)
class DemoSession:
    session_id: str
    kind: str  # idle | expiring | active | oversize
    elements: list[bytes]
    ttl_s: int
    idle_s: int


def _support(rng: random.Random, n: int) -> Iterator[dict[str, object]]:
    name, product = rng.choice(NAMES), rng.choice(PRODUCTS)
    order = f"ORD-{rng.randint(10000, 99999)}"
    price = rng.randint(80, 2400)
    yield {"role": "user", "content": f"Hi, I'm {name}. My {product} ({order}) arrived damaged."}
    yield {
        "role": "assistant",
        "content": f"Sorry to hear that, {name.split()[0]}. Let me look up {order}.",
        "tool_calls": [
            {
                "id": f"call-{order}",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": json.dumps({"order": order})},
            }
        ],
    }
    yield {
        "role": "tool",
        "tool_call_id": f"call-{order}",
        "content": json.dumps({"order": order, "total": price, "status": "delivered"}),
    }
    for i in range(n):
        step = i % 6
        if step == 0:
            yield {
                "role": "user",
                "content": f"Can I get a refund of ${price}.00 or a "
                f"replacement by Friday? The box was crushed on one side.",
            }
        elif step == 1:
            yield {
                "role": "assistant",
                "content": f"I can offer a replacement shipped within "
                f"{rng.randint(2, 5)} days, or a full refund of ${price}.00. Which do you prefer?",
            }
        elif step == 2:
            yield {
                "role": "user",
                "content": "Replacement please. Will I need to return the damaged one?",
            }
        elif step == 3:
            yield {
                "role": "assistant",
                "content": f"Yes: we'll email a prepaid label to "
                f"{name.split()[0].lower()}@example.com. TODO: confirm pickup date.",
            }
        elif step == 4:
            yield {"role": "user", "content": "ok thanks"}
        else:
            yield {
                "role": "assistant",
                "content": f"Decided: replacement for {order}, "
                f"label sent, pickup on the {rng.randint(1, 28)}th.",
            }


def _travel(rng: random.Random, n: int) -> Iterator[dict[str, object]]:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    budget, days = rng.randint(900, 6000), rng.randint(3, 10)
    yield {
        "role": "user",
        "content": f"Plan a {days}-day trip to {city} for {name} with a budget of €{budget}.",
    }
    for i in range(n):
        if i % 2 == 0:
            yield {
                "role": "assistant",
                "content": f"Day {i // 2 % days + 1} in {city}: museum in the "
                f"morning, lunch near the old town (about €{rng.randint(15, 60)}), and a "
                f"sunset walk. Shall I book the hotel at €{rng.randint(90, 320)} a night?",
            }
        else:
            yield {
                "role": "user",
                "content": rng.choice(
                    [
                        "Sounds good, next day please.",
                        f"Can we swap the museum for a food tour? We need to stay under €{budget}.",
                        "Please remind me to check visa rules before booking.",
                        "What's the weather usually like then?",
                    ]
                ),
            }


def _coding(rng: random.Random, n: int) -> Iterator[dict[str, object]]:
    yield {"role": "system", "content": "You are a senior Python reviewer."}
    for i in range(n):
        if i % 2 == 0:
            yield {
                "role": "user",
                "content": f"Test test_{rng.randint(1, 400)} fails with "
                f"KeyError: 'user_id' after upgrading to v{rng.randint(2, 4)}.{i}. Why?",
            }
        else:
            yield {
                "role": "assistant",
                "content": "The payload schema changed: `user_id` moved "
                "under `meta`. Next step: update the fixture and add a migration test. "
                + "Here is the diff:\n```python\nuser = payload['meta']['user_id']\n```",
            }


def conversation(rng: random.Random, turns: int) -> list[bytes]:
    make = rng.choice([_support, _travel, _coding])
    out: list[bytes] = []
    ts = 1_790_000_000.0 + rng.randint(0, 5_000_000)
    for message in make(rng, turns):
        if len(out) >= turns:
            break
        ts += rng.uniform(5, 240)
        message["timestamp"] = round(ts, 3)
        out.append(json.dumps(message, ensure_ascii=rng.random() < 0.5).encode())
    return out


def sessions(count: int, seed: int = 7) -> list[DemoSession]:
    rng = random.Random(seed)
    result = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.35:
            kind, ttl, idle, turns = "idle", rng.randint(3600, 86400), rng.randint(1800, 7200), 0
        elif roll < 0.55:
            kind, ttl, idle, turns = "expiring", rng.randint(30, 240), rng.randint(0, 600), 0
        elif roll < 0.65:
            kind, ttl, idle, turns = "oversize", 86400, 0, rng.randint(160, 260)
        else:
            kind, ttl, idle, turns = "active", rng.randint(3600, 86400), 0, 0
        turns = turns or rng.choice([6, 10, 14, 20, 30, 45, 60, 90])
        result.append(DemoSession(f"{kind}-{i:04d}", kind, conversation(rng, turns), ttl, idle))
    return result


async def load(redis: Redis, pattern: str, demo: list[DemoSession]) -> None:
    """Write the sessions; idle ones get an idle time via RESTORE IDLETIME, as if untouched."""
    async with redis.pipeline(transaction=False) as pipe:
        for s in demo:
            key = pattern.replace("{id}", s.session_id)
            pipe.delete(key)
            pipe.rpush(key, *s.elements)
            pipe.expire(key, s.ttl_s)
        await pipe.execute()
    for s in demo:
        if s.idle_s:
            key = pattern.replace("{id}", s.session_id)
            dump = await redis.dump(key)
            ttl = await redis.pttl(key)
            if dump is not None:
                await redis.restore(key, ttl, dump, replace=True, idletime=s.idle_s)
