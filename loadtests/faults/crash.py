"""kill -9 during registrations and uploads, then ``adapters/fsck.verify_store`` on what is left.

Scenarios, each against a local store and an S3 store (moto's server on 127.0.0.1):

* ``cli-points`` — ``loraswap adapters register`` SIGKILLs itself at each point of the store writes:
  blob temp written but not linked (local), blob created, record temp written (local), record created
  (before the dedup index), index written.
* ``cli-random`` — ``loraswap adapters register`` subprocesses killed at seeded random moments of their
  store phase (delays drawn around how long a run takes to get there).
* ``server`` — a real ``loraswap serve`` with three clients over HTTP (multipart uploads, JSON
  registrations from an ``s3://`` source, and a slow chunked upload that is always mid-body), SIGKILLed
  at a seeded random moment, restarted, repeated.

After every kill the store must be consistent: every listed version opens with its recorded sha256, no
gaps, no number that ever named other content, no version lost that was seen or confirmed before;
only temporary files of the killed writer may remain. After the next writer opens the store (the next
CLI run, the restarted server) there must be no stray file at all, store temps and upload spool
files included. ``python -m loadtests.faults.crash [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapters.fsck import Report, verify_store
from adapters.sources import Store, open_store
from service.uploads import SPOOL_PREFIX, spool_dir

REPO = Path(__file__).resolve().parents[2]
ADAPTER_IDS = ("crash-a", "crash-b")
SOURCE_BUCKET, SOURCE_KEY = "crash-sources", "lora.safetensors"
STORE_BUCKET = "crash-store"
START_TIMEOUT_S = 180.0  # a Python with torch starts in seconds, far slower on a loaded machine
RUN_TIMEOUT_S = 180.0
# (store method, nth call): local stores write a temp file before each create/put.
LOCAL_POINTS = (("temp", 1), ("create", 1), ("temp", 2), ("create", 2), ("put", 1))
S3_POINTS = (("create", 1), ("create", 2), ("put", 1))


# -- fixtures: a LoRA for tiny-sd, moto, the stores ------------------------------------------------


def write_tiny_lora(home: Path, path: Path, seed: int = 0) -> Path:
    """A rank-4 PEFT-layout LoRA on tiny-sd's attention q/v projections (shapes read from its header)."""
    import safetensors.torch
    import torch

    from basemodel.tiny import ensure_tiny

    unet = ensure_tiny(home / "models") / "unet" / "diffusion_pytorch_model.safetensors"
    with unet.open("rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(header):
        if key.endswith(("to_q.weight", "to_v.weight")):
            out_features, in_features = header[key]["shape"]
            module = key.removesuffix(".weight")
            tensors[f"unet.{module}.lora_A.weight"] = torch.randn(4, in_features, generator=generator) * 0.01
            tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path))
    return path


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (dummy credentials in the environment, for subprocesses too).

    PutObject is serialised: moto checks ``If-None-Match`` and writes without a lock, S3 does both at once.
    """
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*credentials, "AWS_PROFILE"]}
    os.environ.update(credentials)
    os.environ.pop("AWS_PROFILE", None)
    lock = threading.Lock()
    original = S3Response.put_object

    def put_object_atomically(self: S3Response) -> Any:
        with lock:
            return original(self)

    S3Response.put_object = put_object_atomically  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        S3Response.put_object = original  # type: ignore[method-assign]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Target:
    """One store under test, and the environment its subprocesses run with."""

    name: str
    uri: str
    home: Path
    endpoint: str | None
    adapter_file: Path

    def store(self) -> Store:
        return open_store(self.uri, s3_endpoint_url=self.endpoint)

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "LORASWAP_HOME": str(self.home),
            "LORASWAP_STORE": self.uri,
            "LORASWAP_WARMUP": "false",
            "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        if self.endpoint:
            env["LORASWAP_S3_ENDPOINT_URL"] = self.endpoint
        return env


def make_targets(workdir: Path, home: Path, endpoint: str | None, names: tuple[str, ...]) -> list[Target]:
    """A fresh store per name ('local', 's3'); creates the S3 buckets and the JSON registration source."""
    adapter = write_tiny_lora(home, workdir / "lora.safetensors")
    targets = []
    if endpoint is not None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in (SOURCE_BUCKET, STORE_BUCKET):
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=SOURCE_BUCKET, Key=SOURCE_KEY, Body=adapter.read_bytes())
    for name in names:
        tag = f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        uri = str(workdir / "stores" / tag) if name == "local" else f"s3://{STORE_BUCKET}/{tag}"
        targets.append(Target(name, uri, home, endpoint, adapter))
    return targets


# -- checks -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One row: what a scenario did and what the checks found."""

    scenario: str
    store: str
    kills: int = 0
    registrations: int = 0  # confirmed to the client (CLI exit 0 / HTTP 201)
    versions: int = 0  # visible at the end
    orphan_blobs: int = 0
    spool_after_kill: int = 0  # upload spool files the server kills left (removed at restart)
    problems: int = 0
    stray_after_restart: int = 0
    problem_kinds: dict[str, int] = field(default_factory=dict)
    kill_effects: dict[str, int] = field(default_factory=dict)  # what each kill left behind
    seen: dict[str, str] = field(default_factory=dict)  # every ref ever visible (or confirmed) → sha256
    strays: set[str] = field(default_factory=set)  # temp files left by kills, until the next open
    orphans: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def check(self, target: Target, *, after_restart: bool) -> Report:
        """Verify the store against everything seen before; stray temps fail only after a restart."""
        report = verify_store(target.store(), known=self.seen)
        strays = set()
        for problem in report.problems:
            if problem.kind == "stray_temp" and not after_restart:
                strays.add(problem.key)
                continue
            self.problems += 1
            self.problem_kinds[problem.kind] = self.problem_kinds.get(problem.kind, 0) + 1
            self.stray_after_restart += problem.kind == "stray_temp"
        if not after_restart:
            effects = {
                "stray_temp": bool(strays - self.strays),
                "orphan_blob": bool(set(report.orphan_blobs) - self.orphans),
                "unconfirmed_version": bool(report.versions.keys() - self.seen.keys()),
            }
            for effect in [k for k, v in effects.items() if v] or ["no_trace"]:
                self.kill_effects[effect] = self.kill_effects.get(effect, 0) + 1
        self.strays |= strays
        self.orphans |= set(report.orphan_blobs)
        self.seen.update(report.versions)
        self.versions = report.live + report.deleted
        self.orphan_blobs = len(report.orphan_blobs)
        return report

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "store": self.store,
            "kills": self.kills,
            "registrations": self.registrations,
            "versions": self.versions,
            "orphan_blobs": self.orphan_blobs,
            "stray_after_kill": len(self.strays),
            "spool_after_kill": self.spool_after_kill,
            "stray_after_restart": self.stray_after_restart,
            "problems": self.problems,
            "problem_kinds": self.problem_kinds,
            "kill_effects": self.kill_effects,
            "seconds": round(time.monotonic() - self.started, 1),
        }


