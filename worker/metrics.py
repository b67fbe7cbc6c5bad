"""Prometheus metrics. One registry per process, made by the runtime (tests make their own).

Everything an operator of the fleet asks of a sidecar: how much it scans and how long a full scan
takes, what happened to each session (consolidated, skipped, quarantined, failed...), turns
archived, bytes and tokens taken out of the hot tier, the model's latency, tokens and errors,
compare-and-swap conflicts with the agents, how close to expiry sessions were when they were
archived, and how well the archive's group commit is batching.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.domain import Outcome, SummaryFailure, SummaryText
from worker.policy import estimate_tokens

# Seconds: a local summarizer answers in milliseconds, a model in about a second, a slow one in
# tens of seconds (its timeout).
_MODEL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# Failures refused before any call (the circuit breaker open): counted, but not timed.
_NO_CALL_MADE = frozenset({"circuit_open"})
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions_scanned = Counter(
            "consolidator_sessions_scanned", "Session keys seen by the scanner", registry=r
        )
        self.scan_seconds = Histogram(
            "consolidator_scan_seconds",
            "Time of one full scan of the keyspace for work (SCAN and probes)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.sessions_due = Gauge(
            "consolidator_sessions_due",
            "Sessions the last scan found due (idle, expiring or oversize): the daemon's backlog",
            registry=r,
        )
        self.passes_cut_short = Counter(
            "consolidator_passes_cut_short",
            "Passes ended with sessions still due, at half the expiry margin, for a fresh scan",
            registry=r,
        )
        self.sessions = Counter(
            "consolidator_sessions",
            "Sessions handled, by outcome (consolidated, archived, unchanged, skipped, "
            "conflict, quarantined, evicted, failed)",
            ["status"],
            registry=r,
        )
        self.turns_archived = Counter(
            "consolidator_turns_archived", "Turns written to the archive", registry=r
        )
        self.bytes_saved = Counter(
            "consolidator_hot_bytes_saved", "Bytes removed from the hot tier", registry=r
        )
        self.tokens_saved = Counter(
            "consolidator_hot_tokens_saved",
            "Estimated tokens removed from the hot tier (what the agents no longer re-send)",
            registry=r,
        )
        self.quarantined = Counter(
            "consolidator_sessions_quarantined",
            "Keys newly put in quarantine (one already there is not counted again)",
            ["reason"],
            registry=r,
        )
        self.cas_conflicts = Counter(
            "consolidator_cas_conflicts",
            "Rewrites abandoned because the agent changed the hot state meanwhile",
            registry=r,
        )
        self.summaries = Counter(
            "consolidator_summaries",
            "Summaries written, by the summarizer that wrote them",
            ["summarizer"],
            registry=r,
        )
        self.model_latency = Histogram(
            "consolidator_model_latency_seconds",
            "Time the summarizer took for one summary, retries included, by whether it gave one",
            ["summarizer", "outcome"],
            buckets=_MODEL_BUCKETS,
            registry=r,
        )
        self.model_tokens = Counter(
            "consolidator_model_tokens",
            "Tokens the model read (in) and wrote (out), as it reported them",
            ["direction"],
            registry=r,
        )
        self.model_cost = Counter(
            "consolidator_model_cost_usd", "Estimated cost of the model's summaries", registry=r
        )
        self.summary_failures = Counter(
            "consolidator_summary_failures",
            "Summary attempts that failed (model unavailable, errors) or were rejected; with a "
            "fallback, the model's and the fallback's each count",
            ["kind"],
            registry=r,
        )
        self.session_seconds = Histogram(
            "consolidator_session_seconds", "Time to consolidate one session", registry=r
        )
        self.expiry_left = Histogram(
            "consolidator_expiry_left_at_flush_seconds",
            "Seconds before the key would have expired, when its turns were archived",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86400),
            registry=r,
        )
        self.batch_size = Histogram(
            "consolidator_archive_batch_size",
            "Requests carried by one archive round trip (group commit), by kind",
            ["kind"],
            buckets=_BATCH_SIZES,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "consolidator_archive_batch_seconds",
            "Time of one batched archive read or write transaction, by kind",
            ["kind"],
            registry=r,
        )
        self.batch_fallbacks = Counter(
            "consolidator_archive_batch_fallbacks",
            "Batches that failed and were retried one session at a time",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "consolidator_sessions_in_flight", "Sessions being consolidated now", registry=r
        )
        self.ready = Gauge("consolidator_ready", "1 when Redis and PostgreSQL answer", registry=r)
        self.pace = Gauge(
            "consolidator_pace_sessions_per_second",
            "Sessions not about to expire that the daemon may start a second, the lower of "
            "CONSOLIDATOR_MAX_SESSIONS_PER_S and the CPU pressure's limit (+Inf: no limit)",
            registry=r,
        )
        self.cpu_pressure = Gauge(
            "consolidator_cpu_pressure",
            "Share of the last interval in which some task waited for a CPU (PSI), read when "
            "CONSOLIDATOR_MAX_CPU_PRESSURE is set",
            registry=r,
        )

    def observe(self, outcome: Outcome) -> None:
        self.sessions.labels(status=outcome.status).inc()
        self.session_seconds.observe(outcome.duration_ms / 1000)
        saved = max(outcome.bytes_before - outcome.bytes_after, 0)
        if saved:
            self.bytes_saved.inc(saved)
            self.tokens_saved.inc(estimate_tokens(saved))

    def observe_summary(self, summary: SummaryText) -> None:
        """The summarizer's answer: who wrote it, how long it took, what it cost."""
        if summary.stands_in_for is not None:
            self.observe_summary_failure(summary.stands_in_for)
        self.summaries.labels(summarizer=summary.summarizer).inc()
        self.model_latency.labels(summarizer=summary.summarizer, outcome="ok").observe(
            summary.latency_ms / 1000
        )
        if summary.tokens_in:
            self.model_tokens.labels(direction="in").inc(summary.tokens_in)
        if summary.tokens_out:
            self.model_tokens.labels(direction="out").inc(summary.tokens_out)
        if summary.cost_usd:
            self.model_cost.inc(summary.cost_usd)

    def observe_summary_failure(self, failure: SummaryFailure) -> None:
        """A summary that failed or was rejected: why, and how long it took to fail (a timeout
        and a refused key look alike in a count, not in a latency)."""
        self.summary_failures.labels(kind=failure.kind).inc()
        if failure.kind in _NO_CALL_MADE:
            return  # its near-zero time would read as a fast model
        self.model_latency.labels(summarizer=failure.summarizer, outcome="failed").observe(
            failure.latency_ms / 1000
        )

    def batch(self, kind: str, size: int, seconds: float, fell_back: bool) -> None:
        """One group-commit round trip to the archive (worker.archive.groupcommit)."""
        self.batch_size.labels(kind=kind).observe(size)
        self.batch_seconds.labels(kind=kind).observe(seconds)
        if fell_back:
            self.batch_fallbacks.labels(kind=kind).inc()
