"""`make bench`: the consolidator measured against the naive pattern and PostgreSQL's own ceiling.

One run measures, side by side, on the same generated workload (realistic sessions in a large
keyspace of unrelated keys):

1. archive throughput of `consolidator flush --all` (offline summarizer), against the seeds'
   naive pattern (scripts/naive_baseline.py) and against a plain binary COPY of the same rows
   into the same tables (the raw ceiling of PostgreSQL on this machine);
2. sessions/s with a slow model (the local Gemini-protocol server answering after 300 ms) as
   CONSOLIDATOR_CONCURRENCY grows;
3. the cost of finding work: one full scan of keyspaces of 10k, 100k and 1M keys (time, and
   Redis CPU from INFO cpu);
4. the agents' own latency (p50/p99 of their appends and reads, from a separate process at a
   steady rate) with and without the daemon working flat out;
5. the daemon's peak memory (`consolidator run --once` in a subprocess) at two keyspace sizes.

It uses the servers named by CONSOLIDATOR_REDIS_URL and CONSOLIDATOR_DATABASE_URL (the local
ones by default) with its own key prefix, which it deletes afterwards, and its own database
(`consolidator_bench`, created fresh and dropped at the end). The results table, with targets
and pass/fail, is printed and written to bench/results.md.

    .venv/bin/python scripts/bench.py                 # the defaults: a few minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick         # a smaller run, to try it out
    .venv/bin/python scripts/bench.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import naive_baseline
from worker import logs
from worker.archive.groupcommit import TURN_COLUMNS
from worker.archive.schema import upgrade
from worker.config import Settings
from worker.layouts.listlayout import ListLayout
from worker.pacing import CpuPressure, PressureUnavailable
from worker.policy import choose_cut
from worker.runtime import open_runtime
from worker.summarizers.extractive import summarize_text
from worker.testing.gemini_server import GeminiServer, Reply, default_summary

REPO = Path(__file__).resolve().parents[1]
DATABASE = "consolidator_bench"
REDIS_URL = os.environ.get("CONSOLIDATOR_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_URL = os.environ.get(
    "CONSOLIDATOR_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
SESSION_TTL_S = 3600
SELF = str(Path(__file__).resolve())


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sessions: int
    turns_mean: int
    unrelated: int
    concurrency: int
    summary_processes: int
    naive_sessions: int
    runs: int
    model_delay: float
    model_levels: tuple[int, ...]
    model_rounds: int
    model_rpm: int
    scan_sizes: tuple[int, ...]
    scan_repeats: int
    session_share: float
    memory_sizes: tuple[int, ...]
    memory_due: int
    agent_rate: float
    agent_seconds: float
    agent_sessions: int
    agent_flush_sessions: int
    daemon_nice: tuple[int, ...]
    daemon_paces: tuple[float, ...]
    daemon_pressures: tuple[float, ...]
    skip: frozenset[str]
    output: Path
    seed: int


SECTIONS = ("throughput", "agents", "model", "scan")


def parse_options(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark the consolidator against the naive pattern and a raw COPY.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sessions", type=int, default=1000, help="sessions in the archive workload")
    p.add_argument("--turns-mean", type=int, default=50, help="mean turns per session")
    p.add_argument("--unrelated", type=int, default=100_000, help="unrelated keys beside them")
    p.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="CONSOLIDATOR_CONCURRENCY of the flat-out flushes (and of the memory runs)",
    )
    p.add_argument(
        "--summary-processes",
        type=int,
        default=2,
        help="CONSOLIDATOR_SUMMARY_PROCESSES of the flat-out flushes (sections 1 and 4)",
    )
    p.add_argument("--naive-sessions", type=int, default=40, help="sessions the naive run does")
    p.add_argument(
        "--runs",
        type=int,
        default=2,
        help="runs of each throughput measurement: COPY, naive, flush (the best of each counts)",
    )
    p.add_argument("--model-delay", type=float, default=0.3, help="model latency, seconds")
    p.add_argument("--model-levels", default="1,4,16,64", help="concurrency levels")
    p.add_argument("--model-rounds", type=int, default=10, help="sessions per level = rounds x c")
    p.add_argument("--model-rpm", type=int, default=60_000, help="configured requests/minute")
    p.add_argument("--scan-sizes", default="10000,100000,1000000", help="keyspace sizes")
    p.add_argument("--scan-repeats", type=int, default=3, help="scans per size (median)")
    p.add_argument("--session-share", type=float, default=0.01, help="share of session keys")
    p.add_argument("--memory-sizes", default="100000,1000000", help="keyspace sizes for RSS")
    p.add_argument("--memory-due", type=int, default=300, help="sessions due in a memory run")
    p.add_argument("--agent-rate", type=float, default=200.0, help="agent appends (and reads)/s")
    p.add_argument("--agent-seconds", type=float, default=8.0, help="agent measuring window")
    p.add_argument("--agent-sessions", type=int, default=200, help="sessions the agents write")
    p.add_argument(
        "--agent-flush-sessions",
        type=int,
        default=3000,
        help="sessions the daemon works through while the agents measure (enough to outlast "
        "the window)",
    )
    p.add_argument(
        "--daemon-nice",
        default="0,19",
        help="niceness of the daemon while the agents measure, one run each (the first counts)",
    )
    p.add_argument(
        "--daemon-paces",
        default="20,10,5",
        help="CONSOLIDATOR_MAX_SESSIONS_PER_S values to measure the agents at, one run each",
    )
    p.add_argument(
        "--daemon-pressures",
        default="5,10",
        help="CONSOLIDATOR_MAX_CPU_PRESSURE values (%%) to measure the agents at, one run each",
    )
    p.add_argument("--skip", default="", help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="small sizes, to try the bench out")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results.md")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    if a.quick:
        a.sessions, a.unrelated, a.naive_sessions, a.runs = 200, 20_000, 10, 1
        a.model_levels, a.model_rounds = "1,8,32", 3
        a.scan_sizes, a.memory_sizes, a.scan_repeats = "10000,100000", "10000,100000", 2
        a.memory_due, a.agent_seconds, a.agent_flush_sessions = 100, 4.0, 1000
    skip = frozenset(s.strip() for s in a.skip.split(",") if s.strip())
    if unknown := skip - set(SECTIONS):
        p.error(f"--skip: unknown sections {sorted(unknown)}")
    return Options(
        sessions=a.sessions,
        turns_mean=a.turns_mean,
        unrelated=a.unrelated,
        concurrency=a.concurrency,
        summary_processes=a.summary_processes,
        naive_sessions=min(a.naive_sessions, a.sessions),
        runs=max(a.runs, 1),
        model_delay=a.model_delay,
        model_levels=_ints(a.model_levels),
        model_rounds=a.model_rounds,
        model_rpm=a.model_rpm,
        scan_sizes=_ints(a.scan_sizes),
        scan_repeats=max(a.scan_repeats, 1),
        session_share=a.session_share,
        memory_sizes=_ints(a.memory_sizes),
        memory_due=a.memory_due,
        agent_rate=a.agent_rate,
        agent_seconds=a.agent_seconds,
        agent_sessions=a.agent_sessions,
        agent_flush_sessions=a.agent_flush_sessions,
        daemon_nice=_ints(a.daemon_nice),
        daemon_paces=_floats(a.daemon_paces),
        daemon_pressures=_floats(a.daemon_pressures),
        skip=skip,
        output=a.output,
        seed=a.seed,
    )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


# --- workload --------------------------------------------------------------------------------

NAMES = ("Ada", "Priya", "Tomás", "Mei", "Olu", "Sven", "Zoë", "Ravi", "Lena", "Kofi", "Aiko")
PLACES = ("Lisbon", "Nairobi", "Osaka", "Denver", "Kraków", "Lyon", "Austin", "Porto", "Seoul")
THINGS = ("Pro plan", "router X200", "Café Zoë voucher", "API key", "invoice", "SSD 2TB")
VERBS = ("check", "cancel", "refund", "upgrade", "book", "move", "confirm", "ship", "reset")
_FILLER = (
    "the a my this that order account please because with for about next week again still and "
    "but so when before after support status delivery payment issue team update details time "
    "we can you it is was will would should could there their what which"
)
WORDS = tuple(_FILLER.split())


class Workload:
    """Deterministic chat sessions as seed 004's agent stores them (JSON with role, content,
    timestamp; RPUSH oldest first), with tool calls in the OpenAI shape.

    Sizes follow what agent fleets see: user turns around 140 characters (8 to 1,500),
    assistant turns around 450 (40 to 4,000), one assistant turn in eight calls a tool whose
    JSON result is a few hundred characters; session lengths are log-normal around the mean.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        pool_rng = random.Random(seed + 1)
        self._sentences = [self._sentence(pool_rng) for _ in range(4000)]

    @staticmethod
    def _sentence(rng: random.Random) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        i = rng.randrange(len(words))
        pick = rng.random()
        if pick < 0.3:
            words[i] = f"ORD-{rng.randint(1000, 99999)}"
        elif pick < 0.5:
            words[i] = f"${rng.randint(1, 2000)}.{rng.randint(0, 99):02d}"
        elif pick < 0.7:
            words[i] = rng.choice(NAMES)
        elif pick < 0.85:
            words[i] = rng.choice(PLACES)
        else:
            words[i] = rng.choice(THINGS)
        return rng.choice(VERBS).capitalize() + " " + " ".join(words) + "."

    def text(self, median: int, low: int, high: int) -> str:
        target = int(min(high, max(low, self.rng.lognormvariate(0, 0.7) * median)))
        parts: list[str] = []
        size = 0
        while size < target:
            sentence = self.rng.choice(self._sentences)
            parts.append(sentence)
            size += len(sentence) + 1
        return " ".join(parts)[: max(target, low)]

    def turn_count(self, mean: int) -> int:
        return int(min(mean * 5, max(6, self.rng.lognormvariate(0, 0.6) * mean * 0.84)))

    def session(self, turns: int, start: float | None = None) -> list[bytes]:
        rng = self.rng
        ts = start if start is not None else time.time() - 86400
        out: list[bytes] = []
        user_turn = True
        while len(out) < turns:
            ts += rng.uniform(2, 60)
            if user_turn:
                out.append(_element("user", self.text(140, 8, 1500), ts))
            elif rng.random() < 0.125 and len(out) + 3 <= turns:
                call_id = f"call_{rng.getrandbits(40):x}"
                order = f"ORD-{rng.randint(1000, 99999)}"
                call = {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": json.dumps({"order": order})},
                }
                out.append(_element("assistant", "", ts, tool_calls=[call]))
                items = [self.text(60, 10, 200) for _ in range(rng.randint(1, 6))]
                result = json.dumps({"order": order, "status": "shipped", "items": items})
                out.append(_element("tool", result, ts + 0.4, tool_call_id=call_id))
                out.append(_element("assistant", self.text(450, 40, 4000), ts + 1.5))
            else:
                out.append(_element("assistant", self.text(450, 40, 4000), ts))
            user_turn = not user_turn
        return out[:turns]

    def sessions(self, count: int, mean: int) -> list[list[bytes]]:
        return [self.session(self.turn_count(mean)) for _ in range(count)]


