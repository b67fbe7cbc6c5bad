"""The fault suite's harness: real daemons, real agent processes, a full audit of both tiers.

- `fresh_database()`: a database of its own for one scenario (copied from a migrated template).
- `Daemon`: a real `consolidator run` subprocess with `CONSOLIDATOR_*` set; SIGKILL, SIGSTOP
  and SIGCONT, SIGTERM, restart; its JSON log is kept and parsed.
- `kill_and_restart()`, `one_off_flushes()`, `flap()`: the chaos, from a seeded RNG
  (`CHAOS_SEED`).
- `WriterFleet`: agent processes (`tests/chaos_writer.py`) appending seed-004 turns, each with
  the writer's sequence number inside, and logging what Redis acknowledged.
- `Monitor`: while a scenario runs, checks over and over that no acknowledged turn is missing
  from both tiers at once (Redis first, then the archive: a turn gone from Redis must already be
  committed in PostgreSQL) and that every lease has a TTL no longer than the lease's.
- `audit()`: at the end, per session, the archive holds every written turn exactly once, in
  each writer's order, and nothing else; the hot list is one summary the archive knows followed
  by exactly the turns it does not cover; no gap was recorded; nothing is quarantined.
- `record()`: the scenario's figures, written as a Markdown table by the soak run
  (`SOAK=1`, to docs/faults.md) or wherever `FAULTS_REPORT` names.

Durations are short by default (the suite runs in `make test`); `SOAK=1` makes them long.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.proxy import FaultProxy
from worker.archive.schema import upgrade
from worker.commands import flush_main
from worker.config import Settings
from worker.hot.keys import lease_key

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("CONSOLIDATOR_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_URL = os.environ.get(
    "CONSOLIDATOR_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
SOAK = os.environ.get("SOAK", "").lower() not in ("", "0", "false", "no")
SEED = int(os.environ.get("CHAOS_SEED", "20240611"))


def scaled(bounded: float, soak: float) -> float:
    """A duration (or count) for `make test`, and a longer one for the soak run."""
    return soak if SOAK else bounded


def consolidator_bin() -> str:
    """The `consolidator` command of the interpreter running the tests (the virtualenv's)."""
    beside = Path(sys.executable).with_name("consolidator")
    return str(beside)


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def key_pattern(prefix: str) -> str:
    return prefix + "conversation:{id}:history"


def key_for(prefix: str, session_id: str) -> str:
    return key_pattern(prefix).replace("{id}", session_id)


def lease_glob(prefix: str) -> str:
    return f"consolidator:lease:*{prefix}*"


def sha256(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


async def hot_list(redis: Redis, key: str) -> list[bytes]:
    """A session's LIST, oldest first, as bytes."""
    return [e if isinstance(e, bytes) else e.encode() for e in await redis.lrange(key, 0, -1)]


# -- databases -------------------------------------------------------------------------------------

_template: str | None = None
_numbers = itertools.count()


async def _admin_execute(*statements: str) -> None:
    conn = await asyncpg.connect(plain_dsn(ADMIN_URL))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _drop_template(name: str) -> None:
    with contextlib.suppress(Exception):
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _migrated_template() -> str:
    global _template
    if _template is None:
        name = f"consolidator_faulttmpl_{os.getpid()}"
        await _admin_execute(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
        await asyncio.to_thread(upgrade, with_database(ADMIN_URL, name))
        atexit.register(_drop_template, name)
        _template = name
    return _template


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A migrated database of its own for one scenario; dropped afterwards."""
    template = await _migrated_template()
    name = f"consolidator_fault_{os.getpid()}_{next(_numbers)}"
    await _admin_execute(
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'CREATE DATABASE "{name}" TEMPLATE "{template}"',
    )
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the daemon and the command line as subprocesses -----------------------------------------------


_SDK_VARIABLES = frozenset({"GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"})


def daemon_env(
    *,
    redis_url: str,
    database_url: str,
    prefix: str,
    **overrides: object,
) -> dict[str, str]:
    """The environment of a `consolidator` subprocess: nothing inherited that could steer it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONSOLIDATOR_", "GEMINI_", "GOOGLE_"))
    }
    settings: dict[str, object] = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "KEY_PATTERN": key_pattern(prefix),
        "IDLE_AFTER_S": 0,
        "EXPIRY_MARGIN_S": 60,
        "SCAN_INTERVAL_S": 0.2,
        "KEEP_RECENT": 4,
        "SUMMARIZER": "extractive",
        "LEASE_TTL_S": 2,
        "DRAIN_GRACE_S": 5,
        "CONCURRENCY": 4,
        "LOG_FORMAT": "json",
    }
    settings.update({k.upper(): v for k, v in overrides.items()})
    for name, value in settings.items():
        if value is None:
            continue
        if name in _SDK_VARIABLES:
            env[name] = str(value)
        else:
            env[f"CONSOLIDATOR_{name}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a file (other lines, such as tracebacks, are skipped)."""
    events = []
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return events


class Daemon:
    """One `consolidator run` replica; its log (every run of it) in `log_path`."""

    def __init__(
        self, name: str, env: Mapping[str, str], log_dir: Path, args: Sequence[str] = ()
    ) -> None:
        self.args = list(args)
        self.name = name
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.exit_codes: list[int] = []
        self._log: IO[bytes] | None = None
        self._offset = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def metrics_port(self) -> int | None:
        port = self.env.get("CONSOLIDATOR_METRICS_PORT")
        return int(port) if port else None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self._log = self.log_path.open("ab")
        self._offset = self._log.tell()
        self.proc = subprocess.Popen(
            [consolidator_bin(), "run", *self.args],
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.starts += 1

    def has_started(self) -> bool:
        """Whether this run has logged `daemon_started` (its signal handlers are in place)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            return b'"daemon_started"' in f.read()

    async def wait_started(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.has_started():
            if not self.running:
                raise AssertionError(f"{self.name} exited at start:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no drain, no lease released, a transaction cut wherever it was."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.exit_codes.append(self.proc.wait())
        self.kills += 1
        self._close_log()

    async def freeze(self, seconds: float) -> None:
        """SIGSTOP, then SIGCONT: a replica paused (a VM stall, a starved CPU) past its lease."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    async def terminate(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        deadline = started + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout_s}s")
            await asyncio.sleep(0.02)
        took = time.monotonic() - started
        code = self.proc.returncode
        self.exit_codes.append(code)
        self._close_log()
        return code, took

    def stop_quietly(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log_path)

    def count(self, event: str) -> int:
        """How many times `event` was logged, over every run of this replica."""
        return sum(1 for e in self.events() if e.get("event") == event)

    async def logged_more(self, event: str, than: int) -> bool:
        return self.count(event) > than

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self) -> bool:
        return (await self.http_get("/readyz"))[0] == 200

    async def not_ready(self) -> bool:
        """/readyz answers 503 (an answer: a daemon that does not answer is not this)."""
        return (await self.http_get("/readyz"))[0] == 503

    async def http_get(self, path: str) -> tuple[int, str]:
        """GET on the daemon's metrics port: (status, body), (0, error) when nobody answers."""
        port = self.metrics_port
        assert port is not None, "this daemon has no CONSOLIDATOR_METRICS_PORT"
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(f"http://127.0.0.1:{port}{path}") as response,
            ):
                return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, repr(exc)

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        status, body = await self.http_get("/metrics")
        assert status == 200, body
        return metric_value(body, name, **labels)


