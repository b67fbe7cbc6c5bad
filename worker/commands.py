"""What the commands do, as coroutines that return an exit code (the CLI only parses)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from typing import TypeVar

import aiohttp
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.archive.reader import ArchiveReader
from worker.archive.schema import SchemaOutdated, current_revision, ensure_current, head_revision
from worker.archive.search import DEFAULT_MARKS, SearchHit
from worker.config import Settings
from worker.domain import Outcome, SessionRef
from worker.hot.keys import KeyPattern
from worker.hot.scanner import probe, scan_keys
from worker.outages import first_line, outage
from worker.pipeline import NO_HOT_STATE, SUMMARY_FAILED, Options
from worker.policy import classify
from worker.quarantined import NO_COPY, STALE_COPY, PutBack, PutBackStatus, restore_quarantined
from worker.runtime import Runtime, database_engine, open_runtime, redis_client
from worker.summarizers.base import Summarizer
from worker.terminal import INDENT, printable

log = structlog.get_logger(__name__)

T = TypeVar("T")
FAILED = ("failed", "quarantined", "conflict", "skipped")
_RETRIED = ("conflict", "skipped")  # transient: a flush tries them again, briefly


def _out(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str).decode() + "\n")


async def _require_schema(rt: Runtime) -> bool:
    try:
        await ensure_current(rt.engine, rt.settings.database_url)
    except SchemaOutdated as exc:
        print(f"consolidator: {exc}", file=sys.stderr)
        return False
    return True


async def _database_answers(rt: Runtime, stop: asyncio.Event) -> bool:
    """Wait, with backoff, until PostgreSQL answers: a sidecar may start before its database.
    False if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            async with rt.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            if (reason := outage(exc)) is None:
                raise
            log.warning("database_unreachable", error=reason, retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 30.0)
    return False


