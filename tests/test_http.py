"""The sidecar's HTTP port: Prometheus metrics after real work, liveness and readiness."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from tests import agents
from tests.proxy import FaultProxy
from worker.config import Settings
from worker.http import ReadinessCheck, serve_metrics
from worker.runtime import Runtime, open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(10)) as reply,
    ):
        return reply.status, await reply.text()


async def test_metrics_count_a_consolidation(runtime: Runtime, redis: Redis) -> None:
    key = runtime.pattern.key_for("m1")
    await agents.conversation(redis, key, 12, ttl_s=5000)
    ref = runtime.pattern.parse(key)
    assert ref is not None
    async with serve_metrics(runtime, 0, host="127.0.0.1") as port:
        assert port != 0
        outcome = await runtime.pipeline.consolidate(ref)
        assert outcome.status == "consolidated"
        status, text = await get(port, "/metrics")
    assert status == 200
    found = samples(text)
    assert found[("consolidator_sessions_total", (("status", "consolidated"),))] == 1
    assert found[("consolidator_turns_archived_total", ())] == 12
    assert found[("consolidator_hot_bytes_saved_total", ())] > 0
    assert found[("consolidator_hot_tokens_saved_total", ())] > 0
    assert found[("consolidator_summaries_total", (("summarizer", "extractive"),))] == 1
    latency = "consolidator_model_latency_seconds_count"
    assert found[(latency, (("outcome", "ok"), ("summarizer", "extractive")))] == 1
    # The key had about 5,000 s left when its turns were archived.
    assert found[("consolidator_expiry_left_at_flush_seconds_bucket", (("le", "3600.0"),))] == 0
    assert found[("consolidator_expiry_left_at_flush_seconds_bucket", (("le", "86400.0"),))] == 1
    assert found[("consolidator_archive_batch_size_count", (("kind", "archive"),))] >= 1
    assert found[("consolidator_cas_conflicts_total", ())] == 0
    for family in (  # the rest an operator finds there, even before they count anything
        "consolidator_sessions_scanned",
        "consolidator_scan_seconds",
        "consolidator_sessions_quarantined",
        "consolidator_summary_failures",
        "consolidator_model_tokens",
        "consolidator_session_seconds",
        "consolidator_sessions_in_flight",
        "consolidator_ready",
    ):
        assert f"# HELP {family}" in text, family


async def test_health_and_readiness_when_servers_answer(runtime: Runtime) -> None:
    async with serve_metrics(runtime, 0, host="127.0.0.1") as port:
        assert await get(port, "/healthz") == (200, '{"status": "ok"}')
        status, body = await get(port, "/readyz")
    assert (status, body) == (200, '{"status": "ready"}')
    assert runtime.metrics.registry.get_sample_value("consolidator_ready") == 1


async def test_overlapping_probes_each_get_their_own_checks_answer() -> None:
    # Probe B arrives after A's check ended and before A resumed: B starts the next check.
    # A must still answer from its own (it read B's, unfinished, and the handler failed: 500).
    ended = asyncio.Event()
    calls = 0

    async def check() -> None:
        nonlocal calls
        calls += 1
        await (ended.wait() if calls == 1 else asyncio.sleep(0.5))

    shared = ReadinessCheck(check)
    a = asyncio.create_task(shared.problem())
    await asyncio.sleep(0.01)
    ended.set()
    await asyncio.sleep(0)  # A's check is done; A has not resumed yet
    b = asyncio.create_task(shared.problem())
    assert list(await asyncio.gather(a, b)) == [None, None]
    assert calls == 2


async def test_not_ready_when_redis_does_not_answer(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    async with (
        open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt,
        serve_metrics(rt, 0, host="127.0.0.1") as port,
    ):
        assert (await get(port, "/healthz"))[0] == 200  # alive, only not ready
        status, body = await get(port, "/readyz")
    assert status == 503
    assert '"redis"' in body and '"postgresql"' not in body
    assert rt.metrics.registry.get_sample_value("consolidator_ready") == 0


async def test_not_ready_within_the_probes_timeout_when_postgresql_stops_answering(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    # A network cut, not a refused connection: nothing answers, nothing is closed.
    url = make_url(database_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    try:
        proxied = url.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
        settings = make_settings(database_url=proxied)
        async with (
            open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt,
            serve_metrics(rt, 0, host="127.0.0.1") as port,
        ):
            assert (await get(port, "/readyz"))[0] == 200  # a pooled connection, now cut off
            answers = []

            async def probe() -> None:
                started = time.monotonic()
                status, body = await get(port, "/readyz")
                answers.append((status, '"postgresql"' in body, time.monotonic() - started))

            proxy.blackhole()
            await probe()
            # The network comes back while that check still waits on its dead connection: the
            # next probe must not answer with the old check's verdict.
            proxy.restore(reset=False)
            back = await get(port, "/readyz")
            proxy.blackhole()
            await probe()
            await probe()
    finally:
        proxy.close()
    assert [(status, named) for status, named, _ in answers] == [(503, True)] * 3
    # Within the 2 s /readyz promises, with room for a slow machine (the first answer took
    # 4 s before); an orchestrator counts a later answer as a failed probe.
    assert max(took for _, _, took in answers) < 3.0, answers
    assert back == (200, '{"status": "ready"}')