def _element(role: str, content: str, ts: float, **extra: Any) -> bytes:
    # json.dumps with its default separators, exactly as the seed's agent writes it.
    return json.dumps({"role": role, "content": content, "timestamp": ts, **extra}).encode()


# --- servers ---------------------------------------------------------------------------------


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _with_db(url: str, name: str) -> str:
    return f"{url.rsplit('/', 1)[0]}/{name}"


BENCH_URL = _with_db(ADMIN_URL, DATABASE)


async def recreate_database(drop_only: bool = False) -> None:
    admin = await asyncpg.connect(_plain(ADMIN_URL))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        if not drop_only:
            await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()


async def truncate_archive() -> None:
    conn = await asyncpg.connect(_plain(BENCH_URL))
    try:
        await conn.execute("TRUNCATE sessions, quarantine CASCADE")
    finally:
        await conn.close()


async def archive_counts() -> tuple[int, int, int]:
    conn = await asyncpg.connect(_plain(BENCH_URL))
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM turns), "
            "(SELECT count(*) FROM summaries WHERE applied = 1)"
        )
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        await conn.close()


async def delete_keys(redis: Redis, match: str) -> int:
    """UNLINK every key matching `match`, in batches (never KEYS, never one huge command)."""
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=match, count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            deleted += await _unlink(redis, batch)
            batch = []
    if batch:
        deleted += await _unlink(redis, batch)
    return deleted


async def _unlink(redis: Redis, keys: list[bytes]) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(0, len(keys), 1000):
            pipe.unlink(*keys[i : i + 1000])
        return sum(int(n) for n in await pipe.execute())


async def load_sessions(
    redis: Redis, pattern: str, sessions: dict[str, list[bytes]], ttl_s: int = SESSION_TTL_S
) -> None:
    items = list(sessions.items())
    for start in range(0, len(items), 500):
        async with redis.pipeline(transaction=False) as pipe:
            for session_id, elements in items[start : start + 500]:
                key = pattern.replace("{id}", session_id)
                pipe.delete(key)
                pipe.rpush(key, *elements)
                pipe.expire(key, ttl_s)
            await pipe.execute()


async def load_unrelated(redis: Redis, prefix: str, start: int, stop: int) -> None:
    """Keys an agent fleet's Redis holds besides sessions: caches, counters, profiles."""
    value = b"x" * 48
    for base in range(start, stop, 50_000):
        async with redis.pipeline(transaction=False) as pipe:
            for chunk in range(base, min(base + 50_000, stop), 1000):
                end = min(chunk + 1000, stop, base + 50_000)
                pipe.mset({f"{prefix}cache:{i}": value for i in range(chunk, end)})
            await pipe.execute()


def postgres_cpu() -> float | None:
    """CPU seconds used so far by this machine's PostgreSQL processes, ended backends included
    (the postmaster collects them), or None when no PostgreSQL runs here."""
    tick = os.sysconf("SC_CLK_TCK")
    total, found = 0, False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if not _command_name(int(pid)).startswith("postgres"):
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found = True
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / tick if found else None


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def host_times() -> tuple[int, int] | None:
    """(steal, all) CPU time of the whole machine so far, in ticks (/proc/stat): steal is the
    time a virtual machine's host kept the CPUs for other work. None where it is not kept."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks)) if len(ticks) == 8 else None


@contextlib.contextmanager
def steal_over(t: Throughput, measure: str) -> Iterator[None]:
    """Record in `t.steal` the share of the machine's CPU time its host took during the block,
    as one run of `measure`."""
    before = host_times()
    yield
    after = host_times()
    share = None
    if before is not None and after is not None and after[1] > before[1]:
        share = (after[0] - before[0]) / (after[1] - before[1])
    t.steal.setdefault(measure, []).append(share)


def cpu_wait_s(pid: int | str = "self") -> float | None:
    """Seconds the process has spent runnable but waiting for a CPU (the kernel's schedstat),
    or None where the kernel does not keep it."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def cpu_stalled_s() -> float | None:
    """Seconds in which some task on this machine waited for a CPU (the kernel's PSI, read as
    the daemon reads it), or None where the kernel keeps no such figures."""
    try:
        return CpuPressure(Path("/proc/pressure/cpu")).stalled_us() / 1e6
    except PressureUnavailable:
        return None


async def local_redis_pid(redis: Redis) -> int | None:
    """The Redis server's pid when it runs on this machine, else None."""
    pid = int((await redis.info("server"))["process_id"])
    return pid if _command_name(pid).startswith("redis") else None


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read()
    except OSError:
        return ""


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# --- the daemon in a subprocess ------------------------------------------------------------


@dataclass
class CliRun:
    code: int
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    log: list[dict[str, Any]]
    tail: str

    def sessions(self) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == "session_consolidated"]

    def work_window_s(self) -> float:
        """From the first session's start to the last one's end, by the daemon's own log."""
        spans = []
        for event in self.sessions():
            end = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            spans.append((end.timestamp() - float(event.get("duration_ms", 0)) / 1000, end))
        if not spans:
            return self.wall_s
        return max(e.timestamp() for _, e in spans) - min(s for s, _ in spans)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for event in self.sessions():
            counts[str(event["status"])] = counts.get(str(event["status"]), 0) + 1
        return counts


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("consolidator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


def daemon_env(pattern: str, **extra: str | int | float) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CONSOLIDATOR_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    }
    env.update(
        {
            "CONSOLIDATOR_REDIS_URL": REDIS_URL,
            "CONSOLIDATOR_DATABASE_URL": BENCH_URL,
            "CONSOLIDATOR_KEY_PATTERN": pattern,
            "CONSOLIDATOR_SUMMARIZER": "extractive",
            "CONSOLIDATOR_LOG_FORMAT": "json",
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def flat_out_env(o: Options, pattern: str) -> dict[str, str]:
    """The settings the README gives for working through a backlog as fast as the machine
    allows: many sessions in flight, and the offline summarizer in worker processes."""
    return daemon_env(
        pattern,
        CONSOLIDATOR_CONCURRENCY=o.concurrency,
        CONSOLIDATOR_SUMMARY_PROCESSES=o.summary_processes,
    )


def _sigint_as_from_a_terminal() -> None:
    """Ctrl-C's default handling, as an operator's shell gives a command: a bench started in
    the background inherits SIGINT ignored, and so would the daemon, which then goes on after
    the paced runs' Ctrl-C until its whole workload is done."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Daemon:
    """`consolidator ARGS` as its own process; the peak RSS comes from the kernel (wait4)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], nice: int = 0) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed by wait())
        self.started = time.perf_counter()
        # `nice` execs the command: same process, so wait4 still reports the daemon's own usage.
        niced = ["nice", "-n", str(nice)] if nice else []
        self.proc = subprocess.Popen(
            [*niced, *cli_command(), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=_sigint_as_from_a_terminal,
        )

    def running(self) -> bool:
        # WNOWAIT: looking must not reap it, or wait() could no longer read its resource usage.
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.proc.pid, flags) is None
        except ChildProcessError:
            return False

    async def wait(self) -> CliRun:
        _, status, usage = await asyncio.to_thread(os.wait4, self.proc.pid, 0)
        wall = time.perf_counter() - self.started
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        self._log.close()
        events = []
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        # ru_maxrss is in kilobytes on Linux.
        cpu = usage.ru_utime + usage.ru_stime
        return CliRun(code, wall, cpu, usage.ru_maxrss / 1024, events, text[-2000:])


