"""The `gemini` layout: sessions written by seed 003's agent (google-genai chats, its history in
one STRING, rewritten whole on every turn) and seed 000's, consolidated, and loaded again by
`client.chats.create(history=...)`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from google import genai
from google.genai import types
from redis.asyncio import Redis

from tests.layout_helpers import MeanwhileSummarizer, archived, ref_of, value_of
from worker.archive import writer
from worker.config import Settings
from worker.layouts.gemini import ACKNOWLEDGEMENT, SUMMARY_HEADER, GeminiLayout
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer
from worker.testing.gemini_server import GeminiServer, Reply

MODEL = "gemini-3.5-flash"
TTL_S = 7 * 24 * 3600


def seed_003(history: list[types.Content]) -> bytes:
    """Seed 003's serialization, exactly: text parts only, Python's json (ASCII escapes)."""
    rows = [{"role": m.role, "parts": [{"text": p.text} for p in m.parts or ()]} for m in history]
    return json.dumps(rows).encode()


def sdk_dump(history: list[types.Content]) -> bytes:
    """The SDK's own dump, function calls included, UTF-8 as is."""
    rows = [m.model_dump(mode="json", exclude_none=True) for m in history]
    return json.dumps(rows, ensure_ascii=False).encode()


class Seed003Agent:
    """Seed 003's chat_once: load the history, send one message, save the whole list back."""

    def __init__(self, redis: Redis, client: genai.Client, prefix: str) -> None:
        self.redis, self.client, self.prefix = redis, client, prefix

    def key(self, session_id: str) -> str:
        return f"{self.prefix}chat:{session_id}"

    async def history(self, session_id: str) -> list[Any]:
        raw = await self.redis.get(self.key(session_id))
        return json.loads(raw) if raw else []

    async def chat_once(self, session_id: str, message: str) -> str:
        history = await self.history(session_id)
        chat = self.client.aio.chats.create(model=MODEL, history=history)
        response = await chat.send_message(message)
        await self.redis.set(self.key(session_id), seed_003(chat.get_history()), ex=TTL_S)
        return response.text or ""


@pytest.fixture
async def server() -> AsyncIterator[GeminiServer]:
    async with GeminiServer() as running:
        yield running


@pytest.fixture
def client(server: GeminiServer) -> genai.Client:
    return genai.Client(api_key="k", http_options=types.HttpOptions(base_url=server.base_url))


@pytest.fixture
def agent(redis: Redis, client: genai.Client, prefix: str) -> Seed003Agent:
    return Seed003Agent(redis, client, prefix)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], prefix: str) -> Settings:
    return make_settings(layout="gemini", key_pattern=prefix + "chat:{id}")


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as runtime:
        yield runtime


async def talk(agent: Seed003Agent, server: GeminiServer, session_id: str, rounds: int) -> None:
    for i in range(rounds):
        server.script(Reply.answer(f"Noted, Zoë: order ORD-{1000 + i} ships on day {i}."))
        await agent.chat_once(session_id, f"Round {i}: check ORD-{1000 + i} for Café Zoë?")


