"""One inference worker thread owns the pipeline; HTTP handlers hand it jobs through a bounded queue.

The event loop never runs model code. A full queue is refused at once (429 with a Retry-After
estimate); a job whose client went away or whose deadline passed is dropped before it starts, or
stopped between two denoising steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from basemodel.errors import Overloaded, RequestTimeout
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

    def should_stop(self) -> bool:
        return self.abandoned.is_set() or time.monotonic() > self.deadline


class InferenceWorker:
    def __init__(self, run: Callable[[Job[Any]], Any], max_queue: int, metrics: Metrics) -> None:
        self._run = run
        self._queue: queue.Queue[Job[Any] | None] = queue.Queue(maxsize=max_queue)
        self._metrics = metrics
        self._thread = threading.Thread(target=self._serve, name="loraswap-inference", daemon=True)
        self._avg_job_s = 1.0

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job[Any]) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            wait = math.ceil(self._avg_job_s * (self._queue.qsize() + 1))
            raise Overloaded(
                f"generation queue is full ({self._queue.maxsize} waiting)",
                retry_after_s=max(1, wait),
                detail={"queue_depth": self._queue.qsize()},
            ) from None
        self._metrics.queue_depth.set(self._queue.qsize())

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, then end the thread (called after the server stopped accepting)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("worker queue still full at shutdown; abandoning queued jobs")
        self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            self._metrics.queue_depth.set(self._queue.qsize())
            if job.abandoned.is_set():
                continue
            if time.monotonic() > job.deadline:
                _deliver(job, RequestTimeout("request timed out while queued"))
                continue
            job.started_at = time.monotonic()
            self._metrics.in_flight.inc()
            try:
                _deliver(job, self._run(job))
            except BaseException as exc:  # delivered to the waiting handler, which re-raises it
                _deliver(job, exc)
            finally:
                self._metrics.in_flight.dec()
                self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - job.started_at)


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