async def run_cli(args: Sequence[str], env: dict[str, str]) -> CliRun:
    run = await Daemon(args, env).wait()
    if run.code not in (0, 1):
        raise RuntimeError(f"consolidator {' '.join(args)} exited {run.code}:\n{run.tail}")
    return run


# --- 1. archive throughput -----------------------------------------------------------------


@dataclass
class Throughput:
    turns: int = 0
    sessions: int = 0
    mean_turn_bytes: float = 0.0
    copy_rows_s: float = 0.0
    copy_runs: list[float] = field(default_factory=list)  # rows/s of each run
    naive_runs: list[float] = field(default_factory=list)  # seconds of each run
    flush_runs: list[float] = field(default_factory=list)  # work windows of each run
    default_runs: list[float] = field(default_factory=list)  # the same, default settings
    naive_archive_runs: list[float] = field(default_factory=list)
    archive_only_runs: list[float] = field(default_factory=list)
    naive_sessions: int = 0
    naive_turns: int = 0
    naive_s: float = 0.0
    naive_archive_turns: int = 0
    naive_archive_s: float = 0.0
    flush_window_s: float = 0.0
    flush_wall_s: float = 0.0
    flush_statuses: dict[str, int] = field(default_factory=dict)
    flush_checked: str = ""
    flush_redis_cpu_s: float = 0.0
    flush_cpu_s: float = 0.0
    flush_postgres_cpu_s: float | None = None  # None when PostgreSQL runs on another machine
    copy_postgres_cpu_s: float | None = None
    summarizer_ms: float = 0.0  # CPU of the offline summarizer for one session's first fold
    archive_only_window_s: float = 0.0
    archive_only_wall_s: float = 0.0
    # The host's steal over each run of each measurement (copy, naive, naive_archive, flush,
    # default, archive_only): what a run lost to other virtual machines, whatever the code.
    steal: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def naive_turns_s(self) -> float:
        return self.naive_turns / self.naive_s if self.naive_s else 0.0

    @property
    def naive_archive_turns_s(self) -> float:
        return self.naive_archive_turns / self.naive_archive_s if self.naive_archive_s else 0.0

    @property
    def flush_turns_s(self) -> float:
        return self.turns / self.flush_window_s if self.flush_window_s else 0.0

    @property
    def default_turns_s(self) -> float:
        return self.turns / min(self.default_runs) if self.default_runs else 0.0

    @property
    def archive_only_turns_s(self) -> float:
        return self.turns / self.archive_only_window_s if self.archive_only_window_s else 0.0


