"""The naive pattern the benchmark compares against, written the way the seeds write it.

Deliberately naive (that is the point of it): one session at a time; read the whole list,
summarize the old turns, insert every turn through the SQLAlchemy ORM with a commit after each
one, then rewrite the hot state with DEL + RPUSH (+ EXPIRE). It keeps none of the daemon's
guarantees (no lease, no compare-and-swap: turns an agent appends meanwhile are lost; no
idempotency check before inserting) and none of its batching. It writes the same tables as the
daemon, with the same offline summarizer, so the two are measured on the same work.

    await naive_flush(redis, database_url, keys, keep_recent=10)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis
from sqlalchemy import BigInteger, DateTime, Integer, LargeBinary, Text
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.domain import Turn
from worker.summarizers.extractive import ExtractiveSummarizer


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    redis_key: Mapped[str] = mapped_column(Text)
    layout: Mapped[str] = mapped_column(Text)
    turn_count: Mapped[int] = mapped_column(BigInteger)


class TurnRow(Base):
    __tablename__ = "turns"

    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    role: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    raw_sha: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SummaryRow(Base):
    __tablename__ = "summaries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(Text)
    from_seq: Mapped[int] = mapped_column(BigInteger)
    through_seq: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)
    elements: Mapped[list[bytes]] = mapped_column(ARRAY(BYTEA))
    head_sha: Mapped[bytes] = mapped_column(LargeBinary)
    applied: Mapped[int] = mapped_column(Integer)
    summarizer: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True, slots=True)
class NaiveResult:
    sessions: int
    turns: int
    seconds: float


def _turn(raw: bytes) -> Turn:
    message = json.loads(raw)
    content = message.get("content")
    stamp = message.get("timestamp")
    return Turn(
        role=str(message.get("role")),
        text=content if isinstance(content, str) else "",
        raw=raw,
        created_at=datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else None,
    )


async def naive_flush(
    redis: Redis,
    database_url: str,
    keys: Sequence[str],
    *,
    keep_recent: int = 10,
    ttl_s: int = 3600,
    max_chars: int = 1200,
    summarize: bool = True,
) -> NaiveResult:
    """Consolidate `keys` (`...:{id}:history` lists) one by one, the naive way; with
    `summarize=False` only archive them (read, then insert and commit each turn)."""
    engine = create_async_engine(database_url, pool_size=2)
    make_session = async_sessionmaker(engine, expire_on_commit=False)
    summarizer = ExtractiveSummarizer()
    turns_written = 0
    started = time.perf_counter()
    try:
        for key in keys:
            session_id = key.split(":")[-2]
            elements = await redis.lrange(key, 0, -1)
            turns = [_turn(raw if isinstance(raw, bytes) else raw.encode()) for raw in elements]
            old, recent = turns[:-keep_recent], turns[-keep_recent:]
            async with make_session() as db:
                db.add(
                    SessionRow(
                        session_id=session_id, redis_key=key, layout="list", turn_count=len(turns)
                    )
                )
                await db.commit()
                for seq, turn in enumerate(turns):
                    db.add(
                        TurnRow(
                            session_id=session_id,
                            seq=seq,
                            role=turn.role,
                            text=turn.text,
                            raw=turn.raw,
                            raw_sha=hashlib.sha256(turn.raw).digest(),
                            created_at=turn.created_at,
                        )
                    )
                    await db.commit()
                    turns_written += 1
                if not old or not summarize:
                    continue
                summary = await summarizer.summarize(None, old, max_chars)
                element = json.dumps(
                    {
                        "role": "system",
                        "content": f"[Summary of the {len(old)} earlier turns]\n{summary.text}",
                        "timestamp": time.time(),
                    }
                ).encode()
                db.add(
                    SummaryRow(
                        session_id=session_id,
                        from_seq=0,
                        through_seq=len(old) - 1,
                        text=summary.text,
                        elements=[element],
                        head_sha=hashlib.sha256(element).digest(),
                        applied=1,
                        summarizer=summary.summarizer,
                    )
                )
                await db.commit()
            await redis.delete(key)
            await redis.rpush(key, element, *(t.raw for t in recent))
            await redis.expire(key, ttl_s)
    finally:
        await engine.dispose()
    return NaiveResult(len(keys), turns_written, time.perf_counter() - started)
