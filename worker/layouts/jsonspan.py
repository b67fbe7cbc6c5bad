"""Exact byte spans of the elements of a JSON array inside a stored document.

STRING layouts keep a whole conversation in one JSON value. The archive must hold each element
exactly as the agent wrote it (its escapes, spacing and key order), and a rewrite must leave the
rest of the document alone, so elements are sliced out of the original bytes rather than parsed
and serialized again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from worker.layouts.base import DecodeError

# Strings (with their escapes) and the structural characters: everything else in valid JSON
# (numbers, literals, whitespace) lies between these tokens and needs no attention.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.S)
_WS = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class ArraySpan:
    """Where an array sits in a document: its brackets and its elements' exact spans."""

    open: int  # offset of "["
    close: int  # offset of "]"
    elements: tuple[tuple[int, int], ...]  # [start, end) of each element, whitespace excluded


def parse(value: bytes) -> object:
    """The whole document, validated strictly (UTF-8 and JSON): a DecodeError otherwise."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON (or not UTF-8): {exc}") from exc


def top_level_array(value: bytes) -> ArraySpan:
    """The document is itself an array (validate it with `parse` first)."""
    start = _skip_ws(value, 0)
    if start >= len(value) or value[start : start + 1] != b"[":
        raise DecodeError("expected a JSON array")
    return _array_at(value, start)


def member_array(value: bytes, name: str) -> ArraySpan | None:
    """The array held by member `name` of the top-level object, or None when it has none.

    A member named twice is refused: parsers disagree on which one counts.
    """
    start = _skip_ws(value, 0)
    if value[start : start + 1] != b"{":
        raise DecodeError("expected a JSON object")
    found: ArraySpan | None = None
    depth = 0
    expect_key = False
    pos = start
    while (match := _TOKEN.search(value, pos)) is not None:
        tok, pos = match.group(), match.end()
        if tok in (b"{", b"["):
            depth += 1
            expect_key = tok == b"{" and depth == 1
        elif tok in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                return found
        elif tok == b",":
            expect_key = depth == 1
        elif tok == b":":
            expect_key = False
        elif depth == 1 and expect_key:
            expect_key = False
            if orjson.loads(tok) != name:
                continue
            if found is not None:
                raise DecodeError(f"member {name!r} appears twice")
            begin = _skip_ws(value, value.index(b":", pos) + 1)
            if value[begin : begin + 1] != b"[":
                raise DecodeError(f"member {name!r} is not an array")
            found = _array_at(value, begin)
            pos = found.close + 1  # the array's own tokens are not members of the object
    raise DecodeError("unterminated JSON object")


def slices(value: bytes, span: ArraySpan) -> list[bytes]:
    return [value[a:b] for a, b in span.elements]


def replace_elements(value: bytes, span: ArraySpan, elements: Sequence[bytes]) -> bytes:
    """`value` with the array's elements replaced, keeping the document's own spacing."""
    head, tail = value[: span.open + 1], value[span.close :]
    if not elements:
        return head + tail
    if span.elements:
        lead = value[span.open + 1 : span.elements[0][0]]
        trail = value[span.elements[-1][1] : span.close]
    else:
        lead, trail = value[span.open + 1 : span.close], b""
    return head + lead + separator(value, span).join(elements) + trail + tail


def separator(value: bytes, span: ArraySpan) -> bytes:
    """What the document puts between two elements: `, ` (Python's json), `,` (compact
    serializers) or a newline and indentation (pretty-printed)."""
    if len(span.elements) >= 2:
        return value[span.elements[0][1] : span.elements[1][0]]
    lead = value[span.open + 1 : span.elements[0][0]] if span.elements else b""
    if b"\n" in lead:
        return b"," + lead
    return b", " if b'": ' in value or b'", "' in value else b","


def _array_at(value: bytes, open_at: int) -> ArraySpan:
    depth = 0
    elements: list[tuple[int, int]] = []
    element_start = open_at + 1
    for match in _TOKEN.finditer(value, open_at):
        tok = match.group()
        if tok in (b"[", b"{"):
            depth += 1
        elif tok in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                _add(value, elements, element_start, match.start())
                return ArraySpan(open_at, match.start(), tuple(elements))
        elif tok == b"," and depth == 1:
            _add(value, elements, element_start, match.start())
            element_start = match.end()
    raise DecodeError("unterminated JSON array")


def _add(value: bytes, out: list[tuple[int, int]], start: int, end: int) -> None:
    a = _skip_ws(value, start)
    b = end
    while b > a and value[b - 1] in _WS:
        b -= 1
    if a < b:
        out.append((a, b))


def _skip_ws(value: bytes, pos: int) -> int:
    while pos < len(value) and value[pos] in _WS:
        pos += 1
    return pos
