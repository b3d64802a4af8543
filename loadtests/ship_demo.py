"""Write the demo files shipped beside tiny-sd (``basemodel/weights/demo``) from a ``make demo`` run.

The adapter is the run's ``adapter.safetensors`` with its tensors as trained (fp16) and compact metadata
(title, description, trigger word, the training summary, the inference plan: no local paths);
``recipe.json`` records the commands and the scores of the run; ``SHA256SUMS`` covers every file, as
tiny-sd's does (``basemodel.demo.install_demo`` checks it). The init image and mask are kept as they are::

    make demo DEMO_ARGS='--work .loraswap/demo-run --train-arg=--rank --train-arg=2 ...'
    python -m loadtests.ship_demo --run .loraswap/demo-run/run \\
        --result loadtests/results/lora_demo-tiny-sd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapters.format import read_adapter, write_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, InferencePlan, TrainingInfo, parse_header_metadata
from adapters.normalise import normalise
from basemodel.demo import DEMO, DEMO_ADAPTER
from basemodel.pretrain.shipped import write_checksums
from basemodel.settings import load_settings

TITLE = "brown (demo)"
DESCRIPTION = (
    "A LoRA you can see: teaches the embedded tiny-sd the colour brown, which it never saw in "
    "pretraining. Prompt 'sks, a brown circle on a blue background'."
)


def compact_metadata(trained: AdapterMetadata) -> AdapterMetadata:
    training = trained.training or TrainingInfo()
    keep = {"steps", "learning_rate", "batch_size", "resolution", "optimizer", "lr_scheduler", "seed"}
    return AdapterMetadata(
        adapter_id="brown",
        title=TITLE,
        description=DESCRIPTION,
        trigger_words=["sks"],
        scale_default=1.0,
        rank=trained.rank,
        alpha=trained.alpha,
        training=TrainingInfo(**training.model_dump(include=keep)),
        inference=InferencePlan(
            prompts=["sks, a brown circle on a blue background", "sks, a brown square on a white background"],
            guidance_scale=4.0,
            steps=25,
            seeds=[0, 1],
            width=32,
            height=32,
        ),
    )


def ship(run: Path, result: dict[str, Any], out: Path = DEMO) -> Path:
    tensors, header = read_adapter(run / "adapter.safetensors")
    trained = parse_header_metadata(header) or AdapterMetadata()
    settings = load_settings()
    base = BaseIdentity.from_spec("tiny-sd", settings.models_dir)
    canonical, _ = normalise(tensors, base.architecture)
    metadata = compact_metadata(trained).model_copy(update={"base_model": base.info()})
    write_adapter(out / DEMO_ADAPTER, {k: v.half() for k, v in canonical.items()}, metadata)
    recipe = {
        "what": DESCRIPTION,
        "made_by": "make demo (loadtests/lora_demo.py), then python -m loadtests.ship_demo",
        "commands": result.get("commands"),
        "settings": result.get("settings"),
        "train_seconds": result.get("train_seconds"),
        "scores": result.get("scores"),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True) + "\n")
    write_checksums(out)
    return out / DEMO_ADAPTER


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="the demo's training run folder")
    parser.add_argument("--result", type=Path, required=True, help="lora_demo's results JSON")
    parser.add_argument("--out", type=Path, default=DEMO)
    args = parser.parse_args()
    path = ship(args.run, json.loads(args.result.read_text()), args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes) and {args.out / 'SHA256SUMS'}")


if __name__ == "__main__":
    main()
