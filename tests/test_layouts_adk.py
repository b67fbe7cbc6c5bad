"""The `adk` layout against Google ADK's own `RedisSessionService`: a real ADK runner writes the
sessions (its model answered by a callback that records each request), the daemon consolidates
them, and ADK loads them again and builds its next request from the compaction event.

google-adk pins google-genai below 3, so these tests run in their own environment
(`scripts/test-adk.sh`); elsewhere they are skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

pytest.importorskip("google.adk.integrations.redis", reason="google-adk[redis] is not installed")

from google.adk.agents import LlmAgent
from google.adk.events.event import Event
from google.adk.integrations.redis import RedisSessionService, RedisSessionServiceConfig
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.genai import types

from tests.conftest import REDIS_URL
from tests.layout_helpers import archived, ref_of, value_of
from worker.config import Settings
from worker.layouts.adk import SUMMARY_HEADER, AdkLayout
from worker.restore import RestoreStatus, restore
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

APP, USER = "shop", "u1"
STATE = {"cart": ["ORD-1042"], "user:name": "Zoë", "app:currency": "EUR"}


def weather(city: str) -> dict[str, str]:
    """The forecast for a city."""
    return {"forecast": f"{city}: 21°C, sunny"}


class Model:
    """Stands in for the model: records each request ADK builds, answers from a script."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.replies: list[types.Part] = []

    def __call__(self, callback_context: Any, llm_request: Any) -> LlmResponse:
        self.requests.append(llm_request)
        part = self.replies.pop(0) if self.replies else types.Part(text="Bien noté, Zoë.")
        return LlmResponse(content=types.Content(role="model", parts=[part]))


class Agent:
    def __init__(self, prefix: str) -> None:
        config = RedisSessionServiceConfig(uri=REDIS_URL, key_prefix=prefix + "adk:session:")
        self.sessions = RedisSessionService(config)
        self.model = Model()
        agent = LlmAgent(
            name="concierge",
            model="gemini-3.5-flash",
            tools=[weather],
            before_model_callback=self.model,
        )
        self.runner = Runner(app_name=APP, agent=agent, session_service=self.sessions)
        self.prefix = prefix

    def key(self, session_id: str) -> str:
        return f"{self.prefix}adk:session:{APP}:{USER}:{session_id}"

    async def say(self, session_id: str, text: str, *replies: types.Part) -> None:
        self.model.replies.extend(replies)
        message = types.Content(role="user", parts=[types.Part(text=text)])
        async for _ in self.runner.run_async(
            user_id=USER, session_id=session_id, new_message=message
        ):
            pass


@pytest.fixture
def agent(prefix: str) -> Agent:
    return Agent(prefix)


@pytest.fixture
async def rt(make_settings: Callable[..., Settings], prefix: str) -> AsyncIterator[Runtime]:
    settings = make_settings(layout="adk", key_pattern=prefix + "adk:session:{app}:{user}:{id}")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as runtime:
        yield runtime


async def conversation(agent: Agent, session_id: str) -> None:
    """Ten events: the weather call and its response sit where keeping four would part them."""
    await agent.sessions.create_session(
        app_name=APP, user_id=USER, session_id=session_id, state=STATE
    )
    await agent.say(session_id, "Bonjour, je suis Zoë du Café Zoë; ORD-1042 ?")
    await agent.say(session_id, "Et réserve une table pour 4 vendredi.")
    call = types.Part(function_call=types.FunctionCall(name="weather", args={"city": "Paris"}))
    await agent.say(session_id, "Quel temps à Paris ?", call, types.Part(text="21°C à Paris."))
    await agent.say(session_id, "Merci !")


