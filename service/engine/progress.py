"""Progress of generation jobs: one record per job, written by the worker thread, read by HTTP handlers.

Every job the worker runs carries a ``JobProgress``. The worker marks it running when its batch starts,
the sampler's per-step callback advances it once per denoising step, and whoever awaits the job's
outcome ends it (succeeded, failed, cancelled). Each change appends an event to the record's log
(queued, started, step …, then done / failed / cancelled: at most ``steps + 3`` events), so a
subscriber reads every step in order however slowly it consumes them, and one that subscribes late
starts from the current state. The first terminal state wins; later updates are ignored (a step that
finishes after a cancel, a result that arrives after one).

Subscribers live on an asyncio loop; the worker thread wakes them with ``call_soon_threadsafe``, so the
worker never waits for a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EVENT_FOR_STATE = {
    "queued": "queued",
    "running": "started",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}
"""The event that announces each state; a late subscriber first gets the one of the current state."""


@dataclass(frozen=True)
class ProgressEvent:
    """One entry of a job's event log: ``seq`` counts from 0, ``event`` is the SSE event name."""

    seq: int
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in ("done", "failed", "cancelled")


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.wake.set)


class JobProgress:
    """The state, step i/N, timestamps and event log of one job (thread-safe)."""

    def __init__(self, steps: int = 0, on_change: Callable[[JobState], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._on_change = on_change
        self.state: JobState = "queued"
        self.step = 0
        self.steps = steps
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._started_mono: float | None = None
        self._log: list[ProgressEvent] = []
        self._final: dict[str, Any] = {}
        self._waiters: list[_Waiter] = []
        self._append("queued", {})

    # -- writers (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        """The worker began the job's batch."""
        with self._lock:
            if self.state != "queued":
                return
            self.state = "running"
            self.started_at = time.time()
            self._started_mono = time.monotonic()
            self._append("started", {"step": self.step, "steps": self.steps})
        self._changed("running")

    def advance(self, step: int, steps: int) -> None:
        """Denoising step ``step`` of ``steps`` is done (the sampler's count is authoritative)."""
        with self._lock:
            if self.state != "running":
                return
            self.step, self.steps = step, steps
            self._append("step", {"step": step, "steps": steps})

    def finish(self, state: JobState, data: dict[str, Any] | None = None) -> bool:
        """End the job; ``False`` (and nothing changes) when it had ended already."""
        assert state in TERMINAL, state
        with self._lock:
            if self.state in TERMINAL:
                return False
            self.state = state
            self.finished_at = time.time()
            self._final = dict(data or {})
            self._append(EVENT_FOR_STATE[state], {"step": self.step, "steps": self.steps, **self._final})
        self._changed(state)
        return True

    def _append(self, event: str, data: dict[str, Any]) -> None:  # under the lock
        self._log.append(ProgressEvent(len(self._log), event, {"state": self.state, **data}))
        for waiter in self._waiters:
            waiter.notify()

    def _changed(self, state: JobState) -> None:
        if self._on_change is not None:
            self._on_change(state)

    # -- readers -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def elapsed_s(self) -> float | None:
        """Seconds since the job started running (``None`` before)."""
        started = self._started_mono
        return None if started is None else time.monotonic() - started

    def eta_s(self) -> float | None:
        """Remaining seconds at the rate of the steps done so far (``None`` before the first step)."""
        elapsed = self.elapsed_s()
        if elapsed is None or self.step <= 0 or self.state != "running":
            return None
        return elapsed / self.step * max(0, self.steps - self.step)

    def current(self) -> ProgressEvent:
        """The event announcing the current state, with the current step (what a late subscriber gets)."""
        with self._lock:
            return self._current()

    def _current(self) -> ProgressEvent:  # under the lock
        data = {"state": self.state, "step": self.step, "steps": self.steps, **self._final}
        return ProgressEvent(len(self._log) - 1, EVENT_FOR_STATE[self.state], data)

    async def events(
        self, heartbeat_s: float, after: int | None = None
    ) -> AsyncGenerator[ProgressEvent | None, None]:
        """The current state's event, then every later event until the job ends; ``None`` after
        ``heartbeat_s`` without one (for a keep-alive). With ``after`` (a ``seq`` the client saw, SSE's
        ``Last-Event-ID``) the log is replayed from the next event instead."""
        waiter = _Waiter(asyncio.get_running_loop())
        first: ProgressEvent | None = None
        with self._lock:
            self._waiters.append(waiter)
            if after is not None and -1 <= after < len(self._log):
                cursor = after + 1
            else:
                first = self._current()
                cursor = len(self._log)
        try:
            if first is not None:
                yield first
                if first.terminal:
                    return
            while True:
                waiter.wake.clear()
                with self._lock:
                    new = self._log[cursor:]
                cursor += len(new)
                for event in new:
                    yield event
                    if event.terminal:
                        return
                if not new:
                    try:
                        await asyncio.wait_for(waiter.wake.wait(), heartbeat_s)
                    except TimeoutError:
                        yield None
        finally:
            with self._lock:
                self._waiters.remove(waiter)


@dataclass(frozen=True)
class WorkerProgress:
    """What the worker is doing now (``InferenceWorker.snapshot``; A1111's ``/sdapi/v1/progress``).

    ``running`` is the number of jobs in the batch being executed (0: idle); ``step``/``steps`` are
    that batch's denoising progress (0/0 when idle); ``queued`` the jobs waiting behind it.
    """

    running: int
    step: int
    steps: int
    queued: int
    elapsed_s: float | None = None
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        """0..1 of the running batch's steps (0 when idle)."""
        return self.step / self.steps if self.steps else 0.0
