"""The `adk` layout: Google ADK's own `RedisSessionService` (seed 001).

One STRING per session, `adk:session:{app}:{user}:{id}`, holding the whole `Session` as pydantic
writes it: `{"id", "app_name", "user_id", "state", "events": [...], "last_update_time"}`. ADK
rewrites it under WATCH/MULTI on every event; the elements are the events, sliced out of the
stored bytes, and a rewrite changes nothing but the events array.

The summary is one event in ADK's own compaction form (`actions.compaction` with
`start_timestamp`, `end_timestamp` and `compacted_content`): ADK's request builder shows it to the
model in place of the events it covers. It is dated between the folded events and the kept ones,
since ADK orders a compaction by its end timestamp and hides events inside its range. ADK loads
and re-serializes every event on each append, so the summary event is built on the template of
the session's own events (every field, in ADK's order): it keeps its bytes through that, and the
next pass still recognises it.

The same key prefix holds ADK's `user_state:{app}:{user}` and `app_state:{app}` values, which
the default pattern also matches: they are not sessions (no events) and are left alone.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from worker.domain import SessionRef, Turn
from worker.layouts import jsonspan
from worker.layouts.base import DecodeError, Storage, load_object
from worker.layouts.contents import read_parts

ROLES = frozenset({"user", "model"})
SUMMARY_HEADER = "[Summary of the conversation so far]\n"
_SESSION_ORDER = ("id", "app_name", "user_id", "state", "events", "last_update_time")


class AdkLayout:
    name = "adk"
    storage = Storage.STRING
    newest_first = False

    def decode(self, raw: bytes) -> Turn:
        event = load_object(raw)
        compaction = _dict(_dict(event.get("actions")).get("compaction"))
        content = _dict(compaction.get("compacted_content") or event.get("content"))
        role = content.get("role")
        if role is None:
            # Events without content (state changes, transfers) or without a role.
            role = "user" if event.get("author") == "user" else "model"
        if not isinstance(role, str) or role not in ROLES:
            raise DecodeError(f"unknown role {role!r} in an ADK event")
        return read_parts(content.get("parts")).turn(role, raw, event.get("timestamp"))

    def summary_elements(
        self,
        text: str,
        turns_covered: int,
        now: datetime,
        *,
        folded: Sequence[Turn] = (),
        kept: Sequence[Turn] = (),
    ) -> list[bytes]:
        events = [_event(t.raw) for t in (*folded, *kept)]
        start, end = _span([_event(t.raw) for t in folded], [_event(t.raw) for t in kept])
        template = next((e for e in events if e), {})
        part = _text_part_template(events)
        part["text"] = SUMMARY_HEADER + text
        compaction = {
            "start_timestamp": start,
            "end_timestamp": end,
            "compacted_content": {"parts": [part], "role": "model"},
        }
        return [orjson.dumps(_summary_event(template, compaction, end))]

    def split(self, value: bytes) -> list[bytes]:
        if not isinstance(jsonspan.parse(value), dict):
            raise DecodeError("an ADK session is a JSON object")
        span = jsonspan.member_array(value, "events")
        # ADK's user_state and app_state values share the key prefix: not sessions.
        return [] if span is None else jsonspan.slices(value, span)

    def join(self, original: bytes, elements: Sequence[bytes]) -> bytes:
        span = jsonspan.member_array(original, "events")
        if span is None:
            raise DecodeError("not an ADK session: no events")
        return jsonspan.replace_elements(original, span, elements)

    def value_metadata(self, value: bytes) -> dict[str, Any]:
        """Everything but the events (ids, session state, last update), archived with them."""
        session = jsonspan.parse(value)
        if not isinstance(session, dict) or "events" not in session:
            return {}
        return {k: v for k, v in session.items() if k != "events"}

    def fresh_value(
        self, ref: SessionRef, elements: Sequence[bytes], metadata: Mapping[str, Any]
    ) -> bytes:
        stamps = [e.get("timestamp") for e in map(_event, elements)]
        latest = max((s for s in stamps if isinstance(s, int | float)), default=0.0)
        known: dict[str, Any] = {
            "id": metadata.get("id", ref.session_id),
            "app_name": metadata.get("app_name", ref.app or ""),
            "user_id": metadata.get("user_id", ref.user or ""),
            "state": metadata.get("state", {}),
            "events": [],
            "last_update_time": metadata.get("last_update_time", float(latest)),
        }
        # Only the Session's own fields (ADK refuses others), serialized with an empty events
        # array, which then receives the exact elements.
        value = orjson.dumps({k: known[k] for k in _SESSION_ORDER})
        span = jsonspan.member_array(value, "events")
        assert span is not None
        return jsonspan.replace_elements(value, span, elements)


def _span(folded: list[dict[str, Any]], kept: list[dict[str, Any]]) -> tuple[float, float]:
    """The compaction's range: from the first folded event (or the range of an earlier summary)
    to the last, and strictly before every kept event, which ADK would otherwise hide."""
    starts: list[float] = []
    ends: list[float] = []
    for event in folded:
        compaction = _dict(_dict(event.get("actions")).get("compaction"))
        start = compaction.get("start_timestamp", event.get("timestamp"))
        end = compaction.get("end_timestamp", event.get("timestamp"))
        if isinstance(start, int | float) and isinstance(end, int | float):
            starts.append(float(start))
            ends.append(float(end))
    kept_times = [float(t) for e in kept if isinstance(t := e.get("timestamp"), int | float)]
    # Unknown dates (a restore with nothing around it): before anything, covering nothing.
    end = max(ends, default=0.0)
    if kept_times and end >= min(kept_times):
        end = math.nextafter(min(kept_times), -math.inf)
    start = min(min(starts, default=end), end)
    return start, end


def _summary_event(
    template: dict[str, Any], compaction: dict[str, Any], timestamp: float
) -> dict[str, Any]:
    """An event with every field the template has, in its order, as ADK would serialize a new
    compaction event: unset fields null, collections empty."""
    values: dict[str, Any] = {
        "invocation_id": str(uuid.uuid4()),
        "author": "user",
        "actions": _emptied(_dict(template.get("actions"))) | {"compaction": compaction},
        "node_info": {k: ("" if isinstance(v, str) else None) for k, v in _node_info(template)},
        "id": str(uuid.uuid4()),
        "timestamp": timestamp,
    }
    if not template:
        return {k: v for k, v in values.items() if k != "node_info"}
    event = {key: values.get(key) for key in template}
    for key in ("invocation_id", "author", "actions", "id", "timestamp"):
        event.setdefault(key, values[key])
    return event


def _emptied(actions: dict[str, Any]) -> dict[str, Any]:
    return {k: ({} if isinstance(v, dict) else None) for k, v in actions.items()}


def _node_info(template: dict[str, Any]) -> list[tuple[str, Any]]:
    return list(_dict(template.get("node_info")).items())


def _text_part_template(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A text part as the session's events serialize one (every Part field, null when unset)."""
    fallback: dict[str, Any] | None = None
    for event in events:
        for part in _dict(event.get("content")).get("parts") or ():
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    return {k: None for k in part}
                fallback = fallback or {k: None for k in part}
    return fallback if fallback is not None and "text" in fallback else {"text": None}


def _event(raw: bytes) -> dict[str, Any]:
    try:
        return load_object(raw)
    except DecodeError:
        return {}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
