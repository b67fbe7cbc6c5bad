"""The `consolidator` command. The only place that installs signal handlers.

Exit codes: 0 success, 1 some work failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, TypeVar

import orjson
import typer
from pydantic import ValidationError

from worker import logs
from worker.config import ConfigFileError, Settings
from worker.gctune import tune_gc
from worker.hot.keys import PatternError
from worker.layouts.registry import UnknownLayout
from worker.outages import outage
from worker.summarizers.select import SummarizerConfigError
from worker.timespec import parse_duration, parse_instant

T = TypeVar("T")

app = typer.Typer(
    name="consolidator",
    help="Archive, summarize and slim AI agents' Redis conversation state.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        _usage_error(f"configuration: {where}: {first['msg']}")
    except ConfigFileError as exc:
        _usage_error(f"configuration: {exc}")
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _usage_error(message: str) -> None:
    print(f"consolidator: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _run(coro_fn: Callable[[], Awaitable[T]], *, cancel_on_sigterm: bool = True) -> T:
    terminated = asyncio.Event()

    async def main() -> T:
        if cancel_on_sigterm:
            # SIGTERM (a supervisor, `kill`) stops a one-shot command as Ctrl-C does: its work
            # is cancelled, which gives its leases back, instead of dying with them held.
            task, loop = asyncio.current_task(), asyncio.get_running_loop()
            assert task is not None

            def on_sigterm() -> None:
                terminated.set()
                task.cancel()

            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        return await coro_fn()

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise
        print("consolidator: terminated", file=sys.stderr)
        raise typer.Exit(128 + signal.SIGTERM) from None
    except (PatternError, SummarizerConfigError, UnknownLayout) as exc:
        _usage_error(str(exc))
        raise  # unreachable: _usage_error exits
    except Exception as exc:
        # A server away is the operator's to fix, not a defect: one line, exit 1.
        if (reason := outage(exc)) is None:
            raise
        print(f"consolidator: {reason}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C cancelled the work (a flush abandons its sessions in progress before their
        # rewrite, the archive being written first, and gives their leases back): one line, not
        # a traceback that would look like a crash.
        print("consolidator: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None


@app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """The daemon: scan, consolidate, repeat. SIGTERM or Ctrl-C drains in-flight work."""
    from worker.commands import daemon_main

    settings = _settings()
    code = _run(
        lambda: daemon_main(settings, once=once, install_signals=_install_signals),
        cancel_on_sigterm=False,  # the daemon drains on SIGTERM, within its grace period
    )
    raise typer.Exit(code)


@app.command()
def flush(
    ids: Annotated[list[str] | None, typer.Argument(help="Session ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every session of the layout.")] = False,
    match: Annotated[str | None, typer.Option("--match", help="Session ids by glob.")] = None,
    no_summarize: Annotated[bool, typer.Option("--no-summarize", help="Archive only.")] = False,
    evict: Annotated[
        bool, typer.Option("--evict", help="Delete the hot state once archived.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be done.")] = False,
) -> None:
    """One-off consolidation of chosen sessions, whatever their idleness."""
    from worker.commands import flush_main

    if not ids and not all_ and match is None:
        _usage_error("flush: name session ids, --all or --match GLOB")
    if match == "":
        _usage_error("flush: --match '' matches no session id; '*' matches them all")
    settings = _settings()
    code = _run(
        lambda: flush_main(
            settings,
            ids=ids or [],
            all_sessions=all_,
            match=match,
            summarize=not no_summarize,
            evict=evict,
            dry_run=dry_run,
        )
    )
    raise typer.Exit(code)


@app.command()
def history(
    session_id: Annotated[str, typer.Argument(help="The session id.")],
    json: Annotated[bool, typer.Option("--json", help="JSON Lines, one object per turn.")] = False,
) -> None:
    """The archived conversation, summaries marked, oldest first."""
    from worker.commands import history_main

    if not session_id.strip():
        _usage_error("history: the session id is empty")
    settings = _settings()
    raise typer.Exit(_run(lambda: history_main(settings, session_id, as_json=json)))


@app.command()
def migrate(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="REVISION",
            help="Migrate to this revision instead of the newest; one older than the "
            "database's downgrades it (before rolling back to an older version).",
        ),
    ] = "head",
    drop_data: Annotated[
        bool,
        typer.Option(
            "--drop-data",
            help="Let a downgrade drop what the newer schema holds (it refuses otherwise, "
            "and says what it would drop).",
        ),
    ] = False,
) -> None:
    """Apply the archive's schema migrations."""
    from worker.archive.schema import (
        DataWouldBeLost,
        UnknownRevision,
        current_revision_of,
        migrate_to,
    )

    settings = _settings()
    try:
        current = current_revision_of(settings.database_url)
        dropped = migrate_to(settings.database_url, to, current, drop_data=drop_data)
    except (UnknownRevision, DataWouldBeLost) as exc:
        _usage_error(f"migrate: {exc}")
    except Exception as exc:
        print(f"consolidator: migrate failed: {exc}", file=sys.stderr)
        raise typer.Exit(1) from exc
    for what in dropped:
        print(f"dropped {what}")
    print(f"schema at {current_revision_of(settings.database_url)}")