# -- the CLI scenarios ---------------------------------------------------------------------------------


def register_argv(target: Target, title: str) -> list[str]:
    metadata = json.dumps({"title": title})
    return ["adapters", "register", str(target.adapter_file), "--id", ADAPTER_IDS[0], "--metadata", metadata]


def start_cli(target: Target, argv: list[str], point: tuple[str, int] | None = None) -> subprocess.Popen[str]:
    """``loraswap <argv>``; with ``point``, the process SIGKILLs itself there (``crash_child``)."""
    if point is None:
        command = [sys.executable, "-m", "service.cli", *argv]
    else:
        code = "import sys; from loadtests.faults.crash import crash_child as c; c(sys.argv[1], sys.argv[2:])"
        command = [sys.executable, "-c", code, f"{point[0]}:{point[1]}", *argv]
    return subprocess.Popen(
        command, cwd=REPO, env=target.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def crash_child(point: str, argv: list[str]) -> None:
    """Run ``loraswap <argv>`` and SIGKILL this process right after the ``nth`` call of a store method."""
    from adapters.sources.local import LocalStore
    from adapters.sources.s3 import S3Store
    from service.cli import main

    method, nth = point.split(":")
    calls = {"n": 0}
    for cls in (LocalStore, S3Store):
        name = "_write_temp" if method == "temp" else method
        if hasattr(cls, name):
            setattr(cls, name, _killing(getattr(cls, name), int(nth), calls))
    sys.exit(main(argv))


def _killing(fn: Any, nth: int, calls: dict[str, int]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapped


def finish_cli(proc: subprocess.Popen[str], tally: Tally) -> float:
    """Wait for an unkilled run; count its confirmed version. Seconds it took."""
    started = time.monotonic()
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"register failed (exit {proc.returncode}): {err[-2000:]}")
    record = json.loads(out)
    tally.registrations += 1
    tally.seen[record["ref"]] = record["sha256"]
    return time.monotonic() - started


def cli_scenario(
    target: Target, rng: random.Random, *, points: tuple[tuple[str, int], ...], kills: int
) -> dict[str, Any]:
    """SIGKILL ``loraswap adapters register`` at each crash point, then ``kills`` times at random."""
    tally = Tally("cli", target.name)
    reach = []  # seconds until a run is killed at a crash point: about when its store writes start
    for point in points:
        started = time.monotonic()
        proc = start_cli(target, register_argv(target, f"point-{point[0]}-{point[1]}"), point)
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"crash point {point} was not reached (exit {proc.returncode}): {err[-2000:]}")
        reach.append(time.monotonic() - started)
        tally.kills += 1
        tally.check(target, after_restart=False)
    if kills and not reach:
        reach.append(finish_cli(start_cli(target, register_argv(target, "calibrate")), tally))
    for index in range(kills):
        proc = start_cli(target, register_argv(target, f"random-{index}"))
        try:
            _, err = proc.communicate(timeout=statistics.median(reach) * rng.uniform(0.7, 1.15))
            if proc.returncode != 0:
                raise RuntimeError(f"register failed (exit {proc.returncode}): {err[-2000:]}")
            tally.registrations += 1  # it finished before its kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=RUN_TIMEOUT_S)
            tally.kills += 1
        tally.check(target, after_restart=False)
    finish_cli(start_cli(target, register_argv(target, "after-kills")), tally)  # the next writer sweeps
    tally.check(target, after_restart=True)
    return tally.row()


