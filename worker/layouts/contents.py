"""Gemini contents (`{"role", "parts"}`), as google-genai agents and ADK events store them.

Function calls and responses are read in both spellings the SDK writes (`functionCall` by
alias, `function_call` by field name); ids are used when present, otherwise the call and its
response are paired by tool name, in order (see `unpaired_id`).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from worker.domain import Turn
from worker.layouts.base import DecodeError, parse_timestamp, unpaired_id

# Tool arguments and results are rendered into the turn's text (for search and the summarizer)
# up to this many characters; the raw element keeps all of it.
_RENDER_MAX = 1000


@dataclass(frozen=True, slots=True)
class Parts:
    text: str
    calls: frozenset[str]
    results: frozenset[str]

    def turn(self, role: str, raw: bytes, timestamp: object) -> Turn:
        """The turn a content with these parts is: its text and tool ids, the raw element kept."""
        return Turn(
            role=role,
            text=self.text,
            raw=raw,
            created_at=parse_timestamp(timestamp),
            tool_calls=self.calls,
            tool_results=self.results,
        )


def read_parts(parts: object) -> Parts:
    """Text and tool ids of a content's parts: strings (seed 000) or Part objects."""
    if parts is None:
        return Parts("", frozenset(), frozenset())
    if not isinstance(parts, list):
        raise DecodeError("parts must be a list")
    texts: list[str] = []
    calls: set[str] = set()
    results: set[str] = set()
    unnamed_calls = unnamed_results = 0
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DecodeError(f"a part must be a string or an object, not {type(part).__name__}")
        text = part.get("text")
        if isinstance(text, str) and not part.get("thought"):
            texts.append(text)
        call = _either(part, "functionCall", "function_call")
        if call is not None:
            name = _name(call)
            if call.get("id"):
                calls.add(str(call["id"]))
            else:
                calls.add(unpaired_id(name, unnamed_calls))
                unnamed_calls += 1
            texts.append(f"[call {name}({render(call.get('args'))})]")
        response = _either(part, "functionResponse", "function_response")
        if response is not None:
            name = _name(response)
            if response.get("id"):
                results.add(str(response["id"]))
            else:
                results.add(unpaired_id(name, unnamed_results))
                unnamed_results += 1
            texts.append(f"[{name} returned {render(response.get('response'))}]")
    return Parts("\n".join(texts), frozenset(calls), frozenset(results))


def render(value: object) -> str:
    if value is None:
        return ""
    text = orjson.dumps(value).decode() if not isinstance(value, str) else value
    return text if len(text) <= _RENDER_MAX else text[:_RENDER_MAX] + "…"


def _either(part: dict[str, object], alias: str, field: str) -> dict[str, object] | None:
    value = part.get(alias, part.get(field))
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DecodeError(f"{alias} must be an object")
    return value


def _name(call: dict[str, object]) -> str:
    name = call.get("name")
    return name if isinstance(name, str) else ""
