"""Dataset handling: captions, metadata.jsonl, corrupt files, split, summary, buckets, synth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.training.conftest import write_image
from training.data.buckets import assign_bucket, make_buckets, resize_crop, to_tensor
from training.data.dataset import CaptionRules, load_image, prepare_dataset, scan_folder, split_examples
from training.data.synth import STYLES, synth_dataset
from training.errors import DatasetError

RULES = CaptionRules()


def test_captions_txt_and_caption_files(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red  square\n on white\n")
    write_image(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("a blue circle")
    scanned = scan_folder(tmp_path, RULES)
    assert {e.path.name: e.caption for e in scanned.examples} == {
        "a.png": "a red square on white",  # whitespace and newlines normalised
        "b.jpg": "a blue circle",
    }
    assert scanned.skipped == []


def test_missing_and_empty_captions_are_skipped_or_defaulted(tmp_path: Path) -> None:
    write_image(tmp_path / "none.png")
    write_image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("  \n")
    scanned = scan_folder(tmp_path, RULES)
    assert not scanned.examples
    assert sorted((s.path, s.reason) for s in scanned.skipped) == [
        ("empty.png", "empty caption"),
        ("none.png", "no caption"),
    ]
    defaulted = scan_folder(tmp_path, CaptionRules(default_caption="a photo"))
    assert sorted(e.caption for e in defaulted.examples) == ["a photo", "a photo"]


def test_corrupt_and_unreadable_files_are_reported_and_counted(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "broken.txt").write_text("broken")
    truncated = tmp_path / "truncated.jpg"
    write_image(tmp_path / "full.jpg", size=(64, 64))
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:100])
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "truncated.txt").write_text("cut")
    (tmp_path / "notes.md").write_text("ignored: not an image")
    data = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.0, seed=0)
    assert [e.path.name for e in data.train] == ["good.png"]
    reasons = {s.path: s.reason for s in data.skipped}
    assert set(reasons) == {"broken.png", "truncated.jpg"}
    assert all(r.startswith("unreadable image") for r in reasons.values())
    assert data.summary["skipped_count"] == 2


def test_no_usable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no usable training images.*1 skipped"):
        prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.1, seed=0)
    with pytest.raises(DatasetError, match="not found"):
        prepare_dataset(tmp_path / "missing", RULES, val_data=None, val_split=0.1, seed=0)


def test_metadata_jsonl(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "one.png")
    write_image(tmp_path / "two.png")
    write_image(tmp_path / "stray.png")  # not listed: ignored, metadata.jsonl defines the set
    lines = [
        json.dumps({"file_name": "img/one.png", "text": "first"}),
        "{not json",
        json.dumps({"file_name": "two.png", "caption": "custom column"}),
        json.dumps({"file_name": "missing.png", "text": "gone"}),
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
        json.dumps({"text": "no file"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    scanned = scan_folder(tmp_path, RULES)
    assert scanned.source == "metadata.jsonl"
    assert [(e.path.name, e.caption) for e in scanned.examples] == [("one.png", "first")]
    reasons = sorted(s.reason.split(":")[0] for s in scanned.skipped)
    assert reasons == [
        "file not found",
        "file_name points outside the dataset folder",
        "invalid JSON",
        "no 'file_name' string",
        "no caption",
    ]
    custom = scan_folder(tmp_path, CaptionRules(caption_column="caption"))
    assert [(e.path.name, e.caption) for e in custom.examples] == [("two.png", "custom column")]


def test_trigger_word_template_and_placeholder() -> None:
    rules = CaptionRules(template="{trigger}, {caption}", trigger_word="ohwx")
    assert rules.format("a dog") == "ohwx, a dog"
    assert rules.format("a photo of [trigger] on grass") == "a photo of ohwx on grass"
    assert rules.format("ohwx, a dog") == "ohwx, a dog"  # already there: not added twice
    assert rules.format("ohwxy dog") == "ohwx, ohwxy dog"  # whole words only
    assert CaptionRules(template="{caption}, in the style of {trigger}", trigger_word="zz").format(
        "a cat"
    ) == ("a cat, in the style of zz")


def test_split_is_deterministic_and_val_folder_wins(tmp_path: Path) -> None:
    for i in range(10):
        write_image(tmp_path / f"{i}.png", colour=(i * 20, 0, 0))
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    a = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.2, seed=3)
    b = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.2, seed=3)
    c = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.2, seed=4)
    assert len(a.val) == 2 and len(a.train) == 8
    assert [e.path for e in a.val] == [e.path for e in b.val]
    assert a.summary["content_sha256"] == b.summary["content_sha256"]
    assert {e.path for e in a.train} | {e.path for e in a.val} == {e.path for e in c.train} | {
        e.path for e in c.val
    }
    write_image(tmp_path / "val" / "v.png")
    (tmp_path / "val" / "v.txt").write_text("held out")
    d = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.2, seed=3)
    assert [e.caption for e in d.val] == ["held out"] and len(d.train) == 10
    assert "folder" in d.summary["split"]


def test_split_keeps_one_training_image() -> None:
    assert split_examples([], 0.5, 0) == ([], [])


def test_summary_contents(tmp_path: Path) -> None:
    write_image(tmp_path / "5_dogs" / "a.png")
    (tmp_path / "5_dogs" / "a.txt").write_text("one two three")
    write_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("one")
    data = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.0, seed=0)
    summary = data.summary
    assert summary["count"] == 2 and summary["train_count_with_repeats"] == 6  # kohya-style 5_ folder
    assert summary["caption_words"] == {"min": 1, "mean": 2.0, "max": 3}
    assert len(summary["file_list_sha256"]) == 64 and len(summary["content_sha256"]) == 64
    (tmp_path / "b.txt").write_text("changed caption")
    again = prepare_dataset(tmp_path, RULES, val_data=None, val_split=0.0, seed=0)
    assert again.summary["file_list_sha256"] == summary["file_list_sha256"]
    assert again.summary["content_sha256"] != summary["content_sha256"]


def test_rgb_conversion_and_exact_size(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (50, 30), (255, 0, 0, 0))  # fully transparent → white
    rgba.save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (20, 60), 128)
    grey.save(tmp_path / "g.png")
    out = resize_crop(load_image(tmp_path / "g.png"), (32, 32))
    assert out.size == (32, 32) and out.mode == "RGB"
    tensor = to_tensor(out)
    assert tensor.shape == (3, 32, 32) and -1.0 <= float(tensor.min()) <= float(tensor.max()) <= 1.0


def test_buckets() -> None:
    buckets = make_buckets(64, 8)
    assert (64, 64) in buckets
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in buckets)
    wide = assign_bucket(1600, 900, buckets)
    assert wide[0] > wide[1]
    assert assign_bucket(500, 500, buckets) == (64, 64)


def test_synth_is_reproducible_and_captioned(tmp_path: Path) -> None:
    a = synth_dataset(tmp_path / "a", n=5, style="neon", size=32, seed=1, trigger_word="zz")
    b = synth_dataset(tmp_path / "b", n=5, style="neon", size=32, seed=1, trigger_word="zz")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    caption = a[0].with_suffix(".txt").read_text()
    assert caption.startswith("zz, ") and "neon style" in caption
    jsonl = synth_dataset(tmp_path / "c", n=3, style="pixel", size=16, caption_format="jsonl", val=2)
    assert len(jsonl) == 5
    data = prepare_dataset(tmp_path / "c", RULES, val_data=None, val_split=0.5, seed=0)
    assert len(data.train) == 3 and len(data.val) == 2  # val/ folder used, metadata.jsonl in both
    assert set(STYLES) >= {"sunset", "neon", "pastel", "pixel", "stripes"}
    with pytest.raises(DatasetError, match="unknown style"):
        synth_dataset(tmp_path / "d", style="nope")
