"""The loop: scan, pick sessions by trigger (most urgent first), consolidate with bounded
concurrency, repeat. `run_once` is one pass (what tests and `run --once` drive)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from worker.archive.retention import prune
from worker.cancel import cancel_and_wait
from worker.domain import Candidate, Outcome, SessionRef, Trigger
from worker.hot.keys import KeyPattern
from worker.hot.leases import release_leftovers
from worker.hot.scanner import Probe, scan_and_probe
from worker.pacing import CpuPressure, Pace, follow_cpu_pressure, show_pace
from worker.pipeline import Options, Pipeline
from worker.policy import classify

log = structlog.get_logger(__name__)

_PRIORITY = {Trigger.EXPIRING: 0, Trigger.OVERSIZE: 1, Trigger.IDLE: 2, Trigger.MANUAL: 3}
_TRANSIENT = (RedisError, OSError, OperationalError, DBAPIError)
# A retry is one PING and one SELECT 1, nothing a recovering server would notice; waiting longer
# only delays the daemon's return once the server is back (up to a minute before).
_BACKOFF_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class _Visit:
    done_at: float  # wall clock when the consolidator last read or wrote the key
    expires_at: float | None  # None: no TTL
    memory: int | None


@dataclass
class VisitCache:
    """Sessions not written to since they were handled, so idle ones are not read again.

    Nothing here may make the daemon miss a write, so a session counts as unchanged only when
    every signal agrees: nobody has accessed the key since (its idle time covers the time since
    we handled it, minus the second of resolution Redis keeps), its expiry has not been pushed
    back (agents refresh the TTL as they write), and its memory is what it was after our write.
    Sessions near expiry are always read again, whatever this says. Bounded, so the daemon's
    memory does not grow with the keyspace.

    One write can still go unseen: in the same second as the consolidator's own last access
    (idle time cannot tell them apart), without a TTL refresh, and too small to move the memory
    figure (it is rounded to the allocator's size classes). Redis offers no exact signal that
    is not itself an access, so a visit is trusted for `max_age_s` at most: such a write waits
    for the next read after that, or the expiry margin, whichever comes first.
    """

    capacity: int = 200_000
    max_age_s: float = 3600.0
    _seen: OrderedDict[str, _Visit] = field(default_factory=OrderedDict)

    def remember(self, p: Probe, memory: int | None) -> None:
        self._seen[p.ref.key] = _Visit(time.time(), p.expires_at, memory)
        self._seen.move_to_end(p.ref.key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def unchanged(self, p: Probe) -> bool:
        seen = self._seen.get(p.ref.key)
        if seen is None or p.idle_s is None or seen.memory is None:
            return False
        now = time.time()
        if now - seen.done_at > self.max_age_s:
            return False
        if p.idle_s < now - seen.done_at - 2.0:
            return False
        expires_at = p.expires_at
        if (expires_at is None) != (seen.expires_at is None):
            return False
        # The tolerance only absorbs when each probe's reply arrived (a few ms): an agent that
        # writes again soon after a fast pass pushes its expiry back by more than that, and its
        # write must not be missed (idle time has a 1 s resolution and memory is rounded).
        pushed_back = (expires_at or 0.0) > (seen.expires_at or 0.0) + 0.01
        if pushed_back:
            return False
        return p.size_bytes == seen.memory

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class Daemon:
    def __init__(self, pipeline: Pipeline, pattern: KeyPattern) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.pattern = pattern
        self.visits = VisitCache()
        self.metrics = pipeline.metrics
        self._pruned_at: float | None = None  # monotonic time of the last retention run
        self._pruning: asyncio.Task[None] | None = None
        self._halt: asyncio.Event | None = None  # set to end the current pass early
        self._outage: BaseException | None = None  # why it ended early
        self._pace = Pace(self.settings.max_sessions_per_s)
        self._pressure = CpuPressure(self.settings.cpu_pressure_file)
        show_pace(self._pace, self.metrics)
        self.cut_short = False  # the last pass ended at its time limit (see run_once)

    async def find_work(self) -> list[tuple[Candidate, Probe]]:
        """One full scan: the sessions that need consolidating, most urgent first."""
        s = self.settings
        found: list[tuple[Candidate, Probe]] = []
        started = time.perf_counter()
        redis = self.pipeline.redis
        async for probes in scan_and_probe(redis, self.pattern, s.scan_count, s.metadata_pattern):
            self.metrics.sessions_scanned.inc(len(probes))
            for p in probes:
                trigger = classify(
                    ttl_ms=p.ttl_ms,
                    idle_s=p.idle_s,
                    size_bytes=p.size_bytes,
                    idle_after_s=s.idle_after_s,
                    expiry_margin_s=s.expiry_margin_s,
                    max_hot_tokens=s.max_hot_tokens,
                )
                if trigger is None:
                    continue
                if trigger is not Trigger.EXPIRING and self.visits.unchanged(p):
                    continue
                found.append((Candidate(p.ref, trigger, p.ttl_ms, p.idle_s), p))
        self.metrics.scan_seconds.observe(time.perf_counter() - started)
        self.metrics.sessions_due.set(len(found))
        found.sort(key=lambda cp: (_PRIORITY[cp[0].trigger], _ttl_order(cp[0].ttl_ms)))
        return found

    async def run_once(
        self,
        stop: asyncio.Event | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        # A session's TTL was read by this scan. While the pass goes on, a session waiting for
        # its turn (a backlog, a slow model, a pace) keeps counting down, and one that was not
        # yet in the expiry margin could run out before its turn. So past half the margin the
        # pass takes no more sessions but expiring ones, and a fresh scan follows at once: it
        # sees the TTLs as they are and puts any session near expiry first.
        margin = self.settings.expiry_margin_s
        until = time.monotonic() + margin / 2 if margin > 0 else None
        work = await self.find_work()
        log.info("scan_done", candidates=len(work))
        items = ((c.ref, p, c) for c, p in work)
        done = await self.process(
            items, stop=stop, options=Options(), on_outcome=on_outcome, until=until
        )
        outcomes = [outcome for _, outcome in done]
        # Each session taken gives one outcome: any left over, without a stop, were left by the
        # time limit.
        left = len(work) - len(outcomes)
        self.cut_short = left > 0 and not (stop is not None and stop.is_set())
        if self.cut_short:
            self.metrics.passes_cut_short.inc()
            log.info("pass_cut_short", sessions_left=left, rescan=True)
        return outcomes

    async def process(
        self,
        items: Iterable[tuple[SessionRef, Probe | None, Candidate | None]],
        *,
        stop: asyncio.Event | None = None,
        options: Options,
        on_outcome: Callable[[Outcome], None] | None = None,
        until: float | None = None,
    ) -> list[tuple[SessionRef, Outcome]]:
        """Consolidate sessions with at most `concurrency` at once; stop taking new ones on
        stop, and, from `until` (monotonic time) on, any but those about to expire. Each
        session taken comes back with its outcome, in the order they finished: by key, since
        one id may be held by two keys (two users of one app, say)."""
        queue = iter(items)
        outcomes: list[tuple[SessionRef, Outcome]] = []

        async def work() -> None:
            for ref, p, cand in queue:
                if stop is not None and stop.is_set():
                    return
                urgent = cand is not None and cand.trigger is Trigger.EXPIRING
                if not urgent and not await self._may_start(stop, until):
                    return
                outcome = await self._one(ref, p, cand, options)
                outcomes.append((ref, outcome))
                if on_outcome is not None:
                    on_outcome(outcome)

        following = self._follow_pressure()
        try:
            async with asyncio.TaskGroup() as group:
                for i in range(self.settings.concurrency):
                    group.create_task(work(), name=f"consolidate-{i}")
        finally:
            if following is not None:
                await cancel_and_wait(following)
        return outcomes

    def _follow_pressure(self) -> asyncio.Task[None] | None:
        """With CONSOLIDATOR_MAX_CPU_PRESSURE, the task that adapts the pace while sessions
        are being taken; the limit it reached carries over to the next pass."""
        limit = self.settings.max_cpu_pressure
        if limit is None:
            return None
        follow = follow_cpu_pressure(self._pace, self._pressure, limit / 100, self.metrics)
        return asyncio.create_task(follow, name="follow-cpu-pressure")

    async def _may_start(self, stop: asyncio.Event | None, until: float | None) -> bool:
        """Whether a session that is not about to expire may start now, after waiting for
        the pace if there is one; False on stop or once `until` has passed."""
        allowed = await _paced(self._pace, stop, until)
        stopped = stop is not None and stop.is_set()
        late = until is not None and time.monotonic() >= until
        return allowed and not stopped and not late

    async def _one(
        self, ref: SessionRef, p: Probe | None, cand: Candidate | None, options: Options
    ) -> Outcome:
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            outcome = await self.pipeline.consolidate(ref, options)
        except _TRANSIENT as exc:
            # Redis or PostgreSQL went away mid-session: nothing was rewritten without a durable
            # archive, so the session is simply tried again on a later pass.
            failed = Outcome(ref.session_id, "failed", reason=type(exc).__name__)
            outcome = self.pipeline.report(failed, started, error=repr(exc)[:300])
            await self._note_outage(exc)
        except Exception as exc:
            # A bug must not take the other sessions down with it; it is logged with its trace.
            log.exception("session_crashed", session_id=ref.session_id)
            failed = Outcome(ref.session_id, "failed", reason=repr(exc)[:300])
            outcome = self.pipeline.report(failed, started)
        finally:
            self.metrics.in_flight.dec()
        if p is not None and outcome.status not in ("failed", "conflict", "skipped"):
            # A quarantined or empty key is not read (nor reported) again until it changes.
            unread = outcome.status in ("quarantined", "unchanged")
            memory = p.size_bytes if unread else outcome.hot_memory
            self.visits.remember(p, memory)
        return outcome

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Passes until `stop` is set; a failing pass is logged and retried with backoff."""
        backoff = 1.0
        while not stop.is_set():
            try:
                await self._check_tiers()
                self.metrics.ready.set(1)
                await self._pass(stop)
                self._maybe_prune()
                backoff = 1.0
                delay = 0.0 if self.cut_short else self.settings.scan_interval_s
            except _TRANSIENT as exc:
                self.metrics.ready.set(0)
                log.warning("pass_failed", error=repr(exc)[:300], retry_in_s=backoff)
                delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        await self._stop_pruning()

    async def _check_tiers(self) -> None:
        """Return when Redis and PostgreSQL both answer; raise the transient error otherwise."""
        async with asyncio.timeout(10):
            await self.pipeline.redis.ping()
            await release_leftovers(self.pipeline.scripts)
            async with self.pipeline.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

    async def _pass(self, stop: asyncio.Event) -> None:
        """One pass, cut short when a tier goes away in the middle of it: every session left
        would fail the same way, so the daemon backs off instead of trying each of them."""
        halt = asyncio.Event()
        relay = asyncio.create_task(stop.wait())
        relay.add_done_callback(lambda _: halt.set())
        self._halt, self._outage = halt, None
        try:
            await self.run_once(halt)
        finally:
            relay.cancel()
            self._halt = None
        if self._outage is not None:
            raise self._outage

    async def _note_outage(self, exc: BaseException) -> None:
        """After a session failed on a transient error: if a tier is away, end the pass.
        A session that fails on its own (the tiers answer) does not stop the others."""
        if self._halt is None or self._halt.is_set():
            return
        try:
            await self._check_tiers()
        except _TRANSIENT:
            self._outage = exc
            self._halt.set()

    def _maybe_prune(self) -> None:
        """Archive retention (CONSOLIDATOR_RETENTION), at most once an hour, beside the passes:
        a long prune must never hold back sessions that are about to expire."""
        retention = self.settings.retention
        now = time.monotonic()
        if retention is None or (self._pruned_at is not None and now - self._pruned_at < 3600):
            return
        if self._pruning is not None and not self._pruning.done():
            return
        self._pruned_at = now
        self._pruning = asyncio.create_task(self._prune(retention), name="prune")

    async def _prune(self, retention: timedelta) -> None:
        try:
            await prune(self.pipeline.engine, retention)
        except _TRANSIENT as exc:
            log.warning("prune_failed", error=repr(exc)[:300])

    async def _stop_pruning(self) -> None:
        # Each prune batch is its own transaction: stopping in the middle loses nothing.
        if self._pruning is not None and not self._pruning.done():
            await cancel_and_wait(self._pruning)


async def _paced(pace: Pace, stop: asyncio.Event | None, until: float | None) -> bool:
    """Wait for the pace to allow one more session; False if `stop` or the time `until`
    (monotonic) came first (the caller tells which), so a slow pace never holds up a shutdown
    or a fresh scan."""
    if pace.start_now():
        return True
    if stop is None and until is None:
        await pace.wait()
        return True
    allowed = asyncio.ensure_future(pace.wait())
    waits: set[asyncio.Future[Any]] = {allowed}
    if stop is not None:
        waits.add(asyncio.ensure_future(stop.wait()))
    timeout = None if until is None else max(until - time.monotonic(), 0.0)
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return allowed.done() and not allowed.cancelled()


def _ttl_order(ttl_ms: int) -> int:
    return ttl_ms if ttl_ms >= 0 else 2**62