async def test_seed_003_session_consolidates_and_the_chat_goes_on_with_the_summary(
    rt: Runtime, agent: Seed003Agent, server: GeminiServer, redis: Redis, pg: asyncpg.Connection
) -> None:
    await talk(agent, server, "g1", 5)  # ten contents
    key = agent.key("g1")
    value = await value_of(redis, key)
    assert b"Caf\\u00e9" in value  # Python's json escapes
    written = GeminiLayout().split(value)

    outcome = await rt.pipeline.consolidate(ref_of(rt, key))

    assert outcome.status == "consolidated", outcome
    assert await archived(pg, "g1") == written
    hot = await agent.history("g1")
    assert hot[0]["role"] == "user" and hot[0]["parts"][0]["text"].startswith(SUMMARY_HEADER)
    assert hot[1] == {"role": "model", "parts": [{"text": ACKNOWLEDGEMENT}]}
    assert hot[2:] == [json.loads(raw) for raw in written[-4:]]
    assert 0 < await redis.ttl(key) <= TTL_S

    # The library loads it, and the next request carries the summary and the recent turns.
    loaded = agent.client.chats.create(model=MODEL, history=hot).get_history()
    assert [c.role for c in loaded] == ["user", "model"] * 3
    server.reset()
    await talk(agent, server, "g1", 1)
    [request] = server.generate_requests
    sent = request.body["contents"]
    assert sent[0]["parts"][0]["text"].startswith(SUMMARY_HEADER)
    assert sent[2:6] == [json.loads(raw) for raw in written[-4:]]

    # The agent re-serialized everything, the summary included: it is still recognised.
    again = await rt.pipeline.consolidate(ref_of(rt, key))
    assert again.turns_archived == 2 and not again.gap, again
    latest = GeminiLayout().split(await value_of(redis, key))
    assert await archived(pg, "g1") == written + latest[-2:]


async def test_function_calls_stay_with_their_responses_and_utf8_round_trips(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, client: genai.Client, prefix: str
) -> None:
    # Gemini's function calls carry no id: a call is paired with the next response by name.
    def call(name: str, **args: Any) -> types.Content:
        part = types.Part(function_call=types.FunctionCall(name=name, args=args))
        return types.Content(role="model", parts=[part])

    def answer(name: str, **response: Any) -> types.Content:
        part = types.Part(function_response=types.FunctionResponse(name=name, response=response))
        return types.Content(role="user", parts=[part])

    def say(role: str, text: str) -> types.Content:
        return types.Content(role=role, parts=[types.Part(text=text)])

    history = [
        say("user", "Météo à Paris, puis à Lyon ?"),
        call("weather", city="Paris"),
        answer("weather", forecast="Paris: 21°C"),
        say("model", "Paris : 21°C."),
        say("user", "Et Lyon ?"),
        call("weather", city="Lyon"),
        answer("weather", forecast="Lyon: 24°C"),
        say("model", "Lyon : 24°C."),
        say("user", "Merci !"),
        say("model", "De rien."),
    ]
    key = prefix + "chat:g2"
    await redis.set(key, sdk_dump(history), ex=3600)
    written = GeminiLayout().split(await value_of(redis, key))
    assert "Météo".encode() in written[0]

    outcome = await rt.pipeline.consolidate(ref_of(rt, key))

    # Keeping four would keep Lyon's response and fold its call: the call stays too, and
    # Paris' call, paired with its own response by name and order, is folded with it.
    assert outcome.status == "consolidated" and outcome.turns_kept == 5, outcome
    assert await archived(pg, "g2") == written
    value = await value_of(redis, key)
    hot = json.loads(value)
    assert hot[1:] == [json.loads(raw) for raw in written[-5:]]
    # The first kept content is the model's call: the summary alone keeps the roles alternating.
    assert [c["role"] for c in hot] == ["user", "model", "user", "model", "user", "model"]
    summary = GeminiLayout().split(value)[0]
    assert "°C".encode() in summary and b"\\u00" not in summary  # the agent's UTF-8, as is
    loaded = client.chats.create(model=MODEL, history=hot).get_history()
    assert loaded[1].parts is not None and loaded[1].parts[0].function_call is not None


async def test_a_pending_function_call_is_never_folded(
    rt: Runtime, redis: Redis, prefix: str
) -> None:
    rows: list[dict[str, Any]] = [
        {"role": "user", "parts": [{"text": "Réserve le train de 19h30."}]},
        {"role": "model", "parts": [{"functionCall": {"id": "c7", "name": "book", "args": {}}}]},
        *({"role": "user", "parts": [{"text": f"Alors ? {i}"}]} for i in range(8)),
    ]
    key = prefix + "chat:g3"
    await redis.set(key, json.dumps(rows).encode())

    outcome = await rt.pipeline.consolidate(ref_of(rt, key))

    assert outcome.turns_folded == 1
    hot = json.loads(await value_of(redis, key))
    # The first kept content is the model's: the summary alone keeps the turns alternating.
    assert hot[0]["parts"][0]["text"].startswith(SUMMARY_HEADER) and hot[1:] == rows[1:]


