"""Stopping a helper task must not swallow the cancellation of the task that stops it."""

from __future__ import annotations

import asyncio

import pytest

from worker.cancel import cancel_and_wait


async def _slow_to_stop() -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(0.2)  # winding down, e.g. giving something back
        raise


async def test_a_cancellation_that_arrives_while_a_helper_winds_down_reaches_its_owner() -> None:
    went_on: list[bool] = []

    async def owner() -> None:
        helper = asyncio.create_task(_slow_to_stop())
        await asyncio.sleep(0)
        await cancel_and_wait(helper)
        went_on.append(True)  # a worker would take its next session here

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []


async def test_the_helper_is_stopped_and_its_own_failure_is_raised() -> None:
    helper = asyncio.create_task(_slow_to_stop())
    await asyncio.sleep(0)
    await cancel_and_wait(helper)
    assert helper.cancelled()

    async def fails() -> None:
        raise RuntimeError("broken before it was stopped")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken"):
        await cancel_and_wait(failed)
