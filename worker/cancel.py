"""Stopping a helper task without losing a cancellation of one's own."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended.

    `task.cancel()` then `await task` under `suppress(CancelledError)` would also swallow a
    cancellation of the caller that arrives meanwhile: a worker stopped by Ctrl-C at the end of
    one session would go on to the next. `asyncio.wait` lets the caller's own through, and a
    failure of the task other than its cancellation is raised as before.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
