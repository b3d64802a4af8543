"""``/v1/jobs``: generation as a job — submit (202), poll, follow its progress as Server-Sent Events, cancel.

The body is ``/v1/generate``'s and goes through the same admission (``Runtime.prepare``); the job store
(``service/engine/jobs.py``) queues it and keeps it after it ends. A job is visible only to the token
that made it (another token gets 404 ``job_not_found``, as for an unknown id).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from service.auth import owner_key, require
from service.engine.jobs import JobRecord, JobStore
from service.engine.progress import ProgressEvent
from service.engine.runtime import Runtime
from service.errors import JobEnded, JobNotFound
from service.metrics import Metrics
from service.openapi import ROUTE_ERRORS, ErrorInfo
from service.schemas import GenerateRequest, GenerateResponse, JobOut

MAX_ID_CHARS = 64


def job_url(record: JobRecord) -> str:
    return f"/v1/jobs/{record.id}"


def view(record: JobRecord, jobs: JobStore) -> JobOut:
    progress = record.progress
    state = record.state
    result = record.result if state == "succeeded" else None
    error = record.error if state == "failed" else None
    return JobOut(
        id=record.id,
        state=state,
        position=jobs.position(record),
        step=progress.step,
        steps=progress.steps,
        created_at=progress.created_at,
        started_at=progress.started_at,
        finished_at=progress.finished_at,
        expires_at=jobs.expires_at(record),
        result=GenerateResponse.model_validate(result.to_json()) if result is not None else None,
        error=ErrorInfo.model_validate(error.to_dict()) if error is not None else None,
    )


def find(job_id: str, request: Request[Any, Any, Any], jobs: JobStore) -> JobRecord:
    record = jobs.get(job_id, owner_key(request)) if len(job_id) <= MAX_ID_CHARS else None
    if record is None:
        shown = job_id if len(job_id) <= MAX_ID_CHARS else job_id[:MAX_ID_CHARS] + "…"
        raise JobNotFound(f"no job {shown!r}", detail={"job_id": shown})
    return record


def last_event_id(request: Request[Any, Any, Any]) -> int | None:
    """SSE's ``Last-Event-ID`` (a reconnecting EventSource sends it): replay from the next event."""
    raw = request.headers.get("last-event-id", "").strip()
    return int(raw) if raw.isdigit() and len(raw) <= 9 else None


def sse_message(record: JobRecord, event: ProgressEvent, jobs: JobStore) -> ServerSentEventMessage:
    data: dict[str, Any] = {"id": record.id, **event.data}
    if event.event == "queued":
        data["position"] = jobs.position(record)
    if event.event == "done":
        data["result"] = job_url(record)
    return ServerSentEventMessage(data=json.dumps(data, default=str), event=event.event, id=event.seq)


class JobController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]
    guards = [require("generate")]

    @post(
        "/",
        status_code=HTTP_202_ACCEPTED,
        summary="Submit a generation job.",
        description=(
            "The body of `POST /v1/generate`, validated and admitted the same way (422, 404/409 for "
            "adapters, 429 + Retry-After when the queue is full, 503 before the model is ready). Answers "
            "202 at once with the job (state `queued`) and `Location: /v1/jobs/{id}`."
        ),
        responses=ROUTE_ERRORS["job_submit"],
    )
    async def submit(
        self, data: GenerateRequest, request: Request[Any, Any, Any], runtime: Runtime, jobs: JobStore
    ) -> Response[JobOut]:
        work = await runtime.prepare(data)
        record = jobs.submit(work, owner_key(request))
        return Response(
            view(record, jobs), status_code=HTTP_202_ACCEPTED, headers={"Location": job_url(record)}
        )

    @get(
        "/{job_id:str}",
        summary="A job's state.",
        description=(
            "`queued` (with `position`), `running` (`step` of `steps`), `succeeded` (`result`: the body "
            "of /v1/generate), `failed` (`error`: the error body /v1/generate would have answered) or "
            "`cancelled`. Ended jobs are kept `job_ttl_s` seconds (at most `max_jobs`), then 404."
        ),
        responses=ROUTE_ERRORS["job"],
    )
    async def show(self, job_id: str, request: Request[Any, Any, Any], jobs: JobStore) -> JobOut:
        return view(find(job_id, request, jobs), jobs)

    @get(
        "/{job_id:str}/events",
        summary="Follow a job as Server-Sent Events.",
        description=(
            "`text/event-stream`: first the event of the current state (`queued`, `started`, or the end), "
            "then `started`, one `step` per denoising step ({step, steps}) and one of `done`, `failed`, "
            "`cancelled`, after which the stream ends. Each event's `data` is JSON with the job `id` and "
            "`state`; `id:` lines allow `Last-Event-ID` replay. A `: keep-alive` comment every "
            "`job_heartbeat_s` seconds without events."
        ),
        responses=ROUTE_ERRORS["job"],
        media_type="text/event-stream",
    )
    async def events(
        self, job_id: str, request: Request[Any, Any, Any], jobs: JobStore, metrics: Metrics
    ) -> ServerSentEvent:
        record = find(job_id, request, jobs)
        after = last_event_id(request)
        heartbeat = request.app.state.settings.job_heartbeat_s

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            metrics.sse_subscribers.inc()
            try:  # aclosing: a client that goes away unsubscribes at once, not when collected
                async with contextlib.aclosing(record.progress.events(heartbeat, after=after)) as events:
                    async for event in events:
                        if event is None:
                            yield ServerSentEventMessage(data=None, comment="keep-alive")
                        else:
                            yield sse_message(record, event, jobs)
            finally:
                metrics.sse_subscribers.dec()

        return ServerSentEvent(stream())

    @delete(
        "/{job_id:str}",
        status_code=HTTP_200_OK,
        summary="Cancel a job.",
        description=(
            "A queued job is taken out of the queue; a running one stops before its next denoising step "
            "(and its images are never made). Answers the job, now `cancelled`; 409 `job_already_ended` "
            "when it had ended (its result or error stays readable)."
        ),
        responses=ROUTE_ERRORS["job_cancel"],
    )
    async def cancel(self, job_id: str, request: Request[Any, Any, Any], jobs: JobStore) -> JobOut:
        record = find(job_id, request, jobs)
        if not jobs.cancel(record):
            raise JobEnded(
                f"job {record.id!r} has already ended ({record.state})",
                detail={"job_id": record.id, "state": record.state},
            )
        return view(record, jobs)
