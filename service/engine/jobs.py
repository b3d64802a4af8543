"""Asynchronous generation jobs (``/v1/jobs``): submitted at once, followed, kept for a while.

A job goes through exactly the path of ``POST /v1/generate`` — ``Runtime.prepare`` (limits, admission,
adapters), ``Runtime.enqueue`` (429 when the queue is full) and ``Runtime.wait`` — except that the
waiting is done by a task of this store instead of the request, and a cancel takes the place of the
client's disconnect. Finished jobs are kept ``job_ttl_s`` seconds after they end, at most ``max_jobs``
of them (the oldest finished is dropped first); queued and running jobs are never dropped (the queue
bounds them). Every job belongs to the owner key of the token that made it (``service.auth.owner_key``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from basemodel.errors import LoraswapError
from basemodel.settings import Settings
from service.engine.progress import TERMINAL, JobProgress, JobState
from service.engine.runtime import GenerationResult, Runtime, Work
from service.engine.worker import Job
from service.metrics import Metrics

log = logging.getLogger(__name__)
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")


def internal_error(exc: BaseException) -> LoraswapError:
    """What a failed job reports for an unexpected exception (as the 500 body of /v1/generate)."""
    return LoraswapError(
        "internal server error",
        detail={"exception": type(exc).__name__},
        hint="This is a bug; the server log has the traceback.",
    )


@dataclass
class JobRecord:
    id: str
    owner: str
    work: Work
    progress: JobProgress
    job: Job[GenerationResult] | None = None
    result: GenerationResult | None = None
    error: LoraswapError | None = None
    finished_mono: float | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> JobState:
        return self.progress.state


class JobStore:
    def __init__(self, settings: Settings, metrics: Metrics, runtime: Runtime) -> None:
        self._settings = settings
        self._metrics = metrics
        self._runtime = runtime
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._finished: OrderedDict[str, JobRecord] = OrderedDict()  # in the order they ended
        self._tasks: set[asyncio.Task[None]] = set()

    # -- submitting and following -------------------------------------------------------------------
    def submit(self, work: Work, owner: str) -> JobRecord:
        """Queue ``work`` as a job owned by ``owner`` (raises ``Overloaded`` when the queue is full; the
        adapters ``work`` leases are released then, and otherwise once the job ends)."""
        record = JobRecord(secrets.token_urlsafe(16), owner, work, JobProgress(work.params.steps))
        try:
            record.job = self._runtime.enqueue(work, record.progress)
        except BaseException:
            self._runtime.release(work)
            raise
        with self._lock:
            self._records[record.id] = record
        self._metrics.jobs_created.inc()
        task = asyncio.get_running_loop().create_task(self._follow(record), name=f"job-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _follow(self, record: JobRecord) -> None:
        assert record.job is not None
        try:
            result = await self._runtime.wait(record.job, record.cancel_requested.wait)
        except LoraswapError as exc:
            self._fail(record, exc)
        except Exception as exc:
            log.exception("job %s failed", record.id, exc_info=exc)
            self._fail(record, internal_error(exc))
        else:
            if result is None:
                self._end(record, "cancelled", {})
            else:
                record.result = result
                if not self._end(
                    record, "succeeded", {"seed": result.params.seed, "timings": result.timings}
                ):
                    record.result = None  # cancelled just before the result arrived
        finally:
            self._runtime.release(record.work)

    def _fail(self, record: JobRecord, error: LoraswapError) -> None:
        record.error = error
        self._end(record, "failed", {"error": error.to_dict()})

    def _end(self, record: JobRecord, state: JobState, data: dict[str, Any]) -> bool:
        if not record.progress.finish(state, data):
            return False
        self._metrics.jobs_ended.labels(state=state).inc()
        with self._lock:
            record.finished_mono = time.monotonic()
            self._finished[record.id] = record
            self._prune()
        return True

    def _prune(self) -> None:  # under the lock
        cutoff = time.monotonic() - self._settings.job_ttl_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            expired = oldest.finished_mono is not None and oldest.finished_mono <= cutoff
            if not expired and len(self._finished) <= self._settings.max_jobs:
                break
            self._finished.popitem(last=False)
            self._records.pop(oldest.id, None)

    # -- reading and cancelling ------------------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> JobRecord | None:
        """The job, or ``None`` when it is unknown, expired, dropped or another owner's."""
        with self._lock:
            self._prune()
            record = self._records.get(job_id)
        if record is None or not secrets.compare_digest(record.owner, owner):
            return None
        return record

    def position(self, record: JobRecord) -> int | None:
        if record.job is None or record.state != "queued":
            return None
        return self._runtime.worker.position(record.job)

    def cancel(self, record: JobRecord) -> bool:
        """Cancel a queued job (taken out of the queue) or a running one (stopped before its next
        denoising step); ``False`` when it had ended already."""
        if not self._end(record, "cancelled", {}):
            return False
        if record.job is not None:
            self._runtime.worker.withdraw(record.job)
            record.job.abandoned.set()
        record.cancel_requested.set()
        return True

    def expires_at(self, record: JobRecord) -> float | None:
        finished = record.progress.finished_at
        return None if finished is None else finished + self._settings.job_ttl_s

    def counts(self) -> dict[JobState, int]:
        with self._lock:
            self._prune()
            states = [record.state for record in self._records.values()]
        return {state: states.count(state) for state in STATES}

    def observe(self) -> None:
        """At scrape: the ``loraswap_jobs{state}`` gauge."""
        for state, count in self.counts().items():
            self._metrics.jobs.labels(state=state).set(count)

    def shutdown(self) -> None:
        """Cancel every job that has not ended (jobs do not outlive the server)."""
        with self._lock:
            live = [r for r in self._records.values() if r.state not in TERMINAL]
        for record in live:
            self.cancel(record)
