"""The `llamaindex` layout against LlamaIndex's own `RedisChatStore`, through the daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.storage.chat_store.redis import RedisChatStore
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from tests.layout_helpers import archived, list_of
from worker.config import Settings
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


@pytest.fixture
async def rt(make_settings: Callable[..., Settings], prefix: str) -> AsyncIterator[Runtime]:
    # The chat store's key is the session key itself: the pattern names the agent's keys.
    settings = make_settings(layout="llamaindex", key_pattern=prefix + "{id}")
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as runtime:
        yield runtime


@pytest.fixture
def store() -> RedisChatStore:
    return RedisChatStore(redis_url=REDIS_URL, ttl=3600)


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, object]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def conversation() -> list[ChatMessage]:
    return [
        ChatMessage(role=MessageRole.USER, content="Hello, I'm Zoë; my parcel ORD-2077 is lost."),
        ChatMessage(role=MessageRole.ASSISTANT, content="Sorry Zoë, let me look at ORD-2077."),
        ChatMessage(role=MessageRole.USER, content="It was going to Café Zoë, 12 rue Oberkampf."),
        ChatMessage(role=MessageRole.ASSISTANT, content="Noted: 12 rue Oberkampf, Paris."),
        ChatMessage(role=MessageRole.USER, content="Where is it now?"),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            content=None,
            additional_kwargs={"tool_calls": [tool_call("t1", "track", '{"id": "ORD-2077"}')]},
        ),
        ChatMessage(
            role=MessageRole.TOOL,
            content="ORD-2077: depot Lyon, out for delivery Thursday",
            additional_kwargs={"tool_call_id": "t1", "name": "track"},
        ),
        ChatMessage(role=MessageRole.ASSISTANT, content="It's in Lyon; delivery on Thursday."),
        ChatMessage(role=MessageRole.USER, content="Merci !"),
        ChatMessage(role=MessageRole.ASSISTANT, content="De rien, Zoë."),
    ]


async def test_daemon_consolidates_chat_store_sessions_that_read_back_with_a_system_summary(
    rt: Runtime, store: RedisChatStore, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    key = prefix + "li1"
    messages = conversation()
    for message in messages:
        store.add_message(key, message)
    written = await list_of(redis, key)
    assert "Zoë".encode() in written[0]  # pydantic writes UTF-8 as is

    outcomes = await rt.daemon.run_once()

    assert [o.status for o in outcomes] == ["consolidated"], outcomes
    assert await archived(pg, "li1") == written
    after = store.get_messages(key)
    assert after[0].role is MessageRole.SYSTEM
    assert "Summary of the 5 earlier turns" in (after[0].content or "")
    # Keeping four would fold the call and keep its result: both stay.
    assert after[1:] == messages[5:]
    assert after[1].additional_kwargs["tool_calls"][0]["id"] == "t1"

    store.add_message(key, late := ChatMessage(role=MessageRole.USER, content="And ORD-2078?"))
    await rt.daemon.run_once()
    assert await archived(pg, "li1") == [*written, late.model_dump_json().encode()]


async def test_a_pending_tool_call_is_never_folded(
    rt: Runtime, store: RedisChatStore, redis: Redis, prefix: str
) -> None:
    key = prefix + "li2"
    messages = [
        ChatMessage(role=MessageRole.USER, content="Refund ORD-9."),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            content=None,
            additional_kwargs={"tool_calls": [tool_call("r9", "refund", '{"id": "ORD-9"}')]},
        ),
        *(ChatMessage(role=MessageRole.USER, content=f"Hello? {i}") for i in range(8)),
    ]
    for message in messages:
        store.add_message(key, message)

    [outcome] = await rt.daemon.run_once()

    assert outcome.turns_folded == 1
    after = store.get_messages(key)
    assert after[0].role is MessageRole.SYSTEM and after[1:] == messages[1:]


async def test_an_unknown_role_is_quarantined_not_rewritten(
    rt: Runtime, redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    key = prefix + "li3"
    elements = [b'{"role":"user","additional_kwargs":{},"blocks":[]}'] * 6
    elements.append(b'{"role":"narrator","additional_kwargs":{},"blocks":[]}')
    await redis.rpush(key, *elements)

    [outcome] = await rt.daemon.run_once()

    assert outcome.status == "quarantined" and "narrator" in (outcome.reason or "")
    assert await list_of(redis, key) == elements


async def test_list_and_llamaindex_sessions_under_each_others_layout_are_quarantined(
    make_settings: Callable[..., Settings], redis: Redis, store: RedisChatStore, prefix: str
) -> None:
    # Both write {"role": ...} objects: a layout set wrong must not archive LlamaIndex's
    # messages as empty turns, nor rewrite a seed-004 agent's list in LlamaIndex's shape.
    chat_key = prefix + "li-chat"
    store.set_messages(chat_key, conversation() * 2)
    plain_key = prefix + "conversation:li-plain:history"
    plain = [
        f'{{"role":"{"user" if i % 2 == 0 else "assistant"}","content":"turn {i}"}}'.encode()
        for i in range(20)
    ]
    await redis.rpush(plain_key, *plain)
    chat_before = await list_of(redis, chat_key)
    for layout, key in (("list", chat_key), ("llamaindex", plain_key)):
        settings = make_settings(layout=layout, key_pattern=prefix + "{id}")
        async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
            ref = rt.pattern.parse(key)
            assert ref is not None
            outcome = await rt.pipeline.consolidate(ref)
        assert outcome.status == "quarantined", (layout, outcome)
    assert await list_of(redis, chat_key) == chat_before
    assert await list_of(redis, plain_key) == plain
