"""The load suite's parts: the Zipf sampler, the statistics, a short locust run against a real server."""

from __future__ import annotations

import math
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loadtests.load.mix import ZipfMix, zipf_weights
from loadtests.load.phases import Load, Phase, Runner
from loadtests.load.report import phase_row, verdict_lines, verdicts
from loadtests.load.server import cuda_allocated_kib, memory_probes
from loadtests.load.stats import (
    least_squares_slope,
    percentile,
    saturation_users,
    slope_mib_per_min,
    summarise,
    valid_retry_after,
)

# -- the Zipf mix --------------------------------------------------------------------------------------


def test_zipf_weights_follow_the_power_law() -> None:
    weights = zipf_weights(50, 1.1)
    assert math.isclose(sum(weights), 1.0)
    harmonic = sum(k**-1.1 for k in range(1, 51))
    assert math.isclose(weights[0], 1 / harmonic)
    for k in (2, 10, 50):  # p(k) / p(1) = k^-s
        assert math.isclose(weights[k - 1] / weights[0], k**-1.1)
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError):
        zipf_weights(0, 1.1)


def test_zipf_mix_draws_each_adapter_at_its_probability() -> None:
    ids = [f"a{k}" for k in range(50)]
    mix = ZipfMix(ids, 1.1, base_share=0.1, seed=7)
    draws = 200_000
    counts = Counter(mix.sample() for _ in range(draws))
    assert abs(counts[None] / draws - 0.1) < 0.005
    expected = dict(zip(ids, mix.probabilities, strict=True))
    assert math.isclose(sum(expected.values()), 0.9)
    for name in ("a0", "a1", "a9", "a49"):
        p = expected[name]
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[name] / draws - p) < 5 * sigma, name
    assert set(counts) <= {*ids, None}


def test_zipf_mix_is_reproducible_and_handles_edges() -> None:
    one, two = (ZipfMix(["x", "y", "z"], 1.1, 0.2, seed=3) for _ in range(2))
    assert [one.sample() for _ in range(100)] == [two.sample() for _ in range(100)]
    assert {ZipfMix([], 1.1, 1.0, seed=1).sample() for _ in range(20)} == {None}
    assert {ZipfMix(["only"], 1.1, 0.0, seed=1).sample() for _ in range(20)} == {"only"}
    with pytest.raises(ValueError):
        ZipfMix([], 1.1, 0.5)
    with pytest.raises(ValueError):
        ZipfMix(["x"], 1.1, 1.5)


# -- statistics ------------------------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation() -> None:
    import numpy as np

    rng = random.Random(1)
    for size in (1, 2, 7, 100, 1001):
        values = [rng.expovariate(1.0) for _ in range(size)]
        for q in (0, 50, 95, 99, 100):
            assert math.isclose(percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-12)
    assert math.isnan(percentile([], 50))


def test_least_squares_slope_recovers_a_line_under_noise() -> None:
    rng = random.Random(2)
    xs = [i * 0.5 for i in range(200)]
    ys = [3.0 - 0.25 * x + rng.gauss(0, 0.1) for x in xs]
    assert least_squares_slope(xs, ys) == pytest.approx(-0.25, abs=0.005)
    assert least_squares_slope([1, 2, 3], [5, 5, 5]) == 0.0
    assert math.isnan(least_squares_slope([1.0], [1.0]))
    assert math.isnan(least_squares_slope([2.0, 2.0], [1.0, 3.0]))


def test_rss_slope_uses_only_the_second_half_in_mib_per_minute() -> None:
    # 0..60 s: 100 MiB of warm-up growth, left out; 60..120 s: 2 MiB/min
    samples = []
    for second in range(0, 121, 2):
        mib = 500 + (100 * second / 60 if second <= 60 else 100 + 2 * (second - 60) / 60)
        samples.append((1000.0 + second, round(mib * 1024)))
    out = slope_mib_per_min(samples, start=1000.0, end=1120.0, name="rss")
    assert out["slope_mib_per_min"] == pytest.approx(2.0, abs=0.01)
    assert out["samples"] == 31
    assert out["rss_peak_mib"] == pytest.approx(602.0, abs=0.01)


METRICS_ON_CUDA = """\
# HELP loraswap_queue_depth Generation jobs waiting for the worker.
# TYPE loraswap_queue_depth gauge
loraswap_queue_depth 0.0
# HELP loraswap_cuda_memory_allocated_bytes Bytes held by tensors on the model's CUDA device.
# TYPE loraswap_cuda_memory_allocated_bytes gauge
loraswap_cuda_memory_allocated_bytes 5.24288e+06
# HELP loraswap_cuda_memory_reserved_bytes Bytes the caching allocator holds on the model's CUDA device.
# TYPE loraswap_cuda_memory_reserved_bytes gauge
loraswap_cuda_memory_reserved_bytes 2.097152e+07
"""
METRICS_ON_CPU = "\n".join(METRICS_ON_CUDA.splitlines()[:3]) + "\n"


