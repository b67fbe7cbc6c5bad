"""Every Redis key the consolidator reads or writes is named here.

A key pattern such as `conversation:{id}:history` names where a layout keeps a session; `{id}`
is the session id, other placeholders (ADK's `{app}` and `{user}`) are archived with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.domain import SessionRef

OWN_PREFIX = "consolidator:"
_PLACEHOLDER = re.compile(r"\{(id|app|user)\}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class PatternError(ValueError):
    pass


def glob_escape(literal: str) -> str:
    """`literal` as a Redis MATCH pattern that matches it alone."""
    return _GLOB_SPECIAL.sub(r"\\\1", literal)


@dataclass(frozen=True, slots=True)
class KeyPattern:
    """A compiled key pattern: a SCAN glob, a parser and a formatter."""

    pattern: str
    glob: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, pattern: str, id_glob: str = "*") -> KeyPattern:
        names = _PLACEHOLDER.findall(pattern)
        if names.count("id") != 1:
            raise PatternError(f"key pattern {pattern!r} must contain {{id}} exactly once")
        if len(set(names)) != len(names):
            raise PatternError(f"key pattern {pattern!r} repeats a placeholder")
        if not _PLACEHOLDER.sub("", pattern):
            # "{id}" alone matches every key in the database: other applications' lists would
            # be archived and rewritten as if they were conversations.
            raise PatternError(
                f"key pattern {pattern!r} has no fixed part and would match every key: "
                "set CONSOLIDATOR_KEY_PATTERN to where the agents keep their sessions"
            )
        glob_parts: list[str] = []
        regex_parts: list[str] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(pattern):
            literal = pattern[pos : match.start()]
            wildcard = id_glob if match.group(1) == "id" else "*"
            glob_parts.append(glob_escape(literal) + wildcard)
            # The id may contain anything (the agent chose it); the other parts are one segment.
            group = ".+" if match.group(1) == "id" else "[^:]*"
            regex_parts.append(re.escape(literal) + f"(?P<{match.group(1)}>{group})")
            pos = match.end()
        tail = pattern[pos:]
        glob_parts.append(glob_escape(tail))
        regex_parts.append(re.escape(tail))
        return cls(pattern, "".join(glob_parts), re.compile("^" + "".join(regex_parts) + "$", re.S))

    def parse(self, key: str) -> SessionRef | None:
        """The session a key holds, or None for a key that is not one (never touched)."""
        if key.startswith(OWN_PREFIX):
            return None
        match = self.regex.match(key)
        if match is None:
            return None
        groups = match.groupdict()
        return SessionRef(
            session_id=groups["id"], key=key, app=groups.get("app"), user=groups.get("user")
        )

    def key_for(self, session_id: str, app: str | None = None, user: str | None = None) -> str:
        values = {"id": session_id, "app": app or "", "user": user or ""}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.pattern)


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def lease_key(session_key: str) -> str:
    # Same hash slot as the session key, so one Lua script may touch both in a Cluster.
    return f"{OWN_PREFIX}lease:{{{hash_tag(session_key)}}}:{session_key}"
