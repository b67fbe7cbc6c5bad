"""Group commit: the archive reads and writes of many concurrent sessions, shared.

Every session still waits until its own write is durable before it touches Redis (DESIGN 5.4);
what changes is the price. Requests queue while the previous batch is with PostgreSQL, and the
next batch takes them all: one transaction (one WAL flush) and one multi-row statement per kind
of write carry every session that asked meanwhile, turns go in with COPY, and one query reads
the archive state of every session that is aligning. Nothing waits on purpose: a lone session
is written at once, and batches grow only as fast as the database falls behind.

The semantics are the per-session writer's (worker.archive.writer): turns are idempotent by
`(session_id, seq)` and a session's `turn_count` only moves forward from the value its writer
read. If a batch fails for any reason other than a lost connection, each of its requests is
tried again alone through the per-session writer, so one bad session cannot fail the others and
each gets its own error.

The statements here are writer.read_state and writer.archive_turns for many sessions at once:
a change to one (a new column, a new guard) is a change to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
import orjson
import structlog
from sqlalchemy import insert, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.archive import writer
from worker.archive.tables import gaps, summaries
from worker.archive.writer import ArchivedFrom, ArchiveState
from worker.domain import SessionRef, SummaryText, Turn, digest
from worker.policy import HeadSummary

log = structlog.get_logger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

# The columns COPY fills; the others (archived_at, generated columns) take their defaults.
TURN_COLUMNS = ("session_id", "seq", "role", "text", "raw", "raw_sha", "created_at")


@dataclass(frozen=True, slots=True)
class ArchiveRequest:
    """Archive `new_turns` as seqs `expected_count..` (writer.archive_turns, for one session)."""

    ref: SessionRef
    layout: str
    newest_first: bool  # the list's order in Redis (restore writes it back the same way)
    expected_count: int
    new_turns: Sequence[Turn]
    gap_reason: str | None
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    session_id: str
    from_seq: int
    through_seq: int
    summary: SummaryText
    elements: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class AppliedRequest:
    session_id: str
    summary_id: int


@dataclass(frozen=True, slots=True)
class StateRequest:
    session_id: str
    head: bytes | None  # the first element of the hot state
    hot_len: int


Bookkeeping = SummaryRequest | AppliedRequest


class BatchObserver(Protocol):
    """What the batches report (worker.metrics.Metrics implements it)."""

    def batch(self, kind: str, size: int, seconds: float, fell_back: bool) -> None: ...


class _Unobserved:
    def batch(self, kind: str, size: int, seconds: float, fell_back: bool) -> None:
        pass


Batch = list[tuple[Req, "asyncio.Future[Res]"]]


class _Batcher(Generic[Req, Res]):
    """Requests wait while up to `max_in_flight` slots write; a slot's next batch takes all
    that waited. A slot keeps its connection while there is work, so a busy queue pays the
    pool's checkout (and its liveness ping) once, not once a batch."""

    def __init__(
        self,
        kind: str,
        connect: Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]],
        run: Callable[[AsyncConnection, list[Req]], Awaitable[list[Res]]],
        alone: Callable[[Req], Awaitable[Res]],
        observer: BatchObserver,
        *,
        max_batch: int,
        max_in_flight: int,
        weight: Callable[[Req], int] = lambda _: 1,
        max_weight: int | None = None,
    ) -> None:
        self._kind = kind
        self._weight = weight
        self._max_weight = max_weight
        self._connect = connect
        self._run = run
        self._alone = alone
        self._observer = observer
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._start()
        return await future

    def _start(self) -> None:
        if self._pending and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._slot(), name=f"group-commit-{self._kind}")
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._start()

    def _take(self) -> Batch[Req, Res]:
        # Up to max_batch requests, and up to max_weight (the first one whatever its weight).
        size = min(len(self._pending), self._max_batch)
        if self._max_weight is not None:
            total = 0
            for i, (request, _) in enumerate(self._pending[:size]):
                total += self._weight(request)
                if i and total > self._max_weight:
                    size = i
                    break
        taken = self._pending[:size]
        del self._pending[:size]
        batch = [(request, future) for request, future in taken if not future.done()]
        if batch and self._pending:
            self._start()  # more waiting than one batch takes: another slot may run beside
        return batch

    async def _slot(self) -> None:
        # The first batch is taken when the task first runs, one loop turn after it was
        # started: everything the other sessions asked for in that turn rides along.
        batch = self._take()
        if not batch:
            return
        try:
            async with self._connect() as conn:
                while batch and await self._flush(conn, batch):
                    batch = self._take()
        except Exception as exc:  # the connection could not be had (or given back)
            for _, future in batch:
                _fail(future, _as_dbapi(exc))

    async def _flush(self, conn: AsyncConnection, batch: Batch[Req, Res]) -> bool:
        """Write one batch; False when it failed (the connection is then given up)."""
        started = asyncio.get_running_loop().time()
        try:
            results = await self._run(conn, [request for request, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if _connection_lost(exc):
                for _, future in batch:
                    _fail(future, _as_dbapi(exc))
                return False
            log.warning(
                "group_commit_fallback", kind=self._kind, size=len(batch), error=repr(exc)[:300]
            )
            self._observer.batch(self._kind, len(batch), _since(started), True)
            for request, future in batch:
                try:
                    result = await self._alone(request)
                except Exception as alone_exc:
                    _fail(future, alone_exc)
                else:
                    if not future.done():
                        future.set_result(result)
            return False
        except BaseException as exc:
            # Not an error of the batch (SystemExit, KeyboardInterrupt, a test's crash): every
            # waiter raises it; the process-level ones go on up from here too.
            for _, future in batch:
                _fail(future, exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return False
        self._observer.batch(self._kind, len(batch), _since(started), False)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        return True


class GroupCommit:
    """The pipeline's access to the archive, shared by every session this process works on.

    Three queues, each with up to `max_in_flight` batches at once: reads; archive writes
    (the turns, heavy: COPY and the full-text index); and bookkeeping (summaries recorded
    before the rewrite, marked applied after it: light), so a session's bookkeeping never
    waits behind another session's large archive write.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        observer: BatchObserver | None = None,
        max_batch: int = 512,
        max_in_flight: int = 2,
        max_turns: int = 20_000,
    ) -> None:
        self._engine = engine
        observer = observer or _Unobserved()
        self._reads: _Batcher[StateRequest, ArchiveState] = _Batcher(
            "read",
            self._autocommit,
            self._read_batch,
            self._read_alone,
            observer,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
        )
        self._archives: _Batcher[ArchiveRequest, bool] = _Batcher(
            "archive",
            engine.connect,
            self._archive_batch,
            self._archive_alone,
            observer,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            # A transaction of at most this many turns stays well within a statement timeout.
            weight=lambda r: len(r.new_turns) + 1,
            max_weight=max_turns,
        )
        self._books: _Batcher[Bookkeeping, int | None] = _Batcher(
            "summary",
            engine.connect,
            self._books_batch,
            self._books_alone,
            observer,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
        )

    @contextlib.asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[AsyncConnection]:
        """Reads need no transaction: no BEGIN and ROLLBACK around each batch's one query."""
        async with self._engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    async def read_state(self, session_id: str, head: bytes | None, hot_len: int) -> ArchiveState:
        return await self._reads.submit(StateRequest(session_id, head, hot_len))

    async def archive(self, request: ArchiveRequest) -> bool:
        """True when the turns are archived (durably), False when another writer moved on."""
        return await self._archives.submit(request)

    async def record_summary(self, request: SummaryRequest) -> int:
        summary_id = await self._books.submit(request)
        assert summary_id is not None
        return summary_id

    async def mark_applied(self, session_id: str, summary_id: int) -> None:
        await self._books.submit(AppliedRequest(session_id, summary_id))

    # --- reads ---------------------------------------------------------------------------

    async def _read_batch(
        self, conn: AsyncConnection, requests: list[StateRequest]
    ) -> list[ArchiveState]:
        params = {
            "session_ids": [r.session_id for r in requests],
            "head_shas": [digest(r.head) if r.head is not None else None for r in requests],
            "hot_lens": [r.hot_len for r in requests],
        }
        rows = (await conn.execute(_READ_STATE, params)).all()
        states: list[ArchiveState | None] = [None] * len(requests)
        for row in rows:
            states[row.i - 1] = _state(row, requests[row.i - 1].head)
        return [state or ArchiveState(0, None, {}, None) for state in states]

    async def _read_alone(self, request: StateRequest) -> ArchiveState:
        async with self._engine.connect() as conn:
            return await writer.read_state(conn, request.session_id, request.head, request.hot_len)

    # --- archive writes ------------------------------------------------------------------

    async def _archive_batch(
        self, conn: AsyncConnection, requests: list[ArchiveRequest]
    ) -> list[bool]:
        async with conn.begin():
            return await _archive_many(conn, requests)

    async def _archive_alone(self, request: ArchiveRequest) -> bool:
        async with self._engine.begin() as conn:
            written = await writer.archive_turns(
                conn,
                request.ref,
                layout=request.layout,
                newest_first=request.newest_first,
                expected_count=request.expected_count,
                new_turns=request.new_turns,
                gap_reason=request.gap_reason,
                metadata=request.metadata,
            )
            if written:
                await writer.release_quarantine(conn, request.ref.key, request.ref.session_id)
            return written

    # --- bookkeeping ---------------------------------------------------------------------

    async def _books_batch(
        self, conn: AsyncConnection, requests: list[Bookkeeping]
    ) -> list[int | None]:
        results: list[int | None] = [None] * len(requests)
        applied = [r for r in requests if isinstance(r, AppliedRequest)]
        made = [(i, r) for i, r in enumerate(requests) if isinstance(r, SummaryRequest)]
        async with conn.begin():
            if applied:
                await writer.mark_applied(conn, [(r.session_id, r.summary_id) for r in applied])
            if made:
                ids = await _insert_summaries(conn, [r for _, r in made])
                for (i, _), summary_id in zip(made, ids, strict=True):
                    results[i] = summary_id
        return results

    async def _books_alone(self, request: Bookkeeping) -> int | None:
        async with self._engine.begin() as conn:
            if isinstance(request, AppliedRequest):
                await writer.mark_applied(conn, [(request.session_id, request.summary_id)])
                return None
            return await writer.record_summary(
                conn,
                request.session_id,
                from_seq=request.from_seq,
                through_seq=request.through_seq,
                summary=request.summary,
                elements=request.elements,
            )


# One query for every aligning session: its count, the summary at the head of its hot state
# (by digest), the digests of its last archived turns and its latest applied summary. On a
# hash-partitioned `turns` the tail lookup is pruned to one partition per session at run time.
_READ_STATE = text(
    """
WITH req AS (
    SELECT * FROM unnest(
        CAST(:session_ids AS text[]), CAST(:head_shas AS bytea[]), CAST(:hot_lens AS bigint[])
    ) WITH ORDINALITY AS r(session_id, head_sha, hot_len, i)
)
SELECT r.i, s.turn_count, s.redis_key, s.layout, s.app_name, s.user_id,
       h.through_seq, h.element_count, h.text AS head_text,
       t.seqs, t.shas, p.text AS previous, p.through_seq AS previous_through,
       p.element_count AS previous_count, p.head AS previous_head
FROM req r
JOIN sessions s ON s.session_id = r.session_id
LEFT JOIN LATERAL (
    SELECT m.through_seq, cardinality(m.elements) AS element_count, m.text
    FROM summaries m
    WHERE m.session_id = r.session_id AND m.head_sha = r.head_sha
    ORDER BY m.id DESC LIMIT 1
) h ON true
LEFT JOIN LATERAL (
    SELECT array_agg(u.seq) AS seqs, array_agg(u.raw_sha) AS shas
    FROM turns u
    WHERE u.session_id = r.session_id AND u.seq >= s.turn_count - r.hot_len
) t ON true
LEFT JOIN LATERAL (
    SELECT m.text, m.through_seq, cardinality(m.elements) AS element_count,
           m.elements[1] AS head
    FROM summaries m
    WHERE m.session_id = r.session_id AND m.applied = 1
    ORDER BY m.through_seq DESC, m.id DESC LIMIT 1
) p ON h.through_seq IS NULL
"""
)


def _state(row: Any, hot_head: bytes | None) -> ArchiveState:
    head = None
    if row.through_seq is not None:
        head = HeadSummary(
            through_seq=row.through_seq, element_count=row.element_count, text=row.head_text
        )
    elif row.previous_head is not None and hot_head is not None:
        # Not known by its bytes: the latest summary, written back in the agent's own style?
        head = writer.respelled(
            hot_head,
            bytes(row.previous_head),
            row.previous_through,
            row.previous_count,
            row.previous,
        )
    tail = dict(zip(row.seqs or (), (bytes(s) for s in row.shas or ()), strict=True))
    origin = ArchivedFrom(row.redis_key, row.layout, row.app_name, row.user_id)
    return ArchiveState(row.turn_count, head, tail, head.text if head else row.previous, origin)


# writer.archive_turns for many sessions at once: each session's row moves from the count its
# writer read, or not at all (the subquery is the per-row guard); the winners are returned.
_UPSERT_SESSIONS = text(
    """
WITH v AS (
    SELECT * FROM unnest(
        CAST(:session_ids AS text[]), CAST(:redis_keys AS text[]), CAST(:layouts AS text[]),
        CAST(:newest_first AS boolean[]), CAST(:app_names AS text[]),
        CAST(:user_ids AS text[]), CAST(:agent_ids AS text[]), CAST(:expected AS bigint[]),
        CAST(:turn_counts AS bigint[]), CAST(:metadata AS text[])
    ) AS v(session_id, redis_key, layout, newest_first, app_name, user_id, agent_id, expected,
           turn_count, metadata)
),
won AS (
    INSERT INTO sessions AS s
        (session_id, redis_key, layout, newest_first, app_name, user_id, agent_id, turn_count,
         metadata)
    -- A key put back from its quarantine copy lacks the metadata that named its user; the
    -- record kept it (writer.release_quarantine).
    SELECT session_id, redis_key, layout, newest_first, app_name,
           coalesce(user_id, (SELECT q.user_id FROM quarantine q WHERE q.redis_key = v.redis_key)),
           agent_id, turn_count, CAST(metadata AS jsonb)
    FROM v
    ON CONFLICT (session_id) DO UPDATE SET
        turn_count = excluded.turn_count,
        last_seen = now(),
        redis_key = excluded.redis_key,
        newest_first = excluded.newest_first,
        -- excluded.user_id may be the quarantine record's: it only fills a NULL.
        user_id = coalesce(
            (SELECT v.user_id FROM v WHERE v.session_id = excluded.session_id),
            s.user_id,
            excluded.user_id
        ),
        agent_id = coalesce(excluded.agent_id, s.agent_id),
        metadata = s.metadata || excluded.metadata
    WHERE s.turn_count = (SELECT v.expected FROM v WHERE v.session_id = excluded.session_id)
    RETURNING s.session_id, s.redis_key
),
released AS (
    -- A session archived again is no longer quarantined (writer.release_quarantine).
    DELETE FROM quarantine q USING won WHERE q.redis_key = won.redis_key
)
SELECT session_id FROM won
"""
)


async def _archive_many(conn: AsyncConnection, requests: list[ArchiveRequest]) -> list[bool]:
    # Rows are locked in session order, whatever order the sessions asked in.
    ordered = sorted(requests, key=lambda r: r.ref.session_id)
    params = {
        "session_ids": [r.ref.session_id for r in ordered],
        "redis_keys": [r.ref.key for r in ordered],
        "layouts": [r.layout for r in ordered],
        "newest_first": [r.newest_first for r in ordered],
        "app_names": [r.ref.app for r in ordered],
        "user_ids": [r.ref.user or _text(r.metadata.get("user_id")) for r in ordered],
        "agent_ids": [_text(r.metadata.get("agent_id")) for r in ordered],
        "expected": [r.expected_count for r in ordered],
        "turn_counts": [r.expected_count + len(r.new_turns) for r in ordered],
        "metadata": [orjson.dumps(dict(r.metadata), default=str).decode() for r in ordered],
    }
    won = {row[0] for row in await conn.execute(_UPSERT_SESSIONS, params)}
    winners = [r for r in ordered if r.ref.session_id in won]
    records = [
        (r.ref.session_id, r.expected_count + i, t.role, t.text, t.raw, t.sha, t.created_at)
        for r in winners
        for i, t in enumerate(r.new_turns)
    ]
    if records:
        await _copy(conn, "turns", TURN_COLUMNS, records)
    gapped = [r for r in winners if r.gap_reason is not None]
    if gapped:
        await conn.execute(
            pg_insert(gaps).on_conflict_do_nothing(),
            [
                {
                    "session_id": r.ref.session_id,
                    "before_seq": r.expected_count,
                    "reason": r.gap_reason,
                }
                for r in gapped
            ],
        )
    return [r.ref.session_id in won for r in requests]


async def _copy(
    conn: AsyncConnection, table: str, columns: Sequence[str], records: list[tuple[Any, ...]]
) -> None:
    """Binary COPY in the connection's transaction (begun by the statement before it)."""
    raw = await conn.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    await driver.copy_records_to_table(table, records=records, columns=list(columns))


async def _insert_summaries(conn: AsyncConnection, requests: list[SummaryRequest]) -> list[int]:
    rows = await conn.execute(
        insert(summaries).returning(summaries.c.id, sort_by_parameter_order=True),
        [
            {
                "session_id": r.session_id,
                "from_seq": r.from_seq,
                "through_seq": r.through_seq,
                "text": r.summary.text,
                "elements": list(r.elements),
                "head_sha": digest(r.elements[0]),
                "summarizer": r.summary.summarizer,
                "model": r.summary.model,
                "model_version": r.summary.model_version,
                "tokens_in": r.summary.tokens_in,
                "tokens_out": r.summary.tokens_out,
                "latency_ms": r.summary.latency_ms,
                "cost_usd": r.summary.cost_usd,
            }
            for r in requests
        ],
    )
    return [int(row[0]) for row in rows]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _since(started: float) -> float:
    return asyncio.get_running_loop().time() - started


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _connection_lost(exc: BaseException) -> bool:
    """The database went away: trying each request alone would only fail again, slowly."""
    if isinstance(exc, OSError | OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, asyncpg.exceptions.InterfaceError | asyncpg.exceptions.PostgresConnectionError
    )


def _raw_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError | asyncpg.exceptions.InterfaceError)


def _as_dbapi(exc: Exception) -> Exception:
    """Errors from the driver's COPY as SQLAlchemy's, which the daemon knows to be transient."""
    if _raw_driver_error(exc):
        return OperationalError("COPY", None, exc)
    return exc
