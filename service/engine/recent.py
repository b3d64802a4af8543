"""The last generations the server ran, with their stage timings: a bounded ring for the console.

Only what an operator needs to see where time goes: when, the mode and size, the sampler, the adapter
references, the LoRA path, the outcome and ``timings``. Prompts are not kept (they may be private to
the token that sent them).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from service.engine.sampler import SampleParams

KEEP = 50


class RecentRequests:
    """A thread-safe ring of the last ``keep`` generations (newest first when read)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(
        self,
        params: SampleParams,
        *,
        outcome: str,
        timings: dict[str, float] | None = None,
        lora_path: str = "none",
        error: str | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "finished_at": round(time.time(), 3),
            "outcome": outcome,
            "mode": params.mode,
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "scheduler": params.scheduler,
            "num_images": params.num_images,
            "adapters": [a.version.ref for a in params.adapters],
            "lora_path": lora_path,
            "timings": dict(timings or {}),
        }
        if error is not None:
            entry["error"] = error
        with self._lock:
            self._ring.append(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self._ring))