def _unanswered(exc: Exception) -> str:
    """Why the model did not answer, in one line (aiohttp's own shows an SSL object's repr)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return first_line(exc)


async def daemon_main(
    settings: Settings, *, once: bool, install_signals: Callable[[asyncio.Event], None]
) -> int:
    async with open_runtime(settings) as rt, contextlib.AsyncExitStack() as stack:
        stop = asyncio.Event()
        install_signals(stop)
        if settings.metrics_port is not None:
            # First: a liveness probe must find the daemon alive while it waits for its
            # database (/readyz says 503 meanwhile), or it would be restarted over and over.
            from worker.http import MetricsPortUnavailable, serve_metrics

            try:
                await stack.enter_async_context(serve_metrics(rt, settings.metrics_port))
            except MetricsPortUnavailable as exc:
                print(f"consolidator: {exc}", file=sys.stderr)
                return 2
        if not once and not await _database_answers(rt, stop):
            return 0  # stopped while waiting for it
        if not await _require_schema(rt):
            return 2
        log.info(
            "daemon_started",
            layout=settings.layout.value,
            pattern=settings.pattern,
            summarizer=rt.pipeline.summarizer.name,
            concurrency=settings.concurrency,
        )
        if once:
            outcomes = await _drained(rt, stop, rt.daemon.run_once(stop)) or []
            log.info("daemon_stopped")
            return 1 if any(o.status == "failed" for o in outcomes) else 0
        return await _run_until_stopped(rt, stop)


async def _run_until_stopped(rt: Runtime, stop: asyncio.Event) -> int:
    try:
        await _drained(rt, stop, rt.daemon.run_forever(stop))
    except Exception as exc:
        log.error("daemon_crashed", error=repr(exc))
        return 1
    log.info("daemon_stopped")
    return 0


async def _drained(rt: Runtime, stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """The work's result; on stop it is given the drain grace to finish its sessions in
    flight, and past it cancelled (None): their leases are released on the way out, and the
    archive-first order means nothing is lost."""
    work_task = asyncio.ensure_future(work)
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if not work_task.done():
        log.info("draining", grace_s=rt.settings.drain_grace_s)
        try:
            return await asyncio.wait_for(asyncio.shield(work_task), rt.settings.drain_grace_s)
        except TimeoutError:
            log.warning("drain_timeout", grace_s=rt.settings.drain_grace_s)
            work_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work_task
            return None
    return work_task.result()


async def _chosen_refs(
    rt: Runtime, ids: Sequence[str], all_sessions: bool, match: str | None
) -> list[SessionRef]:
    refs: dict[str, SessionRef] = {}
    wanted = set(ids)
    if wanted and _names_more_than_the_id(rt.settings.pattern):
        # An id alone does not make the key (ADK's app and user are in it): find its keys.
        async for batch in scan_keys(rt.redis, rt.pattern, rt.settings.scan_count):
            refs.update((ref.key, ref) for ref in batch if ref.session_id in wanted)
        wanted -= {ref.session_id for ref in refs.values()}
    for session_id in wanted:
        ref = _ref_for(rt.pattern, session_id)
        refs[ref.key] = ref
    if all_sessions or match is not None:
        # --match narrows --all down, as it does on its own.
        pattern = rt.pattern
        if match is not None:
            pattern = KeyPattern.compile(rt.settings.pattern, id_glob=match)
        async for batch in scan_keys(rt.redis, pattern, rt.settings.scan_count):
            for ref in batch:
                refs.setdefault(ref.key, ref)
    return list(refs.values())


def _names_more_than_the_id(pattern: str) -> bool:
    return "{app}" in pattern or "{user}" in pattern


def _ref_for(pattern: KeyPattern, session_id: str) -> SessionRef:
    key = pattern.key_for(session_id)
    return pattern.parse(key) or SessionRef(session_id, key)


async def flush_main(
    settings: Settings,
    *,
    ids: Sequence[str],
    all_sessions: bool,
    match: str | None,
    summarize: bool,
    evict: bool,
    dry_run: bool,
) -> int:
    async with open_runtime(settings) as rt:
        if not await _require_schema(rt):
            return 2
        refs = await _chosen_refs(rt, ids, all_sessions, match)
        options = Options(summarize=summarize, evict=evict, dry_run=dry_run)
        with _progress(len(refs)) as advance:
            flushed = await _flush_with_retries(rt, refs, options, advance)
    outcomes = [outcome for _, outcome in flushed]
    totals: dict[str, int] = {}
    for ref, outcome in flushed:
        totals[outcome.status] = totals.get(outcome.status, 0) + 1
        if dry_run or outcome.status in FAILED:
            _out(_brief(ref, outcome))
    missing = sorted({o.session_id for o in outcomes if o.reason == NO_HOT_STATE} & set(ids))
    if missing:  # a mistyped id must not read as a success
        print(f"consolidator: no hot state for {', '.join(map(repr, missing))}", file=sys.stderr)
    unslimmed = sum(1 for o in outcomes if o.reason == SUMMARY_FAILED)
    if unslimmed:  # archived, but the model never answered: the hot state is as large as ever
        print(
            f"consolidator: {unslimmed} summaries failed (see the log); those sessions are "
            "archived, their hot state left as it was",
            file=sys.stderr,
        )
    done = "turns to archive" if dry_run else "turns archived"
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(totals.items()))
    print(
        f"{len(outcomes)} sessions{': ' + statuses if statuses else ''}; "
        f"{sum(o.turns_archived for o in outcomes)} {done}",
        file=sys.stderr,
    )
    return 1 if unslimmed or any(o.status in FAILED for o in outcomes) else 0


async def _flush_with_retries(
    rt: Runtime,
    refs: list[SessionRef],
    options: Options,
    advance: Callable[[int], None],
    attempts: int = 3,
) -> list[tuple[SessionRef, Outcome]]:
    """A conflict or a lease held by a running daemon is transient: try again, briefly. A
    session's outcome is its last attempt's, with the turns every attempt archived."""
    final: dict[str, tuple[SessionRef, Outcome]] = {}
    pending = refs
    for attempt in range(attempts):
        last = attempt + 1 == attempts

        def settled(outcome: Outcome, last: bool = last) -> None:
            if last or outcome.status not in _RETRIED:
                advance(1)  # as each session finishes, not when the whole batch has

        items = ((ref, None, None) for ref in pending)
        done = await rt.daemon.process(items, options=options, on_outcome=settled)
        retry = []
        for ref, outcome in done:
            if (earlier := final.get(ref.key)) is not None:
                archived = earlier[1].turns_archived + outcome.turns_archived
                outcome = replace(outcome, turns_archived=archived)
            final[ref.key] = (ref, outcome)
            if outcome.status in _RETRIED and not last:
                retry.append(ref)
        if not retry:
            break
        pending = retry
        await asyncio.sleep(0.2 * (attempt + 1))
    return list(final.values())


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    if not sys.stderr.isatty() or total < 2:
        yield lambda n: None
        return
    columns = (
        TextColumn("flush"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("flush", total=total)
        yield lambda n: progress.advance(task, n)


def _brief(ref: SessionRef, outcome: Outcome) -> dict[str, object]:
    return {
        "session_id": outcome.session_id,
        "redis_key": ref.key,
        "status": outcome.status,
        "turns_archived": outcome.turns_archived,
        "turns_folded": outcome.turns_folded,
        "turns_kept": outcome.turns_kept,
        "reason": outcome.reason,
    }


async def history_main(settings: Settings, session_id: str, *, as_json: bool) -> int:
    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        _, engine = clients
        entries = await ArchiveReader(engine).history(session_id)
    if not entries:
        print(f"consolidator: no archived session {session_id!r}", file=sys.stderr)
        return 1
    if as_json:
        for entry in entries:
            _out(entry.as_json())
        return 0
    console = Console()
    for entry in entries:
        when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S") if entry.created_at else ""
        if entry.kind.value == "summary":
            console.print(f"[bold magenta]── summary through #{entry.seq} ──[/]", highlight=False)
            console.print(INDENT + printable(entry.text), markup=False, highlight=False)
        elif entry.kind.value == "gap":
            console.print(f"[yellow]── gap before #{entry.seq}: {escape(entry.text)} ──[/]")
        else:
            role = escape(printable(entry.role or ""))
            console.print(f"[dim]#{entry.seq} {when}[/] [bold]{role}[/]: ", end="")
            console.print(printable(entry.text), markup=False, highlight=False)
    return 0


async def check_main(settings: Settings) -> int:
    healthy = True
    async with open_runtime(settings) as rt:
        try:
            info = await rt.redis.info("server")
            memory = await rt.redis.info("memory")
            print(
                f"redis       ok   {info.get('redis_version')} "
                f"used_memory={memory.get('used_memory_human')}"
            )
        except (RedisError, OSError) as exc:
            healthy = False
            print(f"redis       FAIL {exc}")
        try:
            async with rt.engine.connect() as conn:
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            found = await current_revision(rt.engine)
            wanted = head_revision(settings.database_url)
            state = "ok  " if found == wanted else "FAIL"
            healthy &= found == wanted
            print(f"postgresql  {state} {version} schema={found or 'none'} (needs {wanted})")
        except (SQLAlchemyError, OSError) as exc:
            healthy = False
            print(f"postgresql  FAIL {outage(exc) or first_line(exc)}")
        print(f"layout      ok   {settings.layout.value} keys {settings.pattern}")
        healthy &= await _check_summarizer(rt.pipeline.summarizer)
    return 0 if healthy else 1


async def _check_summarizer(summarizer: Summarizer) -> bool:
    """A model is asked to count one word's tokens: a wrong key, model name or address shows
    here rather than as every summary failing. With a fallback the daemon still works."""
    from worker.summarizers.gemini import GeminiSummarizer  # the SDK only where it is used
    from worker.summarizers.select import FallbackSummarizer

    fallback = isinstance(summarizer, FallbackSummarizer)
    model = summarizer.primary if isinstance(summarizer, FallbackSummarizer) else summarizer
    if not isinstance(model, GeminiSummarizer):
        print(f"summarizer  ok   {summarizer.name}")
        return True
    try:
        await model.count_tokens("ping")
    except Exception as exc:  # whatever the SDK raises, it is the answer to report
        then = "; summaries fall back to extractive" if fallback else ""
        state = "ok  " if fallback else "FAIL"
        why = _unanswered(exc)
        print(f"summarizer  {state} {model.name} {model.model} not answering: {why}{then}")
        return fallback
    print(f"summarizer  ok   {model.name} {model.model} answers")
    return True


async def stats_main(settings: Settings, *, as_json: bool) -> int:
    pattern = KeyPattern.compile(settings.pattern)
    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        redis, engine = clients
        hot = {"sessions": 0, "bytes": 0, "pending": 0, "expiring": 0}
        async for refs in scan_keys(redis, pattern, settings.scan_count):
            for p in await probe(redis, refs):
                hot["sessions"] += 1
                hot["bytes"] += p.size_bytes or 0
                trigger = classify(
                    ttl_ms=p.ttl_ms,
                    idle_s=p.idle_s,
                    size_bytes=p.size_bytes,
                    idle_after_s=settings.idle_after_s,
                    expiry_margin_s=settings.expiry_margin_s,
                    max_hot_tokens=settings.max_hot_tokens,
                )
                hot["pending"] += trigger is not None
                hot["expiring"] += trigger is not None and trigger.value == "expiring"
        reader = ArchiveReader(engine)
        cold = await reader.counts()
        quarantined = await reader.quarantined()
    if as_json:
        listed = [{**asdict(q), "retry": _retry_command(q.session_id)} for q in quarantined]
        _out({"hot": hot, "cold": cold, "quarantined": listed})
        return 0
    print(
        f"hot   {hot['sessions']} sessions, {hot['bytes']} bytes, {hot['pending']} pending "
        f"({hot['expiring']} expiring soon)"
    )
    print(
        f"cold  {cold['sessions']} sessions, {cold['turns']} turns, {cold['summaries']} "
        f"summaries, {cold['gaps']} gaps, {cold['archive_bytes']} bytes"
    )
    shown = f" (the {len(quarantined)} seen last)" if cold["quarantined"] > len(quarantined) else ""
    print(f"quarantined {cold['quarantined']}{shown}")
    for q in quarantined:
        detail = " ".join(q.detail.split())[:120]
        print(f"  {q.redis_key}  {q.reason}: {detail}  (attempts {q.attempts})")
        print(f"    retry: {_retry_command(q.session_id)}")
        if q.saved_bytes is not None:
            print(
                f"    copy: {q.saved_bytes} bytes, saved {q.saved_at:%Y-%m-%d %H:%M:%S %Z}; if "
                f"the key is gone: {_put_back_command(q.session_id)}"
            )
            if not q.saved_current:
                print(f"    note: {STALE_COPY}")
        else:
            print(f"    copy: none ({NO_COPY})")
    if quarantined:
        print("  fix the key in Redis, then retry: the session leaves quarantine once it reads")
    return 0


def _retry_command(session_id: str) -> str:
    return f"consolidator flush {shlex.quote(session_id)}"


def _put_back_command(session_id: str) -> str:
    return f"consolidator restore {shlex.quote(session_id)} --quarantined"


# --- The archive as a product: search, restore, forget, prune -------------------------------


@contextlib.asynccontextmanager
async def _archive_clients(settings: Settings) -> AsyncIterator[tuple[Redis, AsyncEngine] | None]:
    """Redis and the database only (no summarizer, no layout): what the archive commands need.
    Yields None, having said why, when the schema is not current."""
    redis = redis_client(settings.redis_url, settings.redis_timeout_s)
    engine = database_engine(settings.database_url, 2, settings.database_timeout_s)
    try:
        try:
            await ensure_current(engine, settings.database_url)
        except SchemaOutdated as exc:
            print(f"consolidator: {exc}", file=sys.stderr)
            yield None
        else:
            yield redis, engine
    finally:
        await redis.aclose()
        await engine.dispose()


_MARK_ON, _MARK_OFF = "\x02", "\x03"  # highlight marks on a terminal, turned into styles


async def search_main(
    settings: Settings,
    text_query: str,
    *,
    session_id: str | None,
    user_id: str | None,
    role: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> int:
    from worker.archive.search import BadCursor, EmptyQuery, QueryTooLong

    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        reader = ArchiveReader(clients[1])
        try:
            page = await reader.search(
                text_query,
                session_id=session_id,
                user_id=user_id,
                role=role,
                since=since,
                until=until,
                limit=limit,
                after=after,
                marks=DEFAULT_MARKS if as_json else (_MARK_ON, _MARK_OFF),
            )
        except (EmptyQuery, BadCursor, QueryTooLong) as exc:
            print(f"consolidator: search: {exc}", file=sys.stderr)
            return 2
    if as_json:
        # One object per hit and nothing else, as for every --json; each carries its own cursor.
        for hit in page.hits:
            _out(hit.as_json())
    else:
        _print_hits(page.hits)
    if not page.hits:
        print("no matches", file=sys.stderr)
    elif page.cursor:
        print(f"more: add --after {page.cursor}", file=sys.stderr)
    return 0


def _print_hits(hits: list[SearchHit]) -> None:
    console = Console(highlight=False)
    for hit in hits:
        when = hit.created_at.strftime("%Y-%m-%d %H:%M") if hit.created_at else ""
        console.print(
            f"[bold]{escape(printable(hit.session_id))}[/] [dim]#{hit.seq} {when}[/] "
            f"[cyan]{escape(printable(hit.role))}[/] [dim]rank {hit.rank:.3f}[/]"
        )
        console.print(_highlighted(hit.snippet))


def _highlighted(snippet: str) -> Text:
    """The snippet with its matches styled; the turn's own text is never read as markup."""
    out = Text("  ")
    # Split on the marks first: printable() would show them as escapes like any control.
    for i, part in enumerate(snippet.replace("\n", " ").split(_MARK_ON)):
        word, sep, rest = part.partition(_MARK_OFF)
        if i and sep:
            out.append(printable(word), style="bold yellow")
            out.append(printable(rest.replace(_MARK_OFF, "")))
        else:
            out.append(printable(part.replace(_MARK_OFF, "")))
    return out


