"""The order a list-layout session was archived in: `sessions.newest_first`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

`restore` writes the list back in the order the agent keeps it: LPUSH (newest first) or
RPUSH. Until now it took that order from its own configuration (CONSOLIDATOR_NEWEST_FIRST),
so a restore run with another configuration than the daemon's (an operator's shell, say)
wrote the conversation back reversed. The writers now record the order on the session's row.

A nullable column without a default: adding it rewrites nothing, and is instant on any size.
Rows archived before stay NULL ("not known"); restore falls back to its configuration for
those. Daemons of the previous version refuse to start on this schema (they check the
revision); ones already running keep working, and leave the column as it was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.archive.schema import guard_downgrade

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("newest_first", sa.Boolean(), nullable=True))


def downgrade() -> None:
    guard_downgrade(
        "sessions", "newest_first IS NOT NULL", "list orders recorded for sessions", "0003"
    )
    op.drop_column("sessions", "newest_first")
