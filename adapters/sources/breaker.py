"""A circuit breaker around a ``Store``: stop calling a store that keeps failing, and fail fast meanwhile.

``CircuitBreaker`` is the state machine (closed → open after ``failures`` consecutive outage errors →
half-open after ``cooldown_s``: one probe call goes through, its success closes the breaker, its
failure opens it again). ``BreakerStore`` wraps any store with it: every call first asks the breaker,
outage errors (``OUTAGE_REASONS``: unreachable, timed out, 5xx, disk I/O) count as failures, and
answers — including ``KeyMissing``, a lost create race, a 403 — count as successes, since the store
did answer. While open, calls raise ``StoreError(reason="circuit_open")`` at once, with
``detail["retry_after_s"]``: the seconds until the next probe (at least 1).

``BreakerProber`` closes the breaker soon after the store is back, without waiting for the cool-down
or for a request to probe: while the breaker is open, a background thread sends one cheap call
(``HEAD`` of ``PROBE_KEY``, which need not exist) once ``probe_interval_s`` has passed since the last
failure — never more than once per interval, and never while the breaker is closed. Its success
closes the breaker; its failure, or no answer within the interval (a black-holed store), keeps it open
(no half-open flip, so ``/readyz`` and the gauge stay ``open``) and the next probe is due an interval
after this one started. With a prober, ``retry_after_s`` is the time to the next probe.

Observers are plain callbacks (``on_error(operation, exc)``, ``on_state(state)``) so the package
stays free of the service's metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from adapters.errors import StoreError
from adapters.sources.base import OUTAGE_REASONS, KeyMissing, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
PROBE_KEY = "health/probe"
"""The key a background probe asks about (``exists``): a missing key is an answer like any other."""


def is_outage(exc: BaseException) -> bool:
    """Whether an exception from a store call means the store is not answering."""
    if isinstance(exc, KeyMissing):
        return False
    if isinstance(exc, StoreError):
        return exc.reason in OUTAGE_REASONS
    return isinstance(exc, Exception)  # anything unexpected from a backend: treat it as failing


def describe(error: BaseException) -> str:
    """A short, address-free description of a failure (health output is unauthenticated)."""
    if isinstance(error, StoreError):
        code = error.detail.get("code")
        return f"{error.reason}: {code}" if code else str(error.reason)
    return type(error).__name__


class CircuitBreaker:
    """Thread-safe breaker state; ``clock`` is injectable for tests."""

    def __init__(
        self,
        failures: int = 3,
        cooldown_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[State], None] | None = None,
        probe_interval_s: float | None = None,
    ) -> None:
        if failures < 1 or cooldown_s <= 0 or (probe_interval_s is not None and probe_interval_s <= 0):
            raise ValueError("the breaker needs failures >= 1, cooldown_s > 0 and probe_interval_s > 0")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.probe_interval_s = probe_interval_s
        """Set when a ``BreakerProber`` probes the open breaker's store every this many seconds."""
        self._clock = clock
        self._on_state = on_state
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self.last_error: str | None = None

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def before_call(self) -> None:
        """Let a call through, or raise ``circuit_open`` (open and cooling down, or a probe in flight)."""
        with self._lock:
            if self._state == "open":
                if self._clock() - self._opened_at < self.cooldown_s:
                    raise self._open_error()
                self._set("half_open")
            if self._state == "half_open":
                if self._probing:
                    raise self._open_error()
                self._probing = True

    def succeeded(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._probing = False
            if self._state != "closed":
                log.warning("adapter store answers again: circuit closed")
                self._set("closed")

    def failed(self, error: BaseException, *, at: float | None = None) -> None:
        """A store call failed; ``at``: when it started, for a probe (the next is due an interval
        after it started, however long it took to fail)."""
        with self._lock:
            self._consecutive += 1
            self._probing = False
            self.last_error = describe(error)
            if self._state != "closed" or self._consecutive >= self.failures:
                if self._state != "open":
                    log.warning(
                        "adapter store failing (%d in a row, last: %s): circuit open for %g s",
                        self._consecutive,
                        error,
                        self.cooldown_s,
                    )
                self._opened_at = self._clock() if at is None else at
                self._set("open")

    def probe_in_s(self) -> float | None:
        """Seconds until a background probe is due (≤ 0: now); ``None`` unless open with a prober."""
        with self._lock:
            if self._state != "open" or self.probe_interval_s is None:
                return None
            return self.probe_interval_s - (self._clock() - self._opened_at)

    def now(self) -> float:
        return self._clock()

    def released(self) -> None:
        """The call neither reached the store nor proved anything (e.g. an invalid key)."""
        with self._lock:
            self._probing = False

    def retry_after_s(self) -> int:
        """Whole seconds until a call may reach the store again (at least 1)."""
        with self._lock:
            if self._state != "open":
                return 1
            return max(1, math.ceil(self._remaining()))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "breaker": self._state,
                "consecutive_failures": self._consecutive,
                "last_error": self.last_error,
            }

    def _set(self, state: State) -> None:  # lock held
        self._state = state
        if self._on_state is not None:
            self._on_state(state)

    def _remaining(self) -> float:  # lock held, open: until a request may probe, or the prober will
        waits = [self.cooldown_s] + ([self.probe_interval_s] if self.probe_interval_s is not None else [])
        return min(waits) - (self._clock() - self._opened_at)

    def _open_error(self) -> StoreError:  # lock held
        retry = max(1, math.ceil(self._remaining())) if self._state == "open" else 1
        return StoreError(
            f"the adapter store is unavailable (circuit open after {self._consecutive} consecutive "
            f"failures; last: {self.last_error})",
            reason="circuit_open",
            detail={"retry_after_s": retry},
            hint="Adapters the server holds are still served; retry after Retry-After seconds.",
        )


