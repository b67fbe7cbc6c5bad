"""The Gemini summarizer inside a consolidation: provenance archived, and the model-down policy
(archive anyway; keep the hot state, or write a marker) against the real google-genai client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from google.genai import types
from redis.asyncio import Redis

from tests import agents
from worker.config import Settings
from worker.runtime import open_runtime
from worker.summarizers.gemini import GeminiSummarizer
from worker.testing.gemini_server import GeminiServer, Reply


@pytest.fixture
async def server() -> AsyncIterator[GeminiServer]:
    async with GeminiServer(model_version="gemini-3.5-flash-001") as srv:
        yield srv


def gemini(server: GeminiServer) -> GeminiSummarizer:
    return GeminiSummarizer(
        api_key="test-key",
        http_options=types.HttpOptions(base_url=server.base_url),
        model="gemini-3.5-flash",
        timeout_s=2.0,
        max_attempts=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.5,
        usd_per_million_in=0.30,
        usd_per_million_out=2.50,
    )


async def test_a_gemini_summary_replaces_folded_turns_and_its_provenance_is_archived(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    server: GeminiServer,
) -> None:
    server.script(
        Reply.answer(
            "Priya's order ORD-1000 ships Monday; open task: email Priya.",
            prompt_tokens=180,
            output_tokens=20,
        )
    )
    async with open_runtime(make_settings(), summarizer=gemini(server)) as rt:
        key = rt.pattern.key_for("gem-ok")
        written = await agents.conversation(redis, key, 10)
        ref = rt.pattern.parse(key)
        assert ref is not None
        outcome = await rt.pipeline.consolidate(ref)
    assert outcome.status == "consolidated" and outcome.summarizer == "gemini"
    hot = await redis.lrange(key, 0, -1)
    assert "ORD-1000 ships Monday" in json.loads(hot[0])["content"]
    assert hot[1:] == written[-4:]
    row = await pg.fetchrow("SELECT * FROM summaries WHERE session_id = 'gem-ok'")
    assert row is not None
    assert (row["summarizer"], row["model"], row["model_version"]) == (
        "gemini",
        "gemini-3.5-flash",
        "gemini-3.5-flash-001",
    )
    assert (row["tokens_in"], row["tokens_out"], row["through_seq"]) == (180, 20, 5)
    assert row["latency_ms"] > 0
    assert row["cost_usd"] == pytest.approx((180 * 0.30 + 20 * 2.50) / 1e6)
    prompt = server.generate_requests[0].text
    assert "ORD-1000" in prompt and "ORD-1004" in prompt  # the folded turns went to the model
    assert "ORD-1006" not in prompt  # the kept ones did not


async def test_model_down_still_archives_and_leaves_the_hot_state(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    server: GeminiServer,
) -> None:
    server.script(*[Reply.error(503)] * 4)
    async with open_runtime(make_settings(), summarizer=gemini(server)) as rt:
        key = rt.pattern.key_for("gem-down")
        written = await agents.conversation(redis, key, 10)
        ref = rt.pattern.parse(key)
        assert ref is not None
        outcome = await rt.pipeline.consolidate(ref)
    assert outcome.status == "archived" and "summary failed" in (outcome.reason or "")
    assert await redis.lrange(key, 0, -1) == written
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id='gem-down'") == 10


async def test_model_down_with_marker_policy_bounds_redis_memory(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    server: GeminiServer,
) -> None:
    server.script(*[Reply.error(500)] * 4)
    settings = make_settings(on_summary_failure="marker")
    async with open_runtime(settings, summarizer=gemini(server)) as rt:
        key = rt.pattern.key_for("gem-marker")
        written = await agents.conversation(redis, key, 10)
        ref = rt.pattern.parse(key)
        assert ref is not None
        outcome = await rt.pipeline.consolidate(ref)
    assert outcome.status == "consolidated" and outcome.summarizer == "marker"
    hot = await redis.lrange(key, 0, -1)
    assert json.loads(hot[0])["content"].endswith("6 earlier turns archived.")
    assert hot[1:] == written[-4:]
    assert await pg.fetchval("SELECT count(*) FROM turns WHERE session_id='gem-marker'") == 10
