"""The archive's schema. Alembic migrations create it; this module describes it for queries."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", Text, primary_key=True),
    Column("redis_key", Text, nullable=False),
    Column("layout", Text, nullable=False),
    Column("app_name", Text),
    Column("user_id", Text),
    Column("agent_id", Text),
    # The next seq to archive: the count of turns (and gaps) archived so far. Writers move it
    # forward only from the value they read, which makes concurrent archiving safe.
    Column("turn_count", BigInteger, nullable=False, server_default="0"),
    Column("first_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_consolidated", DateTime(timezone=True)),
    Column("metadata", JSONB, nullable=False, server_default="{}"),
    Index(None, "user_id"),
)

turns = Table(
    "turns",
    metadata,
    Column(
        "session_id", Text, ForeignKey("sessions.session_id", ondelete="CASCADE"), primary_key=True
    ),
    Column("seq", BigInteger, primary_key=True),
    Column("role", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("raw_sha", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("archived_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

summaries = Table(
    "summaries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "session_id",
        Text,
        ForeignKey("sessions.session_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("from_seq", BigInteger, nullable=False),
    Column("through_seq", BigInteger, nullable=False),
    Column("text", Text, nullable=False),
    # The element(s) written to Redis, and the digest of the first: how the next pass
    # recognises the summary at the head of the hot state, even after a crash.
    Column("elements", ARRAY(BYTEA), nullable=False),
    Column("head_sha", LargeBinary, nullable=False),
    Column("applied", Integer, nullable=False, server_default="0"),
    Column("summarizer", Text, nullable=False),
    Column("model", Text),
    Column("model_version", Text),
    Column("tokens_in", Integer),
    Column("tokens_out", Integer),
    Column("latency_ms", Float),
    Column("cost_usd", Float),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "session_id", "through_seq"),
    Index(None, "session_id", "head_sha"),
)

gaps = Table(
    "gaps",
    metadata,
    Column(
        "session_id", Text, ForeignKey("sessions.session_id", ondelete="CASCADE"), primary_key=True
    ),
    # The gap lies just before this seq: turns the agent trimmed before the archive saw them.
    Column("before_seq", BigInteger, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("detected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("redis_key", Text, primary_key=True),
    Column("session_id", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("first_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "session_id"),
)
