"""The layouts as codecs, without servers: exact element spans, tool-call pairing, the summary
written in the agent's own JSON style, and what is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from worker.domain import Turn
from worker.layouts import jsonspan
from worker.layouts.adk import AdkLayout
from worker.layouts.base import DecodeError, Layout, decode_turns
from worker.layouts.gemini import SUMMARY_HEADER, GeminiLayout
from worker.layouts.langchain import LangChainLayout
from worker.layouts.listlayout import ListLayout
from worker.layouts.llamaindex import LlamaIndexLayout

NOW = datetime(2026, 6, 1, tzinfo=UTC)
TRICKY = [
    {"role": "user", "parts": [{"text": 'Café "Zoë" [1], {2}, \\ ] } , \u2028 😀'}]},
    {"role": "model", "parts": [{"text": "ok"}, {"functionCall": {"name": "f", "args": {}}}]},
    {"role": "user", "parts": ["seed 000 form, with [brackets]"]},
]
STYLES: dict[str, Callable[[Any], bytes]] = {
    "json.dumps": lambda rows: json.dumps(rows).encode(),
    "utf8": lambda rows: json.dumps(rows, ensure_ascii=False).encode(),
    "indent": lambda rows: json.dumps(rows, indent=2).encode(),
    "orjson": orjson.dumps,
    "padded": lambda rows: b" \n[ " + b" ,\n ".join(map(orjson.dumps, rows)) + b" ]\n",
}


@pytest.mark.parametrize("style", STYLES)
def test_elements_are_the_exact_stored_bytes_and_join_keeps_the_rest(style: str) -> None:
    value = STYLES[style](TRICKY)
    layout = GeminiLayout()
    elements = layout.split(value)
    assert [json.loads(e) for e in elements] == TRICKY
    assert all(e in value for e in elements)
    assert layout.join(value, elements) == value
    shorter = layout.join(value, elements[1:])
    assert json.loads(shorter) == TRICKY[1:] and shorter.startswith(value[: value.index(b"[") + 1])
    assert json.loads(layout.join(value, [])) == []


def test_the_events_member_is_found_at_the_top_level_only() -> None:
    doc = (
        b'{"id":"s","state":{"events":[1]},"\\u0065vents":[{"a":"]"},{"b":[{"events":[]}]}],'
        b'"last_update_time":1.5}'
    )
    span = jsonspan.member_array(doc, "events")
    assert span is not None
    assert jsonspan.slices(doc, span) == [b'{"a":"]"}', b'{"b":[{"events":[]}]}']
    assert jsonspan.member_array(b'{"name": "Zo\\u00eb"}', "events") is None
    with pytest.raises(DecodeError):
        jsonspan.member_array(b'{"events": {}}', "events")
    with pytest.raises(DecodeError):
        jsonspan.member_array(b'{"events": [], "events": []}', "events")


def test_calls_without_ids_are_paired_with_their_results_by_name_in_order() -> None:
    def content(role: str, *parts: dict[str, Any]) -> bytes:
        return json.dumps({"role": role, "parts": list(parts)}).encode()

    call = {"functionCall": {"name": "weather", "args": {}}}
    result = {"functionResponse": {"name": "weather", "response": {}}}
    elements = [
        content("model", call, call),  # two parallel calls
        content("user", result),
        content("user", result),
        content("model", call),  # still pending
        content("user", {"functionResponse": {"name": "other", "response": {}}}),  # no call
    ]
    turns = decode_turns(GeminiLayout(), elements)
    first, second = sorted(turns[0].tool_calls)
    assert turns[1].tool_results == {first} and turns[2].tool_results == {second}
    answered = {r for t in turns for r in t.tool_results}
    assert turns[3].tool_calls and not turns[3].tool_calls & answered  # pending
    assert not turns[4].tool_results & {c for t in turns for c in t.tool_calls}


@pytest.mark.parametrize(
    ("layout", "raw"),
    [
        (GeminiLayout(), b'{"role": "system", "parts": [{"text": "x"}]}'),
        (GeminiLayout(), b'{"role": "user"}'),
        (GeminiLayout(), b'{"role": "user", "parts": [3]}'),
        (LangChainLayout(), b'{"type": "remove", "data": {"id": "1"}}'),
        (LangChainLayout(), b'{"type": "human", "data": "hi"}'),
        (LlamaIndexLayout(), b'{"role": "narrator", "blocks": []}'),
        (AdkLayout(), b'{"author": "x", "content": {"role": "system", "parts": []}}'),
        (AdkLayout(), b'["not", "an", "event"]'),
        (GeminiLayout(), b'{"role": "user", "parts": [{"text": "\xff"}]}'),
        # tool_calls that is not a list: which turns answer which call is unknown.
        (ListLayout(), b'{"role": "assistant", "content": "x", "tool_calls": 5}'),
        # Another layout's message (a layout set wrong): LlamaIndex's blocks, no content.
        (ListLayout(), b'{"role": "user", "additional_kwargs": {}, "blocks": []}'),
        (LangChainLayout(), b'{"type": "ai", "data": {"content": "x", "tool_calls": 5}}'),
        (
            LangChainLayout(),
            b'{"type": "ai", "data": {"content": "", "additional_kwargs": {"tool_calls": "f"}}}',
        ),
        (
            LlamaIndexLayout(),
            b'{"role": "assistant", "additional_kwargs": {"tool_calls": {"id": "c1"}}}',
        ),
    ],
)
def test_what_a_layout_cannot_read_is_a_decode_error(layout: Layout, raw: bytes) -> None:
    with pytest.raises(DecodeError):
        layout.decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # OpenAI messages saved without their null fields: valid, with no content key.
        b'{"role": "assistant", "function_call": {"name": "track", "arguments": "{}"}}',
        b'{"role": "assistant", "refusal": "I cannot help with that."}',
    ],
)
def test_a_list_message_without_content_is_still_read(raw: bytes) -> None:
    assert ListLayout().decode(raw).role == "assistant"


@pytest.mark.parametrize(
    "stamp",
    ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2026-13-01", 1e30, "soon"],
)
def test_a_timestamp_that_cannot_be_stored_is_dropped_not_fatal(stamp: object) -> None:
    raw = json.dumps({"role": "user", "content": "hi", "timestamp": stamp}).encode()
    turn = ListLayout().decode(raw)
    assert (turn.text, turn.created_at, turn.raw) == ("hi", None, raw)


def test_a_timestamp_with_an_offset_is_stored_in_utc() -> None:
    raw = b'{"role": "user", "content": "hi", "timestamp": "2026-06-01T05:30:00+05:30"}'
    created = ListLayout().decode(raw).created_at
    assert created == NOW and created is not None and created.utcoffset() == timedelta(0)


def test_every_layout_reads_its_own_summary() -> None:
    for layout in (GeminiLayout(), LangChainLayout(), LlamaIndexLayout(), AdkLayout()):
        elements = layout.summary_elements("Zoë booked LP-77.", 6, NOW)
        assert "Zoë booked LP-77." in layout.decode(elements[0]).text


@pytest.mark.parametrize(
    ("sample", "reserialize"),
    [
        # seed 003: Python's json, ASCII escapes
        (
            {"role": "model", "parts": [{"text": "Café"}]},
            lambda obj: json.dumps(obj).encode(),
        ),
        # the SDK's model_dump(): every field, UTF-8 as is, compact
        (
            {"parts": [{"video_metadata": None, "thought": None, "text": "Café"}], "role": "user"},
            lambda obj: json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
        ),
        # seed 003's own stored form
        (
            {"role": "user", "text": "Café", "ts": 1.5},
            lambda obj: json.dumps(obj).encode(),
        ),
        # seed 000: parts as strings
        ({"role": "user", "parts": ["Café"]}, lambda obj: json.dumps(obj).encode()),
    ],
    ids=["seed-003", "sdk-dump", "seed-003-dto", "seed-000"],
)
def test_the_gemini_summary_survives_the_agents_own_serializer(
    sample: dict[str, Any], reserialize: Callable[[Any], bytes]
) -> None:
    raw = reserialize(sample)
    kept = [GeminiLayout().decode(raw)]
    elements = GeminiLayout().summary_elements("Zoë, ORD-7.", 4, NOW, kept=kept)
    assert [reserialize(json.loads(e)) for e in elements] == elements
    assert GeminiLayout().decode(elements[0]).text.startswith(SUMMARY_HEADER)


def test_the_adk_summary_is_dated_before_every_kept_event() -> None:
    def event(ts: float, text: str) -> Turn:
        raw = orjson.dumps(
            {"content": {"parts": [{"text": text}], "role": "user"}, "author": "user", "id": text}
            | {"timestamp": ts}
        )
        return AdkLayout().decode(raw)

    folded, kept = [event(10.0, "a"), event(20.0, "b")], [event(20.0, "c"), event(30.0, "d")]
    [raw] = AdkLayout().summary_elements("sum", 2, NOW, folded=folded, kept=kept)
    compaction = orjson.loads(raw)["actions"]["compaction"]
    assert compaction["start_timestamp"] == 10.0
    assert 10.0 <= compaction["end_timestamp"] < 20.0  # ADK would hide "c" inside the range
    assert orjson.loads(raw)["timestamp"] == compaction["end_timestamp"]
