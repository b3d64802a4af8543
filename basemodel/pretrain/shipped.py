"""The pretrained embedded model shipped in ``basemodel/weights/tiny-sd`` (fp16 safetensors).

``install(output)`` checks every shipped file against its ``SHA256SUMS`` and expands the folder to
fp32 (weights cast exactly, the text encoder's ``dtype`` set to float32, so a plain
``from_pretrained`` gives one dtype throughout, as every other local model does), into a folder that
appears atomically with its own ``SHA256SUMS`` and a ``SOURCE_SHA256`` stamp (the sha256 of the shipped
``SHA256SUMS``). ``ensure_installed(target)`` installs once, and again when the shipped weights change
(a newer package) or the folder is an older random-init ``tiny-sd``. The expansion is deterministic.
Nothing is trained or downloaded at start-up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from basemodel.atomic import staged_folder
from basemodel.errors import BaseModelError
from basemodel.fingerprint import sha256_file

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "tiny-sd"
CHECKSUMS = "SHA256SUMS"
SOURCE_STAMP = "SOURCE_SHA256"


def checksums(folder: Path = SHIPPED) -> dict[str, str]:
    """``{relative path: sha256}`` from a folder's ``SHA256SUMS``."""
    lines = (Path(folder) / CHECKSUMS).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}


def install(output: Path, source: Path = SHIPPED) -> Path:
    """Copy the shipped diffusers folder to ``output`` (sha256-checked; the folder appears atomically)."""
    output = Path(output)
    with staged_folder(output) as staging:
        for name, digest in checksums(source).items():
            data = (source / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise BaseModelError(
                    f"shipped tiny-sd file {name} does not match its sha256",
                    detail={"path": str(source / name)},
                    hint="Reinstall loraswap, or rebuild it with 'loraswap model pretrain-tiny'.",
                )
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(_expand(name, data))
        write_checksums(staging)
        (staging / SOURCE_STAMP).write_text(source_digest(source) + "\n")
    return output


def _expand(name: str, data: bytes) -> bytes:
    """fp16 weights → fp32 (exact); configs that record a float16 dtype → float32; the rest as is."""
    if name.endswith(".safetensors"):
        from safetensors.torch import load, save

        return save({k: v.float() for k, v in load(data).items()}, metadata={"format": "pt"})
    if name.endswith("config.json"):
        config = json.loads(data)
        if config.get("dtype") == "float16":
            config["dtype"] = "float32"
            return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return data


def write_checksums(folder: Path) -> dict[str, str]:
    """Write ``folder/SHA256SUMS`` (every file but itself, sorted) and return ``{name: sha256}``."""
    sums = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    (Path(folder) / CHECKSUMS).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def source_digest(source: Path = SHIPPED) -> str:
    """sha256 of a shipped folder's ``SHA256SUMS``: names the exact weights an install came from."""
    return hashlib.sha256((Path(source) / CHECKSUMS).read_bytes()).hexdigest()


def ensure_installed(target: Path, source: Path = SHIPPED) -> Path:
    """``target`` holding an install of ``source``; (re)installed when missing or from other weights."""
    target = Path(target)
    stamp = target / SOURCE_STAMP
    current = stamp.is_file() and stamp.read_text().strip() == source_digest(source)
    if not current or not (target / "model_index.json").is_file():
        install(target, source)
    return target
