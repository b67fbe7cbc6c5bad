"""The daemon's pace: a fixed ceiling, and a limit that follows the machine's CPU pressure.

The pressure comes from a PSI file; these tests write one (the kernel's own figures cannot be
driven from a test), in the kernel's format, and the daemon reads it as it would /proc's."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests import agents
from worker.config import Settings
from worker.domain import SummaryText, Turn
from worker.metrics import Metrics
from worker.pacing import (
    FLOOR_PER_S,
    CpuPressure,
    Pace,
    PressureUnavailable,
    follow_cpu_pressure,
    next_rate,
)
from worker.runtime import open_runtime
from worker.summarizers.extractive import ExtractiveSummarizer


def write_psi(path: Path, stalled_us: int) -> None:
    path.write_text(
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={stalled_us}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


@contextlib.asynccontextmanager
async def pressure(path: Path, share: float) -> AsyncIterator[None]:
    """The PSI file of a machine on which some task waits for a CPU `share` of the time."""
    stalled, last = 0.0, time.monotonic()
    write_psi(path, 0)

    async def advance() -> None:
        nonlocal stalled, last
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            stalled += (now - last) * share * 1e6
            last = now
            write_psi(path, int(stalled))

    task = asyncio.create_task(advance())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ModelLatency:
    """The offline summarizer behind a model's round trip, so a session takes a while."""

    name = "model-latency"

    def __init__(self) -> None:
        self.inner = ExtractiveSummarizer()

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        await asyncio.sleep(0.02)
        return await self.inner.summarize(previous, turns, max_chars)

    async def aclose(self) -> None:
        pass


def test_above_the_limit_the_rate_halves_from_what_was_started() -> None:
    assert next_rate(None, pressure=0.3, limit=0.1, started_per_s=80) == 40
    # A limit above what the daemon reached held nothing back: it halves from the real rate.
    assert next_rate(100, pressure=0.3, limit=0.1, started_per_s=20) == 10
    assert next_rate(8, pressure=0.3, limit=0.1, started_per_s=8) == 4
    assert next_rate(1.5, pressure=0.3, limit=0.1, started_per_s=2) == FLOOR_PER_S
    assert next_rate(None, pressure=0.3, limit=0.1, started_per_s=0) == FLOOR_PER_S


def test_below_the_limit_the_rate_grows_until_it_is_lifted() -> None:
    assert next_rate(None, pressure=0.05, limit=0.1, started_per_s=80) is None
    assert next_rate(8, pressure=0.05, limit=0.1, started_per_s=8) == 10
    rate: float | None = FLOOR_PER_S
    calm = 0
    while rate is not None:
        rate = next_rate(rate, pressure=0.0, limit=0.1, started_per_s=rate)
        calm += 1
    assert 20 < calm < 40  # from the floor back to no limit in 10 to 20 s of half-second reads


async def test_a_start_waiting_for_a_slow_pace_goes_soon_after_the_pace_is_raised() -> None:
    pace = Pace(ceiling=None)
    pace.adaptive = 0.1  # one start every 10 s
    await pace.wait()  # the first goes at once
    waiting = asyncio.create_task(pace.wait())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    raised = time.monotonic()
    pace.adaptive = None  # the pressure went away
    await asyncio.wait_for(waiting, 2)
    assert time.monotonic() - raised < 0.5  # not the 10 s the old pace asked for
    assert pace.started == 2


def test_the_pressure_is_the_share_of_wall_time_stalled(tmp_path: Path) -> None:
    path = tmp_path / "cpu"
    write_psi(path, 5_000_000)
    source = CpuPressure(path)
    assert source.share() is None  # nothing to compare with yet
    time.sleep(0.2)
    write_psi(path, 5_000_000 + 100_000)  # 0.1 s stalled
    share = source.share()
    assert share is not None and 0.3 < share < 0.55  # 0.1 s of 0.2 s and a bit


@pytest.mark.parametrize("content", [None, "", "full avg10=0.00 total=0\n", "some total=x\n"])
def test_a_machine_without_pressure_figures_is_named_in_the_error(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "cpu"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PressureUnavailable, match=str(path)):
        CpuPressure(path).share()


async def test_the_limit_falls_under_pressure_and_rises_when_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "cpu"
    pace, metrics = Pace(ceiling=None), Metrics()
    pace.adaptive = 64.0
    write_psi(path, 0)
    follow = asyncio.create_task(follow_cpu_pressure(pace, CpuPressure(path), 0.1, metrics))

    async def start_sessions() -> None:
        while True:
            await pace.wait()

    starting = asyncio.create_task(start_sessions())
    async with pressure(path, 0.9):
        await asyncio.sleep(1.8)
    low = pace.adaptive
    assert low is not None and low <= 16
    assert metrics.registry.get_sample_value("consolidator_cpu_pressure") == pytest.approx(0.9, 0.2)
    async with pressure(path, 0.0):
        await asyncio.sleep(1.8)
    follow.cancel()
    starting.cancel()
    assert pace.adaptive is not None and pace.adaptive > low
    assert metrics.registry.get_sample_value("consolidator_pace_sessions_per_second") == (
        pace.adaptive
    )


async def flushed_within(settings: Settings, redis: Redis, seconds: float, name: str) -> int:
    """Sessions consolidated by one pass stopped after `seconds`, of 200 idle ones."""
    async with open_runtime(settings, summarizer=ModelLatency()) as rt:
        for i in range(200):
            await agents.conversation(redis, rt.pattern.key_for(f"{name}{i}"), 8)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        outcomes = await rt.daemon.run_once(stop)
        return sum(o.status == "consolidated" for o in outcomes)


async def test_under_cpu_pressure_the_daemon_slows_down(
    make_settings: Callable[..., Settings], redis: Redis, tmp_path: Path
) -> None:
    path = tmp_path / "cpu"
    settings = make_settings(concurrency=2, max_cpu_pressure=5, cpu_pressure_file=path)
    async with pressure(path, 0.0):
        calm = await flushed_within(settings, redis, 3, "calm")
    async with pressure(path, 0.5):
        pressed = await flushed_within(settings, redis, 3, "pressed")
    # At about 60 sessions a second the calm pass takes 180, or all 200; under pressure the
    # daemon starts as fast for half a second, then halves its pace every half second.
    assert calm >= 60
    assert pressed < calm / 2


async def test_without_pressure_figures_the_daemon_runs_at_its_ceiling(
    make_settings: Callable[..., Settings], redis: Redis, tmp_path: Path
) -> None:
    missing = tmp_path / "no-psi-here"
    settings = make_settings(max_cpu_pressure=5, cpu_pressure_file=missing)
    async with open_runtime(settings, summarizer=ExtractiveSummarizer()) as rt:
        for i in range(3):
            await agents.conversation(redis, rt.pattern.key_for(f"idle{i}"), 8)
        with capture_logs() as logs:
            outcomes = await rt.daemon.run_once()
            await agents.conversation(redis, rt.pattern.key_for("later"), 8)
            outcomes += await rt.daemon.run_once()  # the next pass does not say it again
        pace = rt.metrics.registry.get_sample_value("consolidator_pace_sessions_per_second")
    assert [o.status for o in outcomes] == ["consolidated"] * 4
    assert pace == math.inf
    [unavailable] = [e for e in logs if e["event"] == "cpu_pressure_unavailable"]
    assert str(missing) in unavailable["error"]
