"""Shared pieces of the kill -9 scenarios: a LoRA for tiny-sd, moto on loopback, stores, the tally."""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.fsck import Report, verify_store
from adapters.sources import Store, open_store

REPO = Path(__file__).resolve().parents[2]
ADAPTER_IDS = ("crash-a", "crash-b")
SOURCE_BUCKET, SOURCE_KEY = "crash-sources", "lora.safetensors"
STORE_BUCKET = "crash-store"
START_TIMEOUT_S = 180.0  # a Python with torch starts in seconds, far slower on a loaded machine
RUN_TIMEOUT_S = 180.0


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

    def check(self, target: Target, *, after_restart: bool, killed: dict[str, bool] | None = None) -> Report:
        """Verify the store against everything seen before; stray temps fail only after a restart.

        ``killed``: this check follows a kill; note what it left (plus the given extra effects).
        """
        report = verify_store(target.store(), known=self.seen)
        strays = set()
        for problem in report.problems:
            if problem.kind == "stray_temp" and not after_restart:
                strays.add(problem.key)
                continue
            self.problems += 1
            self.problem_kinds[problem.kind] = self.problem_kinds.get(problem.kind, 0) + 1
            self.stray_after_restart += problem.kind == "stray_temp"
        if killed is not None:
            effects = {
                "stray_temp": bool(strays - self.strays),
                "orphan_blob": bool(set(report.orphan_blobs) - self.orphans),
                "unconfirmed_version": bool(report.versions.keys() - self.seen.keys()),
                **killed,
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
