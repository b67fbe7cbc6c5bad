"""The `llamaindex` layout: LlamaIndex's `RedisChatStore`.

A LIST at the chat store key itself, RPUSH oldest first, each element
`ChatMessage.model_dump_json()`: `{"role", "additional_kwargs", "blocks": [{"block_type": "text",
"text": ...}]}` (older releases wrote `content` instead of blocks). The summary is a `system`
message first, as LlamaIndex's own summary memory buffer puts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

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
from worker.layouts.contents import render

# llama_index.core.base.llms.types.MessageRole
ROLES = frozenset(
    {"system", "developer", "user", "assistant", "function", "tool", "chatbot", "model"}
)


class LlamaIndexLayout(StoredAsList):
    name = "llamaindex"
    newest_first = False

    def decode(self, raw: bytes) -> Turn:
        obj = load_object(raw)
        role = obj.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DecodeError(f"unknown role {role!r}")
        if "blocks" not in obj and "additional_kwargs" not in obj:
            # Every ChatMessage dump has them; a bare {"role", "content"} is another layout's
            # element, which this one would rewrite into LlamaIndex's shape.
            raise DecodeError("not a LlamaIndex ChatMessage (no blocks, no additional_kwargs)")
        extra = obj.get("additional_kwargs")
        extra = extra if isinstance(extra, dict) else {}
        blocks = obj.get("blocks")
        text = _blocks_text(blocks) if isinstance(blocks, list) else text_of(obj.get("content"))
        calls = tool_call_list(extra.get("tool_calls"))
        rendered = [_render_call(c) for c in calls]
        result_id = extra.get("tool_call_id")
        return Turn(
            role=role,
            text="\n".join(filter(None, [text, *rendered])),
            raw=raw,
            created_at=parse_timestamp(extra.get("timestamp")),
            tool_calls=frozenset(str(c["id"]) for c in calls if c.get("id")),
            tool_results=frozenset({str(result_id)}) if result_id else frozenset(),
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
        message = {
            "role": "system",
            "additional_kwargs": {},
            "blocks": [{"block_type": "text", "text": content}],
        }
        return [orjson.dumps(message)]  # compact UTF-8, as pydantic's model_dump_json writes


def _blocks_text(blocks: list[Any]) -> str:
    texts = []
    for block in blocks:
        if not isinstance(block, dict):
            raise DecodeError("a content block must be an object")
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("block_type") not in (None, "text"):
            texts.append(f"[{block['block_type']}]")  # images, audio, documents: named only
    return "\n".join(texts)


def _render_call(call: dict[str, Any]) -> str:
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    name = function.get("name") or call.get("name") or ""
    return f"[call {name}({render(function.get('arguments', call.get('args')))})]"
