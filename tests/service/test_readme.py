"""The README's quick start runs as written: every example block after the two set-up commands
(``make serve`` / ``make test``) is run, top to bottom, against a live server on loopback, from a folder
laid out like a fresh clone after ``make serve`` (its ``.venv``, then ``loraswap model init-tiny``).

Blocks are ```bash (run with ``bash -euo pipefail``) and ```python; ```text blocks are synopses, never run.
A block that cannot run here says so in a comment right above it (``NOT_RUN``), with the reason. The only
edits are the port (``localhost:8000`` / ``127.0.0.1:8000`` → the test server's) and, for the bundled
client, ``LORASWAP_SERVER``. curl runs with ``--fail-with-body`` (a ``.curlrc``), so an HTTP error fails
its block. Afterwards every file the examples wrote must be git-ignored.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SETUP = ("make serve", "make test")
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run by tests/service/test_readme\.py: (?P<why>.+) -->$")
RUNNABLE = {"bash", "python"}
DEFAULT_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")
BLOCK_TIMEOUT_S = 900  # a hang catcher, not a speed limit (one block trains a LoRA)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason, when marked as not run


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = lines.index("```", index + 1)
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marked = NOT_RUN.match(previous.strip())
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(opening[1], code, index + 1, marked["why"] if marked else None))
        index = end + 1
    return blocks


def example_blocks() -> list[Block]:
    """The blocks after the set-up block (the first one naming ``make serve`` and ``make test``)."""
    blocks = readme_blocks(README.read_text())
    setup = next(i for i, b in enumerate(blocks) if all(command in b.code for command in SETUP))
    return blocks[setup + 1 :]


def test_the_readme_examples_are_runnable_or_say_why_not() -> None:
    blocks = example_blocks()
    setup = readme_blocks(README.read_text())[0]
    assert all(command in setup.code for command in SETUP), "the README starts with make serve / make test"
    for block in blocks:
        if block.language in RUNNABLE | {"sh", "shell", "console"}:
            assert block.language in RUNNABLE, f"line {block.line}: fence the block as bash or python"
        elif block.language == "text" or block.language == "":
            assert block.not_run is None, f"line {block.line}: a synopsis is never run, no marker needed"
    runnable = [b for b in blocks if b.language in RUNNABLE and b.not_run is None]
    assert len(runnable) >= 8 and len([b for b in blocks if b.not_run]) <= 2
    quick_start = runnable[0].code
    assert quick_start.startswith("source .venv/bin/activate\n"), "the quick start activates the venv first"
    assert ".venv/bin/loraswap" not in "".join(b.code for b in runnable)  # one spelling: the venv is active


def substituted(code: str, port: int) -> str:
    for address in DEFAULT_ADDRESSES:
        code = code.replace(address, f"127.0.0.1:{port}")
    return code


def run_block(block: Block, port: int, cwd: Path, env: dict[str, str]) -> None:
    code = substituted(block.code, port)
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = cwd / f".readme-block-{block.line}.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (
        f"README block at line {block.line} failed ({done.returncode}):\n{code}\n"
        f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    )


def clone_env(cwd: Path, server: str) -> dict[str, str]:
    """The shell of a user who ran ``make serve``: its venv first on PATH, no loraswap settings."""
    curl_home = cwd / ".curl-home"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text("fail-with-body\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env |= {
        "PATH": os.pathsep.join([venv_bin, env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        "LORASWAP_SERVER": server,
        "CURL_HOME": str(curl_home),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return env


def written_files(cwd: Path) -> list[str]:
    """What the examples wrote into the clone, outside what ``make serve`` made and this test's own."""
    own = {".venv", ".loraswap", ".curl-home"}
    found = []
    for path in sorted(cwd.rglob("*")):
        relative = path.relative_to(cwd)
        if relative.parts[0] in own or relative.name.startswith(".readme-block-") or path.is_dir():
            continue
        found.append(relative.as_posix())
    return found


def not_ignored(paths: list[str]) -> list[str]:
    """Those of ``paths`` the repository's .gitignore does not ignore."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1), done.stderr
    ignored = set(done.stdout.splitlines())
    return [p for p in paths if p not in ignored]


def shape_colour(path: Path) -> str | None:
    from basemodel.pretrain.concepts import get_concept, read_concept_images

    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    (reading,) = read_concept_images(image[None], get_concept("brown"))
    return reading.shape_colour


@pytest.mark.slow
def test_the_readme_quick_start_runs_verbatim(start_server: Any, base_model: Any, tmp_path: Path) -> None:
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"not running in a venv ({sys.prefix} has no bin/activate): `make test` runs in .venv")
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.prefix))  # make serve's venv: `source .venv/bin/activate` works
    env = clone_env(clone, server="http://127.0.0.1:0")
    init = subprocess.run(  # make serve: `loraswap model init-tiny --if-missing`, then `loraswap serve`
        ["loraswap", "model", "init-tiny", "--if-missing"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert init.returncode == 0, init.stderr
    assert (clone / ".loraswap" / "demo" / "brown.safetensors").is_file()
    server = start_server(home=clone / ".loraswap")  # the same tiny-sd weights, already loaded
    port = int(server.url.rsplit(":", 1)[1])
    env["LORASWAP_SERVER"] = server.url
    seconds: dict[int, float] = {}
    for block in example_blocks():
        if block.language in RUNNABLE and block.not_run is None:
            started = time.perf_counter()
            run_block(block, port, clone, env)
            seconds[block.line] = round(time.perf_counter() - started, 1)
    print("README block (line) → seconds:", seconds)  # shown with -s: where the test's time goes

    # what the examples show is true: the demo LoRA draws brown where the base model does not
    assert shape_colour(clone / "brown.png") == "brown"
    assert shape_colour(clone / "no-lora.png") != "brown"
    written = written_files(clone)
    assert {"square.png", "brown.png", "inpainted.png", "a1111.png", "openai.png"} <= set(written)
    if (REPO / ".git").exists():
        assert not_ignored(written) == [], "the README's examples write files git does not ignore"


def test_the_cli_builds_its_parser_without_importing_diffusers() -> None:
    """Every README command is a `loraswap` process: building the parser imported diffusers (through
    ``basemodel.tiny`` and the pretraining module), seconds of CPU before any command ran."""
    from basemodel.cli import RANDOM_FAMILIES
    from basemodel.random_models import RANDOM_MODELS

    assert tuple(RANDOM_MODELS) == RANDOM_FAMILIES
    probe = (
        "import sys; from service.cli import build_parser; build_parser(); print('diffusers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
