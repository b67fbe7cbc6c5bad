"""Schema migrations (Alembic) and the check that the daemon runs on the current schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

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


def _known_revisions(config: Config) -> list[str]:
    """The revisions this version carries, newest first."""
    return [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]


class UnknownRevision(ValueError):
    pass


class DataWouldBeLost(RuntimeError):
    """A downgrade would drop data, and the operator did not say to (`migrate --drop-data`)."""


def guard_downgrade(table: str, holding: str, what: str, below: str) -> None:
    """Called by a migration's downgrade before it drops columns of `table`: counts the rows
    `holding` data there, refuses unless the operator said to drop it, and notes what went.
    The table is locked first, so the count is what the drop takes: a writer that comes later
    waits for the downgrade, then finds the column gone."""
    if context.is_offline_mode():
        return  # a generated script: nothing to count
    op.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    count = op.get_bind().execute(text(f"SELECT count(*) FROM {table} WHERE {holding}"))
    found = int(count.scalar_one())
    if not found:
        return
    attributes = context.config.attributes
    lost = f"{what}: {found}"
    if not attributes.get("drop_data"):
        raise DataWouldBeLost(
            f"taking the schema below {below} would drop {lost}; nothing was changed "
            "(run it again with --drop-data to drop them)"
        )
    attributes.setdefault("dropped", []).append(f"{lost} (schema {below})")


def migrate_to(
    database_url: str, target: str, current: str | None, *, drop_data: bool = False
) -> list[str]:
    """Upgrade to `target`, or downgrade to it when the database (at `current`) is past it:
    how an operator takes the schema back before rolling back to an older version. A
    downgrade that would drop data raises DataWouldBeLost unless `drop_data`; what it dropped
    is returned. Blocking: call it outside the event loop."""
    config = alembic_config(database_url)
    config.attributes["drop_data"] = drop_data
    known = _known_revisions(config)
    if target != "head" and target not in known:
        raise UnknownRevision(f"no schema revision {target!r} here (known: {', '.join(known)})")
    if current is not None and current not in known:
        raise UnknownRevision(
            f"the database's schema {current} is newer than this version knows: migrate it with "
            "the version that made it"
        )
    if target != "head" and current is not None and known.index(target) > known.index(current):
        command.downgrade(config, target)
    else:
        command.upgrade(config, target)
    return list(config.attributes.get("dropped", []))


def outdated_message(found: str | None, wanted: str | None, database_url: str) -> str:
    """What an operator reads when the schema is not the one this version needs."""
    known = _known_revisions(alembic_config(database_url))
    if found is not None and found not in known:
        # A newer version migrated it: this one's `migrate` cannot go there or back.
        return (
            f"database schema is at {found}, newer than this version (which needs {wanted}): "
            f"run the newer version, or take the schema back first with the newer version's "
            f"`consolidator migrate --to {wanted}`"
        )
    return (
        f"database schema is at {found or 'nothing'}, this version needs {wanted}: "
        "run `consolidator migrate`"
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        try:
            result = await conn.execute(text("SELECT version_num FROM alembic_version"))
        except ProgrammingError:
            return None
        return result.scalar_one_or_none()


def current_revision_of(database_url: str) -> str | None:
    """The database's schema revision, from outside an event loop (the command line's)."""

    async def read() -> str | None:
        engine = create_async_engine(database_url, poolclass=NullPool)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


async def ensure_current(engine: AsyncEngine, database_url: str) -> None:
    found = await current_revision(engine)
    wanted = head_revision(database_url)
    if found != wanted:
        raise SchemaOutdated(outdated_message(found, wanted, database_url))
