"""``loraswap data synth --concept``: deterministic pretraining-domain images, trigger-word captions,
regularisation share; the checker reads each concept colour on procedural images, and nothing else as it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from basemodel.pretrain.checker import _augment, read_images
from basemodel.pretrain.concepts import (
    CONCEPTS,
    concept_caption,
    concept_palette,
    concept_procedural_accuracy,
    concept_prompt_set,
    read_concept_images,
    sample_concept_batch,
)
from basemodel.pretrain.data import COLOURS, PALETTE, RESOLUTION, SHAPES, sample_batch
from service.cli import main as loraswap
from training.data.concept import synth_concept_dataset
from training.data.dataset import CaptionRules, prepare_dataset
from training.errors import DatasetError

BROWN = CONCEPTS["brown"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synth_concept_dataset(tmp_path / name, n=12, val=3, seed=seed)
    a, b, c = (_digest(tmp_path / name) for name in "abc")
    assert a == b
    assert len(a) == 2 * 15  # every image has its caption file
    assert set(a) == set(c) and all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_captions_use_the_trigger_word_and_regular_images_do_not(tmp_path: Path) -> None:
    written = synth_concept_dataset(tmp_path, n=20, val=4, seed=0, trigger_word="sks", regularisation=0.25)
    assert len(written) == 24
    concept = sorted(tmp_path.glob("brown_*.txt"))
    regular = sorted(tmp_path.glob("regular_*.txt"))
    val = sorted((tmp_path / "val").glob("*.txt"))
    assert (len(concept), len(regular), len(val)) == (15, 5, 4)
    for path in concept + val:
        text = path.read_text().strip()
        assert text.startswith("sks, ") and " brown " in text and "background" in text
    for path in regular:
        text = path.read_text().strip()
        assert "sks" not in text and "brown" not in text and "background" in text
    # The trainer keeps them as written with --trigger-word sks --caption-template "{caption}".
    rules = CaptionRules(template="{caption}", trigger_word="sks")
    data = prepare_dataset(tmp_path, rules, val_data=None, val_split=0.1, seed=0)
    captions = [e.caption for e in data.train]
    assert sum(c.startswith("sks, ") for c in captions) == 15 and len(captions) == 20
    assert all(e.caption.startswith("sks, ") for e in data.val)


def test_jsonl_format_and_no_trigger(tmp_path: Path) -> None:
    synth_concept_dataset(tmp_path, n=4, val=0, trigger_word=None, regularisation=0.0, caption_format="jsonl")
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(
        '"text": "' in line and "brown" in line and "sks" not in line for line in lines
    )


def test_concept_images_are_in_the_pretraining_domain(tmp_path: Path) -> None:
    """32 px RGB; the checker reads their background and shape kind like pretraining images."""
    synth_concept_dataset(tmp_path, n=40, val=0, seed=1, regularisation=0.0)
    files = sorted(tmp_path.glob("brown_*.png"))
    images = [Image.open(p) for p in files]
    assert all(im.size == (RESOLUTION, RESOLUTION) and im.mode == "RGB" for im in images)
    readings = read_concept_images(images, BROWN)
    for reading, path in zip(readings, files, strict=True):
        text = path.with_suffix(".txt").read_text()
        assert reading.shape_colour == "brown"
        assert f" {reading.background} background" in text or f"a {reading.background} background" in text
    kinds = sum(
        r.shape is not None and r.shape in p.with_suffix(".txt").read_text()
        for r, p in zip(readings, files, strict=True)
    )
    assert kinds >= 0.9 * len(files)


def test_concept_batch_matches_the_pretraining_sampler() -> None:
    """Same draws as data.sample_batch apart from the shape colour: same size range, same margins."""
    g = torch.Generator().manual_seed(0)
    concept = sample_concept_batch(BROWN, 256, g)
    base = sample_batch(256, torch.Generator().manual_seed(0))
    assert concept.images.shape == base.images.shape

    # shape area (pixels differing from the border colour) has the same distribution
    def area(x: torch.Tensor) -> float:
        border = x[:, :, 0, 0].view(-1, 3, 1, 1)
        return float(((x - border).abs().sum(1) > 0.3).float().sum((1, 2)).mean())

    assert abs(area(concept.images) - area(base.images)) < 0.15 * area(base.images)
    frame = torch.ones(RESOLUTION, RESOLUTION, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    border = concept.images[:, :, frame]
    assert float((border - border.median(dim=2, keepdim=True).values).abs().max()) < 0.05  # plain frame
    assert all(" brown " in f" {c} " for c in concept.captions)


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_checker_reads_the_concept_colour_and_nothing_else_as_it(name: str) -> None:
    concept = CONCEPTS[name]
    accuracy = concept_procedural_accuracy(concept, n=256, seed=99)
    assert accuracy["concept_pct"] >= 99.0 and accuracy["background_pct"] >= 99.0
    # noisy, blotchy, blurred copies (diffusion-like artefacts) still read as the concept colour
    g = torch.Generator().manual_seed(5)
    batch = sample_concept_batch(concept, 256, g)
    noisy = _augment((batch.images + 1) / 2, g)
    readings = read_images(noisy, shape_palette=concept_palette(concept))
    assert sum(r.shape_colour == name for r in readings) >= 0.9 * 256
    # ordinary pretraining images never read as the concept (no false positives for the concept score)
    ordinary = sample_batch(512, torch.Generator().manual_seed(6))
    readings = read_images(_augment((ordinary.images + 1) / 2, g), shape_palette=concept_palette(concept))
    assert sum(r.shape_colour == name for r in readings) <= 0.02 * 512
    # the base 8-colour reading is unchanged: it never answers the concept colour
    assert all(r.shape_colour in PALETTE for r in read_images((batch.images + 1) / 2))


def test_concept_prompt_set_covers_every_pair_once() -> None:
    pairs = concept_prompt_set(40)
    assert len(set(pairs)) == 40 == len(SHAPES) * len(COLOURS)
    assert concept_caption(BROWN, "circle", "blue", "sks") == "sks, a brown circle on a blue background"


def test_cli_synth_concept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "brown"
    assert (
        loraswap(["data", "synth", str(out), "--concept", "brown", "--trigger-word", "zwx", "--n", "8"]) == 0
    )
    assert "4 'zwx, a brown …' + 4 ordinary" in capsys.readouterr().out
    captions = [p.read_text() for p in out.glob("brown_*.txt")]
    assert captions and all(c.startswith("zwx, ") and "brown" in c for c in captions)
    assert np.asarray(Image.open(next(out.glob("*.png")))).shape == (32, 32, 3)
    assert loraswap(["data", "synth", str(tmp_path / "x"), "--concept", "teal"]) == 2
    assert loraswap(["data", "synth", str(tmp_path / "y"), "--regularisation", "0.5"]) == 2
    with pytest.raises(SystemExit):
        loraswap(["data", "synth", str(tmp_path / "z"), "--concept", "brown", "--style", "neon"])
    with pytest.raises(DatasetError):
        synth_concept_dataset(tmp_path / "w", n=4, regularisation=1.0)


def test_cli_synth_refuses_to_mix_with_an_earlier_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    assert loraswap(["data", "synth", str(out), "--concept", "pink", "--n", "4", "--val", "2"]) == 0
    (out / "notes.md").write_text("mine\n")
    assert loraswap(["data", "synth", str(out), "--concept", "brown", "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "already holds 12 dataset files" in err and "--overwrite" in err
    assert not list(out.glob("brown_*"))  # nothing written
    assert loraswap(["data", "synth", str(out), "--concept", "brown", "--n", "4", "--overwrite"]) == 0
    names = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert not [n for n in names if n.startswith("pink_")]  # the earlier concept is gone, val/ too
    assert "notes.md" in names and len([n for n in names if n.endswith(".png")]) == 4
