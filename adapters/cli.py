"""``loraswap adapters …``: register, list, show, delete, convert, inspect, merge, verify and gc.

Every action takes ``--store`` / ``--s3-endpoint-url`` (default from settings: ``$LORASWAP_HOME/adapters``)
and ``--base-model`` (default from settings, ``tiny-sd``). The base model's identity is computed only by
the actions that check compatibility (register, convert, show), without loading weights where possible.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adapters.errors import AdapterInvalid
from adapters.format import Limits, load_source, write_kohya
from adapters.fsck import collect_garbage, verify_store
from adapters.identity import BaseIdentity
from adapters.interop import write_diffusers
from adapters.metadata import AdapterMetadata, coerce_metadata
from adapters.pictures import PictureUpload
from adapters.prepare import Prepared, check_open_compatible, prepare
from adapters.registry import Registry
from adapters.tempfiles import STALE_AFTER_S
from basemodel.errors import LoraswapError
from basemodel.settings import Settings, load_settings


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    adapters = subparsers.add_parser("adapters", help="register, inspect and convert LoRA adapters")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", help="file:///abs/dir, a path or s3://bucket/prefix (default: home/adapters)"
    )
    common.add_argument("--s3-endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    common.add_argument("--base-model", help="'tiny-sd', a diffusers folder or a .safetensors file")
    common.add_argument(
        "--base-components",
        type=Path,
        help="diffusers folder that supplies what a single-file SD3/Flux base lacks (docs/models.md)",
    )

    register = sub.add_parser(
        "register", parents=[common], help="validate, normalise and store a new version"
    )
    register.add_argument("file", type=Path, help="LoRA .safetensors (diffusers/PEFT or kohya layout)")
    register.add_argument(
        "--id", dest="adapter_id", required=True, help="adapter id, ^[a-z0-9][a-z0-9._-]{0,63}$"
    )
    register.add_argument("--scale-default", type=float, help="adapter weight used when a request gives none")
    register.add_argument(
        "--strict-base", action="store_true", default=None, help="refuse unless it names this exact base"
    )
    register.add_argument("--metadata", help="metadata JSON object, or @file.json (see docs/adapters.md)")
    for flag, role in (
        ("--picture", "a preview image"),
        ("--loss-curve", "the loss curve"),
        ("--samples", "a sample grid"),
    ):
        register.add_argument(
            flag, type=Path, action="append", default=[], help=f"{role} (PNG/JPEG/WebP) to store; repeatable"
        )
    register.set_defaults(func=_register)

    listing = sub.add_parser("list", parents=[common], help="list adapters and their latest versions")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--all", action="store_true", help="include adapters whose versions are all deleted")
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", parents=[common], help="print a version's record and metadata as JSON")
    show.add_argument("ref", help="ID, ID@latest or ID@VERSION")
    show.add_argument("--versions", action="store_true", help="also list every version (deleted included)")
    show.set_defaults(func=_show)

    delete = sub.add_parser("delete", parents=[common], help="delete ID@VERSION, or every version of ID")
    delete.add_argument("ref", help="ID (all versions), ID@latest or ID@VERSION")
    delete.add_argument("--purge", action="store_true", help="also remove the stored files")
    delete.set_defaults(func=_delete)

    convert = sub.add_parser(
        "convert", parents=[common], help="normalise a file to diffusers or kohya layout"
    )
    convert.add_argument("file", type=Path, help="LoRA .safetensors in any accepted layout")
    convert.add_argument("--to", choices=("diffusers", "kohya"), required=True, help="output layout")
    convert.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors path")
    convert.set_defaults(func=_convert)

    inspect = sub.add_parser(
        "inspect", parents=[common], help="check a file against the base model and print what it holds"
    )
    inspect.add_argument("file", type=Path, help="adapter .safetensors (LoRA, LoHa, LoKr or full diff)")
    inspect.set_defaults(func=_inspect)

    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="bake registered adapters into a standalone model (diffusers or single file)",
    )
    merge.add_argument(
        "refs", nargs="+", metavar="REF[:SCALE]", help="ID, ID@VERSION or ID@latest, optional :weight"
    )
    merge.add_argument("-o", "--output", type=Path, required=True, help="output folder, or .safetensors file")
    merge.add_argument(
        "--format", choices=("diffusers", "single-file"), default="diffusers", help="output layout"
    )
    merge.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="output weights dtype"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.set_defaults(func=_merge)

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check the store: every version opens with its sha256, no gaps, no reuse, no stray files",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_verify)

    gc = sub.add_parser(
        "gc",
        parents=[common],
        help="list the store's orphan blobs (no version names them); --apply removes them",
    )
    gc.add_argument("--apply", action="store_true", help="remove them (default: a dry run that only lists)")
    gc.add_argument(
        "--min-age",
        type=float,
        default=STALE_AFTER_S,
        metavar="SECONDS",
        help="keep orphans younger than this: a registration in flight writes its blob just before its "
        f"record [default: {STALE_AFTER_S:g}]",
    )
    gc.add_argument("--json", action="store_true", help="print the result as JSON")
    gc.set_defaults(func=_gc)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        base_model=args.base_model,
        base_components=args.base_components,
        store=args.store,
        s3_endpoint_url=args.s3_endpoint_url,
        strict_base=getattr(args, "strict_base", None),
    )


def _base(settings: Settings) -> BaseIdentity:
    return BaseIdentity.from_spec(settings.base_model, settings.models_dir, settings.base_components)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _metadata_arg(text: str | None) -> AdapterMetadata:
    if text is None:
        return AdapterMetadata()
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise AdapterInvalid(f"cannot read metadata file: {exc}", reason="bad_metadata") from None
    return coerce_metadata(text)


def _register(args: argparse.Namespace) -> int:
    settings = _settings(args)
    registry = Registry.from_settings(settings, base=_base(settings))
    metadata = _metadata_arg(args.metadata)
    pictures = [
        PictureUpload(path.read_bytes(), path.name, role)
        for role, paths in (
            ("preview", args.picture),
            ("loss_curve", args.loss_curve),
            ("samples", args.samples),
        )
        for path in paths
    ]
    version = registry.register(
        args.file, args.adapter_id, metadata, scale_default=args.scale_default, pictures=pictures
    )
    _print_json(version.to_dict())
    return 0


def _list(args: argparse.Namespace) -> int:
    registry = Registry.from_settings(_settings(args), sweep=False)
    summaries = registry.list(include_deleted=args.all)
    if args.json:
        _print_json([s.to_dict() for s in summaries])
        return 0
    rows = [("ID", "LATEST", "VERSIONS", "DELETED", "RANK", "SOURCE", "BASE")]
    for s in summaries:
        latest = s.latest
        rows.append(
            (
                s.adapter_id,
                str(latest.version) if latest else "-",
                str(s.versions),
                str(s.deleted),
                str(latest.rank) if latest else "-",
                latest.source_format if latest else "-",
                latest.base_model.name if latest else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    registry = Registry.from_settings(settings, sweep=False)
    loaded = registry.open(args.ref)
    body: dict[str, Any] = {
        "version": loaded.version.to_dict(),
        "metadata": loaded.metadata.model_dump(mode="json", exclude_none=True),
    }
    body["compatible"] = _compatibility(loaded.version, settings)
    if args.versions:
        body["versions"] = [
            v.to_dict() for v in registry.versions(loaded.version.adapter_id, include_deleted=True)
        ]
    _print_json(body)
    return 0


def _compatibility(version: Any, settings: Settings) -> dict[str, Any]:
    base = _base(settings)
    try:
        check_open_compatible(version, base, strict=False)
    except LoraswapError as exc:
        return {"base_model": base.name, "ok": False, "reason": exc.message}
    return {
        "base_model": base.name,
        "ok": True,
        "same_checkpoint": version.base_model.fingerprint == base.fingerprint,
    }


def _delete(args: argparse.Namespace) -> int:
    registry = Registry.from_settings(_settings(args))
    removed = registry.delete(args.ref, purge=args.purge)
    for version in removed:
        print(f"deleted {version.ref}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.output.suffix.lower() != ".safetensors":
        raise AdapterInvalid("the output file must end in .safetensors", reason="bad_output")
    base, prepared = _prepared_file(args.file, settings)
    # a PEFT DoRA has PEFT's own DoRA layout (write_diffusers refuses a kohya/LyCORIS one, typed)
    if args.to == "diffusers" and prepared.metadata.kind not in (None, "lora", "dora"):
        raise AdapterInvalid(
            f"a {prepared.metadata.kind} adapter has no diffusers (PEFT LoRA) layout: diffusers' "
            "load_lora_weights reads LoRA only, and converting would approximate it",
            reason="unsupported_conversion",
            hint="Use --to kohya (LyCORIS names, read by A1111 and ComfyUI), or 'loraswap adapters merge'.",
        )
    if args.to == "diffusers":
        data = write_diffusers(args.output, prepared.tensors, prepared.metadata, base.architecture)
    else:
        data = write_kohya(args.output, prepared.tensors, prepared.metadata, base.architecture)
    modules = len(prepared.metadata.target_modules)
    kind = prepared.metadata.kind or "lora"
    print(f"wrote {args.output} ({args.to} layout, {kind}, {modules} modules, {len(data)} bytes)")
    return 0


def _prepared_file(path: Path, settings: Settings) -> tuple[BaseIdentity, Prepared]:
    """The base identity and ``path`` through every registration check (nothing is stored)."""
    limits = Limits(max_bytes=settings.max_adapter_bytes, max_header_bytes=settings.max_adapter_header_bytes)
    data = load_source(path, limits)  # a file that is not safetensors fails before the base is loaded
    base = _base(settings)
    prepared = prepare(data, base, AdapterMetadata(), max_rank=settings.max_lora_rank, limits=limits)
    return base, prepared


def _inspect(args: argparse.Namespace) -> int:
    """Run every registration check on a file (nothing is stored) and print its summary as JSON.

    It describes the file as it is: ``source_format`` is the layout of its keys and ``tensors`` its
    tensor count (a ``convert --to kohya`` output: ``kohya``, alphas included); what its ``loraswap``
    metadata records as the adapter's origin is ``recorded_source_format`` (absent without metadata).
    """
    settings = _settings(args)
    base, prepared = _prepared_file(args.file, settings)
    meta = prepared.metadata
    summary: dict[str, Any] = {
        "file": str(args.file),
        "kind": meta.kind or "lora",
        "source_format": prepared.layout,
        "tensors": prepared.file_tensors,
        "modules": len(meta.target_modules),
        "components": sorted({m.split(".", 1)[0] for m in meta.target_modules}),
        "rank": meta.rank,
        "alpha": meta.alpha,
        "rank_pattern": meta.rank_pattern,
        "dtype": meta.dtype,
        "base_model": base.name,
        "base_model_match": meta.base_model_match,
    }
    if prepared.embedded is not None:
        summary["recorded_source_format"] = prepared.embedded.source_format or "loraswap"
    _print_json(summary)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from adapters.merge import merge_adapters, parse_item
    from basemodel.loader import load_base_model

    settings = _settings(args)
    items = [parse_item(text) for text in args.refs]
    base = load_base_model(
        settings.base_model,
        settings.models_dir,
        device="cpu",
        dtype="fp32",
        components=settings.base_components,
    )
    registry = Registry.from_settings(settings, base=BaseIdentity.from_base_model(base), sweep=False)
    record = merge_adapters(
        registry,
        base,
        items,
        args.output,
        fmt=args.format,
        dtype=args.dtype,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    names = ", ".join(f"{a['ref']}:{a['scale']:g}" for a in record["adapters"])
    print(f"wrote {args.output} ({args.format}, {args.dtype}): {base.name} + {names}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Exit 0 when the store is consistent, 1 when it has problems (2: it could not be checked)."""
    registry = Registry.from_settings(_settings(args), sweep=False)  # report stray files, do not remove them
    report = verify_store(registry.store, limits=registry.limits)
    if args.json:
        _print_json(report.to_dict())
        return 0 if report.ok else 1
    print(
        f"{report.store}: {report.adapters} adapters, {report.live} live and {report.deleted} deleted "
        f"versions, {report.blobs} blobs ({len(report.orphan_blobs)} unreferenced), "
        f"{len(report.in_flight_temps)} temporary files in flight"
    )
    for problem in report.problems:
        print(f"{problem.kind}: {problem.key}: {problem.message}")
    print("ok" if report.ok else f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def _gc(args: argparse.Namespace) -> int:
    """List the orphan blobs; with ``--apply`` remove those old enough. Exit 0 (2: could not run)."""
    registry = Registry.from_settings(_settings(args), sweep=False)
    found = collect_garbage(registry.store, apply=args.apply, min_age_s=args.min_age, limits=registry.limits)
    if args.json:
        _print_json(found.to_dict())
        return 0
    for orphan in found.orphans:
        if orphan.age_s is None:
            age, state = "age unknown", "kept"
        else:
            age = f"{orphan.age_s:.0f} s old"
            state = "kept (young)" if not orphan.removable else "removed" if args.apply else "removable"
        print(f"orphan {orphan.key} ({age}): {state}")
    removable = sum(o.removable for o in found.orphans)
    if args.apply:
        print(
            f"{found.store}: removed {len(found.removed)} of {len(found.orphans)} orphan blobs and pictures"
        )
    else:
        print(
            f"{found.store}: {len(found.orphans)} orphan blobs and pictures, {removable} older than "
            f"{args.min_age:g} s "
            "(dry run: --apply removes those)"
        )
    return 0
