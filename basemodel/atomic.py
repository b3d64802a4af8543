"""Write a folder so that it appears all at once (readers never see a half-written model)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``output``; when the block succeeds, it replaces ``output``.

    The staging folder gets mode 755 and any earlier ``output`` is removed first; when the block
    raises, ``output`` is left as it was and the staging folder is deleted.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
