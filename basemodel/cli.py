"""``loraswap model …``: build the embedded model and inspect base models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from basemodel.errors import ConfigError
from basemodel.settings import load_settings

# ``basemodel.random_models.RANDOM_MODELS``' keys, spelled here: importing that module (diffusers) to
# build the parser made every `loraswap` command, `--help` included, pay seconds of imports.
RANDOM_FAMILIES = ("sd1", "sdxl", "sd3", "flux")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="build or inspect base models")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = model_sub.add_parser(
        "init-tiny", help="install the embedded tiny-sd (or build its random-init variant), diffusers format"
    )
    init.add_argument(
        "--output",
        type=Path,
        help="target folder (default: $LORASWAP_HOME/models/tiny-sd, or tiny-sd-random with --random)",
    )
    init.add_argument(
        "--if-missing", action="store_true", help="do nothing when an up-to-date install is already there"
    )
    init.add_argument(
        "--random",
        action="store_true",
        help="build the random-init variant (same architecture, weights from --seed) instead",
    )
    init.add_argument("--seed", type=int, default=0, help="with --random: weights seed (same bytes)")
    init.add_argument(
        "--family",
        choices=RANDOM_FAMILIES,
        default="sd1",
        help="with --random: the model family (sd1: tiny-sd-random, sdxl: tiny-sdxl-random, "
        "sd3: tiny-sd3-random, flux: tiny-flux-random)",
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
    info.add_argument(
        "--base-components",
        type=Path,
        help="diffusers folder that supplies what a single-file SD3/Flux checkpoint lacks",
    )
    info.add_argument("--modules", action="store_true", help="also list every LoRA-targetable module")
    info.set_defaults(func=_info)


def _init_tiny(args: argparse.Namespace) -> int:
    from basemodel.demo import install_demo
    from basemodel.pretrain.shipped import ensure_installed, install
    from basemodel.random_models import RANDOM_MODELS, save_random
    from basemodel.tiny import TINY_NAME

    if args.random:
        name = RANDOM_MODELS[args.family]
        output = args.output or load_settings().models_dir / name
        if args.if_missing and (output / "model_index.json").is_file():
            print(f"{name} already at {output}")
            return 0
        save_random(name, output, seed=args.seed)
        print(f"built {name} (random init, seed {args.seed}) at {output}")
        return 0
    if args.family != "sd1":
        raise ConfigError(f"--family {args.family} needs --random: the shipped pretrained tiny-sd is SD1.x")
    settings = load_settings()
    output = args.output or settings.models_dir / TINY_NAME
    (ensure_installed if args.if_missing else install)(output)
    print(f"installed {TINY_NAME} (shipped pretrained weights, sha256-checked) at {output}")
    demo = install_demo(settings.home / "demo")
    print(f"demo files (the brown LoRA, an init image and a mask; see README) at {demo}")
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    from basemodel.pretrain.__main__ import run

    return run(args)


def _info(args: argparse.Namespace) -> int:
    from basemodel.loader import load_base_model

    settings = load_settings(base_model=args.base_model, base_components=args.base_components)
    base = load_base_model(
        settings.base_model,
        settings.models_dir,
        device="cpu",
        dtype="fp32",
        components=settings.base_components,
    )
    summary = {
        "name": base.name,
        "kind": base.ref.kind,
        "path": str(base.ref.path),
        "fingerprint": base.fingerprint,
        "family": base.family.name,
        "pipeline": type(base.pipe).__name__,
        "prediction_type": base.family.prediction_type(base.pipe.scheduler.config),
        "architecture_id": base.architecture.architecture_id,
        "targetable_modules": len(base.architecture.modules),
        "native_size": base.native_size,
    }
    if args.modules:
        summary["modules"] = {k: list(v) for k, v in base.architecture.modules.items()}
    print(json.dumps(summary, indent=2))
    return 0
