"""The `gemini` layout (seeds 000 and 003): one STRING per session, the JSON list of contents.

Elements are `{"role": "user" | "model", "parts": [...]}` with parts as `{"text": ...}` objects
(seed 003, google-genai), as plain strings (seed 000), or function calls and responses; seed
003's SDK-independent form `{"role", "text", "ts"}` is read too. The summary takes seed 003's
shape: a user turn "[Summary of the conversation so far]\\n..." and the model's "Understood.
Let's continue.", which `client.chats.create(history=...)` loads like any other turn.

The agent reads, extends and re-serializes the whole list on every turn, so the summary is
written in the agent's own JSON style (key order, spacing, escapes, part shape): re-serialized,
it keeps its bytes, and the next pass still recognises it as the summary it wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.domain import SessionRef, Turn
from worker.layouts import jsonspan
from worker.layouts.base import DecodeError, Storage, load_object
from worker.layouts.contents import read_parts

ROLES = frozenset({"user", "model"})
SUMMARY_HEADER = "[Summary of the conversation so far]\n"
ACKNOWLEDGEMENT = "Understood. Let's continue."

_FIRST_KEY = re.compile(rb'\s*\{\s*"[^"\\]*(?:\\.[^"\\]*)*"(\s*):(\s*)')
_NON_ASCII_ESCAPE = re.compile(rb"\\u(?:00[89a-fA-F]|0[1-9a-fA-F]|[1-9a-fA-F])")
_TIME_KEYS = ("ts", "timestamp")


class GeminiLayout:
    name = "gemini"
    storage = Storage.STRING
    newest_first = False

    def decode(self, raw: bytes) -> Turn:
        obj = load_object(raw)
        role = obj.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DecodeError(f"unknown role {role!r} (Gemini contents are user or model)")
        if "parts" in obj:
            parts = read_parts(obj["parts"])
        elif isinstance(obj.get("text"), str):  # seed 003's own stored form
            parts = read_parts([obj["text"]])
        else:
            raise DecodeError("a content needs parts (or text)")
        return parts.turn(role, raw, next((obj[k] for k in _TIME_KEYS if k in obj), None))

    def summary_elements(
        self,
        text: str,
        turns_covered: int,
        now: datetime,
        *,
        folded: Sequence[Turn] = (),
        kept: Sequence[Turn] = (),
    ) -> list[bytes]:
        shape = Shape.of([t.raw for t in (*kept, *folded)])
        summary = shape.content("user", SUMMARY_HEADER + text, now)
        # The model's acknowledgement keeps user and model turns alternating; when the first
        # kept turn is the model's own, the summary alone does.
        if kept and kept[0].role == "model":
            return [summary]
        return [summary, shape.content("model", ACKNOWLEDGEMENT, now)]

    def split(self, value: bytes) -> list[bytes]:
        if not isinstance(jsonspan.parse(value), list):
            raise DecodeError("a gemini session is a JSON array of contents")
        return jsonspan.slices(value, jsonspan.top_level_array(value))

    def join(self, original: bytes, elements: Sequence[bytes]) -> bytes:
        span = jsonspan.top_level_array(original)
        return jsonspan.replace_elements(original, span, elements)

    def value_metadata(self, value: bytes) -> dict[str, Any]:
        return {}

    def fresh_value(
        self, ref: SessionRef, elements: Sequence[bytes], metadata: Mapping[str, Any]
    ) -> bytes:
        # Python's json puts ", " between list items where it puts ": " after keys.
        spaced = any((m := _FIRST_KEY.match(e)) and m.group(2) for e in elements)
        return b"[" + (b", " if spaced else b",").join(elements) + b"]"


@dataclass(frozen=True, slots=True)
class Shape:
    """How the agent writes a content: key order, part form and JSON style."""

    keys: tuple[str, ...]
    part: tuple[str, ...] | None  # the keys of a text part; None: parts are plain strings
    separators: tuple[str, str]
    ensure_ascii: bool

    @classmethod
    def of(cls, samples: Sequence[bytes]) -> Shape:
        # Python's json.dumps with seed 003's {"role", "parts": [{"text"}]}, unless told otherwise.
        shape = cls(("role", "parts"), ("text",), (", ", ": "), True)
        for raw in samples:
            found = _sample(raw)
            if found is not None:
                shape = found
                break
        if any(not raw.isascii() for raw in samples):
            return _with_ascii(shape, False)
        if any(_NON_ASCII_ESCAPE.search(raw) for raw in samples):
            return _with_ascii(shape, True)
        return shape

    def content(self, role: str, text: str, now: datetime) -> bytes:
        obj: dict[str, Any] = {}
        for key in self.keys:
            if key == "role":
                obj[key] = role
            elif key == "parts":
                obj[key] = [text if self.part is None else _part(self.part, text)]
            elif key == "text":
                obj[key] = text
            elif key in _TIME_KEYS:
                obj[key] = now.timestamp()
        dumped = json.dumps(obj, separators=self.separators, ensure_ascii=self.ensure_ascii)
        return dumped.encode()


def _sample(raw: bytes) -> Shape | None:
    """The shape of one element that holds text, or None when it tells nothing."""
    match = _FIRST_KEY.match(raw)
    if match is None:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    keys = tuple(k for k in obj if k in ("role", "parts", "text", *_TIME_KEYS))
    parts = obj.get("parts")
    part: tuple[str, ...] | None
    if isinstance(parts, list) and parts and isinstance(parts[0], str):
        part = None
    elif isinstance(parts, list) and parts and isinstance(parts[0], dict):
        # Parts may mix objects and bare strings (seed 000 writes strings): only objects count.
        text_part = next(
            (p for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)), None
        )
        if text_part is None:
            return None
        part = tuple(text_part)
    elif "parts" not in obj and isinstance(obj.get("text"), str):
        part = ("text",)
    else:
        return None
    key_sep = ":" + match.group(2).decode()
    item_sep = ", " if key_sep == ": " else ","
    # Without evidence in the session, a spaced style is Python's json (ASCII escapes), a
    # compact one a serializer that writes UTF-8 as is (pydantic, orjson).
    return Shape(keys, part, (item_sep, key_sep), key_sep == ": ")


def _with_ascii(shape: Shape, ensure_ascii: bool) -> Shape:
    return Shape(shape.keys, shape.part, shape.separators, ensure_ascii)


def _part(keys: tuple[str, ...], text: str) -> dict[str, Any]:
    # The SDK's model_dump() writes every field, null when unset: so does the summary.
    return {key: (text if key == "text" else None) for key in keys}