async def restore_main(
    settings: Settings, session_id: str, *, turns: int | None, ttl_s: int, force: bool
) -> int:
    from worker.hot.exclusive import LeaseBusy
    from worker.restore import RestoreError, RestoreStatus, restore

    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        redis, engine = clients
        try:
            result = await restore(
                redis, engine, settings, session_id, turns=turns, ttl_s=ttl_s, force=force
            )
        except (RestoreError, LeaseBusy) as exc:
            print(f"consolidator: restore: {exc}", file=sys.stderr)
            return 1
        if result.status is RestoreStatus.NOTHING:
            hint = ""
            if await ArchiveReader(engine).is_quarantined(session_id=session_id):
                hint = f"; it is quarantined: {_put_back_command(session_id)}"
            print(
                f"consolidator: {result.reason} for session {session_id!r}{hint}", file=sys.stderr
            )
            return 1
    if result.status is RestoreStatus.REFUSED:
        print(f"consolidator: restore refused: {result.key}: {result.reason}", file=sys.stderr)
        return 1
    parts = []
    if result.summary_through is not None:
        parts.append(f"summary of turns #0-#{result.summary_through}")
    if result.turns and result.first_seq is not None:
        parts.append(f"{result.turns} turns from #{result.first_seq}")
    print(f"restored {session_id} into {result.key}: {' + '.join(parts)}; TTL {result.ttl_s}s")
    if result.left_out:
        before = "the summary" if result.summary_through is not None else "the start"
        where = f"between {before} and the restored turns" if result.turns else f"after {before}"
        print(
            f"note: {result.left_out} archived turns lie {where} and are not in Redis; "
            "restore without --turns to include them",
            file=sys.stderr,
        )
    if result.order_assumed:
        order = "newest first (LPUSH)" if settings.newest_first else "oldest first (RPUSH)"
        print(
            f"note: the archive does not record this list's order (archived before schema 0003); "
            f"written {order}, as CONSOLIDATOR_NEWEST_FIRST here says: it must be the agents' "
            "order (the daemon quarantines a list it finds reversed rather than misread it)",
            file=sys.stderr,
        )
    return 0


