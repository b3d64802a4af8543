"""``loraswap model …``: build the embedded model and inspect base models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from basemodel.settings import load_settings

TINY_NAME = "tiny-sd"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="build or inspect base models")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = model_sub.add_parser("init-tiny", help="build the embedded tiny-sd pipeline (diffusers format)")
    init.add_argument("--output", type=Path, help="target folder (default: $LORASWAP_HOME/models/tiny-sd)")
    init.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")
    init.add_argument("--if-missing", action="store_true", help="do nothing when the folder already exists")
    variant = init.add_mutually_exclusive_group()
    variant.add_argument("--random", action="store_true", help="the random-init build (the default for now)")
    variant.add_argument(
        "--pretrained",
        action="store_true",
        help="install the shipped pretrained weights (default: $LORASWAP_HOME/models/tiny-sd-pretrained)",
    )
    init.set_defaults(func=_init_tiny)

    from basemodel.pretrain.__main__ import add_arguments

    pretrain = model_sub.add_parser(
        "pretrain-tiny", help="train the embedded model from scratch on procedural captioned shapes (CPU)"
    )
    add_arguments(pretrain)
    pretrain.set_defaults(func=_pretrain_tiny)

    info = model_sub.add_parser("info", help="print a base model's fingerprint and architecture summary")
    info.add_argument("--base-model", help="'tiny-sd', a diffusers folder or a .safetensors file")
    info.add_argument("--modules", action="store_true", help="also list every LoRA-targetable module")
    info.set_defaults(func=_info)


def _init_tiny(args: argparse.Namespace) -> int:
    from basemodel.pretrain.shipped import PRETRAINED_NAME, install
    from basemodel.tiny import save_tiny

    if args.pretrained:
        output = args.output or load_settings().models_dir / PRETRAINED_NAME
        if args.if_missing and (output / "model_index.json").is_file():
            print(f"{PRETRAINED_NAME} already at {output}")
            return 0
        install(output)
        print(f"installed {PRETRAINED_NAME} (shipped pretrained weights) at {output}")
        return 0
    output = args.output or load_settings().models_dir / TINY_NAME
    if args.if_missing and (output / "model_index.json").is_file():
        print(f"{TINY_NAME} already at {output}")
        return 0
    save_tiny(output, seed=args.seed)
    print(f"built {TINY_NAME} (seed {args.seed}) at {output}")
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    from basemodel.pretrain.__main__ import run

    return run(args)


def _info(args: argparse.Namespace) -> int:
    from basemodel.loader import load_base_model

    settings = load_settings(base_model=args.base_model)
    base = load_base_model(settings.base_model, settings.models_dir, device="cpu", dtype="fp32")
    summary = {
        "name": base.name,
        "kind": base.ref.kind,
        "path": str(base.ref.path),
        "fingerprint": base.fingerprint,
        "family": base.architecture.family,
        "architecture_id": base.architecture.architecture_id,
        "targetable_modules": len(base.architecture.modules),
        "native_size": base.native_size,
    }
    if args.modules:
        summary["modules"] = {k: list(v) for k, v in base.architecture.modules.items()}
    print(json.dumps(summary, indent=2))
    return 0
