"""Helpers for the archive tests: archiving chosen turns directly, and running the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL
from worker.archive import writer
from worker.config import Settings
from worker.domain import SessionRef, Turn

CLI = [sys.executable, "-m", "worker"]


def turn(role: str, text: str, created_at: datetime | None = None) -> Turn:
    payload: dict[str, Any] = {"role": role, "content": text}
    if created_at is not None:
        payload["timestamp"] = created_at.timestamp()
    return Turn(role=role, text=text, raw=orjson.dumps(payload), created_at=created_at)


async def archive(
    engine: AsyncEngine,
    settings: Settings,
    session_id: str,
    turns: Sequence[Turn],
    *,
    user_id: str | None = None,
) -> None:
    """Archive `turns` after whatever the session already has, as the pipeline would."""
    ref = SessionRef(session_id, settings.pattern.replace("{id}", session_id))
    async with engine.begin() as conn:
        state = await writer.read_state(conn, session_id, None, 0)
        metadata = {"user_id": user_id} if user_id else {}
        assert await writer.archive_turns(
            conn,
            ref,
            layout="list",
            newest_first=settings.newest_first,
            expected_count=state.turn_count,
            new_turns=list(turns),
            gap_reason=None,
            metadata=metadata,
        )


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLIDATOR_")}
    env.pop("GEMINI_API_KEY", None)
    env.pop("GOOGLE_API_KEY", None)
    env.update(
        CONSOLIDATOR_REDIS_URL=REDIS_URL,
        CONSOLIDATOR_DATABASE_URL=settings.database_url,
        CONSOLIDATOR_KEY_PATTERN=settings.pattern,
        CONSOLIDATOR_KEEP_RECENT=str(settings.keep_recent),
        CONSOLIDATOR_LEASE_TTL_S=str(settings.lease_ttl_s),
        CONSOLIDATOR_LOG_FORMAT="json",
    )
    if settings.metadata_pattern:
        env["CONSOLIDATOR_METADATA_PATTERN"] = settings.metadata_pattern
    if settings.newest_first:
        env["CONSOLIDATOR_NEWEST_FIRST"] = "true"
    env.update(extra)
    return env


async def cli(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`consolidator ARGS` as an operator runs it: a process with the environment set."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        env=cli_env(settings, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