class BreakerStore:
    """A ``Store`` whose calls go through a ``CircuitBreaker``; ``inner`` is the wrapped store."""

    def __init__(
        self,
        inner: Store,
        breaker: CircuitBreaker,
        *,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.inner = inner
        self.breaker = breaker
        self._on_error = on_error

    @property
    def uri(self) -> str:
        return self.inner.uri

    def __repr__(self) -> str:
        return f"BreakerStore({self.inner!r})"

    def _call(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            self.breaker.before_call()
        except StoreError as exc:
            self._report(operation, exc)
            raise
        try:
            result = fn(*args)
        except KeyMissing:
            self.breaker.succeeded()  # the store answered
            raise
        except Exception as exc:
            self._settle(exc)
            self._report(operation, exc)
            raise
        except BaseException:
            self.breaker.released()
            raise
        self.breaker.succeeded()
        return result

    def _settle(self, exc: Exception) -> None:
        if is_outage(exc):
            self.breaker.failed(exc)
            if isinstance(exc, StoreError):  # the cool-down this failure may just have started
                exc.detail.setdefault("retry_after_s", self.breaker.retry_after_s())
        elif isinstance(exc, StoreError) and exc.reason == "bad_key":
            self.breaker.released()  # refused before reaching the store
        else:
            self.breaker.succeeded()  # the store answered, with a refusal

    def probe(self, timeout_s: float | None = None) -> bool:
        """One background probe if one is due (open, the interval passed); True when it closed the
        breaker. With ``timeout_s`` the call runs on its own thread and a probe that has not answered
        by then counts as failed (the late answer is dropped), so a black-holed store cannot hold the
        prober past the next probe. Not reported to ``on_error``: no request failed."""
        due = self.breaker.probe_in_s()
        if due is None or due > 0:
            return False
        started = self.breaker.now()
        outcome = _run_bounded(lambda: self.inner.exists(PROBE_KEY), timeout_s)
        if outcome is None:
            outcome = StoreError(
                f"the store did not answer a probe within {timeout_s:g} s", reason="unavailable"
            )
        if isinstance(outcome, BaseException) and is_outage(outcome):
            self.breaker.failed(outcome, at=started)
            return False
        self.breaker.succeeded()  # it answered: a missing key, a refusal or a yes
        return True

    def _report(self, operation: str, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(operation, exc)

    def get(self, key: str) -> bytes:
        return self._call("read", self.inner.get, key)

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        return self._call("read", self.inner.get_range, key, start, stop)

    def put(self, key: str, data: bytes) -> None:
        self._call("write", self.inner.put, key, data)

    def create(self, key: str, data: bytes) -> bool:
        return self._call("create", self.inner.create, key, data)

    def exists(self, key: str) -> bool:
        return self._call("stat", self.inner.exists, key)

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", self.inner.list, prefix)

    def delete(self, key: str) -> None:
        self._call("delete", self.inner.delete, key)


def _run_bounded(call: Callable[[], object], timeout_s: float | None) -> object:
    """``call()``'s result or exception; ``None`` when it has not returned within ``timeout_s``."""
    if timeout_s is None:
        try:
            return call()
        except Exception as exc:
            return exc
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, name="loraswap-store-probe-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return outcome[0] if outcome else None


class BreakerProber:
    """A daemon thread that runs ``store.probe()`` whenever one is due (``probe_interval_s``).

    It sleeps until the due time while the breaker is open, and checks the (lock-only, no store call)
    state every ``idle_s`` while it is closed."""

    def __init__(self, store: BreakerStore, *, idle_s: float = 0.2) -> None:
        if store.breaker.probe_interval_s is None:
            raise ValueError("the breaker has no probe_interval_s")
        self.store = store
        self._idle_s = idle_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraswap-store-probe", daemon=True)

    def start(self) -> BreakerProber:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.store.breaker.probe_in_s()
            if due is None:
                self._stop.wait(self._idle_s)
            elif due > 0:
                self._stop.wait(due)
            else:
                try:
                    self.store.probe(timeout_s=self.store.breaker.probe_interval_s)
                except Exception:  # never let the prober die; the next one is an interval away
                    log.exception("store probe failed unexpectedly")


def unwrap(store: Store) -> Store:
    """The backend under any ``BreakerStore`` layers (for callers that need the concrete type)."""
    while isinstance(store, BreakerStore):
        store = store.inner
    return store
