"""The nouns of the product: plain frozen values, no I/O."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson


def digest(raw: bytes) -> bytes:
    """Identity of a stored element: what the archive and the hot tier are aligned by."""
    return hashlib.sha256(raw).digest()


def same_json(a: bytes, b: bytes) -> bool:
    """Whether two elements say the same as JSON, however spelled (escapes, spacing, key
    order). An agent that loads and saves its whole history again (seed 003's one-string
    layout) may write the daemon's summary back in its own style: it is still that summary."""
    try:
        return bool(orjson.loads(a) == orjson.loads(b))
    except (ValueError, RecursionError):  # not JSON, or nested past what can be compared
        return False


class Kind(enum.StrEnum):
    TURN = "turn"
    SUMMARY = "summary"
    GAP = "gap"


class Trigger(enum.StrEnum):
    IDLE = "idle"
    EXPIRING = "expiring"
    OVERSIZE = "oversize"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class Turn:
    """One element the agent wrote, decoded. `raw` is the exact stored bytes."""

    role: str
    text: str
    raw: bytes
    created_at: datetime | None = None
    # Tool-call ids this turn issues, and the ids whose results it carries: the cut must never
    # separate the two, and a call without a result is never folded.
    tool_calls: frozenset[str] = field(default_factory=frozenset)
    tool_results: frozenset[str] = field(default_factory=frozenset)

    @property
    def sha(self) -> bytes:
        return digest(self.raw)


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A hot-tier session: its id (the `{id}` part of the key) and where it lives."""

    session_id: str
    key: str
    app: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A session the scanner found worth a look, and why."""

    ref: SessionRef
    trigger: Trigger
    ttl_ms: int  # -1: no expiry
    idle_s: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The hot state as read at one instant, in conversation order (oldest first)."""

    ref: SessionRef
    elements: tuple[bytes, ...]
    ttl_ms: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SummaryFailure:
    """One failed attempt at a summary: who failed, how (the metrics' `kind`), how long it took."""

    summarizer: str
    kind: str
    latency_ms: float


@dataclass(frozen=True, slots=True)
class SummaryText:
    """What a summarizer returns, with the provenance the archive keeps."""

    text: str
    summarizer: str
    model: str | None = None
    model_version: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_ms: float = 0.0
    cost_usd: float | None = None
    # The primary summarizer's failure that this (fallback) summary stands in for: an outage
    # must still show in the failure metrics when a fallback hides it from the agents.
    stands_in_for: SummaryFailure | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What consolidating one session did: the canonical log line is made of this."""

    session_id: str
    # consolidated | archived | unchanged | skipped | conflict | quarantined | failed | abandoned
    status: str
    turns_archived: int = 0
    turns_folded: int = 0
    turns_kept: int = 0
    gap: bool = False
    bytes_before: int = 0
    bytes_after: int = 0
    summarizer: str | None = None
    reason: str | None = None
    duration_ms: float = 0.0
    hot_memory: int | None = None  # MEMORY USAGE as last seen or written (change detection)
