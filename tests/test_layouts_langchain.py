"""The `langchain` layout against langchain-community's own `RedisChatMessageHistory`: the
library writes the sessions, the daemon consolidates them, the library reads them back."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from tests.layout_helpers import archived, list_of, ref_of
from worker.config import Settings
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer

with warnings.catch_warnings():  # the package announces its own sunset on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.chat_message_histories import RedisChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)


@pytest.fixture
async def rt(make_settings: Callable[..., Settings], prefix: str) -> AsyncIterator[Runtime]:
    settings = make_settings(layout="langchain", key_pattern=prefix + "message_store:{id}")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as runtime:
        yield runtime


def history(prefix: str, session_id: str) -> RedisChatMessageHistory:
    return RedisChatMessageHistory(
        session_id, url=REDIS_URL, key_prefix=prefix + "message_store:", ttl=3600
    )


def conversation() -> list[BaseMessage]:
    """Ten messages; the weather call and its result sit where keeping the last four would
    separate them."""
    return [
        HumanMessage("Hi, I'm Zoë from Café Zoë; order ORD-1042 is late."),
        AIMessage("Sorry Zoë! ORD-1042 left the depot on Monday."),
        HumanMessage("Can you also book a table for 4 at Le Procope on Friday?"),
        AIMessage("Booked: Le Procope, Friday, 4 people, confirmation LP-77."),
        HumanMessage("What's the weather in Paris on Friday?"),
        AIMessage(
            "",
            tool_calls=[{"name": "weather", "args": {"city": "Paris", "day": "Fri"}, "id": "w1"}],
        ),
        ToolMessage("Paris Friday: 21°C, sunny", tool_call_id="w1"),
        AIMessage("Friday in Paris: 21°C and sunny."),
        HumanMessage("Great, thanks."),
        AIMessage("You're welcome, Zoë."),
    ]


async def stored(redis: Redis, key: str) -> list[bytes]:
    """The elements as the library pushed them, oldest first."""
    return list(reversed(await list_of(redis, key)))


async def test_session_is_archived_byte_for_byte_and_reads_back_with_a_summary_first(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    chat = history(prefix, "lc1")
    messages = conversation()
    chat.add_messages(messages)
    written = await stored(redis, chat.key)
    assert b"\\u00eb" in written[0]  # json.dumps escapes: Zo\u00eb

    outcome = await rt.pipeline.consolidate(ref_of(rt, chat.key))

    assert outcome.status == "consolidated", outcome
    assert await archived(pg, "lc1") == written
    after = chat.messages
    # keep_recent=4 would keep the tool result and fold its call: both stay.
    assert outcome.turns_kept == 5
    assert isinstance(after[0], SystemMessage)
    assert "Summary of the 5 earlier turns" in str(after[0].content)
    assert after[1:] == messages[5:]
    assert isinstance(after[1], AIMessage) and after[1].tool_calls[0]["id"] == "w1"
    assert 0 < await redis.ttl(chat.key) <= 3600


async def test_the_agent_goes_on_and_the_next_pass_archives_only_what_is_new(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    chat = history(prefix, "lc2")
    chat.add_messages(conversation())
    written = await stored(redis, chat.key)
    await rt.pipeline.consolidate(ref_of(rt, chat.key))

    later: list[BaseMessage] = [
        HumanMessage(f"Follow-up {i}: is LP-77 still valid? ça va?") for i in range(3)
    ]
    chat.add_messages(later)
    again = await rt.pipeline.consolidate(ref_of(rt, chat.key))

    assert again.status == "consolidated" and again.turns_archived == 3 and not again.gap
    new = (await stored(redis, chat.key))[-3:]
    assert await archived(pg, "lc2") == written + new
    after = chat.messages
    assert isinstance(after[0], SystemMessage) and "9 earlier turns" in str(after[0].content)
    assert after[-3:] == later
    assert sum(isinstance(m, SystemMessage) for m in after) == 1  # the summary rolled


async def test_a_pending_tool_call_is_never_folded(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    chat = history(prefix, "lc3")
    messages: list[BaseMessage] = [
        HumanMessage("Book the 19:30 train to Lyon."),
        AIMessage("", tool_calls=[{"name": "book_train", "args": {"t": "19:30"}, "id": "b1"}]),
        *(HumanMessage(f"Still waiting… {i}") for i in range(8)),
    ]
    chat.add_messages(messages)

    outcome = await rt.pipeline.consolidate(ref_of(rt, chat.key))

    assert outcome.turns_folded == 1
    after = chat.messages
    assert isinstance(after[0], SystemMessage) and after[1:] == messages[1:]
    assert len(await archived(pg, "lc3")) == 10
