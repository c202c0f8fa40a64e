"""The engine's step loop on a replica: continuous batching under asyncio.

One background task owns the engine. Each turn it frees the slots of cancelled requests, admits
waiting requests into free slots, and runs one engine step; the tokens each step settles go to
their request's queue at once. Steps run on one worker thread (torch releases the GIL), so the
replica's event loop keeps answering HTTP while the models compute; the engine is touched by that
thread only. Requests beyond the free slots wait in a bounded queue; past it `submit` refuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.decoding import Engine, Generation, Request, Update

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No slot is free and the waiting queue is full."""


class EngineFailed(Exception):
    """A step failed: every request in the engine then is ended with this error."""


@dataclass(eq=False)
class Job:
    """One request's way through the loop: its final tokens arrive on `tokens` (None ends them)."""

    request: Request
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    generation: Generation | None = None  # the engine's row, once admitted (its counts grow as it decodes)
    error: Exception | None = None
    done: bool = False


@dataclass
class LoopStats:
    """What the loop has done since it started, and what it holds now."""

    slots: int
    running: int = 0
    waiting: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    refused: int = 0
    steps: int = 0


class EngineLoop:
    """Drives `engine` for the requests `submit`ted to it, `max_waiting` at most waiting for a slot."""

    def __init__(self, engine: Engine, max_waiting: int):
        self.engine = engine
        self.max_waiting = max_waiting
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # id(request) -> job, in the engine or about to be
        self._to_cancel: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="citer-engine")
        self.stats = LoopStats(slots=engine.n_slots)

    def submit(self, request: Request) -> Job:
        """Queue `request` for the next free slot, or raise `QueueFull`."""
        if len(self._running) + len(self._waiting) >= self.engine.n_slots + self.max_waiting:
            self.stats.refused += 1
            raise QueueFull(len(self._waiting))
        job = Job(request)
        self._waiting.append(job)
        self._start()
        self._wake.set()
        return job

    async def tokens(self, job: Job) -> AsyncIterator[list[int]]:
        """The job's final tokens as they settle; raises the loop's error if a step failed. A
        consumer that stops early (its client went away) must `cancel` the job."""
        while True:
            tokens = await job.tokens.get()
            # a consumer that fell behind takes every step's tokens at once: one chunk, not one per step
            while tokens is not None and not job.tokens.empty():
                more = job.tokens.get_nowait()
                if more is None:
                    job.tokens.put_nowait(None)
                    break
                tokens = tokens + more
            if tokens is None:
                if job.error is not None:
                    raise job.error
                return
            yield tokens

    def cancel(self, job: Job) -> None:
        """Drop `job`: out of the queue now, or out of its slot before the next step."""
        if job.done:
            return
        job.done = True
        self.stats.cancelled += 1
        if job in self._waiting:
            self._waiting.remove(job)
        elif self._running.pop(id(job.request), None) is not None:
            self._to_cancel.append(job)
            self._wake.set()
        self._count()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _count(self) -> None:
        self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="citer-engine-loop")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._waiting or self._running or self._to_cancel):
                self._wake.clear()
                await self._wake.wait()
                continue
            free = self.engine.n_slots - len(self._running)
            admit = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            for job in admit:
                self._running[id(job.request)] = job
            cancel, self._to_cancel = self._to_cancel, []
            self._count()
            try:
                updates = await loop.run_in_executor(self._thread, self._turn, admit, cancel)
            except Exception as e:  # a bug or a device failure: end what the engine held, keep serving
                log.exception("engine step failed; ending the %d requests in the engine", len(self._running))
                self._fail_all(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
                continue
            self.stats.admitted += len(admit)
            self.stats.steps += 1
            for update in updates:
                self._deliver(update)
            self._count()

    def _turn(self, admit: list[Job], cancel: list[Job]) -> list[Update]:
        """On the engine's thread: leave, join, one step."""
        for job in cancel:
            self.engine.cancel(job.request)
        if admit:
            self.engine.admit([job.request for job in admit])
            for job in admit:
                job.generation = self.engine.generation(job.request)
        return self.engine.step() if self.engine.rows else []

    def _deliver(self, update: Update) -> None:
        job = self._running.get(id(update.request))
        if job is None:  # cancelled while this step ran
            return
        if update.tokens:
            job.tokens.put_nowait(update.tokens)
        if update.finished:
            del self._running[id(update.request)]
            job.done = True
            job.tokens.put_nowait(None)
            self.stats.finished += 1

    def _fail_all(self, error: Exception) -> None:
        for request in list(self.engine.active):
            self.engine.cancel(request)
        for job in self._running.values():
            job.error, job.done = error, True
            job.tokens.put_nowait(None)
        self._running.clear()
        self._count()
