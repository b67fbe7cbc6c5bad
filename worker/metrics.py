"""Prometheus metrics. One registry per process, made by the runtime (tests make their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.domain import Outcome


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions_scanned = Counter(
            "consolidator_sessions_scanned", "Session keys seen by the scanner", registry=r
        )
        self.sessions = Counter(
            "consolidator_sessions", "Sessions handled, by outcome", ["status"], registry=r
        )
        self.turns_archived = Counter(
            "consolidator_turns_archived", "Turns written to the archive", registry=r
        )
        self.bytes_saved = Counter(
            "consolidator_hot_bytes_saved", "Bytes removed from the hot tier", registry=r
        )
        self.tokens_saved = Counter(
            "consolidator_hot_tokens_saved",
            "Estimated tokens removed from the hot tier",
            registry=r,
        )
        self.quarantined = Counter(
            "consolidator_sessions_quarantined", "Sessions quarantined", ["reason"], registry=r
        )
        self.cas_conflicts = Counter(
            "consolidator_cas_conflicts",
            "Rewrites abandoned because the agent changed the prefix",
            registry=r,
        )
        self.summary_failures = Counter(
            "consolidator_summary_failures",
            "Summaries that failed or were rejected",
            ["kind"],
            registry=r,
        )
        self.session_seconds = Histogram(
            "consolidator_session_seconds", "Time to consolidate one session", registry=r
        )
        self.expiry_left = Histogram(
            "consolidator_seconds_left_at_flush",
            "Seconds before the key would have expired, when it was consolidated",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86400),
            registry=r,
        )
        self.in_flight = Gauge(
            "consolidator_sessions_in_flight", "Sessions being consolidated now", registry=r
        )
        self.ready = Gauge("consolidator_ready", "1 when Redis and PostgreSQL answer", registry=r)

    def observe(self, outcome: Outcome) -> None:
        self.sessions.labels(status=outcome.status).inc()
        self.session_seconds.observe(outcome.duration_ms / 1000)
        saved = max(outcome.bytes_before - outcome.bytes_after, 0)
        if saved:
            self.tokens_saved.inc(saved // 4)
