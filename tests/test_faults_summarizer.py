"""The model down or failing: the archive still happens, and the hot state follows the policy.

CONSOLIDATOR_ON_SUMMARY_FAILURE=keep leaves the hot state exactly as it was (the archive has
everything); =marker replaces the folded turns by one "N earlier turns archived." element whose
count always covers the whole conversation. Driven in-process by a summarizer that raises
SummarizerUnavailable (or has its answers rejected), then end to end: a daemon whose Gemini
summarizer talks to a local Gemini-protocol server answering 503 to everything, which later
recovers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from tests import agents
from tests.chaos import (
    REDIS_URL,
    Daemon,
    Figures,
    WriterFleet,
    assign_sessions,
    audit,
    audit_session,
    daemon_env,
    delete_prefix,
    final_flush,
    fresh_database,
    hot_list,
    more_than,
    plain_dsn,
    record,
    scaled,
    wait_until,
)
from tests.servers import free_port
from worker.config import Settings
from worker.domain import Outcome, SummaryFailure, SummaryText, Turn
from worker.metrics import Metrics
from worker.runtime import Runtime, open_runtime
from worker.summarizers.base import SummarizerUnavailable, SummaryRejected
from worker.summarizers.extractive import ExtractiveSummarizer
from worker.summarizers.select import FallbackSummarizer
from worker.testing.gemini_server import GeminiServer, RecordedRequest, Reply

pytestmark = pytest.mark.fault


class BrokenSummarizer:
    """A model that is down (SummarizerUnavailable) or whose answers are rejected."""

    name = "broken"

    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self.calls = 0

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        self.calls += 1
        raise self.error("model down" if self.error is SummarizerUnavailable else "refusal")

    async def aclose(self) -> None:
        pass


def content(raw: bytes) -> str:
    value = json.loads(raw)["content"]
    assert isinstance(value, str)
    return value


@pytest.mark.parametrize(
    ("error", "kind"), [(SummarizerUnavailable, "unavailable"), (SummaryRejected, "rejected")]
)
async def test_keep_policy_archives_and_leaves_the_hot_state_as_it_was(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
    error: type[Exception],
    kind: str,
) -> None:
    broken = BrokenSummarizer(error)
    session = f"{prefix}keep-{error.__name__}"
    async with open_runtime(make_settings(on_summary_failure="keep"), summarizer=broken) as rt:
        key = rt.pattern.key_for(session)
        written = await agents.conversation(redis, key, 12, ttl_s=900)
        before = (await redis.dump(key), await redis.pttl(key))
        ref = rt.pattern.parse(key)
        assert ref is not None
        outcome = await rt.pipeline.consolidate(ref)
        failures = rt.metrics.summary_failures.labels(kind=kind)._value.get()
        timed = rt.metrics.registry.get_sample_value(
            "consolidator_model_latency_seconds_count",
            {"summarizer": "broken", "outcome": "failed"},
        )
    assert broken.calls == 1
    assert timed == 1  # the failed call's latency is observed too
    assert outcome.status == "archived" and outcome.turns_archived == 12
    assert "summary failed" in (outcome.reason or "")
    assert failures == 1
    assert await redis.dump(key) == before[0]  # byte for byte
    assert 0 < await redis.pttl(key) <= before[1]
    result = await audit_session(redis, pg, prefix, session, {0: written})
    assert not result.problems, result.problems


async def test_marker_policy_replaces_folded_turns_by_a_count_of_the_whole_conversation(
    make_settings: Callable[..., Settings], redis: Redis, pg: asyncpg.Connection, prefix: str
) -> None:
    broken = BrokenSummarizer(SummarizerUnavailable)
    session = f"{prefix}marker"
    settings = make_settings(on_summary_failure="marker")
    async with open_runtime(settings, summarizer=broken) as rt:
        key = rt.pattern.key_for(session)
        ref = rt.pattern.parse(key)
        assert ref is not None
        written = await agents.conversation(redis, key, 12)
        first = await rt.pipeline.consolidate(ref)
        hot = await hot_list(redis, key)
        assert first.status == "consolidated" and first.summarizer == "marker"
        assert hot[1:] == written[-4:]
        assert content(hot[0]).endswith("\n8 earlier turns archived.")

        written += await agents.conversation(redis, key, 6, start=12)
        second = await rt.pipeline.consolidate(ref)
        hot = await hot_list(redis, key)
    assert second.status == "consolidated"
    marker = content(hot[0])
    assert marker.endswith("\n14 earlier turns archived.")
    assert marker.count("earlier turns archived.") == 1  # superseded, not stacked
    result = await audit_session(redis, pg, prefix, session, {0: written})
    assert not result.problems, result.problems
    rows = await pg.fetch(
        "SELECT summarizer, through_seq FROM summaries WHERE session_id = $1 ORDER BY id", session
    )
    assert [(r["summarizer"], r["through_seq"]) for r in rows] == [("marker", 7), ("marker", 13)]


async def consolidate_a_conversation(rt: Runtime, redis: Redis, session: str) -> Outcome:
    """12 turns written by an agent, then one pass over them."""
    key = rt.pattern.key_for(session)
    await agents.conversation(redis, key, 12)
    ref = rt.pattern.parse(key)
    assert ref is not None
    return await rt.pipeline.consolidate(ref)


async def test_a_fallback_summary_still_counts_the_model_failure_it_stands_in_for(
    make_settings: Callable[..., Settings], redis: Redis, prefix: str
) -> None:
    # The agents get the extractive summary; the operator must still see the model failing.
    summarizer = FallbackSummarizer(BrokenSummarizer(SummarizerUnavailable), ExtractiveSummarizer())
    async with open_runtime(make_settings(), summarizer=summarizer) as rt:
        outcome = await consolidate_a_conversation(rt, redis, f"{prefix}fallback")
        value = rt.metrics.registry.get_sample_value
        failures = value("consolidator_summary_failures_total", {"kind": "unavailable"})
        failed = value(
            "consolidator_model_latency_seconds_count",
            {"summarizer": "broken", "outcome": "failed"},
        )
        written = value("consolidator_summaries_total", {"summarizer": "extractive"})
    assert outcome.status == "consolidated" and outcome.summarizer == "extractive"
    assert (failures, failed, written) == (1, 1, 1)


async def test_when_the_fallback_fails_too_each_failure_counts_as_its_own(
    make_settings: Callable[..., Settings], redis: Redis, prefix: str
) -> None:
    model, fallback = BrokenSummarizer(SummarizerUnavailable), BrokenSummarizer(SummaryRejected)
    fallback.name = "backup"
    settings = make_settings(on_summary_failure="keep")
    async with open_runtime(settings, summarizer=FallbackSummarizer(model, fallback)) as rt:
        outcome = await consolidate_a_conversation(rt, redis, f"{prefix}both")
        value = rt.metrics.registry.get_sample_value
        failures = [
            value("consolidator_summary_failures_total", {"kind": kind})
            for kind in ("unavailable", "rejected")
        ]
        timed = [
            value(
                "consolidator_model_latency_seconds_count",
                {"summarizer": name, "outcome": "failed"},
            )
            for name in ("broken", "backup")
        ]
    assert outcome.status == "archived"
    assert (failures, timed) == ([1, 1], [1, 1])


def test_a_call_the_open_circuit_refused_is_counted_but_not_timed() -> None:
    metrics = Metrics()
    metrics.observe_summary_failure(SummaryFailure("gemini", "circuit_open", 0.01))
    metrics.observe_summary_failure(SummaryFailure("gemini", "timeout", 30_000))
    value = metrics.registry.get_sample_value
    assert value("consolidator_summary_failures_total", {"kind": "circuit_open"}) == 1
    latency = {"summarizer": "gemini", "outcome": "failed"}
    assert value("consolidator_model_latency_seconds_count", latency) == 1  # the timeout only
    assert value("consolidator_model_latency_seconds_sum", latency) == 30


@pytest.mark.soak
@pytest.mark.timeout(scaled(120, 900))
async def test_gemini_down_then_back_under_a_running_daemon(tmp_path: Path) -> None:
    """End to end: the daemon's Gemini summarizer gets 503s, then the model recovers."""
    down_s = scaled(1.0, 30.0)
    prefix = f"model{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(REDIS_URL)
    failing = True

    def behaviour(request: RecordedRequest) -> Reply:
        return Reply.error(503) if failing else Reply(text=None)

    async with GeminiServer(default=behaviour) as model, fresh_database() as database_url:
        pg = await asyncpg.connect(plain_dsn(database_url))
        env = daemon_env(
            redis_url=REDIS_URL,
            database_url=database_url,
            prefix=prefix,
            metrics_port=free_port(),
            summarizer="gemini",
            on_summary_failure="marker",
            gemini_max_attempts=1,
            gemini_breaker_failures=3,
            gemini_breaker_reset_s=0.5,
            gemini_timeout_s=5,
            GEMINI_API_KEY="local-test-key",
            GOOGLE_GEMINI_BASE_URL=model.base_url,
        )
        daemon = Daemon("daemon", env, tmp_path)
        fleet = WriterFleet(
            redis_url=REDIS_URL,
            prefix=prefix,
            assignments=assign_sessions(writers=1, per_writer=6, shared=0, tag="m"),
            duration_s=3600,
            rate=15,
            log_dir=tmp_path,
            tool_every=0,
        )

        async def markers() -> int:
            return int(
                await pg.fetchval("SELECT count(*) FROM summaries WHERE summarizer = 'marker'")
            )

        async def model_summaries() -> int:
            return int(
                await pg.fetchval(
                    "SELECT count(*) FROM summaries WHERE summarizer = 'gemini' AND applied = 1"
                )
            )

        started = time.monotonic()
        try:
            daemon.start()
            fleet.start()
            await daemon.wait_started()
            await wait_until(lambda: more_than(markers, 1), 60, "markers while the model is down")
            await asyncio.sleep(down_s)  # the model stays down a while longer
            assert daemon.running, daemon.tail()
            failures = await daemon.metric(
                "consolidator_summary_failures_total", kind="server_error"
            )
            # While it is open, the breaker refuses calls without making them.
            refused = await daemon.metric(
                "consolidator_summary_failures_total", kind="circuit_open"
            )
            failing = False
            recovered = await wait_until(
                lambda: more_than(model_summaries, 2), 60, "the model's summaries again"
            )
            await fleet.finish()
            code, _ = await daemon.terminate()
            final = await final_flush(env)
            written = fleet.written()
            result = await audit(redis, pg, prefix, written)
            record(
                Figures(
                    "model down (Gemini 503s), then back; marker policy",
                    time.monotonic() - started,
                    turns_written=written.total,
                    turns_archived=result.archived,
                    turns_lost=result.lost,
                    duplicates=result.duplicates,
                    outage=f"model {down_s:.0f} s",
                    seen=(
                        f"{await markers()} markers; summary failures: {int(failures)} "
                        f"server errors, {int(refused)} refused by the open circuit; "
                        f"model summaries again {recovered:.1f} s after it recovered"
                    ),
                )
            )
        finally:
            fleet.stop()
            daemon.stop_quietly()
            await delete_prefix(redis, prefix)
            await redis.aclose()
            await pg.close()
    assert code == 0
    assert final == 0
    assert failures >= 3
    assert not result.problems, result.problems[:20]
    assert len(model.generate_requests) > 0
