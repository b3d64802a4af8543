"""``loraswap train`` and ``loraswap data synth|inspect``.

Every ``TrainConfig`` field is a flag (``--field-name``; booleans also get ``--no-field-name``), generated
from the model so the command line and ``--config train.toml`` can never drift apart. Flags that are not
given are absent (not defaults), so precedence is: defaults < checkpoint config (with ``--resume``) <
config file < command line. The checkpoint's config gives hyperparameters only: actions (``--register``,
``--store``, see ``training.config.ACTIONS``) are this invocation's.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from training.config import ACTIONS, CLI_ONLY, TrainConfig, build_config, load_config_file

# Extra spellings users of kohya sd-scripts / the diffusers example script type by habit.
CLI_ALIASES: dict[str, list[str]] = {
    "base_model": ["--pretrained-model-name-or-path"],
    "data": ["--train-data-dir"],
    "output": ["--output-dir"],
    "steps": ["--max-train-steps"],
    "batch_size": ["--train-batch-size"],
    "grad_accum": ["--gradient-accumulation-steps"],
    "lr": ["--learning-rate"],
    "rank": ["--network-dim"],
    "alpha": ["--network-alpha"],
    "snr_gamma": ["--min-snr-gamma"],
    "buckets": ["--enable-bucket"],
    "checkpoint_every": ["--checkpointing-steps", "--save-every-n-steps"],
    "resume": ["--resume-from-checkpoint"],
}
# Flags whose name differs from the field name.
FLAG_NAMES = {"register_id": "--register"}
GROUPS = {
    "base_model": "model and data",
    "steps": "schedule and optimizer",
    "rank": "LoRA",
    "mixed_precision": "precision, device and diffusion",
    "checkpoint_every": "monitoring and evaluation",
    "export": "export and registration",
    "resume": "this invocation",
}
METAVARS = {int: "N", float: "X", Path: "PATH", str: "TEXT"}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, is_list) of ``X``, ``X | None``, ``list[X]``, ``list[X] | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _split_commas(kind: Any) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part.strip()] if "," in text else [kind(text)]

    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group: argparse._ArgumentGroup | argparse.ArgumentParser = parser
    for name, field in TrainConfig.model_fields.items():
        if name in GROUPS:
            group = parser.add_argument_group(GROUPS[name])
        flags = [FLAG_NAMES.get(name, f"--{name.replace('_', '-')}"), *CLI_ALIASES.get(name, [])]
        kind, is_list = _unwrap(field.annotation)
        help_text = field.description or ""
        if not field.is_required() and field.default is not None and not isinstance(field.default, bool):
            help_text += f" [default: {field.default}]"
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(*flags, choices=list(typing.get_args(kind)), **common)
        elif is_list:
            group.add_argument(
                *flags, nargs="+", type=_split_commas(kind), metavar=METAVARS.get(kind, "X"), **common
            )
        else:
            group.add_argument(*flags, type=kind, metavar=METAVARS.get(kind, "X"), **common)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a LoRA adapter from a folder of captioned images",
        description="Train a LoRA adapter (see docs/training.md). Every option can also be set in --config.",
    )
    train.add_argument("--config", type=Path, metavar="TOML", help="TOML file with any of the options below")
    add_config_options(train)
    train.set_defaults(func=_train)

    data = subparsers.add_parser("data", help="dataset tools: synthesise a demo set, inspect a folder")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write a procedurally generated captioned dataset")
    synth.add_argument("output", type=Path, help="target folder")
    synth.add_argument("--n", type=int, default=64, help="number of training images [default: 64]")
    synth.add_argument("--val", type=int, default=0, help="also write this many images under val/")
    kind = synth.add_mutually_exclusive_group()
    kind.add_argument("--style", help="sunset, neon, pastel, pixel or stripes [default: sunset]")
    kind.add_argument(
        "--concept",
        help="a concept the pretrained tiny-sd never saw, in its own 32 px domain: brown (the demo's) or "
        "pink (captions 'TRIGGER, a brown circle on a blue background'; see docs/training.md)",
    )
    synth.add_argument("--size", type=int, help="image side in px [default: 64; 32 with --concept]")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the images and captions already in OUTPUT (and OUTPUT/val) first",
    )
    synth.add_argument(
        "--trigger-word",
        help="prepend this trigger word to every caption (with --concept: to the concept captions; "
        "default sks)",
    )
    synth.add_argument(
        "--regularisation",
        type=float,
        default=None,
        help="with --concept: share of ordinary images (ordinary captions, no trigger word) [default: 0.5]",
    )
    synth.add_argument("--format", choices=("txt", "caption", "jsonl"), default="txt", help="caption storage")
    synth.set_defaults(func=_synth)

    inspect = sub.add_parser(
        "inspect", help="scan a dataset folder and print its summary (what train would use)"
    )
    inspect.add_argument("folder", type=Path)
    inspect.add_argument("--val-split", type=float, default=0.1)
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--trigger-word")
    inspect.add_argument("--caption-extension")
    inspect.set_defaults(func=_inspect)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line; list options flattened (``a,b c`` → a, b, c)."""
    given = {}
    for name in TrainConfig.model_fields:
        if hasattr(args, name):
            value = getattr(args, name)
            if isinstance(value, list):
                value = [item for chunk in value for item in (chunk if isinstance(chunk, list) else [chunk])]
            given[name] = value
    return given