def test_cuda_probe_reads_the_allocated_gauge_and_only_on_cuda() -> None:
    assert cuda_allocated_kib(METRICS_ON_CUDA) == 5120.0  # 5 MiB
    assert cuda_allocated_kib(METRICS_ON_CPU) is None


@contextmanager
def metrics_endpoint(text: str) -> Iterator[str]:
    """A loopback HTTP server answering ``text`` at ``/metrics``: its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_memory_probes_add_cuda_only_when_the_server_exports_it() -> None:
    with metrics_endpoint(METRICS_ON_CUDA) as url:
        probes = memory_probes(os.getpid(), url)
        assert set(probes) == {"rss", "cuda_allocated"}
        assert probes["cuda_allocated"]() == 5120.0
        rss = probes["rss"]()
        assert rss is not None and rss > 1024  # this process's RSS, KiB
    with metrics_endpoint(METRICS_ON_CPU) as url:
        assert set(memory_probes(os.getpid(), url)) == {"rss"}


def soak_phase(cuda: dict[str, Any] | None = None) -> Phase:
    figures = summarise([record(0.0, 0.1, 200)], warmup_s=0.0)
    return Phase("soak", 1, 180, "zipf", figures, 1000.0, 1180.0, {}, cuda=cuda or {})


def soak_of(memory: dict[str, list[tuple[float, float]]], monkeypatch: pytest.MonkeyPatch) -> Phase:
    """``Runner.soak`` over canned memory samples (the locust phase itself replaced by a canned one)."""
    runner = Runner("http://127.0.0.1:9", Path("."), warmup_s=0.0, memory=memory)
    monkeypatch.setattr(runner, "run", lambda *_args: soak_phase())
    return runner.soak(1, 180, Load([], 1.1, 0.1, 4, 32))


def test_soak_reports_the_cuda_slope_with_the_rss_code(monkeypatch: pytest.MonkeyPatch) -> None:
    # RSS flat; allocated CUDA memory: 40 MiB of warm-up, then +3 MiB/min over the second half
    seconds = range(0, 181, 2)
    rss = [(1000.0 + s, 600 * 1024.0) for s in seconds]
    cuda = [(1000.0 + s, 1024 * (100 + min(s, 90) * 40 / 90 + max(s - 90, 0) * 3 / 60)) for s in seconds]
    phase = soak_of({"rss": rss, "cuda_allocated": cuda}, monkeypatch)
    assert phase.cuda["slope_mib_per_min"] == pytest.approx(3.0, abs=0.01)
    assert phase.cuda["cuda_allocated_first_mib"] == pytest.approx(140.0)
    assert phase.cuda["samples"] == 46
    assert len(phase.cuda["samples_s_kib"]) == 91
    assert phase.rss["slope_mib_per_min"] == pytest.approx(0.0)

    post = {"alive": True, "request_status": 200, "drained_s": 0.1, "errors_by_type": {}}
    over = verdicts([phase], post, rss_bound=1.0, cuda_bound=1.0)
    assert over["cuda"] and over["rss_within_bound"] and over["cuda_within_bound"] is False
    assert not over["passed"]
    assert "CUDA allocated memory slope over the soak's second half: +3.00 MiB/min" in "\n".join(
        verdict_lines(over)
    )
    assert verdicts([phase], post, rss_bound=1.0, cuda_bound=5.0)["passed"]
    assert phase_row(phase)[-1] == "+3.00 MiB/min"


def test_soak_on_cpu_reports_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    phase = soak_of({"rss": [(1000.0 + s, 600 * 1024.0) for s in range(0, 181, 2)]}, monkeypatch)
    assert phase.cuda == {} and phase.rss["samples"] == 46
    post = {"alive": True, "request_status": 200, "drained_s": 0.1, "errors_by_type": {}}
    judged = verdicts([phase], post, rss_bound=1.0, cuda_bound=1.0)
    assert judged["cuda"] is False and judged["cuda_within_bound"] is None and judged["passed"]
    assert "CUDA allocated memory slope: n/a (no CUDA)" in verdict_lines(judged)
    assert phase_row(phase)[-1] == "n/a (no CUDA)"


def record(
    t: float, latency: float, status: int, retry_after: str | None = None, error: str | None = None
) -> dict:
    return {
        "t": t,
        "latency_s": latency,
        "status": status,
        "retry_after": retry_after,
        "adapter": None,
        "error": error,
    }


def test_summarise_times_the_steady_window_and_counts_every_response() -> None:
    records = [
        record(0.0, 0.5, 200),  # finishes inside the 1 s warm-up: counted, not timed
        record(0.1, 0.2, 502, error="502: bad gateway"),  # an error in the warm-up still counts
        *[record(1.0 + i, 0.1 * (i + 1), 200) for i in range(10)],  # 10 successes, 0.1 … 1.0 s
        record(2.0, 0.01, 429, "1"),
        record(3.0, 0.01, 429, None, "429 with Retry-After None"),
        record(4.0, 0.2, 504, error="504: timeout"),
        record(5.0, 0.2, 200, error="asked for 'a', served []"),
        record(6.0, 60.0, 0, error="0: timed out"),
    ]
    out = summarise(records, warmup_s=1.0)
    assert out["requests"] == 17
    assert out["successes"] == 10
    assert out["window_s"] == pytest.approx(66.0 - 1.0)
    assert out["img_per_s"] == pytest.approx(10 / 65.0)
    assert out["p50_s"] == pytest.approx(0.55)
    assert out["p99_s"] == pytest.approx(0.991)
    assert out["status_429"] == 2
    assert out["status_429_with_retry_after"] == 1
    assert out["share_429"] == pytest.approx(2 / 17)
    assert out["other_errors"] == 4
    assert out["statuses"] == {"200": 12, "429": 2, "502": 1, "504": 1, "0": 1}
    empty = summarise([], warmup_s=1.0)
    assert empty["requests"] == 0 and math.isnan(empty["img_per_s"])


def test_a_phase_that_records_no_request_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase whose locust process recorded nothing (a dead server, a phase too short) gets every
    figure — zero counts, NaN rates — and the run's table and verdicts still print (was KeyError
    'status_429')."""
    monkeypatch.setattr("loadtests.load.phases.run_locust", lambda *_args: [])
    runner = Runner("http://127.0.0.1:9", Path("."), warmup_s=1.0)
    phase = runner.run("ramp-1", 1, 1, Load(["a"], 1.1, 0.1, 4, 32))
    f = phase.figures
    assert f["requests"] == 0 and f["status_429"] == 0 and f["status_429_with_retry_after"] == 0
    assert f["other_errors"] == 0 and f["statuses"] == {} and math.isnan(f["img_per_s"])
    assert math.isnan(f["share_429"]) and math.isnan(f["p99_s"])
    row = phase_row(phase)
    assert row[2] == "0" and row[7] == "n/a" and row[8] == "–"
    post = {"alive": True, "request_status": 200, "drained_s": 0.1, "errors_by_type": {}}
    judged = verdicts([phase], post, rss_bound=1.0, cuda_bound=1.0)
    assert judged["status_429"] == 0 and judged["other_errors"] == 0
    assert "429s: 0, with Retry-After: 0" in verdict_lines(judged)