def metric_value(exposition: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class CommandResult:
    code: int
    stdout: str
    stderr: str
    seconds: float


async def consolidator(
    *args: str, env: Mapping[str, str], timeout_s: float = 90.0
) -> CommandResult:
    """A one-off `consolidator ...` (flush, stats...) as a subprocess."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        consolidator_bin(),
        *args,
        env={k: v for k, v in env.items() if k != "CONSOLIDATOR_METRICS_PORT"},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CommandResult(
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        time.monotonic() - started,
    )


def settings_from(env: Mapping[str, str]) -> Settings:
    """The Settings a `consolidator` subprocess with this environment would load."""
    values: dict[str, Any] = {
        k.removeprefix("CONSOLIDATOR_").lower(): v
        for k, v in env.items()
        if k.startswith("CONSOLIDATOR_") and k != "CONSOLIDATOR_METRICS_PORT"
    }
    if "GEMINI_API_KEY" in env:
        values["gemini_api_key"] = env["GEMINI_API_KEY"]
    return Settings(**values)


async def final_flush(env: Mapping[str, str]) -> int:
    """`consolidator flush --all`, run in this process (what the CLI runs, without the start-up
    of a process): the last pass before an audit. Its exit code."""
    return await flush_main(
        settings_from(env),
        ids=[],
        all_sessions=True,
        match=None,
        summarize=True,
        evict=False,
        dry_run=False,
    )


# -- agents ----------------------------------------------------------------------------------------


@dataclass
class Written:
    """What the agents wrote, from their logs: per session, each writer's elements in order."""

    by_session: dict[str, dict[int, list[bytes]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    uncertain: dict[str, set[bytes]] = field(default_factory=lambda: defaultdict(set))

    def add(self, writer: int, session: str, raw: bytes, ok: bool) -> None:
        if ok:
            self.by_session[session][writer].append(raw)
        else:
            self.uncertain[session].add(raw)

    @property
    def total(self) -> int:
        return sum(len(raws) for ws in self.by_session.values() for raws in ws.values())

    @property
    def total_uncertain(self) -> int:
        return sum(len(u) for u in self.uncertain.values())

    def sessions(self) -> list[str]:
        return sorted(set(self.by_session) | set(self.uncertain))

    def certain(self, session: str) -> set[bytes]:
        return {raw for raws in self.by_session[session].values() for raw in raws}


class WriterLog:
    """Reads a writer's log incrementally (whole lines only: the writer may be mid-line)."""

    def __init__(self, writer: int, path: Path) -> None:
        self.writer = writer
        self.path = path
        self._offset = 0

    def read_new(self, into: Written) -> list[tuple[str, bytes, bool]]:
        """Add the lines logged since the last call to `into`; return them too."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        entries = []
        for line in data[:end].splitlines():
            entry = json.loads(line)
            session, raw, ok = entry["s"], entry["raw"].encode(), bool(entry["ok"])
            into.add(self.writer, session, raw, ok)
            entries.append((session, raw, ok))
        return entries


class WriterFleet:
    """Agent processes appending to their sessions; `assignments` maps writer to session ids."""

    def __init__(
        self,
        *,
        redis_url: str,
        prefix: str,
        assignments: Mapping[int, Sequence[str]],
        duration_s: float,
        rate: float,
        log_dir: Path,
        seed: int = SEED,
        ttl_s: int = 3600,
        tool_every: int = 12,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.assignments = dict(assignments)
        self.duration_s = duration_s
        self.rate = rate
        self.seed = seed
        self.ttl_s = ttl_s
        self.tool_every = tool_every
        self.logs = {w: WriterLog(w, log_dir / f"writer{w}.jsonl") for w in assignments}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.summaries: dict[int, dict[str, Any]] = {}

    def start(self) -> None:
        for w, sessions in self.assignments.items():
            argv = [
                sys.executable,
                "-m",
                "tests.chaos_writer",
                "--redis-url",
                self.redis_url,
                "--key-pattern",
                key_pattern(self.prefix),
                "--writer",
                str(w),
                "--sessions",
                ",".join(sessions),
                "--duration",
                str(self.duration_s),
                "--rate",
                str(self.rate),
                "--seed",
                str(self.seed),
                "--ttl",
                str(self.ttl_s),
                "--tool-every",
                str(self.tool_every),
                "--log",
                str(self.logs[w].path),
            ]
            self.procs[w] = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
            )

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())

    async def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.running:
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("writers did not finish in time")
            await asyncio.sleep(0.1)
        for w, proc in self.procs.items():
            out, _ = proc.communicate()  # what is left, and the pipe closed
            assert proc.returncode == 0, f"writer {w} exited with {proc.returncode}"
            self.summaries[w] = json.loads(out.decode().strip().splitlines()[-1])

    async def finish(self, timeout_s: float = 30.0) -> None:
        """Ask every writer to stop (SIGTERM: it ends after its current push), and wait."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        await self.wait(timeout_s)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()

    def written(self) -> Written:
        result = Written()
        for w, log in self.logs.items():
            WriterLog(w, log.path).read_new(result)  # from the start, whoever else reads it
        return result


def assign_sessions(
    writers: int, per_writer: int, shared: int, tag: str = "c"
) -> dict[int, list[str]]:
    """Each writer owns `per_writer` sessions; `shared` more are written by every writer."""
    common = [f"{tag}shared{i}" for i in range(shared)]
    return {
        w: [f"{tag}{w:02d}-{i:02d}" for i in range(per_writer)] + common for w in range(writers)
    }


# -- the continuous check --------------------------------------------------------------------------


@dataclass
class Violation:
    at: float
    what: str


class Monitor:
    """Samples both tiers while a scenario runs; see the module docstring for what it checks."""

    def __init__(
        self,
        *,
        redis: Redis,
        database_url: str,
        fleet: WriterFleet,
        lease_ttl_ms: int,
        interval_s: float = 0.25,
    ) -> None:
        self.redis = redis
        self.database_url = database_url
        self.pg: asyncpg.Connection | None = None  # its own: the test uses its connection too
        self.prefix = fleet.prefix
        self.logs = list(fleet.logs.values())
        self.lease_ttl_ms = lease_ttl_ms
        self.interval_s = interval_s
        self.written = Written()
        # What the archive is known to hold (it only grows), read incrementally by seq, and the
        # acknowledged turns not seen there yet: each turn is looked up until it is archived.
        self._archived: dict[str, set[bytes]] = defaultdict(set)
        self._after: dict[str, int] = defaultdict(lambda: -1)
        self._unverified: dict[str, dict[bytes, bytes]] = defaultdict(dict)
        self.samples = 0
        self.failed_samples = 0
        self.leases_seen = 0
        self.max_lease_pttl = 0
        self.violations: list[Violation] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.pg = await asyncpg.connect(plain_dsn(self.database_url))
        self._task = asyncio.create_task(self._run(), name="monitor")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.pg is not None:
            await self.pg.close()
            self.pg = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sample()
            except (OSError, RedisError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.failed_samples += 1  # a tier is away: nothing can be compared now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def sample(self) -> None:
        for log in self.logs:
            for session, raw, ok in log.read_new(self.written):  # t0: acknowledged by now
                digest = sha256(raw)
                if ok and digest not in self._archived[session]:
                    self._unverified[session][digest] = raw
        sessions = sorted(s for s, turns in self._unverified.items() if turns)
        if sessions:
            async with self.redis.pipeline(transaction=False) as pipe:
                for s in sessions:
                    pipe.lrange(key_for(self.prefix, s), 0, -1)
                hot_lists = await pipe.execute()  # t1 > t0
            await self._read_archive()  # t2 > t1: whatever left Redis was committed before
            for s, hot in zip(sessions, hot_lists, strict=True):
                unverified = self._unverified[s]
                for digest in list(unverified):
                    if digest in self._archived[s]:
                        del unverified[digest]
                present = set(hot)
                lost = [raw for raw in unverified.values() if raw not in present]
                if lost:
                    self.violations.append(
                        Violation(
                            time.time(),
                            f"{s}: {len(lost)} turn(s) in neither tier, e.g. {lost[0][:120]!r}",
                        )
                    )
                    for raw in lost:  # reported once; the final audit counts them again
                        unverified.pop(sha256(raw), None)
        await self._check_leases()
        self.samples += 1

    async def _read_archive(self) -> None:
        assert self.pg is not None
        sessions = sorted(self.written.by_session)
        rows = await self.pg.fetch(
            "SELECT t.session_id, t.seq, t.raw_sha "
            "FROM unnest($1::text[], $2::bigint[]) AS w(session_id, after) "
            "JOIN turns t ON t.session_id = w.session_id AND t.seq > w.after",
            sessions,
            [self._after[s] for s in sessions],
        )
        for row in rows:
            session = row["session_id"]
            self._archived[session].add(bytes(row["raw_sha"]))
            self._after[session] = max(self._after[session], row["seq"])

    async def _check_leases(self) -> None:
        # The sessions' own lease keys: no SCAN of a keyspace other tests share, four times a
        # second. (The end of each scenario scans for any lease left under the prefix.)
        keys = [lease_key(key_for(self.prefix, s)) for s in sorted(self.written.by_session)]
        if not keys:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.pttl(k)
            ttls = await pipe.execute()
        for k, ttl in zip(keys, ttls, strict=True):
            if ttl == -2:
                continue
            self.leases_seen += 1
            self.max_lease_pttl = max(self.max_lease_pttl, ttl)
            if ttl == -1 or ttl > self.lease_ttl_ms:
                self.violations.append(Violation(time.time(), f"lease {k!r} has PTTL {ttl}"))


# -- the audit -------------------------------------------------------------------------------------


@dataclass
class SessionAudit:
    session_id: str
    written: int
    archived: int
    lost: int
    duplicates: int
    foreign: int
    out_of_order: int
    gaps: int
    hot_ok: bool
    folded: int
    problems: list[str]
    uncertain_landed: int = 0  # unanswered pushes that did reach Redis (archived once)


@dataclass
class Audit:
    sessions: list[SessionAudit]
    leases_left: int
    quarantined: int

    @property
    def written(self) -> int:
        return sum(a.written for a in self.sessions)

    @property
    def archived(self) -> int:
        return sum(a.archived for a in self.sessions)

    @property
    def lost(self) -> int:
        return sum(a.lost for a in self.sessions)

    @property
    def duplicates(self) -> int:
        return sum(a.duplicates for a in self.sessions)

    @property
    def uncertain_landed(self) -> int:
        return sum(a.uncertain_landed for a in self.sessions)

    @property
    def problems(self) -> list[str]:
        found = [p for a in self.sessions for p in a.problems]
        if self.leases_left:
            found.append(f"{self.leases_left} lease key(s) left")
        if self.quarantined:
            found.append(f"{self.quarantined} session(s) quarantined")
        return found


def summary_covers(raw: bytes) -> int | None:
    """N for a list-layout summary element `[Summary of the N earlier turns]`, else None."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    content = obj.get("content") if isinstance(obj, dict) else None
    if obj.get("role") != "system" or not isinstance(content, str):
        return None
    head = "[Summary of the "
    if not content.startswith(head):
        return None
    number = content[len(head) :].split(" ", 1)[0]
    return int(number) if number.isdigit() else None


async def audit_session(
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
    session_id: str,
    per_writer: Mapping[int, Sequence[bytes]],
    uncertain: set[bytes] = frozenset(),  # type: ignore[assignment]
    *,
    allow_gaps: bool = False,
    hot_expected: bool = True,
) -> SessionAudit:
    problems: list[str] = []
    rows = await pg.fetch(
        "SELECT seq, raw FROM turns WHERE session_id = $1 ORDER BY seq", session_id
    )
    seqs = [r["seq"] for r in rows]
    if seqs != list(range(len(seqs))):
        problems.append(f"{session_id}: archive seqs are not 0..{len(seqs) - 1}")
    archive = [bytes(r["raw"]) for r in rows]
    position = {raw: (w, i) for w, raws in per_writer.items() for i, raw in enumerate(raws)}
    written = len(position)
    counts = Counter(archive)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    foreign = [raw for raw in counts if raw not in position and raw not in uncertain]
    lost = [raw for raw in position if raw not in counts]
    last: dict[int, int] = {}
    out_of_order = 0
    for raw in archive:
        if raw in position:
            w, i = position[raw]
            if i <= last.get(w, -1):
                out_of_order += 1
            last[w] = i
    if duplicates:
        problems.append(f"{session_id}: {duplicates} duplicate turn(s) in the archive")
    if foreign:
        problems.append(
            f"{session_id}: {len(foreign)} archived element(s) nobody wrote: {foreign[0][:160]!r}"
        )
    if lost:
        problems.append(f"{session_id}: {len(lost)} turn(s) lost, e.g. {lost[0][:160]!r}")
    if out_of_order:
        problems.append(f"{session_id}: {out_of_order} turn(s) archived out of order")
    gaps = await pg.fetchval("SELECT count(*) FROM gaps WHERE session_id = $1", session_id)
    if gaps and not allow_gaps:
        problems.append(f"{session_id}: {gaps} gap(s) recorded, yet nobody trimmed")

    hot = await hot_list(redis, key_for(prefix, session_id))
    folded = 0
    hot_ok = True
    if hot_expected:
        covered = summary_covers(hot[0]) if hot else None
        if covered is None:
            if hot != archive:
                hot_ok = False
                problems.append(
                    f"{session_id}: hot list ({len(hot)}) is not the archived turns "
                    f"({len(archive)}) and starts with no summary"
                )
        else:
            kept = hot[1:]
            folded = len(archive) - len(kept)
            if kept != archive[folded:] or folded < 0:
                hot_ok = False
                problems.append(
                    f"{session_id}: the {len(kept)} turns after the summary are not the "
                    "archive's last ones"
                )
            if covered != folded:
                hot_ok = False
                problems.append(f"{session_id}: summary says {covered} turns, {folded} folded")
            through = await pg.fetchval(
                "SELECT through_seq FROM summaries WHERE session_id = $1 AND head_sha = $2 "
                "ORDER BY id DESC LIMIT 1",
                session_id,
                sha256(hot[0]),
            )
            if through is None or through + 1 != folded:
                hot_ok = False
                problems.append(
                    f"{session_id}: the summary at the head is not the archive's summary "
                    f"through #{folded - 1} (found {through})"
                )
    return SessionAudit(
        session_id,
        written,
        len(archive),
        len(lost),
        duplicates,
        len(foreign),
        out_of_order,
        int(gaps),
        hot_ok,
        folded,
        problems,
        sum(1 for raw in counts if raw in uncertain),
    )


async def audit(
    redis: Redis,
    pg: asyncpg.Connection,
    prefix: str,
    written: Written,
    *,
    allow_gaps: bool = False,
) -> Audit:
    sessions = [
        await audit_session(
            redis,
            pg,
            prefix,
            s,
            written.by_session[s],
            written.uncertain[s],
            allow_gaps=allow_gaps,
        )
        for s in written.sessions()
    ]
    leases = [k async for k in redis.scan_iter(match=lease_glob(prefix), count=1000)]
    quarantined = await pg.fetchval("SELECT count(*) FROM quarantine")
    return Audit(sessions, len(leases), int(quarantined))


async def wait_for_no_leases(redis: Redis, prefix: str, timeout_s: float) -> int:
    """Seconds aside, how many lease keys are left once `timeout_s` has passed (0 is early)."""
    deadline = time.monotonic() + timeout_s
    while True:
        keys = [k async for k in redis.scan_iter(match=lease_glob(prefix), count=1000)]
        if not keys or time.monotonic() > deadline:
            return len(keys)
        await asyncio.sleep(0.1)


async def delete_prefix(redis: Redis, prefix: str) -> None:
    for pattern in (f"{prefix}*", lease_glob(prefix)):
        async for key in redis.scan_iter(match=pattern, count=1000):
            await redis.delete(key)


# -- chaos -----------------------------------------------------------------------------------------


@dataclass
class ChaosStats:
    kills: int = 0
    freezes: int = 0
    flushes: int = 0
    flush_kills: int = 0
    flush_codes: Counter[int] = field(default_factory=Counter)
    flush_hangs: list[int] = field(default_factory=list)


async def kill_and_restart(
    daemons: Sequence[Daemon],
    *,
    until: float,
    rng: random.Random,
    stats: ChaosStats,
    min_kills: int = 0,
    work_s: tuple[float, float] = (0.3, 2.5),
    down_s: tuple[float, float] = (0.0, 0.4),
    freeze_chance: float = 0.0,
    min_freezes: int = 0,
    freeze_s: tuple[float, float] = (0.0, 0.0),
    overtime_s: float = 60.0,
) -> None:
    """SIGKILL each replica at a random moment of its working life, restart it, again and again.

    With `freeze_chance` (and for the first `min_freezes` blows), the blow is a freeze instead
    (SIGSTOP for `freeze_s`, chosen longer than the lease TTL, then SIGCONT): the replica wakes
    up holding work whose lease has passed to another, and must write nothing it no longer owns.

    Runs until `until`, and past it (at most `overtime_s`) until `min_kills` kills were made:
    on a loaded machine a replica takes long to start, and a chaos without kills proves nothing.
    """

    def done() -> bool:
        now = time.monotonic()
        return now >= until + overtime_s or (now >= until and stats.kills >= min_kills)

    async def chaos(daemon: Daemon) -> None:
        while not done():
            if not (daemon.running and daemon.has_started()):
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(rng.uniform(*work_s))  # it works for a while...
            if done():
                return
            if stats.freezes < min_freezes or rng.random() < freeze_chance:
                stats.freezes += 1
                await daemon.freeze(rng.uniform(*freeze_s))
                continue
            daemon.kill()  # ... and dies wherever it was
            stats.kills += 1
            await asyncio.sleep(rng.uniform(*down_s))
            daemon.start()

    await asyncio.gather(*(chaos(d) for d in daemons))


async def applied_summaries(pg: asyncpg.Connection) -> int:
    """Summaries written to Redis and marked so in the archive: consolidations done."""
    return int(await pg.fetchval("SELECT count(*) FROM summaries WHERE applied = 1"))


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> float:
    """Poll an async predicate until it holds; the seconds it took."""
    started = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def more_than(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() > n


async def flap(
    proxy: FaultProxy,
    *,
    count: int,
    rng: random.Random,
    up_s: tuple[float, float] = (0.2, 1.0),
    down_s: tuple[float, float] = (0.05, 0.6),
) -> int:
    """Cut and restore a proxy `count` times at random: connections die mid-query, mid-commit,
    mid-script. The number of connections severed."""
    severed = proxy.stats.severed
    for _ in range(count):
        await asyncio.sleep(rng.uniform(*up_s))
        proxy.cut()
        await asyncio.sleep(rng.uniform(*down_s))
        proxy.restore()
    return proxy.stats.severed - severed


@dataclass
class Disruption:
    severed: int  # connections the flaps cut mid-flight
    noticed_s: float  # until the daemon noticed the partition
    resumed_after: list[float]  # until it consolidated again: after the flaps, after the partition


async def flaps_then_partition(
    proxy: FaultProxy,
    daemon: Daemon,
    applied: Callable[[], Awaitable[int]],
    *,
    flaps: int,
    partition_s: float,
) -> Disruption:
    """Short cuts of the daemon's connections in quick succession (they die mid-command,
    mid-commit, mid-script), then a partition: every byte swallowed, nothing refused, nothing
    closed. The daemon must notice the partition (its calls time out) rather than hang holding
    its leases, and consolidate again (`applied` counts up) after each."""
    resumed_after: list[float] = []
    severed = await flap(proxy, count=flaps, rng=random.Random(SEED))
    done_before = await applied()
    resumed_after.append(
        await wait_until(
            lambda: more_than(applied, done_before), 90, "consolidations after the flaps"
        )
    )
    failed_before = daemon.count("pass_failed")
    proxy.blackhole()
    partitioned_at = time.monotonic()
    noticed_s = await wait_until(
        lambda: daemon.logged_more("pass_failed", failed_before),
        60,
        "the daemon to notice the partition",
    )
    await asyncio.sleep(max(partition_s - (time.monotonic() - partitioned_at), 0.0))
    done_before = await applied()
    proxy.restore()
    resumed_after.append(
        await wait_until(lambda: more_than(applied, done_before), 90, "consolidations after it")
    )
    return Disruption(severed, noticed_s, resumed_after)


async def one_off_flushes(
    env: Mapping[str, str],
    *,
    until: float,
    rng: random.Random,
    stats: ChaosStats,
    log_dir: Path,
    every_s: tuple[float, float] = (1.0, 3.0),
    kill_chance: float = 0.3,
    hang_after_s: float = 60.0,
) -> None:
    """`consolidator flush --all` now and then, beside the daemons; some of them SIGKILLed.

    A flush that has not finished after `hang_after_s` is killed and counted as hung (a bug).
    """
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(*every_s))
        if time.monotonic() >= until:
            return
        number = stats.flushes
        stats.flushes += 1
        with (log_dir / f"flush{number}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                consolidator_bin(),
                "flush",
                "--all",
                env={k: v for k, v in env.items() if k != "CONSOLIDATOR_METRICS_PORT"},
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if rng.random() < kill_chance:
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            if proc.returncode is None:
                proc.kill()
                stats.flush_kills += 1
        try:
            code = await asyncio.wait_for(proc.wait(), hang_after_s)
        except TimeoutError:
            stats.flush_hangs.append(number)
            proc.kill()
            code = await proc.wait()
        stats.flush_codes[code] += 1


# -- figures ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    scenario: str
    duration_s: float
    kills: int = 0
    turns_written: int = 0
    turns_archived: int = 0
    turns_lost: int = 0
    duplicates: int = 0
    outage: str = "—"
    seen: str = ""


_rows: list[Figures] = []


def record(figures: Figures) -> None:
    """Keep a scenario's figures; the soak run writes them all to docs/faults.md."""
    _rows.append(figures)
    print(f"figures: {figures}")
    target = os.environ.get("FAULTS_REPORT") or (str(REPO / "docs" / "faults.md") if SOAK else "")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(_rows), encoding="utf-8")


def render(rows: Sequence[Figures]) -> str:
    mode = "soak run (`make soak`)" if SOAK else "bounded run (`make test`)"
    lines = [
        "# Fault suite: what was tried, what was seen",
        "",
        f"Produced by the {mode} on {os.cpu_count()} cores with seed {SEED}, against real Redis",
        "and PostgreSQL, real `consolidator` processes and real agent processes. Every scenario",
        "ends with a full audit of both tiers: each acknowledged turn is in the archive exactly",
        "once and in order, nothing else is, the hot state is one summary the archive knows",
        "followed by exactly the turns it does not cover, no gap was recorded where nobody",
        "trimmed, and no lease outlives its TTL. While a scenario runs, a monitor checks again",
        "and again that no acknowledged turn is ever missing from both tiers at once.",
        "",
        "| scenario | duration | kills | turns written | turns archived | turns lost "
        "| duplicates | outage survived | seen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.duration_s:.0f} s | {r.kills} | {r.turns_written} "
            f"| {r.turns_archived} | {r.turns_lost} | {r.duplicates} | {r.outage} | {r.seen} |"
        )
    lines += [
        "",
        "Reading the table: *kills* are SIGKILLs of daemon replicas and one-off flushes (freezes,",
        "SIGSTOP past the lease TTL, are counted apart); *turns written* are the pushes Redis",
        "acknowledged to the agents (plus, after a Redis crash, unanswered pushes that had in fact",
        "landed); *turns lost* and *duplicates* come from the final audit; *outage survived* is",
        "what the daemon went through without a restart. Reproduce with `make soak`, another",
        "sequence with `CHAOS_SEED=<n> make soak`; the same scenarios run for seconds in",
        "`make test` (tests/test_faults_*.py, harness in tests/chaos.py).",
        "",
    ]
    return "\n".join(lines)


def status_counts(daemons: Iterable[Daemon]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for d in daemons:
        for event in d.events():
            if event.get("event") == "session_consolidated":
                counts[str(event.get("status"))] += 1
    return counts