def _resume_layer(resume: str, output: Any) -> dict[str, Any]:
    """The saved config of the checkpoint to resume (lowest layer, so a bare ``--resume`` works), less
    its actions: resuming a run that registered does not register again unless asked."""
    from training.checkpoint import STATE, resolve_resume

    if resume == "latest" and output is None:
        return {}
    path = resolve_resume(resume, Path(output) if output is not None else Path("."))
    saved = json.loads((path / STATE).read_text(encoding="utf-8")).get("config", {})
    layer = {k: v for k, v in saved.items() if k not in CLI_ONLY | ACTIONS}
    layer["output"] = str(path.parent.parent)  # the run folder the checkpoint is in, wherever we are
    return layer


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cli = _given(args)
    file_layer = load_config_file(args.config) if getattr(args, "config", None) else {}
    resume = cli.get("resume") or file_layer.get("resume")
    layers = []
    if resume:
        layers.append(_resume_layer(resume, cli.get("output") or file_layer.get("output")))
    return build_config(*layers, file_layer, cli)


def _train(args: argparse.Namespace) -> int:
    from training.run import train

    config = resolve_config(args)
    result = train(config)
    if config.dry_run or result.loop is None:
        return 0
    loop = result.loop
    if result.interrupted:
        return 130
    print(f"trained {loop.step} steps in {loop.elapsed_s:.1f} s ({loop.steps_per_s:.2f} steps/s)")
    print(
        f"validation loss {_fmt(loop.initial_val_loss)} -> {_fmt(loop.final_val_loss)} "
        f"(best {_fmt(loop.best_val_loss)} at step {loop.best_step})"
    )
    evaluation = (result.report or {}).get("evaluation", {})
    similarity = evaluation.get("dataset_similarity")
    if similarity:
        print(
            f"dataset similarity ({similarity['measure']}, lower is closer): "
            f"base {similarity['base']:.4g} -> adapter {similarity['adapter']:.4g}"
        )
    print(f"report: {result.output / 'report.json'}   samples: {result.output / 'samples'}")
    if result.adapter_path:
        print(f"adapter: {result.adapter_path}")
    if result.ref:
        print(f"registered: {result.ref}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _synth(args: argparse.Namespace) -> int:
    from training.data.synth import prepare_output, synth_dataset
    from training.errors import DatasetError

    prepare_output(args.output, args.overwrite)
    if args.concept:
        return _synth_concept(args)

    if args.regularisation is not None:
        raise DatasetError("--regularisation needs --concept")
    style, size = args.style or "sunset", args.size or 64
    written = synth_dataset(
        args.output,
        n=args.n,
        style=style,
        size=size,
        seed=args.seed,
        trigger_word=args.trigger_word,
        caption_format=args.format,
        val=args.val,
    )
    print(f"wrote {len(written)} images ({style}, {size}px) to {args.output}")
    return 0


def _synth_concept(args: argparse.Namespace) -> int:
    from basemodel.pretrain.concepts import DEFAULT_TRIGGER
    from basemodel.pretrain.data import RESOLUTION
    from training.data.concept import DEFAULT_REGULARISATION, synth_concept_dataset

    trigger = args.trigger_word or DEFAULT_TRIGGER
    share = DEFAULT_REGULARISATION if args.regularisation is None else args.regularisation
    size = args.size or RESOLUTION
    written = synth_concept_dataset(
        args.output,
        concept=args.concept,
        n=args.n,
        val=args.val,
        seed=args.seed,
        trigger_word=trigger,
        regularisation=share,
        size=size,
        caption_format=args.format,
    )
    regular = round(args.n * share)
    print(
        f"wrote {len(written)} images ({args.concept} concept, {size}px) to {args.output}: "
        f"{args.n - regular} '{trigger}, a {args.concept} …' + {regular} ordinary (no trigger), "
        f"{args.val} val"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from training.data.dataset import CaptionRules, prepare_dataset

    template = "{trigger}, {caption}" if args.trigger_word else "{caption}"
    rules = CaptionRules(template=template, trigger_word=args.trigger_word, extension=args.caption_extension)
    data = prepare_dataset(args.folder, rules, val_data=None, val_split=args.val_split, seed=args.seed)
    print(json.dumps(data.summary, indent=2))
    return 0
