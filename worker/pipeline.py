"""Consolidating one session: claim, read, align, archive, summarize, rewrite, release.

The order is the product's promise (DESIGN 5): nothing in Redis changes before the archive
commit is durable, the model is called while nothing is locked, and the rewrite is a
compare-and-swap that leaves whatever the agent appended meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.archive import writer
from worker.archive.groupcommit import ArchiveRequest, GroupCommit, SummaryRequest
from worker.archive.writer import ArchivedFrom
from worker.config import OnSummaryFailure, Settings
from worker.domain import Outcome, SessionRef, SummaryFailure, SummaryText, Turn
from worker.hot.leases import Lease, claim, still_held
from worker.hot.scripts import Scripts, Swap
from worker.hot.store import BadKey, HotStore
from worker.layouts.base import DecodeError, Layout, decode_turns
from worker.metrics import Metrics
from worker.policy import align, choose_cut, estimate_tokens, reads_backwards
from worker.summarizers.base import Summarizer, SummarizerUnavailable, SummaryRejected

log = structlog.get_logger(__name__)
_WORRYING = frozenset({"failed", "quarantined", "abandoned"})
_MARKER = re.compile(r"^\d+ earlier turns archived\.$")
NO_HOT_STATE = "no hot state"  # the reason given when a session's key is gone or empty
SUMMARY_FAILED = "summary failed; hot state left as it was"  # archived, not slimmed


@dataclass(frozen=True, slots=True)
class Options:
    summarize: bool = True
    evict: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Pipeline:
    """Everything one session's consolidation uses; opened once by the runtime."""

    settings: Settings
    redis: Redis
    scripts: Scripts
    store: HotStore
    layout: Layout
    engine: AsyncEngine
    summarizer: Summarizer
    metrics: Metrics

    @cached_property
    def archive(self) -> GroupCommit:
        """Archive reads and writes, batched with every other session in flight (group commit)."""
        return GroupCommit(self.engine, observer=self.metrics)

    async def consolidate(self, ref: SessionRef, options: Options = Options()) -> Outcome:
        started = time.perf_counter()
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        with structlog.contextvars.bound_contextvars(session_id=ref.session_id):
            try:
                async with claim(self.redis, self.scripts, ref.key, ttl_ms) as lease:
                    if lease is None:
                        outcome = Outcome(ref.session_id, "skipped", reason="leased elsewhere")
                    else:
                        outcome = await self._consolidate(ref, lease, options)
            except asyncio.CancelledError:
                # Stopped past the drain grace: the archive-first order loses nothing, and the
                # session still gets its line.
                gone = Outcome(ref.session_id, "abandoned", reason="stopped before it finished")
                self.report(gone, started)
                raise
            return self.report(outcome, started)

    def report(self, outcome: Outcome, started: float, **extra: object) -> Outcome:
        """The session's one canonical log line and its metrics, whatever came of it."""
        outcome = replace(outcome, duration_ms=round((time.perf_counter() - started) * 1000, 2))
        self.metrics.observe(outcome)
        level = log.warning if outcome.status in _WORRYING else log.info
        level("session_consolidated", **_fields(outcome), **extra)
        return outcome

    async def _consolidate(self, ref: SessionRef, lease: Lease, options: Options) -> Outcome:
        try:
            stored = await self.store.read(ref)
        except BadKey as bad:
            return await self._quarantine(ref, bad.reason, bad.detail, options, save=bad.small)
        if stored is None or not stored.snapshot.elements:
            return Outcome(ref.session_id, "unchanged", reason=NO_HOT_STATE)
        snap = stored.snapshot
        try:
            hot_turns = [_storable(t) for t in decode_turns(self.layout, snap.elements)]
        except DecodeError as bad:
            return await self._quarantine(ref, "undecodable", str(bad), options)
        size_before = sum(len(e) for e in snap.elements)

        shas = [t.sha for t in hot_turns]
        state = await self.archive.read_state(ref.session_id, hot_turns[0].raw, len(shas))
        if clash := await self._other_owner(ref, state.origin):
            return await self._quarantine(ref, "id_collision", clash, options)
        if reads_backwards(shas, state.tail):
            kept = "newest first (LPUSH)" if self.layout.newest_first else "oldest first (RPUSH)"
            detail = (
                f"read {kept} as configured, the list holds its archived turns in reverse: "
                "check CONSOLIDATOR_NEWEST_FIRST against the agents' library; left as it is"
            )
            return await self._quarantine(ref, "list_order", detail, options)
        # The snapshot and the archive state must describe the same session: a worker that
        # stalled past its lease (a pause, a starved CPU) may hold a snapshot read before another
        # worker archived and folded the session, and would take its stale turns for new ones.
        # A lease held without a break until now rules that out; an archive by anyone after
        # this point is refused by the archive's own turn_count guard.
        if not await still_held(self.redis, lease):
            return Outcome(ref.session_id, "conflict", reason="lease lost before archiving")
        alignment = align(shas, state.turn_count, state.head, state.tail)
        verbatim = hot_turns[alignment.summary_len :]
        new_turns = verbatim[alignment.archived :]
        if options.dry_run:
            cut = self._cut(verbatim)
            return Outcome(
                ref.session_id,
                "dry-run",
                turns_archived=len(new_turns),
                turns_folded=cut,
                turns_kept=len(verbatim) - cut,
                gap=alignment.gap_reason is not None,
                bytes_before=size_before,
            )

        written = await self.archive.archive(
            ArchiveRequest(
                ref,
                layout=self.layout.name,
                newest_first=self.layout.newest_first,
                expected_count=state.turn_count,
                new_turns=new_turns,
                gap_reason=alignment.gap_reason,
                metadata=_storable_json(snap.metadata),
            )
        )
        if not written:
            return Outcome(ref.session_id, "conflict", reason="archive moved on meanwhile")
        self.metrics.turns_archived.inc(len(new_turns))
        if snap.ttl_ms >= 0:
            self.metrics.expiry_left.observe(snap.ttl_ms / 1000)
        archived = Outcome(
            ref.session_id,
            "archived",
            turns_archived=len(new_turns),
            turns_kept=len(verbatim),
            gap=alignment.gap_reason is not None,
            bytes_before=size_before,
            bytes_after=size_before,
            hot_memory=stored.memory,
        )

        if options.evict:
            swap = await self.store.evict(stored, lease)
            if swap is Swap.DONE:
                return replace(archived, status="evicted", turns_kept=0, bytes_after=0)
            self.metrics.cas_conflicts.inc()
            return replace(archived, status="conflict", reason=f"evict: {swap.name.lower()}")
        cut = self._cut(verbatim)
        if not options.summarize or cut == 0:
            # A session already lean and with nothing new is not "archived" once more on
            # every restart: counts and alerts would climb for work that was not done.
            return archived if new_turns else replace(archived, status="unchanged")

        # Seqs of the verbatim turns: after a gap the new ones continue the archive's count.
        first_seq = alignment.first_seq
        through_seq = first_seq + cut - 1
        folded = verbatim[:cut]
        summary = await self._summarize(state.previous_summary, folded, through_seq + 1)
        if summary is None:
            return replace(archived, reason=SUMMARY_FAILED)
        prefix_len = alignment.summary_len + cut
        elements = self.layout.summary_elements(
            summary.text,
            through_seq + 1,
            datetime.now(UTC),
            folded=hot_turns[:prefix_len],
            kept=hot_turns[prefix_len:],
        )
        summary_id = await self.archive.record_summary(
            SummaryRequest(
                ref.session_id,
                from_seq=first_seq,  # the turns it folds; earlier ones through the previous
                through_seq=through_seq,
                summary=summary,
                elements=elements,
            )
        )
        result = await self.store.replace_prefix(stored, lease, prefix_len, elements)
        if result.swap is not Swap.DONE:
            self.metrics.cas_conflicts.inc()
            reason = f"rewrite: {result.swap.name.lower()}"
            return replace(archived, status="conflict", reason=reason)
        await self.archive.mark_applied(ref.session_id, summary_id)
        size_after = sum(len(e) for e in elements) + sum(len(t.raw) for t in verbatim[cut:])
        return replace(
            archived,
            status="consolidated",
            turns_folded=cut,
            turns_kept=len(verbatim) - cut,
            bytes_after=size_after,
            summarizer=summary.summarizer,
            hot_memory=result.memory_after,
        )

    def _cut(self, verbatim: list[Turn]) -> int:
        cut = choose_cut(
            verbatim,
            self.settings.keep_recent,
            max_kept_tokens=self.settings.max_hot_tokens,
            fold_max_tokens=self.settings.fold_max_tokens,
        )
        return cut.fold if cut else 0

    async def _summarize(
        self, previous: str | None, folded: list[Turn], turns_covered: int
    ) -> SummaryText | None:
        started = time.perf_counter()
        try:
            summary = await self.summarizer.summarize(
                previous, folded, self.settings.summary_max_chars
            )
        except (SummarizerUnavailable, SummaryRejected) as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            alone = SummaryFailure(self.summarizer.name, exc.kind, elapsed_ms)
            for failure in exc.failures or (alone,):
                self.metrics.observe_summary_failure(failure)
            log.warning("summary_failed", error=str(exc), summarizer=self.summarizer.name)
        else:
            self.metrics.observe_summary(summary)
            return summary
        if self.settings.on_summary_failure is OnSummaryFailure.MARKER:
            # Earlier markers are superseded: the count always covers the whole conversation.
            kept = [line for line in (previous or "").splitlines() if not _MARKER.match(line)]
            text = "\n".join([*kept, f"{turns_covered} earlier turns archived."])
            return SummaryText(text=text, summarizer=OnSummaryFailure.MARKER.value)
        return None

    async def _other_owner(self, ref: SessionRef, origin: ArchivedFrom | None) -> str | None:
        """Why the archived session `ref.session_id` is another conversation, or None.

        The archive knows a session by its id alone, so two live keys with one id (two ADK users
        with the same session id, two layouts sharing a database) would be archived as one, and
        each one's summary would fold in the other's turns. A key that moved (a new key pattern,
        a new layout) is the same conversation: its old key no longer exists, and the key names
        the same app and user if it names any."""
        if origin is None or origin.redis_key == ref.key:
            return None
        same_owner = (ref.app, ref.user) in ((None, None), (origin.app_name, origin.user_id))
        if same_owner and not await self.redis.exists(origin.redis_key):
            return None  # the key moved
        return (
            f"session id {ref.session_id!r} is already archived from {origin.redis_key} "
            f"({origin.layout} layout), another conversation; this key is left as it is"
        )

    async def _quarantine(
        self, ref: SessionRef, reason: str, detail: str, options: Options, save: bool = True
    ) -> Outcome:
        if not options.dry_run:
            saved, lapsed = await self._copy(ref) if save else (None, True)
            owner = await self.store.owner(ref)
            async with self.engine.begin() as conn:
                first = await writer.quarantine_session(
                    conn, ref, reason, detail, saved, owner, lapsed
                )
            if first:  # counted once committed: a failed commit is met, and counted, again
                self.metrics.quarantined.labels(reason=reason).inc()
        return Outcome(ref.session_id, "quarantined", reason=f"{reason}: {detail[:300]}")

    async def _copy(self, ref: SessionRef) -> tuple[bytes | None, bool]:
        """The key's value as DUMP serializes it (any type, byte for byte), for its quarantine
        record: a quarantined session is not archived, and without a copy its key's expiry
        would take every turn with it, the good ones too. Then whether the key as it is could
        not be copied (it grew past the size limit since it was read, or Redis refuses DUMP,
        an ACL without it): the record is made all the same, and marks an earlier copy as
        older than the key. A key gone meanwhile leaves an earlier copy as it was."""
        try:
            saved = await self.redis.dump(ref.key)
        except ResponseError as exc:
            log.warning("quarantine_copy_refused", key=ref.key, detail=f"DUMP refused: {exc}")
            return None, True
        if not isinstance(saved, bytes):
            return None, False
        if len(saved) > self.settings.max_value_bytes:
            return None, True
        return saved, False


def _storable(turn: Turn) -> Turn:
    """PostgreSQL text cannot hold NUL: the searchable text and the role get U+FFFD for it,
    while `raw` (bytea) keeps the exact bytes. Without this, such a turn would fail forever."""
    if "\x00" not in turn.text and "\x00" not in turn.role:
        return turn
    return replace(
        turn, text=turn.text.replace("\x00", "\ufffd"), role=turn.role.replace("\x00", "\ufffd")
    )


def _storable_json(value: Any) -> Any:
    """Metadata for a jsonb column, which refuses NUL in strings and keys alike."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, Mapping):
        return {_storable_json(k): _storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(v) for v in value]
    return value


def _fields(outcome: Outcome) -> dict[str, object]:
    fields = {k: v for k, v in asdict(outcome).items() if v not in (None, False)}
    if outcome.bytes_before:
        fields["tokens_saved"] = estimate_tokens(outcome.bytes_before - outcome.bytes_after)
    return fields
