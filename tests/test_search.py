"""Full-text search over the archive: ranking, filters, pagination, snippets, the CLI."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import pytest

from tests.archive_helpers import archive, cli, turn
from worker.archive.reader import ArchiveReader
from worker.archive.search import BadCursor, EmptyQuery
from worker.runtime import Runtime


@pytest.fixture
def user() -> str:
    # Search spans the whole archive: each test looks only at its own user's sessions.
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_the_better_match_ranks_first_and_stems_match(
    runtime: Runtime, prefix: str, user: str
) -> None:
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}rank",
        [
            turn("user", "Where is my parcel? It left Lyon on Monday."),
            turn("assistant", "The refund was issued."),
            turn("user", "I asked for a refund of the damaged invoice, please refund the invoice."),
            turn("assistant", "Your invoices are attached."),
        ],
        user_id=user,
    )
    page = await ArchiveReader(runtime.engine).search("refund invoice", user_id=user)
    assert [h.seq for h in page.hits] == [2]  # both words: only the turn that has both

    page = await ArchiveReader(runtime.engine).search("refund or invoice", user_id=user)
    seqs = [h.seq for h in page.hits]
    assert seqs[0] == 2  # both words, repeated: the better match comes first
    assert set(seqs) == {1, 2, 3}  # "invoices" is found by its stem; the parcel turn is not
    assert page.hits[0].rank > page.hits[-1].rank
    assert page.cursor is None


async def test_snippets_highlight_the_matching_words(
    runtime: Runtime, prefix: str, user: str
) -> None:
    long_text = " ".join(["filler words about nothing in particular"] * 20)
    text = f"{long_text} the customer wants a refund for order ORD-1234. {long_text}"
    await archive(
        runtime.engine, runtime.settings, f"{prefix}snip", [turn("user", text)], user_id=user
    )

    hit = (await ArchiveReader(runtime.engine).search("refunds", user_id=user)).hits[0]

    assert "<mark>refund</mark>" in hit.snippet
    assert len(hit.snippet) < len(text) / 2  # an excerpt around the match, not the whole turn
    assert hit.text == text


async def test_filters_by_session_user_role_and_time(
    runtime: Runtime, prefix: str, user: str
) -> None:
    now = datetime.now(UTC)
    other_user = f"{user}-other"
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}a",
        [
            turn("user", "booking for Kyoto", now - timedelta(days=10)),
            turn("assistant", "Kyoto booking confirmed", now - timedelta(days=2)),
        ],
        user_id=user,
    )
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}b",
        [turn("user", "cancel the Kyoto booking", now - timedelta(hours=1))],
        user_id=user,
    )
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}c",
        [turn("user", "Kyoto for me too", now)],
        user_id=other_user,
    )
    reader = ArchiveReader(runtime.engine)

    async def found(**filters: object) -> set[tuple[str, int]]:
        page = await reader.search("kyoto", limit=50, **filters)  # type: ignore[arg-type]
        return {(h.session_id.removeprefix(prefix), h.seq) for h in page.hits}

    assert await found(user_id=user) == {("a", 0), ("a", 1), ("b", 0)}
    assert await found(user_id=other_user) == {("c", 0)}
    assert await found(session_id=f"{prefix}a") == {("a", 0), ("a", 1)}
    assert await found(user_id=user, role="assistant") == {("a", 1)}
    assert await found(user_id=user, since=now - timedelta(days=3)) == {("a", 1), ("b", 0)}
    assert await found(user_id=user, until=now - timedelta(days=3)) == {("a", 0)}
    both = await found(user_id=user, since=now - timedelta(days=3), until=now - timedelta(days=1))
    assert both == {("a", 1)}


async def test_pages_cover_every_hit_once_in_rank_order(
    runtime: Runtime, prefix: str, user: str
) -> None:
    # Ranks with many ties (same text in several sessions) and many distinct values.
    for s in range(6):
        turns = [
            turn("user", " ".join(["deadline"] * (1 + (i % 4))) + f" item {i} of sprint {s}")
            for i in range(9)
        ]
        turns.insert(4, turn("assistant", "nothing relevant here"))
        await archive(runtime.engine, runtime.settings, f"{prefix}p{s}", turns, user_id=user)
    reader = ArchiveReader(runtime.engine)
    everything = (await reader.search("deadline", user_id=user, limit=1000)).hits
    assert len(everything) == 6 * 9

    seen: list[tuple[str, int]] = []
    ranks: list[float] = []
    cursor = None
    pages = 0
    while True:
        page = await reader.search("deadline", user_id=user, limit=7, after=cursor)
        pages += 1
        assert len(page.hits) <= 7
        seen += [(h.session_id, h.seq) for h in page.hits]
        ranks += [h.rank for h in page.hits]
        if page.cursor is None:
            break
        cursor = page.cursor
        if pages == 3:
            # Turns archived between two pages must not disturb the walk.
            await archive(
                runtime.engine,
                runtime.settings,
                f"{prefix}p0",
                [turn("user", "deadline deadline deadline deadline late arrival")],
                user_id=user,
            )
    assert pages == 8
    assert len(seen) == len(set(seen))  # no repeats
    assert set(seen) >= {(h.session_id, h.seq) for h in everything}  # no omissions
    assert ranks == sorted(ranks, reverse=True)


async def test_queries_without_searchable_words_and_foreign_cursors_are_refused(
    runtime: Runtime,
) -> None:
    reader = ArchiveReader(runtime.engine)
    with pytest.raises(EmptyQuery):
        await reader.search("the and of")
    with pytest.raises(EmptyQuery, match="symbols and punctuation are not indexed"):
        await reader.search("€ -- ?")
    with pytest.raises(BadCursor):
        await reader.search("refund", after="not-a-cursor")


async def test_cli_json_lines_page_through_with_the_cursor(
    runtime: Runtime, prefix: str, user: str
) -> None:
    created = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}cli",
        [
            turn("user" if i % 2 else "assistant", f"warranty claim number {i}", created)
            for i in range(5)
        ],
        user_id=user,
    )
    first = await cli(
        runtime.settings, "search", "warranty", "--user", user, "--limit", "3", "--json"
    )
    assert first.returncode == 0, first.stderr
    hits = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(hits) == 3
    assert f"more: add --after {hits[-1]['cursor']}" in first.stderr
    assert set(hits[0]) == {
        "session_id",
        "seq",
        "role",
        "text",
        "kind",
        "created_at",
        "rank",
        "snippet",
        "cursor",
    }
    assert hits[0]["session_id"] == f"{prefix}cli" and hits[0]["kind"] == "turn"
    assert datetime.fromisoformat(hits[0]["created_at"]) == created
    assert "<mark>warranty</mark>" in hits[0]["snippet"]

    def after(cursor: str) -> Awaitable[subprocess.CompletedProcess[str]]:
        args = ("search", "warranty", "--user", user, "--json", "--after", cursor)
        return cli(runtime.settings, *args)

    rest = await after(hits[-1]["cursor"])
    assert rest.returncode == 0, rest.stderr
    more = [json.loads(line) for line in rest.stdout.splitlines()]
    assert "more:" not in rest.stderr
    seqs = [h["seq"] for h in hits + more]
    assert sorted(seqs) == [0, 1, 2, 3, 4]

    # Any hit's cursor resumes right after it: a consumer that stopped midway goes on from there.
    resumed = await after(hits[0]["cursor"])
    assert [json.loads(x)["seq"] for x in resumed.stdout.splitlines()] == seqs[1:]

    only_users = await cli(
        runtime.settings, "search", "warranty", "--user", user, "--role", "user", "--json"
    )
    assert {json.loads(x)["seq"] for x in only_users.stdout.splitlines()} == {1, 3}


async def test_cli_terminal_output_and_usage_errors(
    runtime: Runtime, prefix: str, user: str
) -> None:
    await archive(
        runtime.engine,
        runtime.settings,
        f"{prefix}term",
        [turn("user", "please escalate [bold]this[/bold] ticket")],
        user_id=user,
    )
    shown = await cli(runtime.settings, "search", "escalate", "--user", user)
    assert shown.returncode == 0, shown.stderr
    assert f"{prefix}term" in shown.stdout
    assert "[bold]this[/bold]" in shown.stdout  # the turn's text is shown, never read as markup
    assert "\\u0002" not in shown.stdout and "\\u0003" not in shown.stdout
    colour = await cli(runtime.settings, "search", "escalate", "--user", user, FORCE_COLOR="1")
    assert "\x1b[1;33mescalate\x1b[0m" in colour.stdout  # the match is highlighted

    nothing = await cli(runtime.settings, "search", "zyzzyvas", "--user", user)
    assert nothing.returncode == 0 and "no matches" in nothing.stderr

    for args in (
        ["search", "the"],
        ["search", "refund", "--after", "garbage"],
        ["search", "refund", "--since", "last tuesday"],
        ["search", "refund", "--limit", "0"],
    ):
        bad = await cli(runtime.settings, *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("consolidator:"), bad.stderr
