"""Schema migrations (Alembic) and the check that the daemon runs on the current schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

_ROOT = Path(__file__).resolve().parents[2]
# A checkout has them at its top (Alembic's layout); an installed package carries a copy.
_MIGRATIONS = _ROOT / "migrations"
if not _MIGRATIONS.is_dir():
    _MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


class SchemaOutdated(RuntimeError):
    pass


def alembic_config(database_url: str) -> Config:
    ini = _ROOT / "alembic.ini"
    config = Config(str(ini) if ini.is_file() else None)
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["database_url"] = database_url
    return config


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def upgrade(database_url: str) -> None:
    """Apply every pending migration. Blocking: call it outside the event loop."""
    command.upgrade(alembic_config(database_url), "head")


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        try:
            result = await conn.execute(text("SELECT version_num FROM alembic_version"))
        except ProgrammingError:
            return None
        return result.scalar_one_or_none()


async def ensure_current(engine: AsyncEngine, database_url: str) -> None:
    found = await current_revision(engine)
    wanted = head_revision(database_url)
    if found != wanted:
        raise SchemaOutdated(
            f"database schema is at {found or 'nothing'}, this version needs {wanted}: "
            "run `consolidator migrate`"
        )
