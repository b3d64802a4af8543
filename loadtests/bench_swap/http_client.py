"""An HTTP client in its own process, for outside-in timings: a user's client is not in the server's
process, so its requests should not share the server's interpreter lock.

Run as ``python -m loadtests.bench_swap.http_client BASE_URL``: each stdin line ``METHOD PATH`` sends one
request on one keep-alive ``httpx.Client`` and answers one JSON line ``{"status", "seconds", "text"}``
(``seconds``: the round trip timed in this process). ``RemoteClient`` drives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import IO, Any

import httpx


class RemoteClient:
    """``request(method, path)`` through a child process; the round trip is timed in the child."""

    def __init__(self, base_url: str) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "loadtests.bench_swap.http_client", base_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def request(self, method: str, path: str) -> tuple[int, float, str]:
        """(status, seconds, body) of one request."""
        stdin, stdout = self._pipes()
        stdin.write(f"{method} {path}\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's HTTP client process exited")
        answer = json.loads(line)
        return int(answer["status"]), float(answer["seconds"]), str(answer["text"])

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._child.stdin is not None and self._child.stdout is not None
        return self._child.stdin, self._child.stdout

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.close()
        try:
            self._child.wait(30)
        except subprocess.TimeoutExpired:
            self._child.kill()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def main(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=300) as http:
        for line in sys.stdin:
            method, path = line.split()
            started = time.perf_counter()
            response = http.request(method, path)
            seconds = time.perf_counter() - started
            text = response.text
            print(json.dumps({"status": response.status_code, "seconds": seconds, "text": text}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