# -- the server scenario --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(target: Target, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``loraswap serve`` on a free loopback port, once ``/readyz`` answers 200."""
    port = free_port()
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=target.env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    raise RuntimeError(f"the server did not become ready in {START_TIMEOUT_S:.0f} s")


class Clients:
    """Three registering clients: multipart, JSON from s3://, and a slow chunked upload."""

    def __init__(self, target: Target, url: str, cycle: int) -> None:
        self.url, self.cycle = url, cycle
        self.data = target.adapter_file.read_bytes()
        self.json_ok = target.endpoint is not None
        self.stop = threading.Event()
        self.mid_upload = threading.Event()
        self.confirmed: dict[str, str] = {}
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(3)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _loop(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for n in range(10_000):
                if self.stop.is_set():
                    return
                adapter_id, title = ADAPTER_IDS[n % 2], f"server-{self.cycle}-{worker}-{n}"
                try:
                    response = self._send(http, worker, adapter_id, title)
                except httpx.HTTPError:
                    return  # the server is gone
                with self._lock:
                    if response.status_code == 201:
                        body = response.json()
                        self.confirmed[body["ref"]] = body["sha256"]
                    else:
                        self.unexpected.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.05)

    def _send(self, http: httpx.Client, worker: int, adapter_id: str, title: str) -> httpx.Response:
        metadata = json.dumps({"title": title})
        if worker == 0 or (worker == 1 and not self.json_ok):
            files = {"file": ("lora.safetensors", self.data)}
            return http.post("/v1/adapters", files=files, data={"id": adapter_id, "metadata": metadata})
        if worker == 1:
            body = {
                "id": adapter_id,
                "source": f"s3://{SOURCE_BUCKET}/{SOURCE_KEY}",
                "metadata": {"title": title},
            }
            return http.post("/v1/adapters", json=body)
        boundary = f"crash{self.cycle}x{title}"
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        return http.post(
            "/v1/adapters", content=self._slow_body(boundary, adapter_id, metadata), headers=headers
        )

    def _slow_body(self, boundary: str, adapter_id: str, metadata: str) -> Iterator[bytes]:
        def part(name: str, extra: str = "") -> bytes:
            return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()

        yield part("id") + adapter_id.encode() + b"\r\n" + part("metadata") + metadata.encode() + b"\r\n"
        yield part("file", '; filename="lora.safetensors"')
        step = max(1, len(self.data) // 8)
        for start in range(0, len(self.data), step):
            if start:  # the server has had the part's header for a while: its spool file exists
                self.mid_upload.set()
            time.sleep(0.08)
            yield self.data[start : start + step]
        self.mid_upload.clear()
        yield f"\r\n--{boundary}--\r\n".encode()


def server_scenario(target: Target, rng: random.Random, *, kills: int, workdir: Path) -> dict[str, Any]:
    """Start, register over HTTP, SIGKILL mid-upload, restart: ``kills`` times, then stop cleanly."""
    tally = Tally("server", target.name)
    log = workdir / f"server-{target.name}.log"
    spool = spool_dir(target.home)
    proc, url = start_server(target, log)
    for cycle in range(kills + 1):
        if cycle:  # restarted: what the killed server left must be gone
            _check_restart(tally, target, spool)
        with Clients(target, url, cycle) as clients:
            _wait(lambda: bool(clients.confirmed or clients.unexpected), 120, "a first registration")
            if cycle < kills:
                time.sleep(rng.uniform(0.1, 1.2))
                _wait(clients.mid_upload.is_set, 60, "an upload in flight")
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
                tally.kills += 1
        _tally_clients(tally, clients)
        if cycle < kills:
            tally.spool_after_kill += _stale_spool(spool)
            tally.check(target, after_restart=False)
            proc, url = start_server(target, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    _check_restart(tally, target, spool)
    return tally.row()


def _check_restart(tally: Tally, target: Target, spool: Path) -> None:
    tally.check(target, after_restart=True)
    left = _stale_spool(spool)
    tally.stray_after_restart += left
    tally.problems += left


def _tally_clients(tally: Tally, clients: Clients) -> None:
    tally.registrations += len(clients.confirmed)
    tally.seen.update(clients.confirmed)
    if clients.unexpected:
        tally.problem_kinds["http_error"] = tally.problem_kinds.get("http_error", 0) + len(clients.unexpected)
        tally.problems += len(clients.unexpected)


def _stale_spool(folder: Path) -> int:
    from adapters.tempfiles import find_temps

    return sum(t.stale for t in find_temps(folder, SPOOL_PREFIX))


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- entry points ----------------------------------------------------------------------------------------


def run(
    quick: bool,
    *,
    seed: int = 12,
    stores: tuple[str, ...] | None = None,
    workdir: Path | None = None,
    home: Path | None = None,
) -> list[dict[str, Any]]:
    """Every scenario; quick: the local store, one crash point, one random and one server kill."""
    stores = stores or (("local",) if quick else ("local", "s3"))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="loraswap-crash-") as scratch, moto_s3() as endpoint:
        work = workdir or Path(scratch)
        rows = []
        for target in make_targets(work, home or work / "home", endpoint, stores):
            if quick:
                rows.append(cli_scenario(target, rng, points=(("temp", 2),), kills=1))
            else:
                points = LOCAL_POINTS if target.name == "local" else S3_POINTS
                rows.append(cli_scenario(target, rng, points=points, kills=12))
            rows.append(server_scenario(target, rng, kills=1 if quick else 5, workdir=work))
        return rows


COLUMNS = ("scenario", "store", "kills", "registrations", "versions", "orphan_blobs", "stray_after_kill",
           "spool_after_kill", "stray_after_restart", "problems", "seconds")  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.faults.crash", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a bounded run (local store, ~30 s)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.quick, seed=args.seed)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
