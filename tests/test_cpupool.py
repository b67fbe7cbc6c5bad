"""Summaries in worker processes: same answers as inline, and a dead worker is replaced."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from worker.domain import Turn
from worker.summarizers.cpupool import CpuPool
from worker.summarizers.extractive import ExtractiveSummarizer, summarize_text

TURNS = [
    Turn("user", "My order ORD-58291 never arrived; I need a refund of $129.99 by Friday.", b""),
    Turn("assistant", "I will ask the Lisbon warehouse about ORD-58291 today.", b""),
]


def fail(message: str) -> None:
    raise ValueError(message)


async def test_worker_processes_answer_like_the_event_loop() -> None:
    summarizer = ExtractiveSummarizer(processes=2)
    try:
        answers = await asyncio.gather(
            *(summarizer.summarize(None, TURNS, max_chars) for max_chars in (60, 300, 1200))
        )
    finally:
        await summarizer.aclose()
    assert [a.text for a in answers] == [summarize_text(None, TURNS, m) for m in (60, 300, 1200)]
    assert "ORD-58291" in answers[2].text


async def test_an_error_in_the_worker_is_raised_in_the_caller() -> None:
    pool = CpuPool(1)
    try:
        with pytest.raises(RuntimeError, match="ValueError: bad input"):
            await pool.run(fail, "bad input")
        assert await pool.run(pow, 2, 10) == 1024  # the worker survived it
    finally:
        await pool.aclose()


async def test_a_killed_worker_is_replaced() -> None:
    pool = CpuPool(1)
    try:
        pid = await pool.run(os.getpid)
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        replacement = await pool.run(os.getpid)
        assert replacement not in (pid, os.getpid())
    finally:
        await pool.aclose()
