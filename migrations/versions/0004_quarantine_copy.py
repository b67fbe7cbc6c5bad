"""A copy of each quarantined key's value: `quarantine.saved_value`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

A quarantined key is not archived: one malformed element keeps every good turn beside it out
of the archive until an operator fixes the key. Until now, a key that expired before then
took the whole conversation with it. The daemon now keeps the key's value as Redis's DUMP
serializes it (any type, byte for byte), refreshed when the value changes, and `consolidator
restore ID --quarantined` puts it back.

Nullable columns without defaults: adding them rewrites nothing. Records made before stay
without a copy until the daemon meets their key again. Daemons of the previous version keep
working on this schema and leave the columns as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.archive.schema import guard_downgrade

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("quarantine", sa.Column("saved_value", sa.LargeBinary(), nullable=True))
    op.add_column("quarantine", sa.Column("saved_sha256", sa.LargeBinary(), nullable=True))
    op.add_column("quarantine", sa.Column("saved_at", sa.DateTime(timezone=True), nullable=True))
    # Whose conversation the copy holds, so that `forget --user` finds it once the key (and
    # the metadata naming the user) has expired: such a session was never archived.
    op.add_column("quarantine", sa.Column("user_id", sa.Text(), nullable=True))
    op.create_index("ix_quarantine_user_id", "quarantine", ["user_id"])


def downgrade() -> None:
    # A copy may be all that is left of a conversation whose key expired.
    guard_downgrade("quarantine", "saved_value IS NOT NULL", "copies of quarantined keys", "0004")
    op.drop_index("ix_quarantine_user_id", table_name="quarantine")
    for column in ("user_id", "saved_at", "saved_sha256", "saved_value"):
        op.drop_column("quarantine", column)
