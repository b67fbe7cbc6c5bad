"""The model's HTTP session honours the proxy the environment names, as the SDK's own does.

The summarizer brings its own aiohttp session (the SDK's looks the proxy up on every request,
in a thread); it must still send requests through HTTP_PROXY / HTTPS_PROXY and bypass it for
the hosts in NO_PROXY. The local Gemini-protocol server stands in for the proxy: a forward
proxy receives the request with the target's absolute URL, which the server answers as well.
"""

from __future__ import annotations

import pytest
from google.genai import types

from worker.domain import Turn
from worker.summarizers.gemini import GeminiSummarizer
from worker.testing.gemini_server import GeminiServer

MODEL = "gemini-3.5-flash"
TURNS = [
    Turn("user", "Please move order A-1042 to Friday.", b""),
    Turn("model", "Done: A-1042 now ships on Friday.", b""),
]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def summarizer_for(base_url: str) -> GeminiSummarizer:
    return GeminiSummarizer(
        api_key="proxy-test-key",
        http_options=types.HttpOptions(base_url=base_url),
        model=MODEL,
        timeout_s=5.0,
        max_attempts=1,
    )


async def test_requests_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with GeminiServer() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url)
        # A name that resolves nowhere: only a proxy can deliver this request.
        summarizer = summarizer_for("http://gemini.invalid/")
        try:
            summary = await summarizer.summarize(None, TURNS, 1200)
        finally:
            await summarizer.aclose()
        [request] = proxy.generate_requests
    assert request.headers["host"] == "gemini.invalid"
    assert request.path == f"/v1/models/{MODEL}:generateContent"
    assert "A-1042" in request.text
    assert summary.summarizer == "gemini" and summary.text


async def test_hosts_in_no_proxy_are_reached_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    async with GeminiServer() as server:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        summarizer = summarizer_for(server.base_url)
        try:
            summary = await summarizer.summarize(None, TURNS, 1200)
        finally:
            await summarizer.aclose()
        assert len(server.generate_requests) == 1
    assert summary.text