def copy_rows(
    sessions: dict[str, list[bytes]], key_for: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows the daemon writes for these sessions, decoded the same way, ready for COPY."""
    layout = ListLayout()
    session_rows: list[tuple[Any, ...]] = []
    turn_rows: list[tuple[Any, ...]] = []
    for session_id, elements in sessions.items():
        session_rows.append(
            (session_id, key_for.replace("{id}", session_id), "list", len(elements))
        )
        for seq, raw in enumerate(elements):
            turn = layout.decode(raw)
            turn_rows.append(
                (session_id, seq, turn.role, turn.text, turn.raw, turn.sha, turn.created_at)
            )
    return session_rows, turn_rows


def summarizer_cost(sample: list[list[bytes]]) -> float:
    """Milliseconds of CPU the offline summarizer spends on one session's first fold (what
    `flush` asks of it), over a sample of the workload: no amount of I/O batching goes below
    it, and threads share one core for it."""
    layout = ListLayout()
    defaults = Settings()
    folds = []
    for elements in sample:
        turns = [layout.decode(raw) for raw in elements]
        cut = choose_cut(
            turns,
            defaults.keep_recent,
            max_kept_tokens=defaults.max_hot_tokens,
            fold_max_tokens=defaults.fold_max_tokens,
        )
        if cut is not None:
            folds.append(turns[: cut.fold])
    started = time.process_time()
    for folded in folds:
        summarize_text(None, folded, defaults.summary_max_chars)
    return (time.process_time() - started) * 1000 / max(len(sample), 1)


async def copy_ceiling(
    session_rows: list[tuple[Any, ...]], turn_rows: list[tuple[Any, ...]]
) -> float:
    """Seconds for one plain COPY of the sessions' and turns' rows, in one transaction."""
    await truncate_archive()
    conn = await asyncpg.connect(_plain(BENCH_URL))
    try:
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                "sessions",
                records=session_rows,
                columns=["session_id", "redis_key", "layout", "turn_count"],
            )
            await conn.copy_records_to_table("turns", records=turn_rows, columns=list(TURN_COLUMNS))
        return time.perf_counter() - started
    finally:
        await conn.close()


async def bench_throughput(o: Options, redis: Redis, prefix: str, report: Report) -> None:
    pattern = f"{prefix}conversation:{{id}}:history"
    say(f"1. archive throughput: generating {o.sessions} sessions (mean {o.turns_mean} turns)")
    work = Workload(o.seed)
    sessions = {f"s{i:06d}": s for i, s in enumerate(work.sessions(o.sessions, o.turns_mean))}
    t = report.throughput
    t.sessions = len(sessions)
    t.turns = sum(len(s) for s in sessions.values())
    t.mean_turn_bytes = sum(len(e) for s in sessions.values() for e in s) / t.turns
    await load_unrelated(redis, prefix, 0, o.unrelated)

    t.summarizer_ms = summarizer_cost(list(sessions.values()))
    say(f"   offline summarizer: {t.summarizer_ms:.1f} ms of CPU a session")
    session_rows, turn_rows = copy_rows(sessions, pattern)
    for run in range(o.runs):
        pg_cpu = postgres_cpu()
        with steal_over(t, "copy"):
            seconds = await copy_ceiling(session_rows, turn_rows)
        if not t.copy_runs or len(turn_rows) / seconds > max(t.copy_runs):
            t.copy_postgres_cpu_s = _delta(pg_cpu, postgres_cpu())
        t.copy_runs.append(len(turn_rows) / seconds)
        say(f"   COPY run {run + 1}: {len(turn_rows) / seconds:,.0f} rows/s")
    t.copy_rows_s = max(t.copy_runs)
    del session_rows, turn_rows

    naive_ids = list(sessions)[: o.naive_sessions]
    naive_keys = [pattern.replace("{id}", i) for i in naive_ids]
    for summarize in (True, False):
        for _ in range(o.runs):
            await truncate_archive()
            await load_sessions(redis, pattern, {i: sessions[i] for i in naive_ids})
            what = "" if summarize else ", archive only"
            say(f"   naive pattern{what} on {len(naive_ids)} sessions (a commit per turn)...")
            with steal_over(t, "naive" if summarize else "naive_archive"):
                result = await naive_baseline.naive_flush(
                    redis, BENCH_URL, naive_keys, summarize=summarize
                )
            say(f"   naive{what}: {result.turns / result.seconds:,.0f} turns/s")
            t.naive_sessions = result.sessions
            if summarize:
                t.naive_turns = result.turns
                t.naive_runs.append(result.seconds)
            else:
                t.naive_archive_turns = result.turns
                t.naive_archive_runs.append(result.seconds)
    # Every measurement counts its best run: a shared machine's speed moves from minute to
    # minute, and comparing one lucky run with one unlucky one says nothing about the code.
    t.naive_s, t.naive_archive_s = min(t.naive_runs), min(t.naive_archive_runs)

    env = flat_out_env(o, pattern)
    for run in range(o.runs):
        await truncate_archive()
        await load_sessions(redis, pattern, sessions)
        say(
            f"   consolidator flush --all, concurrency {o.concurrency}, "
            f"{o.summary_processes} summary processes, run {run + 1}..."
        )
        cpu, pg_cpu = await redis_cpu(redis), postgres_cpu()
        with steal_over(t, "flush"):
            flush = await run_cli(["flush", "--all"], env)
        redis_cpu_s = await redis_cpu(redis) - cpu
        postgres_cpu_s = _delta(pg_cpu, postgres_cpu())
        window = flush.work_window_s()
        counts = await archive_counts()
        checked = (
            f"{counts[0]} sessions, {counts[1]} turns, {counts[2]} summaries applied in the archive"
        )
        if counts[1] != t.turns:
            checked += f" (EXPECTED {t.turns} turns)"
        say(f"   flush: {t.turns / window:,.0f} turns/s; {checked}")
        if not t.flush_runs or window < min(t.flush_runs):
            t.flush_redis_cpu_s, t.flush_postgres_cpu_s = redis_cpu_s, postgres_cpu_s
            t.flush_window_s, t.flush_wall_s = window, flush.wall_s
            t.flush_cpu_s = flush.cpu_s
            t.flush_statuses = flush.statuses()
        if "EXPECTED" not in t.flush_checked:  # a run that lost turns is the one reported
            t.flush_checked = checked
        t.flush_runs.append(window)

    for run in range(o.runs):
        await truncate_archive()
        await load_sessions(redis, pattern, sessions)
        say(f"   consolidator flush --all with the default settings, run {run + 1}...")
        with steal_over(t, "default"):
            default = await run_cli(["flush", "--all"], daemon_env(pattern))
        say(f"   default settings: {t.turns / default.work_window_s():,.0f} turns/s")
        t.default_runs.append(default.work_window_s())

    for run in range(o.runs):
        await truncate_archive()
        await load_sessions(redis, pattern, sessions)
        say(f"   consolidator flush --all --no-summarize, run {run + 1}...")
        with steal_over(t, "archive_only"):
            archive_only = await run_cli(["flush", "--all", "--no-summarize"], env)
        window = archive_only.work_window_s()
        say(f"   archive only: {t.turns / window:,.0f} turns/s")
        if not t.archive_only_runs or window < min(t.archive_only_runs):
            t.archive_only_window_s, t.archive_only_wall_s = window, archive_only.wall_s
        t.archive_only_runs.append(window)
    await delete_keys(redis, f"{prefix}*")


# --- 2. a slow model -------------------------------------------------------------------------


@dataclass
class ModelLevel:
    concurrency: int
    sessions: int
    window_s: float
    wall_s: float
    consolidated: int
    by_model: int

    @property
    def per_s(self) -> float:
        return self.sessions / self.window_s if self.window_s else 0.0


class GeminiProcess:
    """The local Gemini-protocol server, answering every request after a fixed delay, in its
    own process (so serving it costs the daemon nothing)."""

    def __init__(self, delay_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SELF, "serve-gemini", str(delay_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().decode().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the local Gemini server did not start")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the server stops when its stdin closes
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def serve_gemini(delay_s: float) -> None:
    def slow(request: Any) -> Reply:
        return Reply(text=default_summary(request), delay_s=delay_s)

    async with GeminiServer(default=slow) as server:
        print(server.base_url, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def bench_model(o: Options, redis: Redis, prefix: str, report: Report) -> None:
    say(f"2. a {o.model_delay * 1000:.0f} ms model, concurrency {o.model_levels}")
    server = GeminiProcess(o.model_delay)
    try:
        work = Workload(o.seed + 2)
        for c in o.model_levels:
            pattern = f"{prefix}m{c}:conversation:{{id}}:history"
            count = max(o.model_rounds * c, 12)
            await load_sessions(
                redis, pattern, {f"m{c}-{i:05d}": work.session(24) for i in range(count)}
            )
            env = daemon_env(
                pattern,
                CONSOLIDATOR_SUMMARIZER="gemini",
                CONSOLIDATOR_CONCURRENCY=c,
                CONSOLIDATOR_GEMINI_REQUESTS_PER_MINUTE=o.model_rpm,
                CONSOLIDATOR_GEMINI_TOKENS_PER_MINUTE=1_000_000_000,
                GEMINI_API_KEY="bench-key",
                GOOGLE_GEMINI_BASE_URL=server.base_url,
            )
            run = await run_cli(["flush", "--all"], env)
            by_model = sum(1 for e in run.sessions() if e.get("summarizer") == "gemini")
            level = ModelLevel(
                c,
                count,
                run.work_window_s(),
                run.wall_s,
                run.statuses().get("consolidated", 0),
                by_model,
            )
            report.model.append(level)
            say(f"   concurrency {c}: {level.per_s:,.1f} sessions/s ({by_model}/{count} by model)")
            await delete_keys(redis, f"{prefix}m{c}:*")
    finally:
        server.close()


# --- 3 and 5. finding work in a large keyspace; the daemon's memory --------------------------


@dataclass
class ScanSize:
    keys: int
    dbsize: int
    sessions: int
    scan_s: float
    scan_cpu_s: float
    find_s: float
    find_cpu_s: float


@dataclass
class MemoryRun:
    keys: int
    due: int
    max_rss_mb: float
    wall_s: float
    statuses: dict[str, int]


async def bench_scan(o: Options, redis: Redis, prefix: str, report: Report) -> None:
    pattern = f"{prefix}conversation:{{id}}:history"
    settings = Settings(
        redis_url=REDIS_URL,
        database_url=BENCH_URL,
        key_pattern=pattern,
        summarizer="extractive",
        idle_after_s=86_400,
        expiry_margin_s=600,
    )
    say("3. finding work: full scans of growing keyspaces; 5. the daemon's peak memory")
    have_unrelated = have_sessions = 0
    work = Workload(o.seed + 3)
    tiny = [work.session(3) for _ in range(50)]
    logs.configure("warning", "json")
    async with open_runtime(settings) as rt:
        for size in sorted(set(o.scan_sizes) | set(o.memory_sizes)):
            want_sessions = int(size * o.session_share)
            await load_unrelated(redis, prefix, have_unrelated, size - want_sessions)
            active = {f"a{i}": tiny[i % len(tiny)] for i in range(have_sessions, want_sessions)}
            await load_sessions(redis, pattern, active, ttl_s=86_400)
            have_unrelated, have_sessions = size - want_sessions, want_sessions
            if size in o.scan_sizes:
                measured = await measure_scan(o, redis, rt.daemon, pattern, size, want_sessions)
                report.scans.append(measured)
                say(
                    f"   {size:,} keys: SCAN {measured.scan_s * 1000:,.0f} ms, "
                    f"find work {measured.find_s * 1000:,.0f} ms"
                )
            if size in o.memory_sizes:
                memory = await measure_memory(o, redis, pattern, size, work)
                report.memory.append(memory)
                say(f"   {size:,} keys: run --once peak RSS {memory.max_rss_mb:,.0f} MB")
    await delete_keys(redis, f"{prefix}*")


async def measure_scan(
    o: Options, redis: Redis, daemon: Any, pattern: str, size: int, sessions: int
) -> ScanSize:
    from worker.hot.keys import KeyPattern
    from worker.hot.scanner import scan_keys

    compiled = KeyPattern.compile(pattern)
    scans, scan_cpu, finds, find_cpu = [], [], [], []
    for _ in range(o.scan_repeats):
        cpu = await redis_cpu(redis)
        started = time.perf_counter()
        seen = 0
        async for refs in scan_keys(redis, compiled, daemon.settings.scan_count):
            seen += len(refs)
        scans.append(time.perf_counter() - started)
        scan_cpu.append(await redis_cpu(redis) - cpu)
        if seen < sessions:
            raise RuntimeError(f"SCAN saw {seen} sessions of {sessions}")
        cpu = await redis_cpu(redis)
        started = time.perf_counter()
        await daemon.find_work()
        finds.append(time.perf_counter() - started)
        find_cpu.append(await redis_cpu(redis) - cpu)
    return ScanSize(
        size,
        int(await redis.dbsize()),
        sessions,
        statistics.median(scans),
        statistics.median(scan_cpu),
        statistics.median(finds),
        statistics.median(find_cpu),
    )


async def measure_memory(
    o: Options, redis: Redis, pattern: str, size: int, work: Workload
) -> MemoryRun:
    """`consolidator run --once` over the keyspace, with `memory_due` sessions about to expire
    (the same amount of work at every size): its peak RSS must not follow the keyspace."""
    await truncate_archive()
    due = {f"due{size}-{i}": work.session(30) for i in range(o.memory_due)}
    await load_sessions(redis, pattern, due, ttl_s=300)
    env = daemon_env(
        pattern,
        CONSOLIDATOR_CONCURRENCY=o.concurrency,
        CONSOLIDATOR_IDLE_AFTER_S=86_400,
        CONSOLIDATOR_EXPIRY_MARGIN_S=600,
    )
    run = await run_cli(["run", "--once"], env)
    for session_id in due:  # the next size gets the same amount of work, no more
        await redis.unlink(pattern.replace("{id}", session_id))
    return MemoryRun(size, len(due), run.max_rss_mb, run.wall_s, run.statuses())


# --- 4. the agents' latency ------------------------------------------------------------------


@dataclass
class Latency:
    ops: int
    p50_ms: float
    p99_ms: float


@dataclass
class AgentRun:
    append: Latency
    read: Latency
    rate: float
    redis_us: dict[str, float] = field(default_factory=dict)  # Redis's own time per command
    daemon_busy: bool | None = None
    # Share of the window each spent runnable but without a CPU (schedstat), when known.
    agents_cpu_wait: float | None = None
    redis_cpu_wait: float | None = None
    # Share of the window in which any task on this machine waited for a CPU (PSI), when known.
    cpu_pressure: float | None = None
    daemon_sessions_per_s: float | None = None  # sessions it archived over the window


AGENT_COMMANDS = ("rpush", "expire", "lrange")


async def command_usec(redis: Redis) -> dict[str, tuple[int, int]]:
    stats = await redis.info("commandstats")
    found = {}
    for name in AGENT_COMMANDS:
        entry = stats.get(f"cmdstat_{name}")
        if isinstance(entry, dict):
            found[name] = (int(entry["calls"]), int(entry["usec"]))
    return found


async def agents_main(url: str, pattern: str, sessions: int, rate: float, seconds: float) -> None:
    """A fleet of agents doing what seed 004's agent does, at a steady rate: append a turn
    (RPUSH then EXPIRE) and read the history (LRANGE 0 -1). Prints the latencies as JSON.

    Like a long-running agent, it has its connections open before it is measured (opening a
    connection on a busy machine takes far longer than a command), and a warm-up second runs
    unmeasured."""
    redis = Redis.from_url(url, decode_responses=False, max_connections=1000)
    keys = [pattern.replace("{id}", f"agent{i:04d}") for i in range(sessions)]
    rng = random.Random(11)
    appends: list[float] = []
    reads: list[float] = []
    element = _element("user", "Can you check ORD-4417 for Priya before Friday? " * 4, time.time())

    warmup_s = 1.0

    async def append(key: str) -> None:
        started = time.perf_counter()
        await redis.rpush(key, element)
        await redis.expire(key, SESSION_TTL_S)
        if started >= measured_from:
            appends.append(time.perf_counter() - started)

    async def read(key: str) -> None:
        started = time.perf_counter()
        await redis.lrange(key, 0, -1)
        if started >= measured_from:
            reads.append(time.perf_counter() - started)

    await asyncio.gather(*(redis.ping() for _ in range(64)))
    tasks: set[asyncio.Task[None]] = set()
    begin = time.perf_counter()
    measured_from = begin + warmup_s
    i = 0
    waited_before: float | None = None
    while (due := begin + i / rate) < measured_from + seconds:
        if (pause := due - time.perf_counter()) > 0:
            await asyncio.sleep(pause)
        if waited_before is None and due >= measured_from:
            waited_before = cpu_wait_s()
        for op in (append(rng.choice(keys)), read(rng.choice(keys))):
            task = asyncio.create_task(op)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - measured_from
    waited = _delta(waited_before, cpu_wait_s())
    await redis.aclose()
    print(
        json.dumps(
            {
                "append": _percentiles(appends),
                "read": _percentiles(reads),
                "rate": len(appends) / elapsed,
                "cpu_wait": None if waited is None else waited / elapsed,
            }
        )
    )


def _percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"ops": len(samples), "p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


async def run_agents(o: Options, redis: Redis, pattern: str) -> AgentRun:
    before = await command_usec(redis)
    redis_pid = await local_redis_pid(redis)
    redis_waited = None if redis_pid is None else cpu_wait_s(redis_pid)
    stalled = cpu_stalled_s()
    archived = (await archive_counts())[0]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SELF,
        "agents",
        REDIS_URL,
        pattern,
        str(o.agent_sessions),
        str(o.agent_rate),
        str(o.agent_seconds),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("the agents' process failed")
    data = json.loads(out.decode().strip().splitlines()[-1])
    redis_waited = _delta(redis_waited, None if redis_pid is None else cpu_wait_s(redis_pid))
    stalled = _delta(stalled, cpu_stalled_s())
    elapsed = time.perf_counter() - started
    archived = (await archive_counts())[0] - archived
    after = await command_usec(redis)
    # Mean time Redis itself spent on each command (every client's, the agents' by far most).
    served = {
        name: (after[name][1] - before[name][1]) / (after[name][0] - before[name][0])
        for name in AGENT_COMMANDS
        if name in after and name in before and after[name][0] > before[name][0]
    }
    return AgentRun(
        Latency(**data["append"]),
        Latency(**data["read"]),
        float(data["rate"]),
        served,
        agents_cpu_wait=data["cpu_wait"],
        redis_cpu_wait=None if redis_waited is None else redis_waited / elapsed,
        cpu_pressure=None if stalled is None else stalled / elapsed,
        daemon_sessions_per_s=archived / elapsed,
    )


async def wait_for_archiving(daemon: Daemon) -> None:
    conn = await asyncpg.connect(_plain(BENCH_URL))
    try:
        for _ in range(1200):  # polls the archive for at most a minute
            if not daemon.running() or await conn.fetchval("SELECT count(*) FROM sessions"):
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@dataclass
class CopyLoad:
    """PostgreSQL kept busy by bare COPYs, with no daemon anywhere."""

    rows: int = 0
    seconds: float = 0.0


@contextlib.asynccontextmanager
async def postgres_copying(rows: list[tuple[Any, ...]]) -> AsyncIterator[CopyLoad]:
    """The same rows COPYed into a scratch copy of the turns table (its indexes included) over
    and over, on one connection: what PostgreSQL archiving at full speed costs the agents when
    it shares their machine, whoever sends it the rows."""
    load = CopyLoad()
    conn = await asyncpg.connect(_plain(BENCH_URL))
    await conn.execute("CREATE TEMP TABLE copied (LIKE turns INCLUDING ALL)")
    stop = asyncio.Event()

    async def copy_until_stopped() -> None:
        started = time.perf_counter()
        while not stop.is_set():
            async with conn.transaction():
                await conn.copy_records_to_table("copied", records=rows, columns=list(TURN_COLUMNS))
                await conn.execute("TRUNCATE copied")
            load.rows += len(rows)
        load.seconds = time.perf_counter() - started

    task = asyncio.create_task(copy_until_stopped())
    try:
        yield load
    finally:
        stop.set()
        await task
        await conn.close()


async def bench_agents(o: Options, redis: Redis, prefix: str, report: Report) -> None:
    pattern = f"{prefix}conversation:{{id}}:history"
    say(f"4. agents' latency: {o.agent_rate:.0f} appends/s and reads/s, {o.agent_seconds:.0f} s")
    work = Workload(o.seed + 4)
    agent_sessions = {f"agent{i:04d}": work.session(20) for i in range(o.agent_sessions)}
    await load_unrelated(redis, prefix, 0, o.unrelated)
    await load_sessions(redis, pattern, agent_sessions)
    report.agents_alone = await run_agents(o, redis, pattern)
    say(f"   alone: append p99 {report.agents_alone.append.p99_ms:.2f} ms")

    flushed = work.sessions(o.agent_flush_sessions, o.turns_mean)
    sessions = {f"s{i:06d}": s for i, s in enumerate(flushed)}
    _, turn_rows = copy_rows(dict(list(sessions.items())[:100]), pattern)
    async with postgres_copying(turn_rows) as load:
        report.agents_postgres = await run_agents(o, redis, pattern)
    report.postgres_load = load
    say(f"   PostgreSQL copying alone: append p99 {report.agents_postgres.append.p99_ms:.2f} ms")
    env = flat_out_env(o, pattern)
    for nice in o.daemon_nice:
        await truncate_archive()
        await load_sessions(redis, pattern, sessions)
        daemon = Daemon(["flush", "--all"], env, nice=nice)
        # The window opens once the daemon is archiving, and must close before it is done.
        await wait_for_archiving(daemon)
        busy = await run_agents(o, redis, pattern)
        busy.daemon_busy = daemon.running()
        run = await daemon.wait()
        report.agents_busy[nice] = busy
        say(
            f"   with the daemon (nice {nice}): append p99 {busy.append.p99_ms:.2f} ms (daemon "
            f"{'busy throughout' if busy.daemon_busy else 'finished early'}, exit {run.code})"
        )
    for pace in o.daemon_paces:
        slowed = {"CONSOLIDATOR_MAX_SESSIONS_PER_S": str(pace)}
        busy = await agents_beside_slowed_daemon(o, redis, pattern, sessions, env | slowed)
        report.agents_paced[pace] = busy
        say(f"   with the daemon at {pace:g} sessions/s: append p99 {busy.append.p99_ms:.2f} ms")
    for limit in o.daemon_pressures:
        slowed = {"CONSOLIDATOR_MAX_CPU_PRESSURE": str(limit)}
        busy = await agents_beside_slowed_daemon(o, redis, pattern, sessions, env | slowed)
        report.agents_yielding[limit] = busy
        say(
            f"   with the daemon yielding above {limit:g}% CPU pressure: append p99 "
            f"{busy.append.p99_ms:.2f} ms, {busy.daemon_sessions_per_s or 0:.1f} sessions/s"
        )
    await delete_keys(redis, f"{prefix}*")


async def agents_beside_slowed_daemon(
    o: Options, redis: Redis, pattern: str, sessions: dict[str, list[bytes]], env: dict[str, str]
) -> AgentRun:
    """The agents measured while a paced flush works: at its pace it would take minutes, so
    Ctrl-C ends it after the window (in-flight sessions are abandoned safely, their leases
    released), as an operator would."""
    await truncate_archive()
    await load_sessions(redis, pattern, sessions)
    daemon = Daemon(["flush", "--all"], env)
    await wait_for_archiving(daemon)
    busy = await run_agents(o, redis, pattern)
    busy.daemon_busy = daemon.running()
    daemon.proc.send_signal(signal.SIGINT)
    await daemon.wait()
    return busy


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    options: Options
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    servers: str = ""
    throughput: Throughput = field(default_factory=Throughput)
    model: list[ModelLevel] = field(default_factory=list)
    scans: list[ScanSize] = field(default_factory=list)
    memory: list[MemoryRun] = field(default_factory=list)
    agents_alone: AgentRun | None = None
    agents_busy: dict[int, AgentRun] = field(default_factory=dict)  # by the daemon's niceness
    agents_postgres: AgentRun | None = None  # PostgreSQL busy with bare COPYs, no daemon
    agents_paced: dict[float, AgentRun] = field(default_factory=dict)  # by sessions/s ceiling
    agents_yielding: dict[float, AgentRun] = field(default_factory=dict)  # by pressure limit
    postgres_load: CopyLoad | None = None


def _default_settings() -> str:
    defaults = Settings()
    return (
        f"CONSOLIDATOR_CONCURRENCY={defaults.concurrency}, "
        f"CONSOLIDATOR_SUMMARY_PROCESSES={defaults.summary_processes}"
    )


def _pg_share(t: Throughput) -> str:
    if t.flush_postgres_cpu_s is None:
        return ""
    copy = "" if t.copy_postgres_cpu_s is None else f" (the COPY: {t.copy_postgres_cpu_s:.1f} s)"
    return f", and PostgreSQL {t.flush_postgres_cpu_s:.1f} s over the same run{copy}"


def _steals(t: Throughput, measure: str) -> str:
    return ", ".join(_share(v) for v in t.steal.get(measure, []))


def _rates(values: Iterable[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _share(part: float | None) -> str:
    return "n/a" if part is None else f"{100 * part:.1f}%"


def _per_s(rate: float | None) -> str:
    return "" if not rate else f"{rate:,.1f}"


def _mark(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def render(r: Report, command: str) -> str:
    o = r.options
    rows: list[tuple[str, str, str, str]] = []
    t = r.throughput
    if "throughput" not in o.skip:
        naive_x = t.flush_turns_s / t.naive_turns_s if t.naive_turns_s else 0.0
        copy_pct = 100 * t.flush_turns_s / t.copy_rows_s if t.copy_rows_s else 0.0
        rows += [
            (
                "1 archive throughput, `flush --all`, offline summarizer",
                f"{t.flush_turns_s:,.0f} turns/s, {t.sessions / t.flush_window_s:,.1f} sessions/s",
                "",
                "",
            ),
            (
                "1 … against the naive pattern",
                f"{naive_x:,.1f}× ({t.naive_turns_s:,.0f} turns/s)",
                "≥ 10×",
                _mark(naive_x >= 10),
            ),
            (
                "1 … against a raw COPY of the same rows",
                f"{copy_pct:,.0f}% ({t.copy_rows_s:,.0f} rows/s)",
                "≥ 60%",
                _mark(copy_pct >= 60),
            ),
            (
                f"1 … with the default settings ({_default_settings()}): against the naive "
                "pattern, and against COPY",
                f"{t.default_turns_s:,.0f} turns/s: {t.default_turns_s / t.naive_turns_s:,.1f}× "
                f"and {100 * t.default_turns_s / t.copy_rows_s:,.0f}%",
                "",
                "",
            ),
            (
                "1 archive only (`flush --all --no-summarize`): against the naive pattern "
                "archiving only, and against COPY",
                f"{t.archive_only_turns_s / t.naive_archive_turns_s:,.1f}× and "
                f"{100 * t.archive_only_turns_s / t.copy_rows_s:,.0f}% "
                f"({t.archive_only_turns_s:,.0f} turns/s)",
                "",
                "",
            ),
        ]
    if r.model:
        top = max(r.model, key=lambda m: m.concurrency)
        rows.append(
            (
                f"2 sessions/s, {o.model_delay * 1000:.0f} ms model, concurrency "
                + "/".join(str(m.concurrency) for m in r.model),
                " / ".join(f"{m.per_s:,.1f}" for m in r.model),
                "≥ 100 at 64",
                _mark(top.per_s >= 100) if top.concurrency >= 64 else "(not run at 64)",
            )
        )
    if r.scans:
        big = max(r.scans, key=lambda s: s.keys)
        rows.append(
            (
                f"3 full scan for work, {big.keys:,} keys",
                f"{big.find_s:,.2f} s (SCAN alone {big.scan_s:,.2f} s), "
                f"Redis CPU {big.find_cpu_s:,.2f} s",
                "< 2 s at 1,000,000",
                _mark(big.find_s < 2) if big.keys >= 1_000_000 else "(not run at 1,000,000)",
            )
        )
    if r.agents_alone and r.agents_busy:
        a = r.agents_alone
        for i, (nice, b) in enumerate(r.agents_busy.items()):
            up_append = b.append.p99_ms - a.append.p99_ms
            up_read = b.read.p99_ms - a.read.p99_ms
            rows.append(
                (
                    "4 agents' p99 raised by the daemon (append / read)"
                    + (f", daemon at nice {nice}" if nice else ""),
                    f"{up_append:+.2f} ms / {up_read:+.2f} ms",
                    "< 1 ms" if i == 0 else "",
                    _mark(max(up_append, up_read) < 1 and bool(b.daemon_busy)) if i == 0 else "",
                )
            )
        for pace, b in r.agents_paced.items():
            rows.append(
                (
                    f"4 … with the daemon paced at {pace:g} sessions/s "
                    "(`CONSOLIDATOR_MAX_SESSIONS_PER_S`)",
                    f"{b.append.p99_ms - a.append.p99_ms:+.2f} ms / "
                    f"{b.read.p99_ms - a.read.p99_ms:+.2f} ms",
                    "",
                    "",
                )
            )
        for limit, b in r.agents_yielding.items():
            rows.append(
                (
                    f"4 … with the daemon yielding above {limit:g}% CPU pressure "
                    f"(`CONSOLIDATOR_MAX_CPU_PRESSURE`): {b.daemon_sessions_per_s or 0:.1f} "
                    "sessions/s",
                    f"{b.append.p99_ms - a.append.p99_ms:+.2f} ms / "
                    f"{b.read.p99_ms - a.read.p99_ms:+.2f} ms",
                    "",
                    "",
                )
            )
        if p := r.agents_postgres:
            rows.append(
                (
                    "4 agents' p99 raised by PostgreSQL alone copying rows, no daemon "
                    "(append / read)",
                    f"{p.append.p99_ms - a.append.p99_ms:+.2f} ms / "
                    f"{p.read.p99_ms - a.read.p99_ms:+.2f} ms",
                    "",
                    "",
                )
            )
    if r.memory:
        small, big_m = min(r.memory, key=lambda m: m.keys), max(r.memory, key=lambda m: m.keys)
        flat = big_m.max_rss_mb <= small.max_rss_mb * 1.1 + 5
        rows.append(
            (
                "5 daemon peak RSS at " + " / ".join(f"{m.keys:,}" for m in r.memory) + " keys",
                " / ".join(f"{m.max_rss_mb:,.0f} MB" for m in r.memory),
                "< 250 MB, flat",
                _mark(big_m.max_rss_mb < 250 and flat),
            )
        )
    lines = [
        "## Benchmark results",
        "",
        f"`{command}` on {r.started:%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, "
        f"load average {r.load_before[0]:.1f} before and {r.load_after[0]:.1f} after "
        "(the one-minute figures; the benchmark's own work raises the second).",
        "",
        "| measure | result | target | |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
    ]
    lines += _details(r)
    return "\n".join(lines) + "\n"


def _details(r: Report) -> list[str]:
    o = r.options
    t = r.throughput
    out: list[str] = ["### Details", "", f"Servers: {r.servers}.", ""]
    if "throughput" not in o.skip:
        out += [
            f"**1. Archive throughput.** {t.sessions:,} sessions, {t.turns:,} turns "
            f"(mean {t.mean_turn_bytes:,.0f} bytes a turn) among {o.unrelated:,} unrelated keys; "
            f"CONSOLIDATOR_CONCURRENCY={o.concurrency} and CONSOLIDATOR_SUMMARY_PROCESSES="
            f"{o.summary_processes} (the README's settings for a backlog; the defaults are "
            f"{_default_settings()}), keep 10 recent turns. Rates count each "
            "run's work window (first session started to last one done, from the daemon's log); "
            f"wall time with the process start-up: flush {t.flush_wall_s:.1f} s, archive only "
            f"{t.archive_only_wall_s:.1f} s.",
            "",
            f"Each measurement is made {o.runs} time{'s' if o.runs > 1 else ''} and its best "
            "run counts, for all of them alike; the last columns have every run's rate, and "
            "the share of the machine's CPU time that its host kept for other work during that "
            "run (steal, from /proc/stat), which slows a run whatever the code.",
            "",
            "| run | turns/s | sessions/s | seconds | turns/s of each run | steal in each run |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| raw COPY (asyncpg, binary) | {t.copy_rows_s:,.0f} | "
            f"| {t.turns / t.copy_rows_s:.2f} | {_rates(t.copy_runs)} | {_steals(t, 'copy')} |",
            f"| `consolidator flush --all` | {t.flush_turns_s:,.0f} | "
            f"{t.sessions / t.flush_window_s:,.1f} | {t.flush_window_s:.2f} | "
            f"{_rates(t.turns / w for w in t.flush_runs)} | {_steals(t, 'flush')} |",
            f"| `consolidator flush --all`, default settings | {t.default_turns_s:,.0f} | "
            f"{t.sessions * t.default_turns_s / t.turns:,.1f} | {min(t.default_runs):.2f} | "
            f"{_rates(t.turns / w for w in t.default_runs)} | {_steals(t, 'default')} |",
            f"| `consolidator flush --all --no-summarize` | {t.archive_only_turns_s:,.0f} | "
            f"{t.sessions / t.archive_only_window_s:,.1f} | {t.archive_only_window_s:.2f} | "
            f"{_rates(t.turns / w for w in t.archive_only_runs)} | "
            f"{_steals(t, 'archive_only')} |",
            f"| naive pattern ({t.naive_sessions} sessions) | {t.naive_turns_s:,.0f} | "
            f"{t.naive_sessions / t.naive_s:,.2f} | {t.naive_s:.2f} | "
            f"{_rates(t.naive_turns / s for s in t.naive_runs)} | {_steals(t, 'naive')} |",
            f"| naive pattern, archive only | {t.naive_archive_turns_s:,.0f} | "
            f"{t.naive_sessions / t.naive_archive_s:,.2f} | {t.naive_archive_s:.2f} | "
            f"{_rates(t.naive_archive_turns / s for s in t.naive_archive_runs)} | "
            f"{_steals(t, 'naive_archive')} |",
            "",
            f"Where the time goes: the flush process and its summary processes used "
            f"{t.flush_cpu_s:.1f} s of CPU "
            f"({1000 * t.flush_cpu_s / t.sessions:.1f} ms a session; "
            f"{t.flush_cpu_s / t.flush_wall_s:.0%} of one core over its run, start-up "
            f"included){_pg_share(t)}. The offline summarizer alone takes "
            f"{t.summarizer_ms:.1f} ms of CPU for a session's first fold (measured on these "
            "sessions' folds, on an idle core); the archive path without it is the "
            "`--no-summarize` run. The flush is bound by the machine's two cores, which the "
            "daemon shares with PostgreSQL: the COPY ceiling is PostgreSQL alone on one of them. "
            "The default settings leave the second core mostly to PostgreSQL, and keep fewer "
            "sessions in flight, so each group commit carries fewer of them.",
            "",
            f"Flush outcomes: {t.flush_statuses}; checked: {t.flush_checked}. Redis CPU during "
            f"the flush: {t.flush_redis_cpu_s:.2f} s ({t.flush_redis_cpu_s / t.flush_wall_s:.0%} "
            "of one core, every client's).",
            "",
        ]
    if r.model:
        out += [
            f"**2. Slow model.** The local Gemini-protocol server answers every request after "
            f"{o.model_delay * 1000:.0f} ms; the real google-genai client calls it; "
            f"CONSOLIDATOR_GEMINI_REQUESTS_PER_MINUTE={o.model_rpm:,} (so at most "
            f"{o.model_rpm / 60:,.0f} sessions/s in the long run). Sessions of 24 turns.",
            "",
            "| concurrency | sessions | sessions/s | ideal (c / delay) | summarized by the model |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {m.concurrency} | {m.sessions} | {m.per_s:,.1f} | "
                f"{m.concurrency / o.model_delay:,.1f} | {m.by_model} |"
                for m in r.model
            ),
            "",
        ]
    if r.scans:
        out += [
            f"**3. Finding work.** {o.session_share:.0%} of the keys are sessions (lists with a "
            "long TTL, not due), the rest unrelated strings. SCAN is the daemon's own "
            "MATCH/COUNT walk; finding work adds the probes (PTTL, OBJECT IDLETIME, MEMORY "
            f"USAGE) of every session key. Median of {o.scan_repeats}; Redis CPU is the "
            "server's used_cpu_sys+used_cpu_user over the scan.",
            "",
            "| keys (DBSIZE) | SCAN | finding work | Redis CPU | ms per 100k keys |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {s.keys:,} ({s.dbsize:,}) | {s.scan_s * 1000:,.0f} ms | "
                f"{s.find_s * 1000:,.0f} ms | {s.find_cpu_s * 1000:,.0f} ms | "
                f"{s.find_s * 1000 * 100_000 / s.keys:,.0f} |"
                for s in r.scans
            ),
            "",
        ]
    if r.agents_alone and r.agents_busy:
        runs = [("without the daemon", r.agents_alone)]
        if r.agents_postgres and (load := r.postgres_load):
            rate = load.rows / load.seconds if load.seconds else 0
            runs.append((f"no daemon, PostgreSQL copying {rate:,.0f} rows/s", r.agents_postgres))
        runs += [
            (f"daemon flushing, nice {nice}" + ("" if b.daemon_busy else " (finished early)"), b)
            for nice, b in r.agents_busy.items()
        ]
        runs += [
            (
                f"daemon flushing at {pace:g} sessions/s"
                + ("" if b.daemon_busy else " (finished)"),
                b,
            )
            for pace, b in r.agents_paced.items()
        ]
        runs += [
            (f"daemon yielding above {limit:g}% CPU pressure", b)
            for limit, b in r.agents_yielding.items()
        ]
        out += [
            f"**4. Agents' latency.** A separate process, {o.agent_sessions} sessions, "
            f"{o.agent_rate:.0f} appends/s (RPUSH then EXPIRE) and {o.agent_rate:.0f} reads/s "
            f"(LRANGE 0 -1) for {o.agent_seconds:.0f} s after a warm-up, each op timed by the "
            "agent, while `consolidator flush --all` works through "
            f"{o.agent_flush_sessions:,} sessions "
            "(the agents' own sessions among them), with the settings of section 1. Redis "
            "µs/call is Redis's own time per "
            "command (INFO commandstats) over the window: what the server spends, without the "
            "waiting for a CPU that the agents' timings include on a shared machine. CPU wait is "
            "that waiting, from the kernel (/proc/PID/schedstat): the share of the window the "
            "agents' process, and Redis, were ready to run but had no CPU. The second row has "
            "no daemon at all: PostgreSQL is kept busy by bare COPYs of the workload's rows into "
            "a scratch copy of the turns table, on one connection, which is the database work "
            "that archiving at full speed asks of it. The paced rows run the same flush with "
            "CONSOLIDATOR_MAX_SESSIONS_PER_S set, and end it with Ctrl-C after the window; the "
            "yielding rows the same with CONSOLIDATOR_MAX_CPU_PRESSURE, so the daemon sets its own "
            "pace from the machine's CPU pressure. CPU pressure is the kernel's PSI figure: the "
            "share of the window in which any task on the machine waited for a CPU. Daemon "
            "sessions/s: sessions archived over the window.",
            "",
            "| | append p50 | append p99 | read p50 | read p99 | ops/s | Redis µs/call "
            "RPUSH · EXPIRE · LRANGE | CPU wait: agents · Redis | CPU pressure | daemon "
            "sessions/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {name} | {run.append.p50_ms:.2f} ms | {run.append.p99_ms:.2f} ms | "
                f"{run.read.p50_ms:.2f} ms | {run.read.p99_ms:.2f} ms | {run.rate:,.0f} | "
                + " · ".join(f"{run.redis_us.get(c, 0):.1f}" for c in AGENT_COMMANDS)
                + f" | {_share(run.agents_cpu_wait)} · {_share(run.redis_cpu_wait)} | "
                f"{_share(run.cpu_pressure)} | {_per_s(run.daemon_sessions_per_s)} |"
                for name, run in runs
            ),
            "",
        ]
    if r.memory:
        out += [
            f"**5. Memory.** `consolidator run --once` over the keyspace with {o.memory_due} "
            "sessions about to expire (the same work at every size); peak RSS from the kernel.",
            "",
            "| keys | peak RSS | wall | outcomes |",
            "| --- | --- | --- | --- |",
            *(
                f"| {m.keys:,} | {m.max_rss_mb:,.0f} MB | {m.wall_s:.1f} s | {m.statuses} |"
                for m in r.memory
            ),
            "",
        ]
    return out


# --- main ------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def bench_redis(prefix: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(REDIS_URL, decode_responses=False)
    try:
        yield redis
    finally:
        deleted = await delete_keys(redis, f"{prefix}*")
        await delete_keys(redis, f"consolidator:lease:*{prefix}*")
        say(f"cleaned up {deleted} keys")
        await redis.aclose()


async def server_versions(redis: Redis) -> str:
    info = await redis.info("server")
    conn = await asyncpg.connect(_plain(BENCH_URL))
    try:
        pg = await conn.fetchval("SHOW server_version")
        revision = await conn.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    return (
        f"Redis {info.get('redis_version')}, PostgreSQL {pg} (schema {revision}), "
        f"Python {platform.python_version()}"
    )


async def bench(o: Options, command: str) -> Report:
    report = Report(o, load_before=os.getloadavg())
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    say(f"bench: keys under {prefix!r}, database {DATABASE!r}")
    await recreate_database()
    try:
        await asyncio.to_thread(upgrade, BENCH_URL)
        async with bench_redis(prefix) as redis:
            report.servers = await server_versions(redis)
            if "throughput" not in o.skip:
                await bench_throughput(o, redis, prefix, report)
            if "agents" not in o.skip:
                await bench_agents(o, redis, prefix, report)
            if "model" not in o.skip:
                await bench_model(o, redis, prefix, report)
            if "scan" not in o.skip:
                await bench_scan(o, redis, prefix, report)
    finally:
        await recreate_database(drop_only=True)
    report.load_after = os.getloadavg()
    return report


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve-gemini"]:
        asyncio.run(serve_gemini(float(argv[1])))
        return 0
    if argv[:1] == ["agents"]:
        url, pattern, sessions, rate, seconds = argv[1:6]
        asyncio.run(agents_main(url, pattern, int(sessions), float(rate), float(seconds)))
        return 0
    options = parse_options(argv)
    # The servers are read above; every other setting is the daemon's default, here as in the
    # daemons the bench starts (daemon_env), whatever this shell exports.
    for name in [n for n in os.environ if n.startswith("CONSOLIDATOR_")]:
        del os.environ[name]
    command = " ".join(["make bench"] if not argv else ["scripts/bench.py", *argv])
    report = asyncio.run(bench(options, command))
    text = render(report, command)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text, encoding="utf-8")
    print(text)
    say(f"written to {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