async def restore_quarantined_main(settings: Settings, session_id: str, *, ttl_s: int) -> int:
    from worker.hot.exclusive import LeaseBusy

    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        redis, engine = clients
        try:
            done = await restore_quarantined(redis, engine, settings, session_id, ttl_s=ttl_s)
        except LeaseBusy as exc:
            print(f"consolidator: restore: {exc}", file=sys.stderr)
            return 1
    if not done:
        print(f"consolidator: nothing quarantined for session {session_id!r}", file=sys.stderr)
        return 1
    for put in done:
        _report_put_back(put, session_id, ttl_s)
    return 0 if all(put.status is PutBackStatus.RESTORED for put in done) else 1


def _report_put_back(put: PutBack, session_id: str, ttl_s: int) -> None:
    if put.status is PutBackStatus.NO_COPY:
        print(f"consolidator: no copy kept of {put.key} ({put.reason}): {NO_COPY}", file=sys.stderr)
        return
    if put.status is PutBackStatus.REFUSED:
        print(
            f"consolidator: restore refused: {put.key} exists; its turns since the copy are in "
            "no archive: move it away (RENAME) first to keep both",
            file=sys.stderr,
        )
        return
    if put.status is PutBackStatus.FAILED:
        print(
            f"consolidator: restore: {put.key}: Redis refused the copy: {put.error}",
            file=sys.stderr,
        )
        return
    when = f", saved {put.saved_at:%Y-%m-%d %H:%M:%S %Z}" if put.saved_at else ""
    print(f"restored {put.key} ({put.reason}): {put.size} bytes{when}; TTL {ttl_s}s")
    if not put.current:
        print(f"note: {STALE_COPY}", file=sys.stderr)
    if put.reason == "id_collision":
        print(
            "note: this key holds another conversation under an id the archive already has: "
            "give it a session id of its own (RENAME) before it is flushed; where keys do not "
            "name their user, it would otherwise join that archive once the first key is gone",
            file=sys.stderr,
        )
    else:
        print(
            "note: the key is as it was when quarantined: fix what its reason says, then "
            f"{_retry_command(session_id)}",
            file=sys.stderr,
        )


