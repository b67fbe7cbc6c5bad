"""How fast the daemon starts sessions that are not about to expire.

Two limits, and the lower one holds: a fixed ceiling (CONSOLIDATOR_MAX_SESSIONS_PER_S), and,
with CONSOLIDATOR_MAX_CPU_PRESSURE, one that follows the machine's CPU pressure. The kernel's
pressure figures (PSI) say for how much of the time some runnable task had to wait for a CPU:
that waiting is what raises the agents' latency when the daemon shares their cores, and neither
niceness nor the idle scheduling class prevents it for a daemon whose work is socket I/O (see
the README's benchmark). The rate is halved while the pressure is above the limit and grows by
a quarter each calm interval (the sawtooth of TCP's congestion control), so a daemon with
cores to spare runs flat out and one beside busy agents takes what they leave. Its own work
counts as well, the database's too: a daemon that alone keeps every core busy slows itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from worker.metrics import Metrics

log = structlog.get_logger(__name__)

# How often the pressure is read: often enough to back off within a second of the agents
# feeling it, seldom enough that a reading spans many scheduler ticks.
INTERVAL_S = 0.5
FLOOR_PER_S = 1.0  # the slowest it goes: a backlog of idle sessions still moves
_GROWTH = 1.25
_UNBOUNDED_ABOVE = 1000.0  # past this the limit holds nothing back: it is lifted
_RECHECK_S = 0.25  # a waiting start looks again this often, so a raised rate takes effect


class Pace:
    """Starts spaced evenly at the lower of a fixed ceiling and an adaptive limit; without
    either, at once. An even spacing rather than a token bucket, since a burst of sessions is
    a burst of archive writes the agents feel."""

    def __init__(self, ceiling: float | None) -> None:
        self.ceiling = ceiling
        self.adaptive: float | None = None
        self.started = 0  # starts that went through the pace (expiring sessions do not)
        self._last = -math.inf
        self._turn = asyncio.Lock()  # one start waits for its slot at a time, in order

    @property
    def rate(self) -> float | None:
        limits = [r for r in (self.ceiling, self.adaptive) if r is not None]
        return min(limits) if limits else None

    def start_now(self) -> bool:
        """Start one session at once if nothing holds it back (no limit, nobody waiting)."""
        if self.rate is None and not self._turn.locked():
            self._note_start()
            return True
        return False

    async def wait(self) -> None:
        """Return when one more session may start."""
        if self.start_now():
            return
        async with self._turn:
            while (rate := self.rate) is not None:
                wait_s = self._last + 1 / rate - time.monotonic()
                if wait_s <= 0:
                    break
                await asyncio.sleep(min(wait_s, _RECHECK_S))
            self._note_start()

    def _note_start(self) -> None:
        self._last = time.monotonic()
        self.started += 1


class PressureUnavailable(Exception):
    """The kernel keeps no CPU pressure figures here (no PSI), or the file is not one."""


@dataclass
class CpuPressure:
    """Reads a PSI file (/proc/pressure/cpu, or a cgroup's cpu.pressure): the share of wall
    time, since the last reading, in which at least one runnable task waited for a CPU."""

    path: Path
    failed: bool = False  # the figures could not be read: not tried again
    _last: tuple[float, int] | None = None  # (monotonic seconds, stalled microseconds)

    def stalled_us(self) -> int:
        try:
            text = self.path.read_text()
        except OSError as exc:  # missing, or EOPNOTSUPP where PSI is off (psi=0)
            raise PressureUnavailable(f"{self.path}: {exc.strerror or exc}") from exc
        for line in text.splitlines():
            kind, _, fields = line.partition(" ")
            if kind == "some":
                for field in fields.split():
                    name, _, value = field.partition("=")
                    if name == "total" and value.isdigit():
                        return int(value)
        raise PressureUnavailable(f"{self.path}: no 'some ... total=' line")

    def share(self) -> float | None:
        """The share since the last call; None on the first."""
        now, stalled = time.monotonic(), self.stalled_us()
        last, self._last = self._last, (now, stalled)
        if last is None or now <= last[0]:
            return None
        return min(max((stalled - last[1]) / 1e6 / (now - last[0]), 0.0), 1.0)

    def restart(self) -> None:
        self._last = None


def next_rate(
    rate: float | None, pressure: float, limit: float, started_per_s: float
) -> float | None:
    """The adaptive limit after one interval. Above the pressure limit it halves, from what was
    actually started when that is lower (a limit nothing reaches holds nothing back); below,
    it grows by a quarter, and is lifted once far above any rate a daemon reaches."""
    if pressure > limit:
        base = started_per_s if rate is None else min(rate, started_per_s)
        return max(base / 2, FLOOR_PER_S)
    if rate is None:
        return None
    grown = rate * _GROWTH
    return None if grown > _UNBOUNDED_ABOVE else grown


async def follow_cpu_pressure(
    pace: Pace, source: CpuPressure, limit: float, metrics: Metrics
) -> None:
    """Adjust `pace.adaptive` to the CPU pressure until cancelled. If the machine keeps no
    pressure figures it says so, once in the process's life, and leaves the pace to its fixed
    ceiling from then on."""
    if source.failed:
        return
    source.restart()
    started, at = pace.started, time.monotonic()
    try:
        source.share()
        while True:
            await asyncio.sleep(INTERVAL_S)
            pressure = source.share()
            now = time.monotonic()
            started_per_s = (pace.started - started) / max(now - at, 1e-3)
            started, at = pace.started, now
            if pressure is not None:
                metrics.cpu_pressure.set(pressure)
                pace.adaptive = next_rate(pace.adaptive, pressure, limit, started_per_s)
                show_pace(pace, metrics)
    except PressureUnavailable as exc:
        source.failed = True
        log.error("cpu_pressure_unavailable", error=str(exc), pacing="fixed ceiling only")
        pace.adaptive = None
        show_pace(pace, metrics)


def show_pace(pace: Pace, metrics: Metrics) -> None:
    """The pace as `consolidator_pace_sessions_per_second` shows it: +Inf without a limit."""
    metrics.pace.set(math.inf if pace.rate is None else pace.rate)
