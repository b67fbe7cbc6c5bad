"""The archive as a product: full-text search, hash-partitioned turns, retention, erasure audit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Partitioning: `turns` is hash-partitioned by `session_id` into 16 partitions.

- Every hot query names one session (alignment's tail, history, restore, erasure), so the
  planner prunes it to a single partition whose indexes stay small however large the archive
  grows; only search without a session filter visits every partition (one GIN scan each).
- The primary key `(session_id, seq)` keeps the partition key, as PostgreSQL requires of a
  unique constraint on a partitioned table, so archiving stays idempotent unchanged. Range
  partitioning by time would have forced the time column into the key (breaking that
  idempotency) and would scatter one long conversation over many partitions.
- Retention therefore does not drop partitions: it deletes by `archived_at` (indexed in every
  partition) and by `sessions.last_seen`, in small batches.
- Hash partitions are also the unit a later move to Citus (distributed by `session_id`) or to
  more partitions (`ALTER TABLE ... DETACH`, re-insert) works with. 16 keeps planning cheap
  and each partition at a few percent of the table.

Full-text search: a stored generated `tsvector` column with a GIN index. A generated column
needs no change to the writer's multi-row INSERT. Only the first 100,000 characters are indexed:
a tsvector is limited to 1 MB, and an over-long tool output must never make a turn impossible
to archive. The `english` configuration stems English words; words of other languages are
still found by their exact (lower-cased) form.

On an existing 0001 database the turns are copied into the new table inside this migration's
transaction; stop the daemons first (they refuse to run on an old schema anyway).
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")
PARTITIONS = 16
SEARCH_EXPR = "to_tsvector('english'::regconfig, left(text, 100000))"
COPIED = "session_id, seq, role, text, raw, raw_sha, created_at, archived_at"


def _turn_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("raw_sha", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    ]


def _keys() -> list[sa.Constraint]:
    return [
        sa.PrimaryKeyConstraint("session_id", "seq", name="pk_turns"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.session_id"],
            name="fk_turns_session_id_sessions",
            ondelete="CASCADE",
        ),
    ]


def _set_aside_old_turns() -> None:
    # The primary key's name is an index name, unique in the schema: free it for the new table.
    op.rename_table("turns", "turns_old")
    op.execute("ALTER TABLE turns_old RENAME CONSTRAINT pk_turns TO pk_turns_old")
    op.execute(
        "ALTER TABLE turns_old RENAME CONSTRAINT fk_turns_session_id_sessions "
        "TO fk_turns_old_session_id_sessions"
    )


def upgrade() -> None:
    _set_aside_old_turns()
    op.create_table(
        "turns",
        *_turn_columns(),
        sa.Column("search", postgresql.TSVECTOR(), sa.Computed(SEARCH_EXPR, persisted=True)),
        *_keys(),
        postgresql_partition_by="HASH (session_id)",
    )
    for i in range(PARTITIONS):
        op.execute(
            f"CREATE TABLE turns_p{i:02d} PARTITION OF turns "
            f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
        )
    op.execute(f"INSERT INTO turns ({COPIED}) SELECT {COPIED} FROM turns_old")
    op.drop_table("turns_old")
    # Indexes after the copy: one build instead of row-by-row maintenance.
    op.create_index("ix_turns_search", "turns", ["search"], postgresql_using="gin")
    # Retention walks turns by age; session_id and seq make that walk a keyset (a whole pass
    # of the pipeline is archived with one timestamp, so age alone does not order the rows).
    op.create_index("ix_turns_archived_at", "turns", ["archived_at", "session_id", "seq"])
    op.create_index("ix_sessions_last_seen", "sessions", ["last_seen"])
    # Statistics for the planner now, not when autovacuum first visits the new partitions.
    op.execute("ANALYZE turns")
    op.create_table(
        "erasures",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("subject_kind", sa.Text(), nullable=False),
        # sha256 of the session or user id, hex: the audit proves an erasure happened without
        # keeping the identifier it erased.
        sa.Column("subject_sha256", sa.Text(), nullable=False),
        sa.Column("sessions_deleted", sa.Integer(), nullable=False),
        sa.Column("turns_deleted", sa.BigInteger(), nullable=False),
        sa.Column("summaries_deleted", sa.Integer(), nullable=False),
        sa.Column("gaps_deleted", sa.Integer(), nullable=False),
        sa.Column("quarantine_deleted", sa.Integer(), nullable=False),
        sa.Column("hot_keys_deleted", sa.Integer(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_erasures"),
        sa.CheckConstraint("subject_kind IN ('session', 'user')", name="ck_erasures_subject_kind"),
    )
    op.create_index("ix_erasures_subject_sha256", "erasures", ["subject_sha256"])


def downgrade() -> None:
    op.drop_table("erasures")
    op.drop_index("ix_sessions_last_seen", table_name="sessions")
    _set_aside_old_turns()
    op.create_table("turns", *_turn_columns(), *_keys())
    op.execute(f"INSERT INTO turns ({COPIED}) SELECT {COPIED} FROM turns_old")
    op.drop_table("turns_old")  # its partitions and indexes go with it
