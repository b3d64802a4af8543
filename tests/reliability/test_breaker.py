"""The store circuit breaker: what opens it, fast failures while open, the half-open probe, metrics hooks."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adapters.errors import StoreError
from adapters.sources import KeyMissing, LocalStore, Store
from adapters.sources.breaker import BreakerProber, BreakerStore, CircuitBreaker, unwrap


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """A store whose calls fail with ``error`` while it is set; counts the calls that reach it."""

    uri = "flaky://"

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error

    def get(self, key: str) -> bytes:
        self._call()
        if key == "missing":
            raise KeyMissing(key)
        return b"data"

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        self._call()
        return b"data"[start:stop]

    def put(self, key: str, data: bytes) -> None:
        self._call()

    def create(self, key: str, data: bytes) -> bool:
        self._call()
        return False  # always a lost race: the store answered

    def exists(self, key: str) -> bool:
        self._call()
        return True

    def list(self, prefix: str = "") -> list[str]:
        self._call()
        return []

    def delete(self, key: str) -> None:
        self._call()


OUTAGE = StoreError("connection refused", reason="unavailable", detail={"code": "EndpointConnectionError"})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parts(clock: Clock) -> tuple[BreakerStore, FlakyStore, list[str], Counter[str]]:
    states: list[str] = []
    errors: Counter[str] = Counter()
    inner = FlakyStore()
    breaker = CircuitBreaker(3, 5.0, clock=clock, on_state=states.append)
    store = BreakerStore(inner, breaker, on_error=lambda operation, _: errors.update([operation]))
    return store, inner, states, errors


def test_consecutive_outage_errors_open_it_and_it_fails_fast(parts: Any, clock: Clock) -> None:
    store, inner, states, errors = parts
    assert isinstance(store, Store)
    for attempt in range(3):
        inner.error = StoreError("refused", reason="unavailable", detail={"code": "EndpointConnectionError"})
        with pytest.raises(StoreError) as failed:
            store.list("adapters/")
        assert failed.value.reason == "unavailable"
        assert failed.value.detail["retry_after_s"] == (5 if attempt == 2 else 1)  # the one that opened it
    assert states == ["open"]
    assert store.breaker.snapshot()["last_error"] == "unavailable: EndpointConnectionError"
    clock.now += 2
    with pytest.raises(StoreError) as fast:
        store.get("k")
    assert fast.value.reason == "circuit_open"
    assert fast.value.detail["retry_after_s"] == 3  # the remaining cool-down, rounded up
    assert inner.calls == 3  # the open breaker did not call the store
    assert errors == Counter({"list": 3, "read": 1})


def test_answers_are_not_failures(parts: Any) -> None:
    store, inner, states, _ = parts
    inner.error = OUTAGE
    for _ in range(2):
        with pytest.raises(StoreError):
            store.put("k", b"")
    inner.error = None
    with pytest.raises(KeyMissing):  # a missing key is an answer: it resets the count
        store.get("missing")
    assert store.create("k", b"") is False  # a lost create race (412) too
    inner.error = StoreError("AccessDenied", reason="s3_error")  # a refusal, not an outage
    for _ in range(5):
        with pytest.raises(StoreError):
            store.exists("k")
    inner.error = OUTAGE
    for _ in range(2):
        with pytest.raises(StoreError):
            store.delete("k")
    assert states == [] and store.breaker.state == "closed"


def test_half_open_probe_closes_it_or_opens_it_again(parts: Any, clock: Clock) -> None:
    store, inner, states, _ = parts
    inner.error = OUTAGE
    for _ in range(3):
        with pytest.raises(StoreError):
            store.list()
    clock.now += 5  # cool-down over: one probe may go through
    with pytest.raises(StoreError) as probe:
        store.list()
    assert probe.value.reason == "unavailable"  # the probe reached the store and failed: open again
    assert states == ["open", "half_open", "open"]
    clock.now += 5
    inner.error = None
    assert store.list() == []  # the first call after the store came back succeeds
    assert states[-2:] == ["half_open", "closed"]
    assert store.get("k") == b"data"


def test_one_probe_at_a_time(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.failed(OUTAGE)
    clock.now += 1
    breaker.before_call()  # the probe
    with pytest.raises(StoreError) as second:
        breaker.before_call()
    assert second.value.reason == "circuit_open" and second.value.detail["retry_after_s"] == 1
    breaker.succeeded()
    breaker.before_call()


def test_wrapping_a_local_store_is_harmless(tmp_path: Path) -> None:
    local = LocalStore(tmp_path)
    store = BreakerStore(local, CircuitBreaker())
    assert store.create("a/b.json", b"1") and store.get("a/b.json") == b"1"
    assert store.list() == ["a/b.json"] and store.uri == local.uri
    with pytest.raises(StoreError) as bad:
        store.get("../x")
    assert bad.value.reason == "bad_key"
    assert unwrap(store) is local and store.breaker.state == "closed"


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 1.0, probe_interval_s=0)


def test_background_probe_closes_it_within_a_second_and_never_hammers(clock: Clock) -> None:
    """Issue 20, item 3: the store back → closed at the next probe (≤ 1 s), not after the 5 s cool-down;
    while it is down, at most one probe per second reaches it, and none while the breaker is closed."""
    inner = FlakyStore()
    breaker = CircuitBreaker(3, 5.0, clock=clock, probe_interval_s=1.0)
    store = BreakerStore(inner, breaker)
    inner.error = OUTAGE
    assert not store.probe() and inner.calls == 0  # closed: nothing to probe
    for _ in range(3):
        with pytest.raises(StoreError):
            store.list()
    with pytest.raises(StoreError) as fast:
        store.get("k")
    assert fast.value.detail["retry_after_s"] == 1  # the next probe, not the 5 s cool-down
    reached = inner.calls
    for _ in range(160):  # 10 s of a prober waking every 1/16 s (the real one sleeps until due)
        clock.now += 0.0625
        store.probe()
    assert inner.calls - reached == 10  # one per second
    assert breaker.state == "open"  # a failed probe keeps it open: no half-open flip per probe
    inner.error = None
    back = clock.now
    while not store.probe():
        clock.now += 0.0625
    assert clock.now - back <= 1.0 and breaker.state == "closed"
    assert store.get("k") == b"data"


def test_the_prober_thread_probes_when_due(tmp_path: Path) -> None:
    inner = FlakyStore()
    store = BreakerStore(inner, CircuitBreaker(1, 60.0, probe_interval_s=0.2))
    inner.error = OUTAGE
    prober = BreakerProber(store, idle_s=0.05).start()
    try:
        with pytest.raises(StoreError):
            store.list()
        assert store.breaker.state == "open"
        inner.error = None
        back = time.monotonic()
        while store.breaker.state != "closed":
            assert time.monotonic() - back < 5, "the prober never closed it"
            time.sleep(0.01)
        assert time.monotonic() - back < 1.0
    finally:
        prober.close()
    with pytest.raises(ValueError):
        BreakerProber(BreakerStore(inner, CircuitBreaker()))


def test_a_probe_that_does_not_answer_counts_as_failed(clock: Clock) -> None:
    """A black-holed store: the probe gives up after its timeout and the next is due an interval after
    this one started, so the prober keeps its one-per-second pace."""
    hang = threading.Event()

    class Hanging(FlakyStore):
        def exists(self, key: str) -> bool:
            hang.wait(10)
            return True

    inner = Hanging()
    store = BreakerStore(inner, CircuitBreaker(1, 60.0, clock=clock, probe_interval_s=1.0))
    store.breaker.failed(OUTAGE)
    clock.now += 1.0
    started = clock.now
    try:
        assert store.probe(timeout_s=0.05) is False
        assert store.breaker.state == "open"
        assert store.breaker.probe_in_s() == pytest.approx(1.0 - (clock.now - started))
    finally:
        hang.set()
