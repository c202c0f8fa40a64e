"""The engine's step loop on a replica: continuous batching beside an asyncio event loop.

One thread owns the engine and steps it back to back while it holds requests: each turn it frees
the slots of cancelled requests, admits waiting requests into free slots, and runs one engine
step; the tokens the step settled are handed to the event loop, which puts them on each request's
queue. The event loop never waits for a step, so the replica keeps answering HTTP while the models
compute, and the engine never waits for the event loop. Requests beyond the free slots wait in a
bounded queue; past it `submit` refuses.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pipeline.decoding import Engine, Generation, Request, Update

log = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). Every
# torch call of a step lets the GIL go; with the default, the event loop's HTTP work then keeps the
# engine's thread waiting up to 5 ms each time, which made a CPU step several times slower.
SWITCH_INTERVAL_S = 0.0002


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
    engine_seconds: float = 0.0  # spent in the engine (admissions and steps), on its thread


class EngineLoop:
    """Drives `engine` for the requests `submit`ted to it, `max_waiting` at most waiting for a slot.
    `submit`, `tokens` and `cancel` are called on the event loop; the engine runs on its own thread."""

    def __init__(self, engine: Engine, max_waiting: int):
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = LoopStats(slots=engine.n_slots)
        self._lock = threading.Condition()  # guards the three collections below
        self._waiting: deque[Job] = deque()
        self._to_cancel: list[Job] = []
        self._running: dict[int, Job] = {}  # id(request) -> job, admitted and not finished
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def submit(self, request: Request) -> Job:
        """Queue `request` for the next free slot, or raise `QueueFull`."""
        self._start()
        with self._lock:
            if len(self._running) + len(self._waiting) >= self.engine.n_slots + self.max_waiting:
                self.stats.refused += 1
                raise QueueFull(len(self._waiting))
            job = Job(request)
            self._waiting.append(job)
            self._count()
            self._lock.notify()
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
        with self._lock:
            if job.done:
                return
            job.done = True
            self.stats.cancelled += 1
            if job in self._waiting:
                self._waiting.remove(job)
            elif self._running.pop(id(job.request), None) is not None:
                self._to_cancel.append(job)
                self._lock.notify()
            self._count()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            sys.setswitchinterval(self._switch_interval)

    def _count(self) -> None:
        self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()  # where tokens are delivered (a test may run several loops)
        if self._thread is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(target=self._run, name="citer-engine", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------
    # The engine's thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._to_cancel or self.engine.rows):
                    self._lock.wait()
                if self._closed:
                    return
                cancel, self._to_cancel = self._to_cancel, []
            started = time.perf_counter()
            for job in cancel:  # first: the slots they free take waiting requests in this turn
                self.engine.cancel(job.request)
            with self._lock:
                admit = [self._waiting.popleft() for _ in range(min(self.engine.free_slots, len(self._waiting)))]
                for job in admit:
                    self._running[id(job.request)] = job
                self._count()
            try:
                updates = self._turn(admit)
            except Exception as e:  # a bug or a device failure: end what the engine held, keep serving
                log.exception("engine step failed; ending the requests in the engine")
                self._fail_all(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
                continue
            finally:
                self.stats.engine_seconds += time.perf_counter() - started
            self.stats.admitted += len(admit)
            self.stats.steps += 1
            if updates:
                self._loop.call_soon_threadsafe(self._deliver, updates)

    def _turn(self, admit: list[Job]) -> list[Update]:
        """Join, one step."""
        if admit:
            self.engine.admit([job.request for job in admit])
            for job in admit:
                job.generation = self.engine.generation(job.request)
        return self.engine.step() if self.engine.rows else []

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for request in list(self.engine.active):
                self.engine.cancel(request)
            failed = list(self._running.values())
            self._running.clear()
            self._count()
        for job in failed:
            job.error = error
        self._loop.call_soon_threadsafe(self._end, failed)

    # ------------------------------------------------------------------------------------------
    # Back on the event loop

    def _deliver(self, updates: list[Update]) -> None:
        ended = []
        with self._lock:
            for update in updates:
                job = self._running.get(id(update.request))
                if job is None:  # cancelled while this step ran
                    continue
                if update.tokens:
                    job.tokens.put_nowait(update.tokens)
                if update.finished:
                    del self._running[id(update.request)]
                    ended.append(job)
                    self.stats.finished += 1
            self._count()
        self._end(ended)

    @staticmethod
    def _end(jobs: list[Job]) -> None:
        for job in jobs:
            job.done = True
            job.tokens.put_nowait(None)
