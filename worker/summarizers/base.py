"""The summarizer seam and the checks every summary passes before it replaces turns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from worker.domain import SummaryFailure, SummaryText, Turn


class SummaryFailed(Exception):
    """A summary that did not come: the base of the two ways it fails."""

    kind = "unavailable"  # the label of consolidator_summary_failures_total
    # Every failed attempt of this call, each timed, when the summarizer tried more than one
    # (FallbackSummarizer: the model's, then the fallback's); empty when this one is all.
    failures: tuple[SummaryFailure, ...] = ()


class SummaryRejected(SummaryFailed):
    """The summarizer answered, but the answer must not replace the turns (empty, refusal...)."""

    kind = "rejected"


class SummarizerUnavailable(SummaryFailed):
    """The summarizer could not answer now (model down, circuit open, timeout).

    `kind`, one of a few words (timeout, rate_limited, server_error, client_error,
    unreachable, circuit_open, unavailable), labels the failure in the metrics: an operator
    must tell a quota from an outage without reading the logs."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class Summarizer(Protocol):
    name: str

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        """Fold `turns` (oldest first) into `previous`; the result is at most `max_chars`."""
        ...

    async def aclose(self) -> None: ...


_NONE_LIKE = re.compile(
    r"^\W*(none|n/?a|null|nothing( to summari[sz]e)?|no summary|empty)\W*$", re.IGNORECASE
)
_REFUSAL = re.compile(
    r"^\W*(i('m| am) (sorry|unable)|i can(no|')t|as an ai|sorry, i)", re.IGNORECASE
)


def input_chars(previous: str | None, turns: Sequence[Turn]) -> int:
    return len(previous or "") + sum(len(t.text) for t in turns)


def check_summary(text: str, previous: str | None, turns: Sequence[Turn]) -> str:
    """Return the cleaned summary, or raise SummaryRejected saying why."""
    cleaned = text.strip()
    if not cleaned:
        raise SummaryRejected("empty")
    if _NONE_LIKE.match(cleaned):
        raise SummaryRejected("none-like")
    if _REFUSAL.match(cleaned):
        raise SummaryRejected("refusal")
    # A fold of blank turns may say so in a few words rather than fail for ever.
    if len(cleaned) > max(input_chars(previous, turns), 16):
        raise SummaryRejected("longer than its input")
    return cleaned


def transcript(turns: Sequence[Turn]) -> str:
    """Turns as `role: text` lines, the input a model summarizes."""
    return "\n".join(f"{t.role}: {t.text}" for t in turns)


def transcript_chars(previous: str | None, turns: Sequence[Turn]) -> int:
    """The length of the previous summary and `transcript(turns)` on lines of their own, what
    a model would read, counted without building the text."""
    chars = sum(len(t.role) + 2 + len(t.text) for t in turns) + max(len(turns) - 1, 0)
    if previous:
        chars += len(previous) + bool(turns)
    return chars
