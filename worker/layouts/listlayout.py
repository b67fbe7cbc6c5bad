"""The `list` layout (seed 004): a LIST of JSON `{"role","content","timestamp"?}` elements.

Tool calls in the OpenAI shape many agents use are recognised, so the cut never separates
an assistant's `tool_calls` from the `tool` messages answering them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import orjson

from worker.domain import Turn
from worker.layouts.base import (
    DecodeError,
    StoredAsList,
    load_object,
    parse_timestamp,
    text_of,
    tool_call_list,
)

KNOWN_ROLES = frozenset({"user", "assistant", "system", "tool", "function", "model", "developer"})


class ListLayout(StoredAsList):
    name = "list"

    def __init__(self, *, newest_first: bool = False) -> None:
        self.newest_first = newest_first

    def decode(self, raw: bytes) -> Turn:
        obj = load_object(raw)
        role = obj.get("role")
        if not isinstance(role, str) or role not in KNOWN_ROLES:
            raise DecodeError(f"unknown role {role!r}")
        if "blocks" in obj and "content" not in obj:
            # LlamaIndex's messages have a role too: read as this layout they would be archived
            # empty and folded away. A layout set wrong must quarantine, not damage.
            raise DecodeError("a LlamaIndex message (blocks, no content): is the layout right?")
        calls = frozenset(
            str(call["id"]) for call in tool_call_list(obj.get("tool_calls")) if "id" in call
        )
        result_id = obj.get("tool_call_id")
        results = frozenset({str(result_id)}) if result_id is not None else frozenset()
        return Turn(
            role=role,
            text=text_of(obj.get("content")),
            raw=raw,
            created_at=parse_timestamp(obj.get("timestamp")),
            tool_calls=calls,
            tool_results=results,
        )

    def summary_elements(
        self,
        text: str,
        turns_covered: int,
        now: datetime,
        *,
        folded: Sequence[Turn] = (),
        kept: Sequence[Turn] = (),
    ) -> list[bytes]:
        content = f"[Summary of the {turns_covered} earlier turns]\n{text}"
        return [orjson.dumps({"role": "system", "content": content, "timestamp": now.timestamp()})]
