"""One inference worker thread owns the pipeline; HTTP handlers hand it jobs through a bounded queue.

The event loop never runs model code. A full queue is refused at once (429 with a Retry-After
estimate); a job whose client went away or whose deadline passed is dropped before it starts, or
stopped inside the step it is in (``service/engine/cancel.py``). Each job carries a ``JobProgress``
(``service/engine/progress.py``): the worker marks it running when its batch starts, and ``snapshot``
tells what the worker is doing now.
A queued job can be withdrawn from the queue (``withdraw``, for a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from basemodel.errors import Overloaded, RequestTimeout
from service.engine.progress import JobProgress, WorkerProgress
from service.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Job(Generic[T]):
    """A unit of work; ``payload`` is opaque to the worker."""

    payload: Any
    deadline: float  # time.monotonic() after which the job is worthless
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    progress: JobProgress = field(default_factory=JobProgress)

    def should_stop(self) -> bool:
        return self.abandoned.is_set() or time.monotonic() > self.deadline


class _JobQueue(queue.Queue[Job[Any] | None]):
    """A bounded FIFO from which a waiting job can also be taken out (a cancel) or located."""

    def withdraw(self, job: Job[Any]) -> bool:
        with self.mutex:
            try:
                self.queue.remove(job)
            except ValueError:
                return False
            self.not_full.notify()
            return True

    def waiting(self) -> list[Job[Any]]:
        with self.mutex:
            return [job for job in self.queue if job is not None]


class InferenceWorker:
    """Runs jobs one batch at a time on a dedicated thread.

    With ``max_batch`` > 1 it gathers, for up to ``window_s`` after the first job, further queued
    jobs whose ``batch_key`` matches the first one's into the same batch; others wait for the next.
    ``run`` gets the batch and returns one outcome (a result or an exception) per job.
    """

    def __init__(
        self,
        run: Callable[[list[Job[Any]]], list[Any]],
        max_queue: int,
        metrics: Metrics,
        *,
        max_batch: int = 1,
        window_s: float = 0.0,
        batch_key: Callable[[Job[Any]], Any] = lambda job: None,
    ) -> None:
        self._run = run
        self._queue = _JobQueue(maxsize=max_queue)
        self._metrics = metrics
        self._max_batch = max_batch
        self._window_s = window_s
        self._key = batch_key
        self._deferred: deque[Job[Any]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="loraswap-inference", daemon=True)
        self._avg_job_s = 1.0
        self._current: tuple[Job[Any], ...] = ()

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    @property
    def running(self) -> int:
        """Jobs the worker thread is running now (0 when idle)."""
        return len(self._current)

    @property
    def average_job_s(self) -> float:
        """Moving average of a batch's wall time (the Retry-After and ETA estimate)."""
        return self._avg_job_s

    def admit(self) -> None:
        """Refuse at once (429) while the queue is full, before the request does any work for a job
        (resolving and loading adapters): shedding load must cost next to nothing. ``submit`` still
        decides; this only spares a request that would be refused anyway."""
        if self._queue.full():
            raise self._overloaded()

    def submit(self, job: Job[Any]) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise self._overloaded() from None
        self._metrics.queue_depth.set(self.depth)

    def withdraw(self, job: Job[Any]) -> bool:
        """Take a job that still waits out of the queue (``False`` when it is not waiting there: it
        already started, or it was set aside for a later batch and is dropped when it comes up)."""
        removed = self._queue.withdraw(job)
        if removed:
            self._metrics.queue_depth.set(self.depth)
        return removed

    def position(self, job: Job[Any]) -> int | None:
        """1 for the next job to start, 2 for the one after …; ``None`` when ``job`` is not waiting."""
        waiting = [*self._deferred, *self._queue.waiting()]
        for index, candidate in enumerate(waiting):
            if candidate is job:
                return index + 1
        return None

    def snapshot(self) -> WorkerProgress:
        """The batch running now (its step i/N, elapsed and estimated remaining seconds) and how many
        jobs wait behind it. Safe to call from any thread; A1111's ``/sdapi/v1/progress`` reads it."""
        current = self._current
        queued = self.depth
        if not current:
            return WorkerProgress(running=0, step=0, steps=0, queued=queued)
        live = [job.progress for job in current if not job.progress.done]  # a cancelled job's stays put
        progress = live[0] if live else current[0].progress
        return WorkerProgress(
            running=len(current),
            step=progress.step,
            steps=progress.steps,
            queued=queued,
            elapsed_s=progress.elapsed_s(),
            eta_s=progress.eta_s(),
        )

    def _overloaded(self) -> Overloaded:
        wait = math.ceil(self._avg_job_s * (self._queue.qsize() + 1))
        return Overloaded(
            f"generation queue is full ({self._queue.maxsize} waiting)",
            retry_after_s=max(1, wait),
            detail={"queue_depth": self._queue.qsize()},
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, then end the thread (called after the server stopped accepting)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("worker queue still full at shutdown; abandoning queued jobs")
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------------
    def _serve(self) -> None:
        while (first := self._next()) is not None:
            batch = self._gather(first)
            self._metrics.queue_depth.set(self.depth)
            if batch:
                self._execute(batch)

    def _next(self) -> Job[Any] | None:
        if self._deferred:
            return self._deferred.popleft()
        if self._stopping:
            return None
        job = self._queue.get()
        if job is None:
            self._stopping = True
        return job

    def _usable(self, job: Job[Any]) -> bool:
        if job.abandoned.is_set():
            return False
        if time.monotonic() > job.deadline:
            _deliver(job, RequestTimeout("request timed out while queued"))
            return False
        return True

    def _gather(self, first: Job[Any]) -> list[Job[Any]]:
        batch = [first] if self._usable(first) else []
        if not batch or self._max_batch == 1:
            return batch
        key = self._key(first)
        for job in list(self._deferred):
            if len(batch) < self._max_batch and self._key(job) == key:
                self._deferred.remove(job)
                if self._usable(job):
                    batch.append(job)
        until = time.monotonic() + self._window_s
        while len(batch) < self._max_batch and not self._stopping:
            try:
                arrived = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if arrived is None:
                self._stopping = True
            elif self._key(arrived) == key:
                if self._usable(arrived):
                    batch.append(arrived)
            else:
                self._deferred.append(arrived)
        return batch

    def _execute(self, batch: list[Job[Any]]) -> None:
        started = time.monotonic()
        for job in batch:
            job.started_at = started
            job.progress.start()
        self._current = tuple(batch)
        self._metrics.in_flight.inc(len(batch))
        self._metrics.batch_size.observe(len(batch))
        try:
            outcomes = self._run(batch)
        except BaseException as exc:  # delivered to every waiting handler, which re-raises it
            outcomes = [exc] * len(batch)
        finally:
            self._current = ()
            self._metrics.in_flight.dec(len(batch))
        for job, outcome in zip(batch, outcomes, strict=True):
            _deliver(job, outcome)
        self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - started)


def _deliver(job: Job[Any], outcome: Any) -> None:
    def settle() -> None:
        if job.future.done() or job.abandoned.is_set():
            return  # nobody is waiting for this outcome any more
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
        job.loop.call_soon_threadsafe(settle)
