"""Scan a captioned image folder, check every file, split it and summarise it.

Layouts (the ones kohya sd-scripts, the diffusers example script and SimpleTuner/ai-toolkit use):

* ``img.png`` + ``img.txt`` (or ``img.caption``, or ``--caption-extension``), in the folder or its
  subfolders; a kohya-style subfolder ``<N>_<name>`` repeats its images N times per epoch;
* ``metadata.jsonl`` with one ``{"file_name": …, "text": …}`` object per line (diffusers
  ``imagefolder``); when present it alone defines the dataset;
* ``val/`` inside the folder (same layout) is the validation set; otherwise ``--val-split``.

Unreadable images, missing files and missing/empty captions are skipped and counted, never fatal,
unless nothing usable is left. Captions get ``[trigger]`` replaced (ai-toolkit style) and the caption
template applied. The summary (counts, caption statistics, sha256 of the file list and of the
content) goes into the adapter's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from training.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = (".txt", ".caption")
VAL_DIR = "val"
METADATA = "metadata.jsonl"
_REPEATS = re.compile(r"^(\d+)_(.+)$")
_SHOWN_SKIPPED = 50


@dataclass(frozen=True)
class CaptionRules:
    """How a caption is found and formatted."""

    template: str = "{caption}"
    trigger_word: str | None = None
    extension: str | None = None
    caption_column: str = "text"
    image_column: str = "file_name"
    default_caption: str | None = None

    def format(self, raw: str) -> str:
        """Whitespace normalised; ``[trigger]`` in the caption is replaced by the trigger word. A caption
        that then contains the trigger word (as a word) is used as written, otherwise the template is
        applied."""
        text = " ".join(raw.split())
        trigger = self.trigger_word or ""
        text = text.replace("[trigger]", trigger).strip(" ,")
        if trigger and re.search(rf"(?<![\w]){re.escape(trigger)}(?![\w])", text):
            return text
        return self.template.format(caption=text, trigger=trigger).strip(" ,")


@dataclass(frozen=True)
class Example:
    """One usable training image."""

    path: Path
    caption: str
    sha256: str
    width: int
    height: int
    repeats: int = 1


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ScannedSet:
    root: Path
    source: str  # "captions" or "metadata.jsonl"
    examples: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, transparency composited on white."""
    with Image.open(path) as opened:
        opened.load()
        img: Image.Image = ImageOps.exif_transpose(opened) or opened
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return img.convert("RGB")


def _check_image(path: Path) -> tuple[str, int, int]:
    """sha256 and size of a readable image; raises ``ValueError`` with the reason otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    try:
        img = load_image(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image: {exc}") from None
    if min(img.size) < 1:
        raise ValueError("empty image")
    return hashlib.sha256(data).hexdigest(), img.width, img.height


def _read_caption(image: Path, rules: CaptionRules) -> str | None:
    extensions = (rules.extension,) if rules.extension else CAPTION_EXTS
    for ext in extensions:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
    return None


def _add(scanned: ScannedSet, image: Path, raw: str | None, rules: CaptionRules, repeats: int) -> None:
    rel = _rel(image, scanned.root)
    if raw is None or not raw.strip():
        if rules.default_caption is None:
            scanned.skipped.append(Skipped(rel, "no caption" if raw is None else "empty caption"))
            return
        raw = rules.default_caption
    try:
        sha, width, height = _check_image(image)
    except ValueError as exc:
        scanned.skipped.append(Skipped(rel, str(exc)))
        return
    scanned.examples.append(Example(image, rules.format(raw), sha, width, height, repeats))


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _repeats_of(path: Path, root: Path) -> int:
    for part in path.relative_to(root).parts[:-1]:
        match = _REPEATS.match(part)
        if match:
            return max(1, int(match.group(1)))
    return 1


def _scan_metadata(root: Path, rules: CaptionRules) -> ScannedSet:
    scanned = ScannedSet(root, METADATA)
    lines = (root / METADATA).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            scanned.skipped.append(Skipped(where, f"invalid JSON: {exc.msg}"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get(rules.image_column), str):
            scanned.skipped.append(Skipped(where, f"no {rules.image_column!r} string"))
            continue
        image = (root / row[rules.image_column]).resolve()
        if not image.is_relative_to(root.resolve()):
            scanned.skipped.append(Skipped(where, "file_name points outside the dataset folder"))
            continue
        if not image.is_file():
            scanned.skipped.append(Skipped(row[rules.image_column], "file not found"))
            continue
        caption = row.get(rules.caption_column)
        _add(scanned, image, caption if isinstance(caption, str) else None, rules, 1)
    return scanned


def scan_folder(root: Path, rules: CaptionRules, *, exclude_val: bool = True) -> ScannedSet:
    """Every image under ``root`` with its caption, plus what was skipped and why."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} not found", detail={"path": str(root)})
    if (root / METADATA).is_file():
        return _scan_metadata(root, rules)
    scanned = ScannedSet(root, "captions")
    for path in sorted(root.rglob("*")):
        rel_parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        if exclude_val and rel_parts[0] == VAL_DIR:
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTS:
            continue
        _add(scanned, path, _read_caption(path, rules), rules, _repeats_of(path, root))
    return scanned


