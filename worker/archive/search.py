"""Full-text search over archived turns: ranked, filtered, keyset-paginated, highlighted.

The GIN index on `turns.search` finds the matching turns; ranking sorts only those. Pages are
cut by keyset on (rank, session_id, seq), never by OFFSET: the next page starts strictly after
the last hit of this one, so a page costs the same however deep it is, and turns archived
between two pages neither repeat a hit nor hide one that was already ranked above the cursor.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Select, and_, cast, func, literal_column, or_, select, tuple_
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.archive.tables import SEARCH_CONFIG, SEARCH_MAX_CHARS, sessions, turns
from worker.domain import Kind

DEFAULT_MARKS = ("<mark>", "</mark>")
MAX_LIMIT = 1000
_CONFIG: ColumnElement[Any] = literal_column(f"'{SEARCH_CONFIG}'::regconfig")
# ts_rank's normalization 1 divides by 1 + log(length): a long tool output that mentions a word
# once does not outrank a short turn about it.
_NORMALIZATION: ColumnElement[Any] = literal_column("1")


class BadCursor(ValueError):
    pass


# PostgreSQL's snippets (ts_headline) cost grows with the square of the query's terms: 2,000
# words took 26 s. A person's search is a few words; this leaves room for a pasted sentence.
MAX_QUERY_CHARS = 1000


class QueryTooLong(ValueError):
    pass


class EmptyQuery(ValueError):
    """The query has no searchable words (empty, stop words like "the", symbols like "€")."""


@dataclass(frozen=True, slots=True)
class SearchHit:
    session_id: str
    seq: int
    role: str
    text: str
    created_at: datetime | None
    rank: float
    snippet: str

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "seq": self.seq,
            "role": self.role,
            "text": self.text,
            "kind": Kind.TURN.value,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "rank": self.rank,
            "snippet": self.snippet,
            "cursor": self.cursor,
        }

    @property
    def cursor(self) -> str:
        """Pass as `after` to go on with the hits ranked below this one."""
        return encode_cursor(self.rank, self.session_id, self.seq)


@dataclass(frozen=True, slots=True)
class SearchPage:
    hits: list[SearchHit]
    cursor: str | None  # pass as `after` for the next page; None when this is the last


@dataclass(frozen=True, slots=True)
class SearchQuery:
    text: str
    session_id: str | None = None
    user_id: str | None = None
    role: str | None = None
    since: datetime | None = None  # the turn's time (when archived, if the agent gave none)
    until: datetime | None = None
    limit: int = 20
    after: str | None = None
    marks: tuple[str, str] = DEFAULT_MARKS


def encode_cursor(rank: float, session_id: str, seq: int) -> str:
    raw = orjson.dumps([rank, session_id, seq])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        rank, session_id, seq = orjson.loads(raw)
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise BadCursor(f"not a search cursor: {cursor!r}") from exc
    if (
        not isinstance(rank, int | float)
        or not isinstance(session_id, str)
        or not isinstance(seq, int)
    ):
        raise BadCursor(f"not a search cursor: {cursor!r}")
    return float(rank), session_id, seq


def _tsquery(text: str) -> ColumnElement[Any]:
    # websearch syntax: "quoted phrases", OR, -excluded; it never fails on user input.
    return func.websearch_to_tsquery(_CONFIG, text)


def search_statement(query: SearchQuery) -> Select[Any]:
    """The page query: the hits after the cursor, best first, one more than the limit (to know
    whether another page exists), with their snippets."""
    if not 1 <= query.limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    start, stop = query.marks
    if '"' in start + stop:
        raise ValueError("highlight marks cannot contain a double quote")
    tsq = _tsquery(query.text)
    rank = cast(func.ts_rank(turns.c.search, tsq, _NORMALIZATION), DOUBLE_PRECISION)
    conditions: list[ColumnElement[bool]] = [turns.c.search.op("@@")(tsq)]
    if query.session_id is not None:
        conditions.append(turns.c.session_id == query.session_id)
    if query.user_id is not None:
        owned = select(sessions.c.session_id).where(sessions.c.user_id == query.user_id)
        conditions.append(turns.c.session_id.in_(owned))
    if query.role is not None:
        conditions.append(turns.c.role == query.role)
    when = func.coalesce(turns.c.created_at, turns.c.archived_at)
    if query.since is not None:
        conditions.append(when >= query.since)
    if query.until is not None:
        conditions.append(when < query.until)
    ranked = (
        select(
            turns.c.session_id,
            turns.c.seq,
            turns.c.role,
            turns.c.text,
            turns.c.created_at,
            rank.label("rank"),
        )
        .where(*conditions)
        .subquery("ranked")
    )
    order = (ranked.c.rank.desc(), ranked.c.session_id, ranked.c.seq)
    page = select(ranked)
    if query.after is not None:
        after_rank, after_session, after_seq = decode_cursor(query.after)
        page = page.where(
            or_(
                ranked.c.rank < after_rank,
                and_(
                    ranked.c.rank == after_rank,
                    tuple_(ranked.c.session_id, ranked.c.seq) > tuple_(after_session, after_seq),
                ),
            )
        )
    limited = page.order_by(*order).limit(query.limit + 1).subquery("page")
    # Snippets only for the page's rows: ts_headline re-parses the text and is the costly part.
    options = (
        f'StartSel="{start}", StopSel="{stop}", MaxWords=30, MinWords=10, '
        'MaxFragments=2, FragmentDelimiter=" … "'
    )
    snippet = func.ts_headline(
        _CONFIG, func.left(limited.c.text, SEARCH_MAX_CHARS), tsq, options
    ).label("snippet")
    return select(limited, snippet).order_by(
        limited.c.rank.desc(), limited.c.session_id, limited.c.seq
    )


async def search(conn: AsyncConnection, query: SearchQuery) -> SearchPage:
    if len(query.text) > MAX_QUERY_CHARS:
        raise QueryTooLong(f"the query is {len(query.text)} characters, at most {MAX_QUERY_CHARS}")
    lexemes = (await conn.execute(select(func.numnode(_tsquery(query.text))))).scalar_one()
    if not lexemes:
        raise EmptyQuery(
            f"nothing to search for in {query.text!r}: "
            "stop words (like 'the'), symbols and punctuation are not indexed"
        )
    rows = (await conn.execute(search_statement(query))).all()
    hits = [
        SearchHit(
            session_id=row.session_id,
            seq=row.seq,
            role=row.role,
            text=row.text,
            created_at=row.created_at,
            rank=float(row.rank),
            snippet=row.snippet,
        )
        for row in rows[: query.limit]
    ]
    return SearchPage(hits, hits[-1].cursor if len(rows) > query.limit else None)
