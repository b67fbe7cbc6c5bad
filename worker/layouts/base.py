"""The layout seam: a pure codec between the agent's stored bytes and turns."""

from __future__ import annotations

import enum
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from worker.domain import SessionRef, Turn
from worker.timespec import iso_instant


class Storage(enum.Enum):
    LIST = "list"  # one Redis LIST element per turn
    STRING = "string"  # one Redis STRING holding the whole conversation


class DecodeError(ValueError):
    """An element the layout cannot read: the session is quarantined, never rewritten."""


class Layout(Protocol):
    name: str
    storage: Storage
    newest_first: bool  # LIST order in Redis: LPUSH (newest first) or RPUSH

    def decode(self, raw: bytes) -> Turn:
        """One stored element as a turn; raises DecodeError."""
        ...

    def summary_elements(
        self,
        text: str,
        turns_covered: int,
        now: datetime,
        *,
        folded: Sequence[Turn] = (),
        kept: Sequence[Turn] = (),
    ) -> list[bytes]:
        """The element(s), in conversation order, that stand for the folded turns.

        `folded` (an earlier summary included) and `kept` are the turns on either side of the
        cut, when known. Layouts whose agent re-serializes the whole value read them to write
        the summary exactly as the agent would (so it is still recognised after the agent's
        next write), and ADK to date the summary before the kept events.
        """
        ...

    def split(self, value: bytes) -> list[bytes]:
        """STRING layouts: the stored value as its elements, oldest first (DecodeError)."""
        ...

    def join(self, original: bytes, elements: Sequence[bytes]) -> bytes:
        """STRING layouts: `original` with its elements replaced by `elements`."""
        ...

    def value_metadata(self, value: bytes) -> dict[str, Any]:
        """STRING layouts: what the value holds besides its elements (ADK's session state),
        archived with the session. LIST layouts return {}."""
        ...

    def fresh_value(
        self, ref: SessionRef, elements: Sequence[bytes], metadata: Mapping[str, Any]
    ) -> bytes:
        """STRING layouts: a whole new value holding `elements` (restore), from the session's
        archived metadata."""
        ...


class StoredAsList:
    """For LIST layouts: the whole-value methods of the protocol, which only STRING layouts use."""

    storage = Storage.LIST

    def split(self, value: bytes) -> list[bytes]:
        raise NotImplementedError(f"{type(self).__name__} is stored as a LIST")

    def join(self, original: bytes, elements: Sequence[bytes]) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} is stored as a LIST")

    def value_metadata(self, value: bytes) -> dict[str, Any]:
        return {}

    def fresh_value(
        self, ref: SessionRef, elements: Sequence[bytes], metadata: Mapping[str, Any]
    ) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} is stored as a LIST")


def load_object(raw: bytes) -> dict[str, Any]:
    """Parse one JSON object strictly: invalid UTF-8, bad JSON or a non-object is a DecodeError."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON (or not UTF-8): {exc}") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"expected a JSON object, found {type(value).__name__}")
    return value


def parse_timestamp(value: object) -> datetime | None:
    """Timestamps as agents write them: epoch seconds or milliseconds, or ISO 8601."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        # One that cannot be stored would fail the session's archive write on every pass.
        return iso_instant(value)
    return None


def tool_call_list(value: object) -> list[dict[str, Any]]:
    """The calls in a `tool_calls` field. Anything but a list (or nothing) is a DecodeError: the
    session is quarantined rather than cut without knowing which turns answer which call."""
    if not value:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"tool_calls is a {type(value).__name__}, not a list")
    return [call for call in value if isinstance(call, dict)]


def text_of(content: object) -> str:
    """Text from the content shapes chat libraries use: a string, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    pieces.append(text)
        return "\n".join(pieces)
    if isinstance(content, dict):
        return text_of(content.get("text") or content.get("parts"))
    return str(content)


# Tool calls and results that carry no id (Gemini's function calls usually do not) are paired by
# tool name, in order, which needs the whole conversation: `decode` marks them with
# `unpaired_id`, and `decode_turns` gives each pair one id.
_UNPAIRED = "\x00"


def unpaired_id(name: str, index: int) -> str:
    """The `index`-th call (or result) without an id of tool `name` within one element."""
    return f"{_UNPAIRED}{name}{_UNPAIRED}{index}"


def decode_turns(layout: Layout, elements: Sequence[bytes]) -> list[Turn]:
    """Every element as a turn (DecodeError), calls without ids paired with their results."""
    open_calls: defaultdict[str, deque[str]] = defaultdict(deque)
    issued: Counter[str] = Counter()
    turns = []
    for raw in elements:
        turn = layout.decode(raw)
        if any(i.startswith(_UNPAIRED) for i in turn.tool_calls | turn.tool_results):
            calls = set()
            for cid in sorted(turn.tool_calls, key=_position):
                if cid.startswith(_UNPAIRED):
                    name = _tool_name(cid)
                    cid = f"{_UNPAIRED}{name}#{issued[name]}"
                    issued[name] += 1
                    open_calls[name].append(cid)
                calls.add(cid)
            results = set()
            for rid in sorted(turn.tool_results, key=_position):
                if rid.startswith(_UNPAIRED):
                    name = _tool_name(rid)
                    # A result with no call before it answers nothing the cut must keep.
                    pending = open_calls[name]
                    rid = pending.popleft() if pending else f"{_UNPAIRED}{name}#unmatched"
                results.add(rid)
            turn = replace(turn, tool_calls=frozenset(calls), tool_results=frozenset(results))
        turns.append(turn)
    return turns


def _tool_name(marker: str) -> str:
    return marker[1:].rpartition(_UNPAIRED)[0]


def _position(tool_id: str) -> tuple[int, str]:
    if tool_id.startswith(_UNPAIRED):
        return int(tool_id.rpartition(_UNPAIRED)[2]), tool_id
    return -1, tool_id
