"""The `langchain` layout: langchain-community's `RedisChatMessageHistory`.

A LIST at `message_store:{id}`, pushed newest first (LPUSH), each element
`json.dumps(message_to_dict(message))`: `{"type": "human" | "ai" | ..., "data": {...}}`. The
summary is a `SystemMessage` at the oldest end, the form LangChain's summary memory gives the
model, so `RedisChatMessageHistory(...).messages` starts with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from worker.domain import Turn
from worker.layouts.base import (
    DecodeError,
    StoredAsList,
    load_object,
    text_of,
    tool_call_list,
    unpaired_id,
)
from worker.layouts.contents import render

# Message types `messages_from_dict` accepts, and the role each one speaks with.
ROLE_OF_TYPE = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "function",
    "HumanMessageChunk": "user",
    "AIMessageChunk": "assistant",
    "SystemMessageChunk": "system",
    "ToolMessageChunk": "tool",
    "FunctionMessageChunk": "function",
}
CHAT_TYPES = frozenset({"chat", "ChatMessageChunk"})  # the role is in the message itself


class LangChainLayout(StoredAsList):
    name = "langchain"
    newest_first = True

    def decode(self, raw: bytes) -> Turn:
        obj = load_object(raw)
        kind, data = obj.get("type"), obj.get("data")
        if not isinstance(data, dict):
            raise DecodeError("a LangChain message needs a data object")
        role = data.get("role") if kind in CHAT_TYPES else ROLE_OF_TYPE.get(str(kind))
        if not isinstance(role, str) or not role:
            raise DecodeError(f"unknown LangChain message type {kind!r}")
        calls, results, rendered = _tools(data)
        text = "\n".join(filter(None, [text_of(data.get("content")), *rendered]))
        return Turn(role=role, text=text, raw=raw, tool_calls=calls, tool_results=results)

    def summary_elements(
        self,
        text: str,
        turns_covered: int,
        now: datetime,
        *,
        folded: Sequence[Turn] = (),
        kept: Sequence[Turn] = (),
    ) -> list[bytes]:
        # message_to_dict(SystemMessage(content)) as the library writes it, with json.dumps.
        data: dict[str, Any] = {
            "content": f"[Summary of the {turns_covered} earlier turns]\n{text}",
            "additional_kwargs": {},
            "response_metadata": {},
            "type": "system",
            "name": None,
            "id": None,
        }
        return [json.dumps({"type": "system", "data": data}).encode()]


def _tools(data: dict[str, Any]) -> tuple[frozenset[str], frozenset[str], list[str]]:
    """Tool call ids an AI message issues (its `tool_calls`, or the provider's own in
    `additional_kwargs`), the id a tool message answers, and the calls rendered as text."""
    calls: set[str] = set()
    rendered: list[str] = []
    extra = data.get("additional_kwargs")
    extra = extra if isinstance(extra, dict) else {}
    own = tool_call_list(data.get("tool_calls"))
    provider = tool_call_list(extra.get("tool_calls"))
    calls.update(str(c["id"]) for c in [*own, *provider] if c.get("id"))
    for call in own or provider:  # the provider's list repeats LangChain's own
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        name = call.get("name") or function.get("name") or ""
        rendered.append(f"[call {name}({render(call.get('args', function.get('arguments')))})]")
    # The legacy OpenAI function call carries no id: paired by name with its FunctionMessage.
    legacy = extra.get("function_call")
    if isinstance(legacy, dict):
        calls.add(unpaired_id(str(legacy.get("name") or ""), 0))
        rendered.append(f"[call {legacy.get('name')}({render(legacy.get('arguments'))})]")
    results: set[str] = set()
    if data.get("tool_call_id"):
        results.add(str(data["tool_call_id"]))
    elif data.get("type") == "function" and data.get("name"):
        results.add(unpaired_id(str(data["name"]), 0))
    return frozenset(calls), frozenset(results), rendered