async def test_seed_000_string_parts_keep_their_form(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    rows = [
        {"role": "user" if i % 2 == 0 else "model", "parts": [f"Turn {i}: Sudeep, ORD-{i}"]}
        for i in range(10)
    ]
    key = prefix + "history:s0"
    await redis.set(key, json.dumps(rows).encode())
    settings = make_settings(layout="gemini", key_pattern=prefix + "history:{id}")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        outcome = await rt.pipeline.consolidate(ref_of(rt, key))
    assert outcome.status == "consolidated"
    hot = json.loads(await value_of(redis, key))
    assert isinstance(hot[0]["parts"][0], str) and hot[0]["parts"][0].startswith(SUMMARY_HEADER)
    assert hot[1] == {"role": "model", "parts": [ACKNOWLEDGEMENT]}
    assert hot[2:] == rows[-4:]
    assert len(await archived(pg, "s0")) == 10


async def test_parts_mixing_objects_and_strings_are_kept_as_written(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    # An image part beside a bare string: valid for the agent, and its shape must not be taken
    # for the session's text-part form (it crashed the rewrite on every pass).
    mixed = {"role": "model", "parts": [{"inline_data": {"data": "AAAA"}}, "here is the picture"]}
    rows: list[dict[str, Any]] = [
        {"role": "user" if i % 2 == 0 else "model", "parts": [{"text": f"Turn {i}: ORD-{i}"}]}
        for i in range(7)
    ]
    rows.insert(3, mixed)
    key = prefix + "chat:mixed"
    await redis.set(key, json.dumps(rows).encode())
    settings = make_settings(layout="gemini", key_pattern=prefix + "chat:{id}", keep_recent=5)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        outcome = await rt.pipeline.consolidate(ref_of(rt, key))
    assert outcome.status == "consolidated", outcome
    hot = json.loads(await value_of(redis, key))
    assert hot[0]["parts"][0]["text"].startswith(SUMMARY_HEADER)
    assert hot[-5:] == rows[-5:] and mixed in hot
    assert len(await archived(pg, "mixed")) == 8


async def test_the_swap_never_overwrites_a_value_the_agent_rewrote_meanwhile(
    settings: Settings, agent: Seed003Agent, server: GeminiServer, redis: Redis
) -> None:
    await talk(agent, server, "g4", 5)
    key = agent.key("g4")

    async def agent_trims() -> None:  # seed 003's own trim_history: the prefix changes
        history = await agent.history("g4")
        await redis.set(key, json.dumps(history[4:]).encode(), keepttl=True)

    async with open_runtime(settings, summarizer=MeanwhileSummarizer(agent_trims)) as rt:
        outcome = await rt.pipeline.consolidate(ref_of(rt, key))
    assert outcome.status == "conflict" and outcome.reason == "rewrite: changed", outcome
    trimmed = await value_of(redis, key)
    assert len(json.loads(trimmed)) == 6  # the agent's value, untouched


async def test_turns_the_agent_appends_during_the_summary_are_kept(
    settings: Settings, agent: Seed003Agent, server: GeminiServer, redis: Redis, pg: Any
) -> None:
    await talk(agent, server, "g5", 5)
    key = agent.key("g5")
    written = GeminiLayout().split(await value_of(redis, key))

    async def agent_talks() -> None:
        await talk(agent, server, "g5", 1)

    async with open_runtime(settings, summarizer=MeanwhileSummarizer(agent_talks)) as rt:
        outcome = await rt.pipeline.consolidate(ref_of(rt, key))
        assert outcome.status == "consolidated", outcome
        hot = GeminiLayout().split(await value_of(redis, key))
        assert len(hot) == 2 + 4 + 2 and hot[2:6] == written[-4:]
        again = await rt.pipeline.consolidate(ref_of(rt, key))
    assert again.turns_archived == 2
    assert await archived(pg, "g5") == written + hot[-2:]


async def test_the_agents_lock_is_honoured(
    make_settings: Callable[..., Settings],
    agent: Seed003Agent,
    server: GeminiServer,
    redis: Redis,
    prefix: str,
) -> None:
    settings = make_settings(
        layout="gemini",
        key_pattern=prefix + "chat:{id}",
        agent_lock_pattern=prefix + "chat:lock:{id}",
    )
    await talk(agent, server, "g6", 5)
    key, lock = agent.key("g6"), prefix + "chat:lock:g6"
    before = await redis.get(key)
    await redis.set(lock, "agent-token", nx=True, px=10_000)  # the agent is mid-turn

    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        held = await rt.pipeline.consolidate(ref_of(rt, key))
        assert held.status == "conflict" and held.reason == "rewrite: locked", held
        assert await redis.get(key) == before and await redis.get(lock) == b"agent-token"

        await redis.delete(lock)  # the agent's turn is over
        done = await rt.pipeline.consolidate(ref_of(rt, key))
    assert done.status == "consolidated", done
    assert not await redis.exists(lock)  # ours was taken for the swap and given back


@pytest.mark.parametrize(
    "value",
    [b"not json", b'{"role": "user"}', b'[{"role": "system", "parts": [{"text": "x"}]}]'],
    ids=["not-json", "not-a-list", "system-role"],
)
async def test_an_unreadable_value_is_quarantined_and_left_alone(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str, value: bytes
) -> None:
    key = prefix + "chat:bad"
    await redis.set(key, value)
    outcome = await rt.pipeline.consolidate(ref_of(rt, key))
    assert outcome.status == "quarantined", outcome
    assert await redis.get(key) == value
    assert await pg.fetchval("SELECT count(*) FROM quarantine WHERE redis_key = $1", key) == 1


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(lambda rows: json.dumps(rows, separators=(",", ":")), id="compact-ascii"),
        pytest.param(lambda rows: json.dumps(rows, ensure_ascii=False), id="spaced-utf8"),
        pytest.param(lambda rows: json.dumps(rows, indent=2), id="indented"),
    ],
)
async def test_an_agent_that_saves_the_summary_its_own_way_still_has_it_recognised(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
    save: Callable[[list[Any]], str],
) -> None:
    # ASCII-only turns tell nothing of how the agent escapes: the summary (with its "…") is
    # written in a guessed style, and the agent's next save spells it its own way.
    rows: list[Any] = [
        {"role": "user" if i % 2 == 0 else "model", "parts": [{"text": f"Turn {i}: " + "x" * 500}]}
        for i in range(12)
    ]
    sid = "styled-" + prefix.rstrip(":")  # session ids are global to the shared archive
    key = f"{prefix}chat:{sid}"
    await redis.set(key, save(rows).encode(), ex=TTL_S)
    settings = make_settings(layout="gemini", key_pattern=prefix + "chat:{id}", keep_recent=4)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        first = await rt.pipeline.consolidate(ref_of(rt, key))
        assert first.status == "consolidated", first
        exact = GeminiLayout().split(await value_of(redis, key))[0]
        hot = json.loads(await value_of(redis, key))
        assert "…" in hot[0]["parts"][0]["text"]
        new = [{"role": "user", "parts": [{"text": "And one more thing."}]}]
        await redis.set(key, save(hot + new).encode(), keepttl=True)  # the agent's next turn
        # The one-session read (what a failed batch falls back to) knows it too.
        respelled = GeminiLayout().split(await value_of(redis, key))[0]
        async with rt.engine.connect() as conn:
            for head in (exact, respelled):
                alone = await writer.read_state(conn, sid, head, 7)
                assert alone.head is not None and alone.head.through_seq == 7, alone

        again = await rt.pipeline.consolidate(ref_of(rt, key))

    assert again.turns_archived == 1 and not again.gap, again
    assert [json.loads(raw) for raw in await archived(pg, sid)] == rows + new
