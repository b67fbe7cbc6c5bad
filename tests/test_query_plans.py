"""The common queries use indexes, and session-scoped ones touch one partition, on a large archive.

200,000 turns in 2,000 sessions are loaded, ANALYZEd, and each query's EXPLAIN is checked: no
sequential scan of `turns`, at least one index scan of it. `plans_text` renders the same plans
for docs/archive.md.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson
import pytest
from sqlalchemy import Executable, select
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from tests.conftest import _plain
from worker.archive.retention import delete_folded, old_turns_page
from worker.archive.search import SearchQuery, search_statement
from worker.archive.tables import turns

pytestmark = pytest.mark.timeout(300)  # the load takes half a minute on a small machine

SESSIONS = 2000
TURNS_PER_SESSION = 100
RARE = "zanzibar"  # in 1 turn of 5,000


async def load(pg: asyncpg.Connection, prefix: str) -> None:
    # Bulk-load settings for this connection only: GIN entries are merged once, by the VACUUM.
    await pg.execute("SET gin_pending_list_limit = '256MB'")
    await pg.execute("SET work_mem = '256MB'")
    await pg.execute("SET maintenance_work_mem = '256MB'")
    await pg.execute(
        """
        INSERT INTO sessions (session_id, redis_key, layout, user_id, turn_count)
        SELECT $1 || 'plan-' || s, $1 || 'conversation:plan-' || s || ':history', 'list',
               $1 || 'user-' || (s % 500), $2
        FROM generate_series(0, $3 - 1) AS s
        """,
        prefix,
        TURNS_PER_SESSION,
        SESSIONS,
    )
    # Text of 8 to 30 words from a 5,000-word vocabulary; the rare word now and then.
    await pg.execute(
        f"""
        INSERT INTO turns (session_id, seq, role, text, raw, raw_sha, created_at, archived_at)
        SELECT session_id, seq, role, body, convert_to(body, 'UTF8'),
               sha256(convert_to(body, 'UTF8')), at, at
        FROM (
            SELECT $1 || 'plan-' || s AS session_id, q AS seq,
                   CASE WHEN q % 2 = 0 THEN 'user' ELSE 'assistant' END AS role,
                   now() - make_interval(mins => ($2 - q) * 7 + s) AS at,
                   (SELECT string_agg('word' || ((s * 7919 + q * 104729 + i * i * 31) % 5000), ' ')
                    FROM generate_series(1, 8 + (s + q) % 23) AS i)
                   || CASE WHEN (s * $2 + q) % 5000 = 17 THEN ' {RARE} trip' ELSE '' END AS body
            FROM generate_series(0, $3 - 1) AS s, generate_series(0, $2 - 1) AS q
        ) AS generated
        """,
        prefix,
        TURNS_PER_SESSION,
        SESSIONS,
    )
    # What autovacuum does on a live archive: statistics, and the GIN index's pending list
    # merged (a bulk load leaves it long, which makes the index look costlier than it is).
    await pg.execute("VACUUM ANALYZE sessions")
    await pg.execute("VACUUM ANALYZE turns")
    await pg.execute("RESET ALL")


@pytest.fixture(scope="module")
async def loaded(database_url: str) -> AsyncIterator[str]:
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    pg = await asyncpg.connect(_plain(database_url))
    try:
        await load(pg, prefix)
        yield prefix
        await pg.execute("DELETE FROM sessions WHERE session_id LIKE $1", prefix + "plan-%")
    finally:
        await pg.close()


def queries(prefix: str) -> dict[str, Executable]:
    """The statements the product runs, as its modules build them."""
    one = f"{prefix}plan-1234"
    user = f"{prefix}user-42"
    # The loaded turns span about two days: half of them are "old" for a one-day retention.
    cutoff = datetime.now(UTC) - timedelta(days=1)
    page_start = (cutoff - timedelta(hours=6), f"{prefix}plan-1", 40)
    page_end = (cutoff - timedelta(hours=5), f"{prefix}plan-1999", 0)
    return {
        # ArchiveReader.history and `consolidator history`
        "history of a session": select(turns.c.seq, turns.c.role, turns.c.text, turns.c.created_at)
        .where(turns.c.session_id == one)
        .order_by(turns.c.seq),
        # writer.read_state: the alignment tail
        "alignment tail": select(turns.c.seq, turns.c.raw_sha).where(
            turns.c.session_id == one, turns.c.seq >= TURNS_PER_SESSION - 20
        ),
        # restore: the last N turns after the summary
        "restore: last turns": select(turns.c.seq, turns.c.raw)
        .where(turns.c.session_id == one, turns.c.seq > 80)
        .order_by(turns.c.seq.desc())
        .limit(10),
        "search, whole archive": search_statement(SearchQuery(RARE)),
        "search, one user": search_statement(SearchQuery("word42", user_id=user)),
        "search, one session": search_statement(SearchQuery("word42", session_id=one)),
        # retention: the walk over old turns, and the deletion of one page's folded turns
        "retention: old turns": old_turns_page(cutoff, None, 2000),
        "retention: next page": old_turns_page(cutoff, page_start, 2000),
        "retention: delete folded": delete_folded(cutoff, page_start, page_end),
    }


SESSION_SCOPED = {
    "history of a session",
    "alignment tail",
    "restore: last turns",
    "search, one session",
}


def _compiled(stmt: Executable) -> tuple[str, list[Any]]:
    assert isinstance(stmt, ClauseElement)
    compiled = cast(SQLCompiler, stmt.compile(dialect=asyncpg_dialect()))  # type: ignore[no-untyped-call]
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    return str(compiled), params


async def explain(pg: asyncpg.Connection, stmt: Executable, fmt: str = "JSON") -> Any:
    sql, params = _compiled(stmt)
    rows = await pg.fetch(f"EXPLAIN (FORMAT {fmt}, COSTS true) {sql}", *params)
    if fmt == "JSON":
        return orjson.loads(rows[0][0])[0]["Plan"]
    return "\n".join(r[0] for r in rows)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


async def test_common_queries_use_indexes_and_prune_partitions(
    pg: asyncpg.Connection, loaded: str
) -> None:
    assert (
        await pg.fetchval("SELECT count(*) FROM turns WHERE session_id LIKE $1", loaded + "plan-%")
        == SESSIONS * TURNS_PER_SESSION
    )
    for name, stmt in queries(loaded).items():
        plan = await explain(pg, stmt)
        all_nodes = list(nodes(plan))
        on_turns = [n for n in all_nodes if n.get("Relation Name", "").startswith("turns")]
        seq_scans = [n["Relation Name"] for n in on_turns if n["Node Type"] == "Seq Scan"]
        assert not seq_scans, (name, seq_scans)
        index_scans = [
            n
            for n in all_nodes
            if n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
            and n.get("Index Name", "").startswith("turns_p")
        ]
        assert index_scans, (name, [n["Node Type"] for n in all_nodes])
        if name in SESSION_SCOPED:
            partitions = {n["Relation Name"] for n in on_turns}
            assert len(partitions) == 1, (name, partitions)
        if name.startswith("search"):
            gin = [n for n in index_scans if re.search(r"search", n["Index Name"])]
            pk = [n for n in index_scans if n["Index Name"].endswith("pkey")]
            assert gin or pk, name


async def test_search_finds_the_rare_turns_in_the_large_archive(
    pg: asyncpg.Connection, loaded: str
) -> None:
    sql, params = _compiled(search_statement(SearchQuery(RARE, limit=100)))
    rows = await pg.fetch(sql, *params)
    expected = SESSIONS * TURNS_PER_SESSION // 5000
    mine = [r for r in rows if r["session_id"].startswith(loaded)]
    assert len(mine) == expected
    assert all(f"<mark>{RARE}</mark>" in r["snippet"] for r in mine)


async def plans_text(pg: asyncpg.Connection, prefix: str) -> str:
    """The EXPLAIN of every query, as docs/archive.md shows them."""
    out = []
    for name, stmt in queries(prefix).items():
        text = await explain(pg, stmt, "TEXT")
        out.append(f"-- {name}\n{text}")
    return "\n\n".join(out)
