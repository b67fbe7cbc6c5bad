"""Alembic environment: async, the URL from the application's settings."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from worker.archive.tables import metadata
from worker.config import Settings

config = context.config
target_metadata = metadata


def _url() -> str:
    return config.attributes.get("database_url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        # Only one replica migrates at a time; the others wait, then find nothing to do.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7312001)")
        # A migration's ALTER waits for a table lock, and every daemon's query on that table
        # queues behind the wait: give up after 5 s (run it again) rather than stall them.
        connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
