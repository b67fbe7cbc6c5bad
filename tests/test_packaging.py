"""The package as `pip install .` makes it, not as this checkout runs it: an installed
`consolidator migrate` must find the migrations, which live at the top of the repository."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from tests.conftest import ADMIN_URL, _plain, _with_db
from worker.archive.schema import head_revision

REPO = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        timeout=300,
    )


async def _admin(sql: str, database: str | None = None) -> object:
    conn = await asyncpg.connect(_plain(_with_db(ADMIN_URL, database) if database else ADMIN_URL))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_an_installed_package_migrates_a_fresh_database(tmp_path: Path) -> None:
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO))
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    _pip("install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel))
    name = f"consolidator_pkg_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLIDATOR_")}
        env |= {
            "PYTHONPATH": str(tmp_path / "site"),  # ahead of this checkout's own install
            "CONSOLIDATOR_DATABASE_URL": _with_db(ADMIN_URL, name),
        }
        show_and_migrate = (
            "import sys, worker; print(worker.__file__, file=sys.stderr); "
            "sys.argv[1:] = ['migrate']; from worker.cli import main; main()"
        )
        run = subprocess.run(
            [sys.executable, "-c", show_and_migrate],
            cwd=tmp_path,  # not the checkout: nothing may be found there by accident
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert run.stderr.startswith(str(tmp_path / "site")), run.stderr  # the installed copy
        version = asyncio.run(_admin("SELECT version_num FROM alembic_version", name))
        assert version == head_revision(ADMIN_URL)  # every migration of the checkout, shipped
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
