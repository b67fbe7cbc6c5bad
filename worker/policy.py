"""Decisions as plain functions: which turns are new, where to cut, what triggers a session.

No I/O here; the pipeline feeds these functions what it read and acts on what they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from worker.domain import Trigger, Turn

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class HeadSummary:
    """A summary the consolidator wrote, found at the head of the hot state."""

    through_seq: int
    element_count: int
    text: str


@dataclass(frozen=True, slots=True)
class Alignment:
    """How the hot elements line up with the archive.

    The hot state is `summary_len` summary elements, then verbatim turns of which the first
    `archived` are already in the archive; the verbatim turns start at `first_seq` (after a gap,
    the new ones start at the archive's `turn_count`).
    """

    summary_len: int
    archived: int
    first_seq: int
    gap_reason: str | None = None


def align(
    shas: Sequence[bytes],
    turn_count: int,
    head: HeadSummary | None,
    archived_tail: Mapping[int, bytes],
) -> Alignment:
    """Find which hot elements the archive already holds (DESIGN 5.3).

    `archived_tail` maps seq to digest for the last archived turns (at least as many as there are
    hot elements). The agent may have trimmed its list from the head (seed 004's LTRIM): the
    archived part is then a shorter prefix of the body, found by the longest suffix/prefix match.
    """
    k = head.element_count if head else 0
    body = shas[k:]
    if head is not None:
        start = head.through_seq + 1
        p = turn_count - start
        if 0 <= p <= len(body) and all(archived_tail.get(start + i) == body[i] for i in range(p)):
            return Alignment(k, p, start)
    if turn_count and body:
        last = archived_tail.get(turn_count - 1)
        for p in range(min(len(body), turn_count), 0, -1):
            if body[p - 1] != last:
                continue
            if all(archived_tail.get(turn_count - p + i) == body[i] for i in range(p)):
                return Alignment(k, p, turn_count - p)
        # Nothing in the hot state is in the archive, yet the archive has turns: the agent
        # trimmed (or replaced) turns we never saw. Record the gap instead of gluing over it.
        return Alignment(k, 0, turn_count, gap_reason="hot state does not continue the archive")
    return Alignment(k, 0, turn_count)


# Archived turns a hot state must show, all in reverse, before it is taken for a list read in
# the wrong order: two could be an agent repeating itself word for word.
_BACKWARDS_EVIDENCE = 3


def reads_backwards(shas: Sequence[bytes], archived_tail: Mapping[int, bytes]) -> bool:
    """Whether the hot elements, in the order read, hold their archived turns newest first:
    a list kept with LPUSH read as an RPUSH one, or the reverse (CONSOLIDATOR_NEWEST_FIRST
    not the agents' order). Read so, archived turns look new and are archived again, reversed.

    Only digests that occur once in the tail count; at least three, in strictly falling seq
    order and none rising, are needed."""
    seq_of: dict[bytes, int | None] = {}
    for seq, sha in archived_tail.items():
        seq_of[sha] = None if sha in seq_of else seq
    found = (seq_of.get(sha) for sha in shas)
    seqs = [seq for seq in found if seq is not None]
    return len(seqs) >= _BACKWARDS_EVIDENCE and all(a > b for a, b in pairwise(seqs))


@dataclass(frozen=True, slots=True)
class Cut:
    """Fold the first `fold` verbatim turns (plus any old summary); keep the rest verbatim."""

    fold: int


def choose_cut(
    turns: Sequence[Turn],
    keep_recent: int,
    *,
    max_kept_tokens: int | None = None,
    fold_max_tokens: int | None = None,
) -> Cut | None:
    """Where to cut the verbatim turns, or None when nothing should be folded.

    Keeps the last `keep_recent` turns, fewer when those alone exceed `max_kept_tokens` (the
    oversize trigger; the newest turn always stays); folds no more than `fold_max_tokens` at once
    (the rest waits for the next pass); never folds a call whose result has not arrived; and
    moves the cut earlier until no call and its result lie on different sides.
    """
    fold = max(len(turns) - keep_recent, 0)
    if max_kept_tokens is not None:
        kept = sum(estimate_tokens(len(t.text)) for t in turns[fold:])
        while kept > max_kept_tokens and fold < len(turns) - 1:
            kept -= estimate_tokens(len(turns[fold].text))
            fold += 1
    if fold_max_tokens is not None:
        budget = fold_max_tokens
        for i, turn in enumerate(turns[:fold]):
            budget -= estimate_tokens(len(turn.text))
            if budget < 0:
                fold = max(i, 1)
                break
    answered = {rid for turn in turns for rid in turn.tool_results}
    for i, turn in enumerate(turns[:fold]):
        if turn.tool_calls - answered:  # a pending call: fold nothing from here on
            fold = i
            break
    while fold > 0 and _splits_a_call(turns, fold):
        fold -= 1
    return Cut(fold) if fold > 0 else None


def _splits_a_call(turns: Sequence[Turn], fold: int) -> bool:
    folded, kept = turns[:fold], turns[fold:]
    folded_calls = {cid for t in folded for cid in t.tool_calls}
    folded_results = {rid for t in folded for rid in t.tool_results}
    kept_calls = {cid for t in kept for cid in t.tool_calls}
    kept_results = {rid for t in kept for rid in t.tool_results}
    return bool(kept_results & folded_calls or folded_results & kept_calls)


def classify(
    *,
    ttl_ms: int,
    idle_s: int | None,
    size_bytes: int | None,
    idle_after_s: float,
    expiry_margin_s: float,
    max_hot_tokens: int,
) -> Trigger | None:
    """Why a session deserves consolidation now, most urgent first; None when it does not."""
    if 0 <= ttl_ms < expiry_margin_s * 1000:
        return Trigger.EXPIRING
    if size_bytes is not None and estimate_tokens(size_bytes) > max_hot_tokens:
        return Trigger.OVERSIZE
    if idle_s is not None and idle_s >= idle_after_s:
        return Trigger.IDLE
    return None