async def forget_main(settings: Settings, *, session_id: str | None, user_id: str | None) -> int:
    from worker.archive.erase import AmbiguousSession, forget_session, forget_user
    from worker.hot.exclusive import LeaseBusy

    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        redis, engine = clients
        try:
            if session_id is None:
                assert user_id is not None
                counts = await forget_user(redis, engine, settings, user_id)
            else:
                counts = await forget_session(redis, engine, settings, session_id, user_id)
        except AmbiguousSession as exc:
            print(f"consolidator: forget: {exc}", file=sys.stderr)
            return 2
        except LeaseBusy as exc:
            print(f"consolidator: forget: {exc}", file=sys.stderr)
            return 1
    subject = f"session {session_id}" if session_id is not None else f"user {user_id}"
    if session_id is not None and user_id is not None:
        subject += f" of user {user_id}"
    print(
        f"erased {subject}: {counts.sessions} sessions, {counts.turns} turns, "
        f"{counts.summaries} summaries, {counts.gaps} gaps, {counts.quarantine} quarantine "
        f"records, {counts.hot_keys} hot keys"
    )
    if not any(counts.as_json().values()):
        # Still exit 0 and audited (erasure is idempotent), but a mistyped id must show.
        print(f"consolidator: nothing of {subject} was found", file=sys.stderr)
    return 0


async def prune_main(settings: Settings, older_than: timedelta) -> int:
    from worker.archive.retention import prune

    async with _archive_clients(settings) as clients:
        if clients is None:
            return 2
        result = await prune(clients[1], older_than)
    if result.skipped:
        print("consolidator: prune: another process is pruning; nothing done", file=sys.stderr)
        return 1
    print(
        f"pruned {result.sessions} sessions, {result.turns} turns, {result.summaries} "
        f"summaries, {result.gaps} gaps, {result.quarantine} quarantine records"
    )
    return 0