def test_retry_after_and_saturation() -> None:
    assert valid_retry_after("3") and valid_retry_after(" 0 ")
    assert not valid_retry_after(None) and not valid_retry_after("") and not valid_retry_after("1.5")
    assert saturation_users([(1, 7.0, 0), (2, 7.4, 0), (4, 7.2, 0)]) == 1
    assert saturation_users([(1, 2.0, 0), (2, 3.9, 0), (4, 4.0, 0), (8, 4.1, 5)]) == 2
    assert saturation_users([(1, math.nan, 0), (2, 3.0, 0)]) == 2
    # a noisy machine made 8 users look fastest, but 4 users already filled the queue
    assert saturation_users([(1, 2.0, 0), (2, 1.9, 0), (4, 2.1, 10), (8, 3.0, 68)]) == 4


# -- a short run against a real server --------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_locust_against_a_real_server(loraswap_home: Path, tmp_path: Path) -> None:
    """A few seconds of overload (6 users, max_queue 1) with 3 adapters: only 200s and 429s, every 429
    with Retry-After, every 200 serving the adapter it was asked for; the server is gone afterwards."""
    from loadtests.load.adapters import register_adapters, write_adapters
    from loadtests.load.server import ServerOptions, ServerProcess, rss_kib

    options = ServerOptions(loraswap_home, max_queue=1, device_cache_mb=1, request_timeout_s=60, threads=1)
    with ServerProcess(options, tmp_path / "server.log") as server:
        server.wait_ready()
        ids = register_adapters(server.url, write_adapters(loraswap_home / "models", 3, tmp_path / "files"))
        runner = Runner(server.url, tmp_path, warmup_s=0.0)
        load = Load(ids, zipf_s=1.1, base_share=0.2, steps=2, size=32, retry_after_cap_s=1.0)
        phase = runner.run("smoke", users=6, seconds=4, load=load)
        pid = server.pid
    figures = phase.figures
    assert figures["other_errors"] == 0, (figures["error_examples"], server.log_tail())
    assert figures["successes"] > 0
    assert figures["status_429"] > 0, figures["statuses"]  # 6 users against 1 running + 1 queued
    assert figures["status_429_with_retry_after"] == figures["status_429"]
    assert phase.locust["records"] == phase.locust["locust_request_count"]
    assert rss_kib(pid) is None  # the server process has ended
    assert not list(Path.cwd().glob("smoke*")), "locust wrote into the working directory"
