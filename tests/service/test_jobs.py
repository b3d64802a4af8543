"""/v1/jobs over real HTTP: 202 + Location, polling, Server-Sent Events, cancel, TTL, bound, owners, 429."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import main
from tests.service.conftest import metric_value, wait_until

FAST = {"prompt": "a red fox", "steps": 3, "seed": 5}
TOKEN_A = "a" * 24
TOKEN_B = "b" * 24


class Gate:
    """Holds the worker at the start of its first batch (the job is running, before step 1)."""

    def __init__(self, runtime: Any) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        run_batch = runtime.worker._run
        first = [True]

        def gated(jobs: list[Any]) -> list[Any]:
            if first:
                first.clear()
                self.entered.set()
                self.released.wait(120)
            return run_batch(jobs)

        runtime.worker._run = gated

    def wait_entered(self) -> None:
        wait_until(self.entered.is_set, "the first job to start")


def runtime_of(server: Any) -> Any:
    return server.server.config.app.state.runtime


def state_of(http: httpx.Client, url: str, **kwargs: Any) -> dict[str, Any]:
    response = http.get(url, **kwargs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_state(http: httpx.Client, url: str, state: str, **kwargs: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(state_of(http, url, **kwargs))
        return seen["state"] == state

    wait_until(reached, f"job {url} to be {state}")
    return seen


def parse_sse(raw: bytes) -> tuple[list[tuple[str, int, dict[str, Any]]], list[str]]:
    """(event, id, data) triples and comment lines of a raw text/event-stream body."""
    events, comments = [], []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            events.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
    return events, comments


class RawStream:
    """Reads GET …/events into ``chunks`` on a thread until the server ends the stream."""

    def __init__(self, server: Any, url: str, headers: dict[str, str] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(server, url, headers or {}), daemon=True)
        self._thread.start()

    def _read(self, server: Any, url: str, headers: dict[str, str]) -> None:
        try:
            with server.client() as http, http.stream("GET", f"{url}/events", headers=headers) as stream:
                self.status = stream.status_code
                for chunk in stream.iter_raw():
                    self.chunks.append(chunk)
        finally:
            self.ended.set()

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    def join(self) -> bytes:
        wait_until(self.ended.is_set, "the event stream to end")
        return self.raw


def test_submit_answers_202_with_location_and_polls_to_the_generate_result(server: Any) -> None:
    with server.client() as http:
        submitted = http.post("/v1/jobs", json=FAST)
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert submitted.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["state"] in ("queued", "running")
        done = wait_for_state(http, submitted.headers["location"], "succeeded")
        direct = http.post("/v1/generate", json=FAST).json()
    assert done["step"] == done["steps"] == 3
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    assert done["expires_at"] == pytest.approx(done["finished_at"] + server.settings.job_ttl_s)
    assert done["result"]["seed"] == 5
    assert done["result"]["images"][0]["png_base64"] == direct["images"][0]["png_base64"]  # byte-identical
    assert done["result"]["parameters"] == direct["parameters"]
    assert metric_value(server.url, "loraswap_jobs", state="succeeded") == 1
    assert metric_value(server.url, "loraswap_jobs_ended_total", state="succeeded") == 1


def test_events_queued_started_one_per_step_done_with_heartbeats(start_server: Any) -> None:
    server = start_server(job_heartbeat_s=0.2)
    gate = Gate(runtime_of(server))
    with server.client() as http:
        blocker = http.post("/v1/jobs", json={**FAST, "seed": 1}).json()
        gate.wait_entered()
        queued = http.post("/v1/jobs", json=FAST).json()
        assert (queued["state"], queued["position"]) == ("queued", 1)
        url = f"/v1/jobs/{queued['id']}"
        stream = RawStream(server, url)
        wait_until(lambda: b"keep-alive" in stream.raw, "a heartbeat comment while the job waits")
        assert metric_value(server.url, "loraswap_sse_subscribers") == 1
        with server.client() as other, other.stream("GET", f"{url}/events") as early:
            chunks = early.iter_raw()  # (a discarded iterator would close the response at once)
            assert b"event: queued" in next(chunks)
            assert metric_value(server.url, "loraswap_sse_subscribers") == 2
        wait_until(
            lambda: metric_value(server.url, "loraswap_sse_subscribers") == 1, "a client that left to be gone"
        )
        gate.released.set()
        raw = stream.join()
        late, _ = parse_sse(RawStream(server, url).join())  # connects after the end: the current state only
        assert state_of(http, f"/v1/jobs/{blocker['id']}")["state"] == "succeeded"
    assert stream.status == 200
    events, comments = parse_sse(raw)
    assert [name for name, _, _ in events] == ["queued", "started", "step", "step", "step", "done"]
    assert events[0][2]["position"] == 1
    assert [data["step"] for name, _, data in events if name == "step"] == [1, 2, 3]
    assert all(data["steps"] == 3 and data["id"] == queued["id"] for _, _, data in events)
    assert [seq for _, seq, _ in events] == sorted({seq for _, seq, _ in events})
    assert events[-1][2]["state"] == "succeeded" and events[-1][2]["result"] == url
    assert "keep-alive" in comments
    assert [(name, data["state"]) for name, _, data in late] == [("done", "succeeded")]
    wait_until(lambda: metric_value(server.url, "loraswap_sse_subscribers") == 0, "the streams to close")


def test_last_event_id_replays_the_rest(server: Any) -> None:
    with server.client() as http:
        job = http.post("/v1/jobs", json=FAST).json()
        url = f"/v1/jobs/{job['id']}"
        wait_for_state(http, url, "succeeded")
        replay, _ = parse_sse(RawStream(server, url, headers={"Last-Event-ID": "2"}).join())
    assert [(name, seq) for name, seq, _ in replay] == [("step", 3), ("step", 4), ("done", 5)]


def test_cancel_queued_takes_it_out_of_the_queue(server: Any) -> None:
    runtime = runtime_of(server)
    gate = Gate(runtime)
    with server.client() as http:
        running = http.post("/v1/jobs", json={**FAST, "seed": 1}).json()
        gate.wait_entered()
        queued = http.post("/v1/jobs", json=FAST).json()
        assert runtime.worker.depth == 1
        stream = RawStream(server, f"/v1/jobs/{queued['id']}")
        wait_until(lambda: b"event: queued" in stream.raw, "the stream to start")
        cancelled = http.delete(f"/v1/jobs/{queued['id']}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled"
        assert runtime.worker.depth == 0  # removed from the queue, not left for the worker to skip
        events, _ = parse_sse(stream.join())  # the cancel ends the stream
        gate.released.set()
        wait_for_state(http, f"/v1/jobs/{running['id']}", "succeeded")
        after = state_of(http, f"/v1/jobs/{queued['id']}")
        again = http.delete(f"/v1/jobs/{queued['id']}")
    assert [(name, data["state"]) for name, _, data in events] == [
        ("queued", "queued"),
        ("cancelled", "cancelled"),
    ]
    assert after["state"] == "cancelled" and after["started_at"] is None and after["result"] is None
    assert again.status_code == 409 and again.json()["error"]["type"] == "job_already_ended"
    assert metric_value(server.url, "loraswap_images_generated_total") == 1  # only the first job ran
    assert metric_value(server.url, "loraswap_jobs_ended_total", state="cancelled") == 1


def test_cancel_running_stops_between_steps(server: Any) -> None:
    runtime = runtime_of(server)
    run_batch = runtime.worker._run
    steps_done: list[int] = []
    at_two, resume = threading.Event(), threading.Event()

    def watched(jobs: list[Any]) -> list[Any]:  # hold the sampler after step 2, count every step
        for job in jobs:
            advance: Callable[[int, int], None] = job.progress.advance

            def counting(step: int, steps: int, advance: Callable[[int, int], None] = advance) -> None:
                steps_done.append(step)
                advance(step, steps)
                if step == 2:
                    at_two.set()
                    resume.wait(120)

            job.progress.advance = counting
        return run_batch(jobs)

    runtime.worker._run = watched
    with server.client() as http:
        job = http.post("/v1/jobs", json={**FAST, "steps": 8}).json()
        url = f"/v1/jobs/{job['id']}"
        wait_until(at_two.is_set, "step 2")
        snapshot = runtime.worker.snapshot()
        assert (snapshot.running, snapshot.step, snapshot.steps, snapshot.queued) == (1, 2, 8, 0)
        assert state_of(http, url)["state"] == "running"
        cancelled = http.delete(url)
        resume.set()
        wait_until(lambda: runtime.worker.snapshot().running == 0, "the worker to stop the job")
        final = state_of(http, url)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert steps_done == [1, 2]  # no step after the cancel
    assert (final["state"], final["step"], final["steps"], final["result"]) == ("cancelled", 2, 8, None)
    assert metric_value(server.url, "loraswap_images_generated_total") == 0


def test_finished_jobs_expire_after_the_ttl(start_server: Any) -> None:
    server = start_server(job_ttl_s=0.5)
    with server.client() as http:
        url = http.post("/v1/jobs", json=FAST).headers["location"]
        wait_for_state(http, url, "succeeded")
        wait_until(lambda: http.get(url).status_code == 404, "the job to expire", timeout=60)
        gone = http.get(url).json()
        events = http.get(f"{url}/events")
    assert gone["error"]["type"] == "job_not_found"
    assert events.status_code == 404


def test_the_store_keeps_max_jobs_dropping_the_oldest(start_server: Any) -> None:
    server = start_server(max_jobs=2)
    with server.client() as http:
        urls = []
        for seed in range(3):
            urls.append(http.post("/v1/jobs", json={**FAST, "seed": seed}).headers["location"])
            wait_for_state(http, urls[-1], "succeeded")
        statuses = [http.get(url).status_code for url in urls]
    assert statuses == [404, 200, 200]


def test_a_job_is_visible_only_to_its_token(start_server: Any) -> None:
    server = start_server(generate_tokens=[TOKEN_A, TOKEN_B])
    a = {"Authorization": f"Bearer {TOKEN_A}"}
    b = {"Authorization": f"Bearer {TOKEN_B}"}
    with server.client() as http:
        url = http.post("/v1/jobs", json=FAST, headers=a).headers["location"]
        as_b = [http.get(url, headers=b), http.get(f"{url}/events", headers=b), http.delete(url, headers=b)]
        anonymous = http.get(url)
        mine = wait_for_state(http, url, "succeeded", headers=a)
    for response in as_b:
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "job_not_found"
    assert anonymous.status_code == 401
    assert mine["result"]["seed"] == 5


def test_a_full_queue_refuses_jobs_with_429(start_server: Any) -> None:
    server = start_server(max_queue=1)
    gate = Gate(runtime_of(server))
    with server.client() as http:
        running = http.post("/v1/jobs", json=FAST)
        gate.wait_entered()
        waiting = http.post("/v1/jobs", json=FAST)
        refused = http.post("/v1/jobs", json=FAST)
        direct = http.post("/v1/generate", json=FAST)
        invalid = http.post("/v1/jobs", json={**FAST, "steps": 0})
        gate.released.set()
        for accepted in (running, waiting):
            assert accepted.status_code == 202
            wait_for_state(http, accepted.headers["location"], "succeeded")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert direct.status_code == 429
    assert invalid.status_code == 422
    assert metric_value(server.url, "loraswap_jobs_created_total") == 2


def test_schema_documents_the_job_routes(server: Any) -> None:
    with server.client() as http:
        paths = http.get("/schema/openapi.json").json()["paths"]
    assert set(paths["/v1/jobs"]["post"]["responses"]) >= {"202", "401", "404", "409", "422", "429", "503"}
    assert set(paths["/v1/jobs/{job_id}"]["get"]["responses"]) >= {"200", "401", "404"}
    assert set(paths["/v1/jobs/{job_id}"]["delete"]["responses"]) >= {"200", "401", "404", "409"}
    assert set(paths["/v1/jobs/{job_id}/events"]["get"]["responses"]) >= {"200", "401", "404"}
    assert "job_not_found" in paths["/v1/jobs/{job_id}"]["get"]["responses"]["404"]["description"]


def test_hostile_job_ids_are_404(server: Any) -> None:
    with server.client() as http:
        for path in ("/v1/jobs/" + "x" * 5000, "/v1/jobs/%C3%9F", "/v1/jobs/a%0Ab"):
            for response in (http.get(path), http.get(f"{path}/events"), http.delete(path)):
                assert response.status_code == 404, (path, response.text)
                assert response.json()["error"]["type"] == "job_not_found"
                assert len(response.text) < 1000  # a huge id is not echoed back


def cli(server: Any, out: Path, *extra: str) -> int:
    return main(
        [
            "generate",
            "a red fox",
            "--server",
            server.url,
            "--steps",
            "3",
            "--seed",
            "5",
            "-o",
            str(out),
            *extra,
        ]
    )


def test_cli_draws_a_progress_bar_from_the_events(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, tmp_path / "bar.png") == 0
    bar = capsys.readouterr()
    assert cli(server, tmp_path / "plain.png", "--no-progress") == 0
    plain = capsys.readouterr()
    with server.client() as http:
        direct = http.post("/v1/generate", headers={"Accept": "image/png"}, json=FAST).content
    assert "\r[##########" in bar.err and "3/3 steps" in bar.err
    assert "steps" not in plain.err and "\r[" not in plain.err
    assert (tmp_path / "bar.png").read_bytes() == (tmp_path / "plain.png").read_bytes() == direct
    assert metric_value(server.url, "loraswap_jobs_created_total") == 1  # --no-progress made no job


def test_cli_falls_back_to_generate_without_jobs(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.client.JOBS_PATH", "/v1/no-jobs-here")  # as on a server without /v1/jobs
    assert cli(server, tmp_path / "out.png") == 0
    assert "steps" not in capsys.readouterr().err
    assert (tmp_path / "out.png").stat().st_size > 0
    assert metric_value(server.url, "loraswap_jobs_created_total") == 0
