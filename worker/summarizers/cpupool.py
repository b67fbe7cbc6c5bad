"""CPU-bound work off the event loop, in worker processes.

A thread is no help here: the work holds the GIL, and every socket call of the event loop then
waits to get it back (measured: a flush spent most of its time in `send`). Nor is
concurrent.futures' process pool: its feeder and manager threads bring the same contention back
into the daemon's process. So each worker is a plain child process fed through its stdin and
stdout by the event loop itself: length-prefixed pickles, answers in the order asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import sys
from collections import deque
from collections.abc import Callable
from itertools import cycle
from typing import Any, TypeVar

import structlog

from worker.cancel import cancel_and_wait

log = structlog.get_logger(__name__)
T = TypeVar("T")
_HEADER = struct.Struct(">Q")


class WorkerDied(RuntimeError):
    """A worker process exited (killed, out of memory) before it answered."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.summarizers.cpupool",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    async def call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        assert self.proc.stdin is not None
        payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
        await self.proc.stdin.drain()
        ok, value = await future
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                header = await self.proc.stdout.readexactly(_HEADER.size)
                body = await self.proc.stdout.readexactly(_HEADER.unpack(header)[0])
                future = self.pending.popleft()
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(pickle.loads(body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            while self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_exception(WorkerDied("worker process exited"))

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker exits at end of input
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await cancel_and_wait(self.reader)


class CpuPool:
    """`run(fn, *args)` in one of `processes` worker processes, or inline when it is 0.

    `fn` and its arguments must pickle (a module-level function and plain data). Workers start
    on first use; one that died is replaced and the call tried once more there.
    """

    def __init__(self, processes: int) -> None:
        if processes < 0:
            raise ValueError("processes must be 0 or more")
        self.processes = processes
        self._workers: list[_Worker] = []
        self._turns: cycle[int] = cycle(range(max(processes, 1)))
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.processes == 0:
            return fn(*args)
        slot = next(self._turns)
        try:
            return await (await self._worker(slot)).call(fn, args)
        except WorkerDied:
            log.warning("cpu_worker_died", detail="a worker process exited; starting another")
            return await (await self._worker(slot)).call(fn, args)

    async def _worker(self, slot: int) -> _Worker:
        async with self._lock:
            while len(self._workers) <= slot:
                self._workers.append(await _Worker.start())
            if not self._workers[slot].alive:
                await self._workers[slot].stop()
                self._workers[slot] = await _Worker.start()
            return self._workers[slot]

    async def aclose(self) -> None:
        workers, self._workers = self._workers, []
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


def serve() -> None:
    """The worker's loop: read a call, run it, write the answer, until the input ends."""
    from worker.gctune import tune_gc

    tune_gc()
    # Answers go to the original stdout; anything printed by the work goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    while header := requests.read(_HEADER.size):
        fn, args = pickle.loads(requests.read(_HEADER.unpack(header)[0]))
        try:
            answer = pickle.dumps((True, fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # handed back to the caller, raised there
            answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
        answers.write(_HEADER.pack(len(answer)) + answer)
        answers.flush()


if __name__ == "__main__":
    serve()
