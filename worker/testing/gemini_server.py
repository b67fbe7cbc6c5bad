"""A local HTTP server that speaks enough of the Gemini REST protocol for the real client.

    async with GeminiServer() as server:
        server.script(Reply.error(429, retry_after=1), Reply.answer("Ada booked room 12."))
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=server.base_url))

`POST /{version}/models/{model}:generateContent` answers from the script (one behaviour per
request, in order), then from `default` (a deterministic short summary of the prompt).
`:countTokens` always answers. Every request is recorded in `requests`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    model: str
    action: str  # generateContent | countTokens | ...
    headers: Mapping[str, str]  # lower-cased names
    body: Any  # the parsed JSON body, None when it was not JSON
    raw: bytes
    received_at: float  # time.monotonic() on arrival

    @property
    def text(self) -> str:
        """Every text part sent: system instruction first, then the contents."""
        if not isinstance(self.body, dict):
            return ""
        blocks = [self.body.get("systemInstruction") or {}, *(self.body.get("contents") or [])]
        return "\n".join(
            str(part["text"])
            for block in blocks
            if isinstance(block, dict)
            for part in block.get("parts") or []
            if isinstance(part, dict) and "text" in part
        )

    @property
    def max_output_tokens(self) -> int | None:
        config = self.body.get("generationConfig") if isinstance(self.body, dict) else None
        value = config.get("maxOutputTokens") if isinstance(config, dict) else None
        return int(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer. `text=None` means the server's default summary of the prompt."""

    text: str | None = None
    status: int = 200
    delay_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None  # sent as is (e.g. malformed JSON), overriding everything else
    finish_reason: str = "STOP"
    blocked: bool = False  # no candidate, promptFeedback.blockReason = SAFETY
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    @classmethod
    def answer(cls, text: str, **kwargs: Any) -> Reply:
        return cls(text=text, **kwargs)

    @classmethod
    def slow(cls, delay_s: float, text: str | None = None) -> Reply:
        return cls(text=text, delay_s=delay_s)

    @classmethod
    def error(
        cls, status: int, *, retry_after: str | float | None = None, retry_delay: str | None = None
    ) -> Reply:
        """An error in Google's JSON shape; `retry_delay` (e.g. "0.4s") adds a RetryInfo detail."""
        error: dict[str, Any] = {
            "code": status,
            "message": f"scripted {status}",
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
        if retry_delay is not None:
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
            ]
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(status=status, headers=headers, body=json.dumps({"error": error}).encode())

    @classmethod
    def malformed(cls) -> Reply:
        return cls(body=b'{"candidates": [{"content": {"parts": [{"text": "unterminated')

    @classmethod
    def empty(cls) -> Reply:
        return cls(text="")

    @classmethod
    def refusal(cls) -> Reply:
        return cls(text="I'm sorry, but I can't help with summarizing this conversation.")


Behaviour = Reply | Callable[[RecordedRequest], Reply]

_TRANSCRIPT_LINE = re.compile(r"^\s*(user|model|assistant|system|tool|human|ai)\s*:\s*(.+)$", re.I)


def default_summary(request: RecordedRequest) -> str:
    """A deterministic summary: the opening words of each transcript line, a third as long."""
    text = request.text
    lines = [m.group(2) for m in map(_TRANSCRIPT_LINE.match, text.splitlines()) if m]
    pieces = [" ".join(line.split()[:8]) for line in lines] or [" ".join(text.split()[:12])]
    summary = "Earlier: " + "; ".join(pieces) + "."
    budget = max(40, sum(len(line) for line in lines) // 3)
    return summary if len(summary) <= budget else summary[: budget - 1].rstrip() + "…"


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class GeminiServer:
    def __init__(
        self,
        *,
        model_version: str = "gemini-local-001",
        default: Callable[[RecordedRequest], Reply] | None = None,
    ) -> None:
        self.model_version = model_version
        self.default = default or (lambda request: Reply(text=default_summary(request)))
        self.requests: list[RecordedRequest] = []
        self._script: deque[Behaviour] = deque()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next generateContent requests, one each, in order."""
        self._script.extend(behaviours)

    @property
    def generate_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.action == "generateContent"]

    def reset(self) -> None:
        self.requests.clear()
        self._script.clear()

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/{version}/models/{target}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].partition(":")
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            model=model,
            action=action,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            raw=raw,
            received_at=time.monotonic(),
        )
        self.requests.append(recorded)
        if action == "countTokens":
            return web.json_response({"totalTokens": _tokens(recorded.text)})
        if action != "generateContent":
            return web.json_response(
                {"error": {"code": 404, "message": "unknown method", "status": "NOT_FOUND"}},
                status=404,
            )
        behaviour = self._script.popleft() if self._script else self.default
        reply = behaviour if isinstance(behaviour, Reply) else behaviour(recorded)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.body is not None:
            return web.Response(
                body=reply.body,
                status=reply.status,
                headers=dict(reply.headers),
                content_type="application/json",
            )
        payload = self._answer(recorded, reply)
        return web.json_response(payload, status=reply.status, headers=dict(reply.headers))

    def _answer(self, request: RecordedRequest, reply: Reply) -> dict[str, Any]:
        text = default_summary(request) if reply.text is None else reply.text
        finish = reply.finish_reason
        limit = request.max_output_tokens
        if limit is not None and _tokens(text) > limit:
            text, finish = text[: limit * 4], "MAX_TOKENS"
        prompt_tokens = reply.prompt_tokens or _tokens(request.text)
        output_tokens = reply.output_tokens if reply.output_tokens is not None else _tokens(text)
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
        }
        if reply.blocked:
            return {
                "promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": {"promptTokenCount": prompt_tokens},
                "modelVersion": self.model_version,
            }
        candidate = {
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": finish,
            "index": 0,
        }
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": self.model_version,
            "responseId": f"local-{len(self.requests)}",
        }
