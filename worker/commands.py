"""What the commands do, as coroutines that return an exit code (the CLI only parses)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import orjson
import structlog
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from worker.archive.reader import ArchiveReader
from worker.archive.schema import SchemaOutdated, current_revision, ensure_current, head_revision
from worker.config import Settings
from worker.domain import Outcome, SessionRef
from worker.hot.keys import KeyPattern
from worker.hot.scanner import probe, scan_keys
from worker.pipeline import Options
from worker.policy import classify
from worker.runtime import Runtime, open_runtime

log = structlog.get_logger(__name__)
FAILED = ("failed", "quarantined", "conflict", "skipped")


def _out(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str).decode() + "\n")


async def _require_schema(rt: Runtime) -> bool:
    try:
        await ensure_current(rt.engine, rt.settings.database_url)
    except SchemaOutdated as exc:
        print(f"consolidator: {exc}", file=sys.stderr)
        return False
    return True


async def daemon_main(
    settings: Settings, *, once: bool, install_signals: Callable[[asyncio.Event], None]
) -> int:
    async with open_runtime(settings) as rt:
        if not await _require_schema(rt):
            return 2
        stop = asyncio.Event()
        install_signals(stop)
        async with contextlib.AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                from worker.http import serve_metrics

                await stack.enter_async_context(serve_metrics(rt, settings.metrics_port))
            log.info(
                "daemon_started",
                layout=settings.layout.value,
                pattern=settings.pattern,
                summarizer=rt.pipeline.summarizer.name,
                concurrency=settings.concurrency,
            )
            if once:
                outcomes = await rt.daemon.run_once(stop)
                return 1 if any(o.status == "failed" for o in outcomes) else 0
            return await _run_until_stopped(rt, stop)
    return 0


async def _run_until_stopped(rt: Runtime, stop: asyncio.Event) -> int:
    loop_task = asyncio.create_task(rt.daemon.run_forever(stop), name="daemon")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if not loop_task.done():
        log.info("draining", grace_s=rt.settings.drain_grace_s)
        try:
            await asyncio.wait_for(asyncio.shield(loop_task), rt.settings.drain_grace_s)
        except TimeoutError:
            # Past the grace period in-flight sessions are abandoned: their leases are released
            # on the way out, and the archive-first order means nothing is lost.
            log.warning("drain_timeout", grace_s=rt.settings.drain_grace_s)
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
    elif loop_task.exception() is not None:
        log.error("daemon_crashed", error=repr(loop_task.exception()))
        return 1
    log.info("daemon_stopped")
    return 0


async def _chosen_refs(
    rt: Runtime, ids: Sequence[str], all_sessions: bool, match: str | None
) -> list[SessionRef]:
    refs: dict[str, SessionRef] = {}
    for session_id in ids:
        ref = _ref_for(rt.pattern, session_id)
        refs[ref.key] = ref
    if all_sessions or match is not None:
        pattern = rt.pattern
        if match is not None and not all_sessions:
            pattern = KeyPattern.compile(rt.settings.pattern, id_glob=match)
        async for batch in scan_keys(rt.redis, pattern, rt.settings.scan_count):
            for ref in batch:
                refs.setdefault(ref.key, ref)
    return list(refs.values())


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
            outcomes = await _flush_with_retries(rt, refs, options, advance)
    totals: dict[str, int] = {}
    for outcome in outcomes:
        totals[outcome.status] = totals.get(outcome.status, 0) + 1
        if dry_run or outcome.status in FAILED:
            _out(_brief(outcome))
    archived = sum(o.turns_archived for o in outcomes)
    print(
        f"{len(outcomes)} sessions: "
        + ", ".join(f"{n} {status}" for status, n in sorted(totals.items()))
        + f"; {archived} turns archived",
        file=sys.stderr,
    )
    return 1 if any(o.status in FAILED for o in outcomes) else 0


async def _flush_with_retries(
    rt: Runtime,
    refs: list[SessionRef],
    options: Options,
    advance: Callable[[int], None],
    attempts: int = 3,
) -> list[Outcome]:
    """A conflict or a lease held by a running daemon is transient: try again, briefly."""
    final: dict[str, Outcome] = {}
    pending = refs
    for attempt in range(attempts):
        outcomes = await rt.daemon.process(((ref, None, None) for ref in pending), options=options)
        by_id = {o.session_id: o for o in outcomes}
        retry = []
        for ref in pending:
            outcome = by_id.get(ref.session_id)
            if outcome is None:
                continue
            final[ref.key] = outcome
            if outcome.status in ("conflict", "skipped") and attempt + 1 < attempts:
                retry.append(ref)
            else:
                advance(1)
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


def _brief(outcome: Outcome) -> dict[str, object]:
    return {
        "session_id": outcome.session_id,
        "status": outcome.status,
        "turns_archived": outcome.turns_archived,
        "turns_folded": outcome.turns_folded,
        "turns_kept": outcome.turns_kept,
        "reason": outcome.reason,
    }


async def history_main(settings: Settings, session_id: str, *, as_json: bool) -> int:
    async with open_runtime(settings) as rt:
        if not await _require_schema(rt):
            return 2
        entries = await ArchiveReader(rt.engine).history(session_id)
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
            console.print(entry.text, markup=False, highlight=False)
        elif entry.kind.value == "gap":
            console.print(f"[yellow]── gap before #{entry.seq}: {entry.text} ──[/]")
        else:
            console.print(f"[dim]#{entry.seq} {when}[/] [bold]{entry.role}[/]: ", end="")
            console.print(entry.text, markup=False, highlight=False)
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
            print(f"postgresql  FAIL {str(exc).splitlines()[0]}")
        print(f"layout      ok   {settings.layout.value} keys {settings.pattern}")
        print(f"summarizer  ok   {rt.pipeline.summarizer.name}")
    return 0 if healthy else 1


async def stats_main(settings: Settings, *, as_json: bool) -> int:
    async with open_runtime(settings) as rt:
        hot = {"sessions": 0, "bytes": 0, "pending": 0, "expiring": 0}
        async for refs in scan_keys(rt.redis, rt.pattern, settings.scan_count):
            for p in await probe(rt.redis, refs):
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
        if not await _require_schema(rt):
            return 2
        reader = ArchiveReader(rt.engine)
        cold = await reader.counts()
        quarantined = await reader.quarantined()
    if as_json:
        _out({"hot": hot, "cold": cold, "quarantined": [q.__repr__() for q in quarantined]})
        return 0
    print(
        f"hot   {hot['sessions']} sessions, {hot['bytes']} bytes, {hot['pending']} pending "
        f"({hot['expiring']} expiring soon)"
    )
    print(
        f"cold  {cold['sessions']} sessions, {cold['turns']} turns, {cold['summaries']} "
        f"summaries, {cold['gaps']} gaps, {cold['archive_bytes']} bytes"
    )
    print(f"quarantined {cold['quarantined']}")
    for q in quarantined:
        print(f"  {q.redis_key}  {q.reason}: {q.detail[:120]}  (attempts {q.attempts})")
    if quarantined:
        print("  retry one with: consolidator flush <session id>")
    return 0
