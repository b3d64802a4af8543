"""A circuit breaker around a ``Store``: stop calling a store that keeps failing, and fail fast meanwhile.

``CircuitBreaker`` is the state machine (closed → open after ``failures`` consecutive outage errors →
half-open after ``cooldown_s``: one probe call goes through, its success closes the breaker, its
failure opens it again). ``BreakerStore`` wraps any store with it: every call first asks the breaker,
outage errors (``OUTAGE_REASONS``: unreachable, timed out, 5xx, disk I/O) count as failures, and
answers — including ``KeyMissing``, a lost create race, a 403 — count as successes, since the store
did answer. While open, calls raise ``StoreError(reason="circuit_open")`` at once, with
``detail["retry_after_s"]``: the seconds until the next probe (at least 1).

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
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("the breaker needs failures >= 1 and cooldown_s > 0")
        self.failures = failures
        self.cooldown_s = cooldown_s
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

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self._consecutive += 1
            self._probing = False
            self.last_error = describe(error)
            if self._state == "half_open" or self._consecutive >= self.failures:
                if self._state != "open":
                    log.warning(
                        "adapter store failing (%d in a row, last: %s): circuit open for %g s",
                        self._consecutive,
                        error,
                        self.cooldown_s,
                    )
                self._opened_at = self._clock()
                self._set("open")

    def released(self) -> None:
        """The call neither reached the store nor proved anything (e.g. an invalid key)."""
        with self._lock:
            self._probing = False

    def retry_after_s(self) -> int:
        """Whole seconds until a call may reach the store again (at least 1)."""
        with self._lock:
            if self._state != "open":
                return 1
            remaining = self.cooldown_s - (self._clock() - self._opened_at)
            return max(1, math.ceil(remaining))

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

    def _open_error(self) -> StoreError:  # lock held
        remaining = self.cooldown_s - (self._clock() - self._opened_at)
        retry = max(1, math.ceil(remaining)) if self._state == "open" else 1
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


def unwrap(store: Store) -> Store:
    """The backend under any ``BreakerStore`` layers (for callers that need the concrete type)."""
    while isinstance(store, BreakerStore):
        store = store.inner
    return store
