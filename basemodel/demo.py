"""The demo files shipped beside tiny-sd (``basemodel/weights/demo``), installed by ``init-tiny``.

* ``brown.safetensors`` — a LoRA you can see: a rank-2 adapter on the cross-attention keys and values
  (15 KB) that teaches tiny-sd the colour brown, which it never saw in pretraining. Trigger word
  ``sks``: "sks, a brown circle on a blue background". Made with ``make demo``'s recipe
  (``recipe.json``: the exact command and its scores).
* ``init.png`` / ``mask.png`` — the README's image-to-image input and inpainting mask (32×32; white =
  repaint).

Every file is checked against ``SHA256SUMS`` and copied into ``$LORASWAP_HOME/demo`` (the folder appears
atomically, like tiny-sd's install); an install from the same shipped files is left as it is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from basemodel.atomic import staged_folder
from basemodel.errors import BaseModelError
from basemodel.pretrain.shipped import CHECKSUMS, SOURCE_STAMP, checksums, source_digest, write_checksums

DEMO = Path(__file__).resolve().parent / "weights" / "demo"
DEMO_ADAPTER = "brown.safetensors"


def install_demo(target: Path, source: Path = DEMO) -> Path:
    """Copy the shipped demo files into ``target`` (sha256-checked), unless already installed from them."""
    target = Path(target)
    stamp = target / SOURCE_STAMP
    if stamp.is_file() and stamp.read_text().strip() == source_digest(source):
        return target
    with staged_folder(target) as staging:
        for name, digest in checksums(source).items():
            data = (source / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise BaseModelError(
                    f"shipped demo file {name} does not match its sha256",
                    detail={"path": str(source / name)},
                    hint="Reinstall loraswap (a fresh clone or 'make install').",
                )
            (staging / name).write_bytes(data)
        write_checksums(staging)
        (staging / SOURCE_STAMP).write_text(source_digest(source) + "\n")
    return target


__all__ = ["CHECKSUMS", "DEMO", "DEMO_ADAPTER", "install_demo"]
