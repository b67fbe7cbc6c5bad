"""`make demo`: load a few hundred realistic agent sessions into Redis, let the daemon do its
work with a live view, and report what happened in words and numbers.

Uses the servers named by CONSOLIDATOR_REDIS_URL / CONSOLIDATOR_DATABASE_URL (the Makefile
starts private ones when none answers), its own key prefix and its own database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import demo_data
from worker import logs
from worker.archive.reader import ArchiveReader
from worker.archive.schema import upgrade
from worker.config import Settings
from worker.domain import Outcome
from worker.runtime import open_runtime

PATTERN = "demo:conversation:{id}:history"
DATABASE = "consolidator_demo"
console = Console()


async def demo_database(url: str) -> str:
    """The demo's own database beside the configured one, created fresh."""
    base = url.rsplit("/", 1)[0]
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    return f"{base}/{DATABASE}"


async def hot_memory(redis: Redis) -> tuple[int, int]:
    """(bytes used by the demo's keys, Redis used_memory)."""
    total = 0
    async for key in redis.scan_iter(match="demo:conversation:*", count=1000):
        total += await redis.memory_usage(key, samples=0) or 0
    info = await redis.info("memory")
    return total, int(info["used_memory"])


def show_session(title: str, elements: Sequence[bytes | str], limit: int = 8) -> Panel:
    lines = []
    for raw in elements[:limit]:
        obj = json.loads(raw)
        text = str(obj.get("content") or "").replace("\n", " ")
        lines.append(f"[bold]{obj['role']:>9}[/] {text[:110]}")
    if len(elements) > limit:
        lines.append(f"[dim]… {len(elements) - limit} more[/]")
    return Panel("\n".join(lines), title=f"{title} ({len(elements)} elements)")


async def main(count: int) -> None:
    logs.configure("warning", "console")
    base = Settings()
    url = await demo_database(base.database_url)
    await asyncio.to_thread(upgrade, url)
    settings = Settings(
        database_url=url,
        key_pattern=PATTERN,
        idle_after_s=900,
        expiry_margin_s=300,
        keep_recent=6,
        max_hot_tokens=6000,
        summarizer="extractive",
        concurrency=16,
    )
    sessions = demo_data.sessions(count)
    async with open_runtime(settings) as rt:
        redis = rt.redis
        async for key in redis.scan_iter(match="demo:conversation:*", count=1000):
            await redis.delete(key)
        await demo_data.load(redis, PATTERN, sessions)
        kinds = Counter(s.kind for s in sessions)
        console.print(
            f"Loaded {len(sessions)} sessions, {sum(len(s.elements) for s in sessions)} turns: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        )
        example = max((s for s in sessions if s.kind == "idle"), key=lambda s: len(s.elements))
        example_key = PATTERN.replace("{id}", example.session_id)
        before = example.elements  # reading the key now would make it look active
        mem_before, used_before = await hot_memory(redis)

        work = await rt.daemon.find_work()
        console.print(
            f"The daemon found {len(work)} sessions to consolidate "
            f"(idle, expiring soonest first, oversize); active ones are left alone."
        )
        columns = (
            TextColumn("consolidating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[turns]} turns archived"),
            TimeElapsedColumn(),
        )
        outcomes: list[Outcome] = []
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("run", total=len(work), turns=0)

            def advance(outcome: Outcome) -> None:
                outcomes.append(outcome)
                progress.update(task, advance=1, turns=sum(o.turns_archived for o in outcomes))

            await rt.daemon.run_once(on_outcome=advance)

        after = await redis.lrange(example_key, 0, -1)
        mem_after, used_after = await hot_memory(redis)
        reader = ArchiveReader(rt.engine)
        counts = await reader.counts()
        history = await reader.history(example.session_id)

    statuses = Counter(o.status for o in outcomes)
    table = Table(title="What the daemon did", show_header=False)
    table.add_row("sessions consolidated", str(statuses.get("consolidated", 0)))
    table.add_row("sessions archived only (short)", str(statuses.get("archived", 0)))
    table.add_row(
        "sessions failed / quarantined",
        f"{statuses.get('failed', 0)} / {statuses.get('quarantined', 0)}",
    )
    table.add_row("turns archived to PostgreSQL", str(sum(o.turns_archived for o in outcomes)))
    table.add_row("turns folded into summaries", str(sum(o.turns_folded for o in outcomes)))
    table.add_row(
        "demo keys' memory in Redis",
        f"{mem_before / 1024:.0f} KiB → {mem_after / 1024:.0f} KiB "
        f"({100 * (mem_before - mem_after) / max(mem_before, 1):.0f}% less)",
    )
    table.add_row(
        "Redis used_memory", f"{used_before / 2**20:.1f} MiB → {used_after / 2**20:.1f} MiB"
    )
    table.add_row(
        "archive",
        f"{counts['sessions']} sessions, {counts['turns']} turns, "
        f"{counts['summaries']} summaries, {counts['archive_bytes'] / 2**20:.1f} MiB",
    )
    console.print(table)
    console.print(show_session(f"{example.session_id} before", before))
    console.print(show_session(f"{example.session_id} after", after))
    turns = [e for e in history if e.kind.value == "turn"]
    summary = next(e for e in reversed(history) if e.kind.value == "summary")
    console.print(
        Panel(
            f"`consolidator history {example.session_id}` has all {len(turns)} turns, "
            f"seq 0..{turns[-1].seq}, byte for byte, and the summary:\n\n{summary.text}",
            title="archive query",
        )
    )
    print(
        "Explore it yourself:\n"
        f"  export CONSOLIDATOR_DATABASE_URL={url}\n"
        f"  export CONSOLIDATOR_KEY_PATTERN='{PATTERN}'\n"
        f"  .venv/bin/consolidator history {example.session_id}\n"
        "  .venv/bin/consolidator stats"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=300)
    asyncio.run(main(parser.parse_args().sessions))
