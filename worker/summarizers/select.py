"""Which summarizer runs: chosen from settings, optionally backed by the extractive one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import structlog

from worker.config import Settings, SummarizerName
from worker.domain import SummaryFailure, SummaryText, Turn
from worker.summarizers.base import Summarizer, SummarizerUnavailable, SummaryRejected
from worker.summarizers.extractive import ExtractiveSummarizer
from worker.summarizers.vertex import vertex_requested

log = structlog.get_logger(__name__)


class SummarizerConfigError(ValueError):
    """The configured summarizer cannot be built (e.g. gemini chosen but no credentials)."""


class FallbackSummarizer:
    """`primary`, and `fallback` whenever the primary is unavailable or its summary rejected.

    The returned SummaryText names the summarizer that actually wrote it, and carries the
    primary's failure (`stands_in_for`) for the metrics.
    """

    def __init__(self, primary: Summarizer, fallback: Summarizer) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        started = time.perf_counter()
        try:
            return await self.primary.summarize(previous, turns, max_chars)
        except (SummarizerUnavailable, SummaryRejected) as exc:
            failure = SummaryFailure(self.primary.name, exc.kind, _ms_since(started))
            log.warning(
                "summary_fallback",
                primary=self.primary.name,
                fallback=self.fallback.name,
                reason=str(exc),
                rejected=isinstance(exc, SummaryRejected),
            )
        started = time.perf_counter()
        try:
            summary = await self.fallback.summarize(previous, turns, max_chars)
        except (SummarizerUnavailable, SummaryRejected) as exc:
            exc.failures = (
                failure,
                SummaryFailure(self.fallback.name, exc.kind, _ms_since(started)),
            )
            raise
        return replace(summary, stands_in_for=failure)

    async def aclose(self) -> None:
        try:
            await self.primary.aclose()
        finally:
            await self.fallback.aclose()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def choose(settings: Settings) -> tuple[SummarizerName, str]:
    """The summarizer `settings` ask for, and why (for the log)."""
    if settings.summarizer is not SummarizerName.AUTO:
        return settings.summarizer, "configured"
    if vertex_requested():
        return SummarizerName.GEMINI, "auto: Vertex AI enabled"
    if settings.model_api_key:
        return SummarizerName.GEMINI, "auto: API key set"
    return SummarizerName.EXTRACTIVE, "auto: no API key"


def build_summarizer(settings: Settings) -> Summarizer:
    which, reason = choose(settings)
    primary: Summarizer
    if which is SummarizerName.GEMINI:
        # Imported here: google-genai takes over a second to import, which every command
        # using the offline summarizer would otherwise pay.
        from google.auth.exceptions import GoogleAuthError

        from worker.summarizers.gemini import GeminiSummarizer

        try:
            primary = GeminiSummarizer.from_settings(settings)
        except (ValueError, GoogleAuthError) as exc:
            raise SummarizerConfigError(f"gemini summarizer: {exc}") from exc
    else:
        primary = ExtractiveSummarizer(settings.summary_processes)
    fallback = settings.summary_fallback and which is not SummarizerName.EXTRACTIVE
    log.info(
        "summarizer_selected",
        summarizer=which.value,
        reason=reason,
        model=settings.gemini_model if which is SummarizerName.GEMINI else None,
        fallback="extractive" if fallback else None,
    )
    if fallback:
        return FallbackSummarizer(primary, ExtractiveSummarizer(settings.summary_processes))
    return primary