@dataclass
class PreparedData:
    """The split dataset and its summary."""

    train: list[Example]
    val: list[Example]
    skipped: list[Skipped]
    summary: dict[str, Any]


def split_examples(
    examples: list[Example], val_split: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out: the same files, fraction and seed give the same split."""
    if val_split <= 0 or len(examples) < 2:
        return list(examples), []
    order = sorted(examples, key=lambda e: (e.sha256, str(e.path)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_split * len(order))))
    val = sorted(order[:n_val], key=lambda e: str(e.path))
    train = sorted(order[n_val:], key=lambda e: str(e.path))
    return train, val


def prepare_dataset(
    data: Path, rules: CaptionRules, *, val_data: Path | None, val_split: float, seed: int
) -> PreparedData:
    """Scan, check, split and summarise; raises ``DatasetError`` when nothing is usable."""
    data = Path(data)
    scanned = scan_folder(data, rules)
    skipped = list(scanned.skipped)
    if val_data is None and (data / VAL_DIR).is_dir():
        val_data = data / VAL_DIR
    if val_data is not None:
        val_scan = scan_folder(Path(val_data), rules, exclude_val=False)
        skipped += [Skipped(f"{VAL_DIR}/{s.path}", s.reason) for s in val_scan.skipped]
        train, val = list(scanned.examples), list(val_scan.examples)
        split_source = f"folder {val_data}"
    else:
        train, val = split_examples(scanned.examples, val_split, seed)
        split_source = f"val_split={val_split} seed={seed}"
    if skipped:
        log.warning("skipped %d file(s) of the dataset: %s", len(skipped), _reasons(skipped))
    if not train:
        raise DatasetError(
            f"no usable training images in {data} "
            f"({len(skipped)} skipped: {_reasons(skipped) or 'no image files found'})",
            detail={"skipped": [s.__dict__ for s in skipped[:_SHOWN_SKIPPED]]},
        )
    summary = summarise(data, train, val, skipped, scanned.source, split_source)
    return PreparedData(train, val, skipped, summary)


def _reasons(skipped: list[Skipped]) -> str:
    counts: dict[str, int] = {}
    for item in skipped:
        key = item.reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


def summarise(
    root: Path,
    train: list[Example],
    val: list[Example],
    skipped: list[Skipped],
    source: str,
    split: str,
) -> dict[str, Any]:
    """Counts, caption statistics and hashes of the dataset (kept in the adapter metadata)."""
    everything = [("train", e) for e in train] + [("val", e) for e in val]
    names = sorted(f"{part}/{_rel(e.path, root)}" for part, e in everything)
    content = sorted(f"{part}/{_rel(e.path, root)}\0{e.sha256}\0{e.caption}" for part, e in everything)
    captions = [e.caption for _, e in everything]
    return {
        "source": source,
        "split": split,
        "count": len(everything),
        "train_count": len(train),
        "train_count_with_repeats": sum(e.repeats for e in train),
        "val_count": len(val),
        "skipped_count": len(skipped),
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped[:_SHOWN_SKIPPED]],
        "caption_words": _stats([len(c.split()) for c in captions]),
        "caption_chars": _stats([len(c) for c in captions]),
        "unique_captions": len(set(captions)),
        "image_sizes": _stats([min(e.width, e.height) for _, e in everything]),
        "file_list_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "content_sha256": hashlib.sha256("\n".join(content).encode()).hexdigest(),
    }
