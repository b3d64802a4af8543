"""Pickle-free training checkpoints with atomic writes.

Layout of ``OUTPUT/checkpoints/step-00000100/``:

* ``adapter.safetensors``: every LoRA parameter by its full name (``unet.<path>.lora_A.default.weight``);
* ``optimizer.safetensors``: the AdamW state tensors as ``state.<param index>.<name>``;
* ``state.json`` (written last): step, epoch position, optimizer param groups and non-tensor state,
  LR-scheduler state, grad-scaler state, RNG states (torch CPU/CUDA and the trainer's generator as
  base64, Python and NumPy as lists), the resolved config and the identity of the base model and data.

A checkpoint is built in a hidden temporary folder and renamed into place, then ``LATEST`` (a text
file with the folder name) is replaced atomically, so a crash or Ctrl-C never leaves a half-written
checkpoint that ``--resume latest`` could pick. Nothing here ever unpickles anything.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training import TRAINER_VERSION
from training.errors import CheckpointError, CheckpointNotFound

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE = "state.json"
ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.safetensors"
FORMAT = "loraswap-checkpoint/1"


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the loop touches, as JSON values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "generator": _b64(generator.get_state()),
        "generator_device": str(generator.device),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],  # type: ignore[index]
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    generator.set_state(_unb64(state["generator"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` → (tensors for safetensors, the rest as JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    output: Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write one checkpoint atomically, point ``LATEST`` at it, prune old ones; returns its folder."""
    root = Path(output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        opt_tensors, opt_meta = split_optimizer_state(optimizer)
        save_file({k: v.contiguous() for k, v in adapter.items()}, staging / ADAPTER)
        save_file(opt_tensors, staging / OPTIMIZER)
        body = {
            "format": FORMAT,
            "trainer_version": TRAINER_VERSION,
            "step": step,
            "optimizer": opt_meta,
        } | state
        _write_json(staging / STATE, body)
        if final.exists():
            trash = root / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep, final)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: p.name)


def _prune(root: Path, keep: int, current: Path) -> None:
    for path in list_checkpoints(root.parent)[:-keep]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(spec: str, output: Path) -> Path:
    """``latest`` (newest complete checkpoint of OUTPUT), a checkpoint folder, or a run folder."""
    if spec == "latest":
        root = Path(output) / CHECKPOINTS
        pointer = root / LATEST
        if pointer.is_file():
            candidate = root / pointer.read_text(encoding="utf-8").strip()
            if (candidate / STATE).is_file():
                return candidate
        found = list_checkpoints(output)
        if not found:
            raise CheckpointNotFound(f"no checkpoint to resume under {root}")
        return found[-1]
    path = Path(spec).expanduser()
    if (path / STATE).is_file():
        return path
    if (path / CHECKPOINTS).is_dir():
        return resolve_resume("latest", path)
    raise CheckpointNotFound(f"{path} is not a checkpoint folder (no {STATE})", detail={"path": str(path)})


@dataclass
class Checkpoint:
    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        adapter = load_file(path / ADAPTER)
        opt_tensors = load_file(path / OPTIMIZER)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {exc.filename} missing") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has unknown format {state.get('format')!r}")
    optimizer = join_optimizer_state(opt_tensors, state.pop("optimizer"))
    return Checkpoint(path, int(state["step"]), adapter, optimizer, state)
