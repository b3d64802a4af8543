"""The load suite's parts: the Zipf sampler, the statistics, a short locust run against a real server."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from loadtests.load.mix import ZipfMix, zipf_weights
from loadtests.load.stats import (
    least_squares_slope,
    percentile,
    rss_slope_mib_per_min,
    saturation_users,
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
    out = rss_slope_mib_per_min(samples, start=1000.0, end=1120.0)
    assert out["slope_mib_per_min"] == pytest.approx(2.0, abs=0.01)
    assert out["samples"] == 31
    assert out["rss_peak_mib"] == pytest.approx(602.0, abs=0.01)


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
    from loadtests.load.phases import Load, Runner
    from loadtests.load.server import ServerOptions, ServerProcess, rss_kib

    options = ServerOptions(loraswap_home, max_queue=1, device_cache_mb=1, request_timeout_s=60, threads=1)
    with ServerProcess(options, tmp_path / "server.log") as server:
        server.wait_ready()
        ids = register_adapters(server.url, write_adapters(loraswap_home / "models", 3, tmp_path / "files"))
        runner = Runner(server.url, tmp_path, warmup_s=0.0, rss_samples=[])
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