async def test_session_is_archived_byte_for_byte_and_loads_with_a_compaction_event(
    rt: Runtime, agent: Agent, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    await conversation(agent, "a1")
    key = agent.key("a1")
    value = await value_of(redis, key)
    written = AdkLayout().split(value)
    assert len(written) == 10 and "Zoë".encode() in written[0]  # pydantic writes UTF-8 as is
    others = {k: await redis.get(k) async for k in redis.scan_iter(match=f"{prefix}*state*")}
    assert len(others) == 2  # ADK's user_state and app_state values
    before = await agent.sessions.get_session(app_name=APP, user_id=USER, session_id="a1")

    outcomes = {o.session_id: o for o in await rt.daemon.run_once()}

    assert outcomes["a1"].status == "consolidated", outcomes
    assert outcomes["a1"].turns_kept == 5  # the call stays with its response
    assert await archived(pg, "a1") == written
    row = await pg.fetchrow(
        "SELECT app_name, user_id, metadata FROM sessions WHERE session_id='a1'"
    )
    assert (row["app_name"], row["user_id"]) == (APP, USER)
    assert json.loads(row["metadata"])["state"] == {"cart": ["ORD-1042"]}
    assert not await pg.fetchval(
        "SELECT count(*) FROM quarantine WHERE redis_key LIKE $1", prefix + "%"
    )
    for other, raw in others.items():  # user and app state: not sessions, left alone
        assert await redis.get(other) == raw

    after = await agent.sessions.get_session(app_name=APP, user_id=USER, session_id="a1")
    assert after is not None and before is not None
    compaction = after.events[0].actions.compaction
    assert compaction is not None and after.events[0].content is None
    assert compaction.compacted_content.parts[0].text.startswith(SUMMARY_HEADER)
    assert compaction.end_timestamp < after.events[1].timestamp
    assert after.events[1].get_function_calls()[0].name == "weather"
    assert AdkLayout().split(await value_of(redis, key))[1:] == written[-5:]
    assert after.state == before.state and after.last_update_time == before.last_update_time
    assert await redis.ttl(key) > 0

    # ADK's next request: the summary first, then the kept events, then the new message.
    agent.model.requests.clear()
    await agent.say("a1", "Et samedi ?")
    contents = agent.model.requests[0].contents
    assert contents[0].parts[0].text.startswith(SUMMARY_HEADER)
    assert contents[1].parts[0].function_call.name == "weather"
    assert contents[-1].parts[0].text == "Et samedi ?"

    # ADK re-serialized the whole session on that turn: the summary event is still recognised.
    again = await rt.pipeline.consolidate(ref_of(rt, key))
    assert again.turns_archived == 2 and not again.gap, again
    assert await archived(pg, "a1") == written + AdkLayout().split(await value_of(redis, key))[-2:]


async def test_a_pending_function_call_is_never_folded(
    rt: Runtime, agent: Agent, redis: Redis
) -> None:
    session = await agent.sessions.create_session(app_name=APP, user_id=USER, session_id="a2")

    def event(author: str, role: str, part: types.Part) -> Event:
        content = types.Content(role=role, parts=[part])
        return Event(author=author, invocation_id="i1", content=content)

    call = types.FunctionCall(id="adk-c1", name="refund", args={"order": "ORD-9"})
    await agent.sessions.append_event(session, event("user", "user", types.Part(text="Refund?")))
    await agent.sessions.append_event(
        session, event("concierge", "model", types.Part(function_call=call))
    )
    for i in range(8):
        await agent.sessions.append_event(session, event("user", "user", types.Part(text=f"? {i}")))
    written = AdkLayout().split(await value_of(redis, agent.key("a2")))

    outcome = await rt.pipeline.consolidate(ref_of(rt, agent.key("a2")))

    assert outcome.turns_folded == 1
    assert AdkLayout().split(await value_of(redis, agent.key("a2")))[1:] == written[1:]
    loaded = await agent.sessions.get_session(app_name=APP, user_id=USER, session_id="a2")
    assert loaded is not None and loaded.events[0].actions.compaction is not None


async def test_a_restored_session_loads_in_adk_with_its_state(
    rt: Runtime, agent: Agent, redis: Redis
) -> None:
    await conversation(agent, "a3")
    key = agent.key("a3")
    before = await agent.sessions.get_session(app_name=APP, user_id=USER, session_id="a3")
    await rt.pipeline.consolidate(ref_of(rt, key))
    await redis.delete(key)  # expired; the user comes back

    result = await restore(rt.redis, rt.engine, rt.settings, "a3", turns=5, ttl_s=600)

    assert result.status is RestoreStatus.RESTORED, result
    loaded = await agent.sessions.get_session(app_name=APP, user_id=USER, session_id="a3")
    assert loaded is not None and before is not None
    assert loaded.events[0].actions.compaction is not None
    assert [e.id for e in loaded.events[1:]] == [e.id for e in before.events[-5:]]
    assert loaded.state == before.state
    await agent.say("a3", "Je suis de retour.")  # and ADK carries on with it
    assert agent.model.requests[-1].contents[0].parts[0].text.startswith(SUMMARY_HEADER)
