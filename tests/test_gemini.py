"""The Gemini summarizer through the real google-genai client, against a local Gemini server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx2
import pytest
from google.genai import errors, types
from structlog.testing import capture_logs

from tests.servers import free_port
from worker.config import Settings
from worker.domain import Turn
from worker.summarizers.base import SummarizerUnavailable, SummaryRejected
from worker.summarizers.extractive import ExtractiveSummarizer
from worker.summarizers.gemini import GeminiSummarizer, build_prompt, default_thinking_level
from worker.summarizers.resilience import BreakerState, CircuitBreaker, is_transient, retry_after_s
from worker.summarizers.select import (
    FallbackSummarizer,
    SummarizerConfigError,
    build_summarizer,
)
from worker.testing.gemini_server import GeminiServer, Reply

MODEL = "gemini-3.5-flash"
API_KEY = "test-key-do-not-log"
PREVIOUS = (
    "Ada Lovelace (Analytical Engines Ltd) asked about bulk pricing; "
    "a 5% discount was agreed on orders above $1,000."
)


def turn(role: str, text: str) -> Turn:
    return Turn(role=role, text=text, raw=f"{role}:{text}".encode())


TURNS = [
    turn(
        "user",
        "Please move order A-1042 (3 units, $1,250 in total) to Friday 14 March, "
        "delivery to the Bristol warehouse.",
    ),
    turn(
        "model",
        "Done: order A-1042 now ships on Friday 14 March to Bristol. I still need your VAT "
        "number before I can issue the invoice.",
    ),
    turn(
        "user",
        "I'll send the VAT number tomorrow. Also remind me to call Charles Babbage about the "
        "difference engine quote.",
    ),
]

ENV_VARS = (
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_GENAI_USE_ENTERPRISE",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_CLOUD_LOCATION",
    "CONSOLIDATOR_SUMMARIZER",
    "CONSOLIDATOR_SUMMARY_FALLBACK",
    "CONSOLIDATOR_GEMINI_MODEL",
    "CONSOLIDATOR_CONFIG_FILE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def server() -> AsyncIterator[GeminiServer]:
    async with GeminiServer(model_version="gemini-3.5-flash-001") as srv:
        yield srv


Make = Callable[..., GeminiSummarizer]


@pytest.fixture
async def make(server: GeminiServer) -> AsyncIterator[Make]:
    made: list[GeminiSummarizer] = []

    def factory(*, transport: str = "aiohttp", **overrides: Any) -> GeminiSummarizer:
        options = types.HttpOptions(base_url=server.base_url)
        if transport == "httpx2":
            # A transport of its own makes the SDK use httpx2 instead of aiohttp.
            options.async_client_args = {"transport": httpx2.AsyncHTTPTransport()}
        kwargs: dict[str, Any] = {
            "api_key": API_KEY,
            "http_options": options,
            "model": MODEL,
            "timeout_s": 2.0,
            "max_attempts": 3,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 2.0,
            "usd_per_million_in": 0.30,
            "usd_per_million_out": 2.50,
            **overrides,
        }
        summarizer = GeminiSummarizer(**kwargs)
        made.append(summarizer)
        return summarizer

    yield factory
    for summarizer in made:
        await summarizer.aclose()


TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpx2"])

# The SDK subclasses aiohttp.ClientSession, which aiohttp discourages; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession")


@TRANSPORTS
async def test_request_and_provenance(server: GeminiServer, make: Make, transport: str) -> None:
    summarizer = make(transport=transport)
    server.script(
        Reply.answer(
            "Ada Lovelace: A-1042 moved to Friday 14 March (Bristol). Open: VAT number due "
            "tomorrow; call Charles Babbage.",
            prompt_tokens=1200,
            output_tokens=40,
        )
    )
    summary = await summarizer.summarize(PREVIOUS, TURNS, 1200)

    [request] = server.generate_requests
    assert request.path == f"/v1/models/{MODEL}:generateContent"
    assert request.model == MODEL
    assert request.headers["x-goog-api-key"] == API_KEY
    prompt = request.text
    assert PREVIOUS in prompt
    for t in TURNS:
        assert f"{t.role}: {t.text}" in prompt
    for must in ("proper nouns", "numbers", "unfinished tasks", "1200 characters"):
        assert must in prompt
    assert request.max_output_tokens == 512

    assert summary.summarizer == "gemini"
    assert summary.text.startswith("Ada Lovelace: A-1042")
    assert summary.model == MODEL
    assert summary.model_version == "gemini-3.5-flash-001"
    assert (summary.tokens_in, summary.tokens_out) == (1200, 40)
    assert summary.cost_usd == pytest.approx((1200 * 0.30 + 40 * 2.50) / 1e6)
    assert summary.latency_ms > 0


async def test_default_answer_is_accepted(server: GeminiServer, make: Make) -> None:
    summary = await make().summarize(None, TURNS, 1200)
    assert summary.text.startswith("Earlier:")
    assert "A-1042" in summary.text
    assert "(none yet)" in server.generate_requests[0].text


async def test_base_url_from_sdk_environment(
    server: GeminiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.base_url)
    monkeypatch.setenv("GEMINI_API_KEY", API_KEY)
    summarizer = build_summarizer(Settings())
    try:
        assert isinstance(summarizer, GeminiSummarizer)
        summary = await summarizer.summarize(PREVIOUS, TURNS, 1200)
    finally:
        await summarizer.aclose()
    assert summary.summarizer == "gemini"
    [request] = server.generate_requests
    assert request.headers["x-goog-api-key"] == API_KEY
    assert request.model == MODEL
    # Gemini 3 models are asked to think little, so thinking does not eat the output budget.
    # (the SDK sends this one in snake_case, which the API's JSON parser accepts too)
    thinking = request.body["generationConfig"]["thinkingConfig"]
    assert {k.replace("_", "").lower(): v for k, v in thinking.items()} == {"thinkinglevel": "LOW"}


async def test_count_tokens(server: GeminiServer, make: Make) -> None:
    assert await make().count_tokens("x" * 400) == 100
    assert server.requests[-1].path == f"/v1/models/{MODEL}:countTokens"


@TRANSPORTS
async def test_429_waits_for_retry_after(server: GeminiServer, make: Make, transport: str) -> None:
    server.script(Reply.error(429, retry_after=1))
    started = time.monotonic()
    summary = await make(transport=transport).summarize(PREVIOUS, TURNS, 1200)
    first, second = server.generate_requests
    assert summary.summarizer == "gemini"
    assert 0.95 <= second.received_at - first.received_at < 2.0
    assert time.monotonic() - started < 4.0


async def test_429_with_retry_info_in_the_body(server: GeminiServer, make: Make) -> None:
    server.script(Reply.error(429, retry_delay="0.4s"))
    await make().summarize(PREVIOUS, TURNS, 1200)
    first, second = server.generate_requests
    assert 0.38 <= second.received_at - first.received_at < 2.0


async def test_retry_after_beyond_the_cap_is_not_waited(server: GeminiServer, make: Make) -> None:
    server.script(Reply.error(429, retry_after=120))
    started = time.monotonic()
    with pytest.raises(SummarizerUnavailable, match="429") as info:
        await make(backoff_max_s=1.0).summarize(PREVIOUS, TURNS, 1200)
    assert len(server.generate_requests) == 1
    assert info.value.kind == "rate_limited"  # the metrics' label: a quota, not an outage
    assert time.monotonic() - started < 3.0  # not the 120 s asked for


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_error_then_success(server: GeminiServer, make: Make, status: int) -> None:
    server.script(Reply.error(status))
    summary = await make().summarize(PREVIOUS, TURNS, 1200)
    assert summary.summarizer == "gemini"
    assert len(server.generate_requests) == 2


async def test_gives_up_after_max_attempts(server: GeminiServer, make: Make) -> None:
    server.script(*[Reply.error(503)] * 5)
    with pytest.raises(SummarizerUnavailable, match="503") as info:
        await make(max_attempts=3).summarize(PREVIOUS, TURNS, 1200)
    assert len(server.generate_requests) == 3
    assert info.value.kind == "server_error"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_not_retried(server: GeminiServer, make: Make, status: int) -> None:
    summarizer = make()
    server.script(Reply.error(status))
    with pytest.raises(SummarizerUnavailable, match=str(status)) as info:
        await summarizer.summarize(PREVIOUS, TURNS, 1200)
    assert isinstance(info.value.__cause__, errors.ClientError)
    assert len(server.generate_requests) == 1
    assert info.value.kind == "client_error"


@TRANSPORTS
async def test_slow_answer_times_out(server: GeminiServer, make: Make, transport: str) -> None:
    server.script(Reply.slow(5.0))
    started = time.monotonic()
    with pytest.raises(SummarizerUnavailable, match=r"(?i)timeout") as info:
        await make(transport=transport, timeout_s=0.3, max_attempts=1).summarize(
            PREVIOUS, TURNS, 1200
        )
    assert info.value.kind == "timeout"
    assert time.monotonic() - started < 3.0  # the answer would take 5 s


async def test_slow_answer_is_retried(server: GeminiServer, make: Make) -> None:
    server.script(Reply.slow(5.0))
    summary = await make(timeout_s=0.3, max_attempts=2).summarize(PREVIOUS, TURNS, 1200)
    assert summary.summarizer == "gemini"
    assert len(server.generate_requests) == 2


async def test_malformed_json_is_a_failure(server: GeminiServer, make: Make) -> None:
    summarizer = make()
    server.script(Reply.malformed())
    with pytest.raises(SummarizerUnavailable):
        await summarizer.summarize(PREVIOUS, TURNS, 1200)
    assert len(server.generate_requests) == 1
    # The next call works: one bad body does not break the client.
    assert (await summarizer.summarize(PREVIOUS, TURNS, 1200)).summarizer == "gemini"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply.empty(), "empty"),
        (Reply.answer("   "), "empty"),
        (Reply.answer("NONE"), "none-like"),
        (Reply.answer("N/A."), "none-like"),
        (Reply.refusal(), "refusal"),
        (Reply.answer("As an AI, I cannot summarize private conversations."), "refusal"),
        (Reply(blocked=True), "blocked"),
        (Reply.answer("Ada asked", finish_reason="SAFETY"), "refused"),
        (Reply.answer("Ada asked", finish_reason="MAX_TOKENS"), "truncated"),
        (Reply.answer("Ada Lovelace " * 100), "longer than its input"),
    ],
)
async def test_bad_summaries_are_rejected(
    server: GeminiServer, make: Make, reply: Reply, reason: str
) -> None:
    summarizer = make()
    server.script(reply)
    with pytest.raises(SummaryRejected, match=reason):
        await summarizer.summarize(PREVIOUS, TURNS, 5000)
    assert len(server.generate_requests) == 1
    # An answer, even a bad one, shows the model is up.
    assert state_of(summarizer.breaker) == BreakerState.CLOSED


async def test_summary_over_max_chars_is_rejected(server: GeminiServer, make: Make) -> None:
    server.script(Reply.answer("Ada Lovelace moved order A-1042 to Friday 14 March. " * 3))
    with pytest.raises(SummaryRejected, match="max_chars"):
        await make().summarize(PREVIOUS, TURNS, 100)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so the type checker does not pin the state between checks


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_circuit_breaker_opens_fails_fast_and_half_opens(
    server: GeminiServer, make: Make
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 30.0, clock=clock)
    summarizer = make(breaker=breaker, max_attempts=2)
    server.script(*[Reply.error(500)] * 4)
    for _ in range(2):
        with pytest.raises(SummarizerUnavailable, match="500"):
            await summarizer.summarize(PREVIOUS, TURNS, 1200)
    assert state_of(breaker) == BreakerState.OPEN
    assert len(server.generate_requests) == 4

    for _ in range(3):
        with pytest.raises(SummarizerUnavailable, match="circuit open") as info:
            await summarizer.summarize(PREVIOUS, TURNS, 1200)
        assert info.value.kind == "circuit_open"
    assert len(server.generate_requests) == 4  # failed fast: nothing sent

    clock.now += 30.0
    assert state_of(breaker) == BreakerState.HALF_OPEN
    summary = await summarizer.summarize(PREVIOUS, TURNS, 1200)
    assert summary.summarizer == "gemini"
    assert state_of(breaker) == BreakerState.CLOSED
    assert len(server.generate_requests) == 5


async def test_half_open_lets_one_probe_through(server: GeminiServer, make: Make) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    summarizer = make(breaker=breaker, max_attempts=1)
    server.script(Reply.error(503))
    with pytest.raises(SummarizerUnavailable):
        await summarizer.summarize(PREVIOUS, TURNS, 1200)
    clock.now += 10.0

    # The probe is slow and fails; a call made meanwhile is not let through.
    server.script(Reply(status=503, delay_s=0.3, body=b'{"error": {"code": 503}}'))
    probe = asyncio.create_task(summarizer.summarize(PREVIOUS, TURNS, 1200))
    await asyncio.sleep(0.1)
    with pytest.raises(SummarizerUnavailable, match="circuit open"):
        await summarizer.summarize(PREVIOUS, TURNS, 1200)
    with pytest.raises(SummarizerUnavailable, match="503"):
        await probe
    assert state_of(breaker) == BreakerState.OPEN  # reopened for another reset period
    assert len(server.generate_requests) == 2


async def test_bad_request_does_not_open_the_breaker(server: GeminiServer, make: Make) -> None:
    breaker = CircuitBreaker(1, 60.0)
    summarizer = make(breaker=breaker)
    server.script(Reply.error(400))
    with pytest.raises(SummarizerUnavailable):
        await summarizer.summarize(PREVIOUS, TURNS, 1200)
    assert state_of(breaker) == BreakerState.CLOSED


async def test_request_rate_is_limited_across_sessions(server: GeminiServer, make: Make) -> None:
    summarizer = make(requests_per_period=1, rate_period_s=0.3)
    # A first call opens the connection, so arrival times below measure the limiter alone.
    await summarizer.summarize(PREVIOUS, TURNS, 1200)
    await asyncio.gather(*(summarizer.summarize(PREVIOUS, TURNS, 1200) for _ in range(3)))
    times = [r.received_at for r in server.generate_requests]
    assert len(times) == 4
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times))
    assert times[-1] - times[0] >= 0.8


async def test_token_rate_is_limited(server: GeminiServer, make: Make) -> None:
    # Each call is estimated at more than the whole budget (capped to it): one call empties the
    # bucket and the next waits for it to drain.
    summarizer = make(tokens_per_period=1000, rate_period_s=0.4, max_output_tokens=700)
    await summarizer.summarize(PREVIOUS, TURNS, 1200)
    await asyncio.gather(*(summarizer.summarize(PREVIOUS, TURNS, 1200) for _ in range(2)))
    times = [r.received_at for r in server.generate_requests]
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(times))


async def test_fallback_to_extractive_when_the_model_is_down(
    server: GeminiServer, make: Make
) -> None:
    server.script(*[Reply.error(503)] * 3)
    summarizer = FallbackSummarizer(make(max_attempts=3), ExtractiveSummarizer())
    with capture_logs() as logs:
        summary = await summarizer.summarize(PREVIOUS, TURNS, 600)
    assert summary.summarizer == "extractive"
    assert summary.model is None
    assert "A-1042" in summary.text
    assert any(e["event"] == "summary_fallback" for e in logs)
    assert len(server.generate_requests) == 3


async def test_fallback_when_the_summary_is_rejected(server: GeminiServer, make: Make) -> None:
    server.script(Reply.answer("NONE"))
    summarizer = FallbackSummarizer(make(), ExtractiveSummarizer())
    assert summarizer.name == "gemini"
    summary = await summarizer.summarize(PREVIOUS, TURNS, 600)
    assert summary.summarizer == "extractive"


async def test_model_answer_used_when_it_is_up(server: GeminiServer, make: Make) -> None:
    summarizer = FallbackSummarizer(make(), ExtractiveSummarizer())
    assert (await summarizer.summarize(PREVIOUS, TURNS, 600)).summarizer == "gemini"


# Selection


async def _selected(monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[Any, list[Any]]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with capture_logs() as logs:
        summarizer = build_summarizer(Settings())
    await summarizer.aclose()
    return summarizer, logs


async def test_auto_without_a_key_is_extractive(monkeypatch: pytest.MonkeyPatch) -> None:
    summarizer, logs = await _selected(monkeypatch)
    assert isinstance(summarizer, ExtractiveSummarizer)
    [selected] = [e for e in logs if e["event"] == "summarizer_selected"]
    assert selected["summarizer"] == "extractive"


@pytest.mark.parametrize("key_var", ["GEMINI_API_KEY", "GOOGLE_API_KEY"])
async def test_auto_with_a_key_is_gemini(monkeypatch: pytest.MonkeyPatch, key_var: str) -> None:
    summarizer, logs = await _selected(
        monkeypatch, **{key_var: API_KEY, "CONSOLIDATOR_GEMINI_MODEL": "gemini-3.5-flash-lite"}
    )
    assert isinstance(summarizer, GeminiSummarizer)
    assert summarizer.model == "gemini-3.5-flash-lite"
    [selected] = [e for e in logs if e["event"] == "summarizer_selected"]
    assert selected["summarizer"] == "gemini"
    assert selected["model"] == "gemini-3.5-flash-lite"
    assert API_KEY not in repr(logs)


async def test_auto_with_vertex_ai_is_gemini(monkeypatch: pytest.MonkeyPatch) -> None:
    summarizer, _ = await _selected(
        monkeypatch,
        GOOGLE_GENAI_USE_VERTEXAI="true",
        GOOGLE_CLOUD_PROJECT="demo-project",
        GOOGLE_CLOUD_LOCATION="us-central1",
    )
    assert isinstance(summarizer, GeminiSummarizer)


async def test_explicit_extractive_wins_over_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    summarizer, _ = await _selected(
        monkeypatch, GEMINI_API_KEY=API_KEY, CONSOLIDATOR_SUMMARIZER="extractive"
    )
    assert isinstance(summarizer, ExtractiveSummarizer)


async def test_explicit_gemini_without_credentials_is_a_config_error() -> None:
    with pytest.raises(SummarizerConfigError, match="API key"):
        build_summarizer(Settings(summarizer="gemini"))


async def test_fallback_wrapper_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    summarizer, logs = await _selected(
        monkeypatch, GEMINI_API_KEY=API_KEY, CONSOLIDATOR_SUMMARY_FALLBACK="true"
    )
    assert isinstance(summarizer, FallbackSummarizer)
    assert isinstance(summarizer.primary, GeminiSummarizer)
    assert isinstance(summarizer.fallback, ExtractiveSummarizer)
    [selected] = [e for e in logs if e["event"] == "summarizer_selected"]
    assert selected["fallback"] == "extractive"


# Pieces


def test_prompt_without_previous_summary() -> None:
    prompt = build_prompt(None, TURNS, 800)
    assert "(none yet)" in prompt
    assert "at most 800 characters" in prompt


def test_thinking_level_only_for_models_that_accept_it() -> None:
    assert default_thinking_level("gemini-3.5-flash") == "LOW"
    assert default_thinking_level("models/gemini-3-pro") == "LOW"
    assert default_thinking_level("gemini-2.5-flash") is None


def test_retry_after_forms() -> None:
    def error(code: int, headers: dict[str, str], body: dict[str, Any]) -> errors.APIError:
        return errors.ClientError(code, body, httpx2.Response(code, headers=headers))

    assert retry_after_s(error(429, {"Retry-After": "7"}, {})) == 7.0
    when = datetime.now(UTC) + timedelta(seconds=30)
    dated = retry_after_s(error(429, {"retry-after": format_datetime(when, usegmt=True)}, {}))
    assert dated is not None and 28 <= dated <= 31
    info = {
        "error": {
            "code": 429,
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}
            ],
        }
    }
    assert retry_after_s(error(429, {}, info)) == 2.5
    assert retry_after_s(error(429, {"Retry-After": "soon"}, {})) is None
    assert retry_after_s(TimeoutError()) is None


def test_transient_classification() -> None:
    assert is_transient(errors.ServerError(503, {}, None))
    assert is_transient(errors.ClientError(429, {}, None))
    assert not is_transient(errors.ClientError(400, {}, None))
    assert not is_transient(errors.ServerError(501, {}, None))
    assert is_transient(TimeoutError())
    assert is_transient(httpx2.ConnectError("refused"))
    assert not is_transient(ValueError("bad json"))


def test_breaker_states() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and state_of(breaker) == BreakerState.CLOSED
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        breaker.record_failure()
    assert state_of(breaker) == BreakerState.OPEN and not breaker.allow()
    assert breaker.retry_in_s == 5.0
    clock.now += 5.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.release()  # the probe was cancelled: no verdict
    assert breaker.allow()
    breaker.record_failure()
    assert state_of(breaker) == BreakerState.OPEN


async def test_an_unreachable_model_is_told_apart_from_one_that_answers_an_error(
    make: Make,
) -> None:
    options = types.HttpOptions(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SummarizerUnavailable) as info:
        await make(http_options=options, max_attempts=1).summarize(PREVIOUS, TURNS, 1200)
    assert info.value.kind == "unreachable"
