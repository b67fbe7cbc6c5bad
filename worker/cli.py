"""The `consolidator` command. The only place that installs signal handlers.

Exit codes: 0 success, 1 some work failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import orjson
import typer
from pydantic import ValidationError

from worker import logs
from worker.config import Settings
from worker.hot.keys import PatternError

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
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _usage_error(message: str) -> None:
    print(f"consolidator: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except PatternError as exc:
        _usage_error(str(exc))
        raise  # unreachable: _usage_error exits


@app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """The daemon: scan, consolidate, repeat. SIGTERM or Ctrl-C drains in-flight work."""
    from worker.commands import daemon_main

    settings = _settings()
    code = _run(lambda: daemon_main(settings, once=once, install_signals=_install_signals))
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

    settings = _settings()
    raise typer.Exit(_run(lambda: history_main(settings, session_id, as_json=json)))


@app.command()
def migrate() -> None:
    """Apply the archive's schema migrations."""
    from worker.archive.schema import head_revision, upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url)
    except Exception as exc:
        print(f"consolidator: migrate failed: {exc}", file=sys.stderr)
        raise typer.Exit(1) from exc
    print(f"schema at {head_revision(settings.database_url)}")


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


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def print_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str).decode() + "\n")


def main() -> None:
    app()