@app.command()
def check() -> None:
    """Connect to everything configured and say what was found; exit 0 when healthy."""
    from worker.commands import check_main

    settings = _settings()
    raise typer.Exit(_run(lambda: check_main(settings)))


@app.command()
def stats(
    json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Hot and cold counts, sizes, what is pending, what is quarantined."""
    from worker.commands import stats_main

    settings = _settings()
    raise typer.Exit(_run(lambda: stats_main(settings, as_json=json)))


def _instant(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        _usage_error(f"{option}: {exc}")
        raise  # unreachable: _usage_error exits


@app.command()
def search(
    text: Annotated[str, typer.Argument(help='Words, "a phrase", or, -excluded.')],
    session: Annotated[str | None, typer.Option("--session", help="Only this session.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's sessions.")] = None,
    role: Annotated[str | None, typer.Option("--role", help="Only turns of this role.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From this time (ISO 8601, or an age: 7d).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Before this time (ISO 8601, or an age).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Hits per page (1-1000).")] = 20,
    after: Annotated[
        str | None, typer.Option("--after", help="The cursor a previous page ended with.")
    ] = None,
    json: Annotated[
        bool, typer.Option("--json", help="JSON Lines: one hit a line, each with its cursor.")
    ] = False,
) -> None:
    """Full-text search over archived turns, best match first."""
    from worker.archive.search import MAX_LIMIT
    from worker.commands import search_main

    if not 1 <= limit <= MAX_LIMIT:
        _usage_error(f"search: --limit must be between 1 and {MAX_LIMIT}")
    start, end = _instant(since, "--since"), _instant(until, "--until")
    settings = _settings()
    code = _run(
        lambda: search_main(
            settings,
            text,
            session_id=session,
            user_id=user,
            role=role,
            since=start,
            until=end,
            limit=limit,
            after=after,
            as_json=json,
        )
    )
    raise typer.Exit(code)


MAX_RESTORE_TTL_S = 10 * 365 * 86400


@app.command()
def restore(
    session_id: Annotated[str, typer.Argument(help="The session id.")],
    turns: Annotated[
        int | None,
        typer.Option(
            "--turns",
            help="Recent turns to put back (default: every turn after the latest summary).",
        ),
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", help="Expiry of the restored key, seconds.")] = 86400,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the session's live state if it has any.")
    ] = False,
    quarantined: Annotated[
        bool,
        typer.Option(
            "--quarantined",
            help="Put back the session's quarantined keys that are gone, from the copies "
            "their quarantine records keep (each as it was when last copied).",
        ),
    ] = False,
) -> None:
    """Put an archived session back into Redis: its latest summary and last turns."""
    from worker.commands import restore_main, restore_quarantined_main

    if turns is not None and turns < 0:
        _usage_error("restore: --turns cannot be negative")
    if quarantined and (turns is not None or force):
        # No --force: a live quarantined key's turns since the copy are in no archive.
        _usage_error(
            "restore: --quarantined puts back whole keys that are gone; no --turns or --force"
        )
    if not 1 <= ttl <= MAX_RESTORE_TTL_S:
        # Checked here: Redis refuses an expiry past its range only after the key is rewritten.
        _usage_error(f"restore: --ttl must be 1 to {MAX_RESTORE_TTL_S} seconds (10 years)")
    settings = _settings()
    if quarantined:
        raise typer.Exit(_run(lambda: restore_quarantined_main(settings, session_id, ttl_s=ttl)))
    raise typer.Exit(
        _run(lambda: restore_main(settings, session_id, turns=turns, ttl_s=ttl, force=force))
    )


@app.command()
def forget(
    session_id: Annotated[str | None, typer.Argument(help="The session id.")] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Every session of this user; with an id, this user's one."),
    ] = None,
) -> None:
    """Erase a session (or a user's sessions) from Redis and the archive, leaving an audit row."""
    from worker.commands import forget_main

    if session_id is None and user is None:
        _usage_error("forget: name a session id, --user ID, or both")
    if any(given is not None and not given.strip() for given in (session_id, user)):
        _usage_error("forget: the session or user id is empty")
    settings = _settings()
    raise typer.Exit(_run(lambda: forget_main(settings, session_id=session_id, user_id=user)))


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Retention, e.g. 90d, 12h, 1h30m.")
    ],
) -> None:
    """Delete archived data older than the retention (idle sessions, folded turns)."""
    from worker.commands import prune_main

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        _usage_error(f"prune: --older-than: {exc}")
        raise  # unreachable: _usage_error exits
    settings = _settings()
    raise typer.Exit(_run(lambda: prune_main(settings, age)))


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal or a supervisor's reload must drain, not kill mid-pass and
    # leave leases that hold the sessions back from other replicas for a lease's length.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def print_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str).decode() + "\n")


def main() -> None:
    tune_gc()
    for arg in sys.argv[1:]:
        # Python hands undecodable bytes over as lone surrogates, which no server accepts: an
        # id or a query must be refused here, not fail as a driver's traceback.
        if not _is_utf8(arg):
            raw = arg.encode("utf-8", "surrogateescape")
            print(f"consolidator: argument {raw!r} is not valid UTF-8", file=sys.stderr)
            raise SystemExit(2)
    app()


def _is_utf8(arg: str) -> bool:
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
