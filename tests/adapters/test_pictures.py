"""Pictures a version carries, over both store backends: checked, bounded, stored, read back verified."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from adapters.errors import AdapterCorrupt, AdapterNotFound
from adapters.identity import BaseIdentity
from adapters.pictures import PictureLimits, PictureUpload, clean_name, picture_key
from adapters.records import version_key
from adapters.registry import Registry
from adapters.sources import Store
from basemodel.errors import ImageInvalid, ImageTooLarge, ValidationFailed
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, kohya_layout


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 8), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def lora_bytes(lora_case: LoraCase) -> bytes:
    return save_bytes(kohya_layout(lora_case))


def test_pictures_are_stored_with_the_version_and_read_back(
    registry: Registry, store: Store, lora_bytes: bytes
) -> None:
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG", (8, 8), "blue")
    version = registry.register(
        lora_bytes,
        "pics",
        pictures=[PictureUpload(png, "runs/loss.png", "loss_curve"), PictureUpload(jpeg, "cover.jpg")],
    )
    shown = [(p.name, p.role, p.media_type, p.width, p.height) for p in version.pictures]
    assert shown == [
        ("loss.png", "loss_curve", "image/png", 16, 8),
        ("cover.jpg", "preview", "image/jpeg", 8, 8),
    ]
    assert registry.resolve("pics@1") == version  # the record carries them
    picture, data = registry.read_picture(version, 1)
    assert (picture.media_type, data) == ("image/jpeg", jpeg)
    assert store.exists(picture_key(version.pictures[0]))
    with pytest.raises(AdapterNotFound, match="no picture 2"):
        registry.read_picture(version, 2)
    # the same file and pictures: the same version; other pictures: a new one
    assert (
        registry.register(
            lora_bytes,
            "pics",
            pictures=[PictureUpload(png, "runs/loss.png", "loss_curve"), PictureUpload(jpeg, "cover.jpg")],
        )
        == version
    )
    assert registry.register(lora_bytes, "pics").version == 2
    # a version without pictures stores the record it always did (no "pictures" key)
    assert b"pictures" not in store.get(version_key("pics", 2))
    store.put(picture_key(version.pictures[0]), image_bytes("PNG", color="green"))
    with pytest.raises(AdapterCorrupt, match="modified"):
        registry.read_picture(version, 0)


def test_pictures_are_validated_and_bounded(
    store: Store, base_identity: BaseIdentity, lora_bytes: bytes
) -> None:
    registry = Registry(
        store, base_identity, picture_limits=PictureLimits(max_count=2, max_bytes=2000, max_pixels=4096)
    )
    cases = [
        ([PictureUpload(b"<script>alert(1)</script>", "x.png")], ImageInvalid, "not a readable image"),
        ([PictureUpload(image_bytes("GIF"), "a.gif")], ImageInvalid, "GIF"),
        ([PictureUpload(image_bytes("PNG", (100, 100)), "big.png")], ImageTooLarge, "pixel limit"),
        ([PictureUpload(image_bytes("PNG")[:40], "cut.png")], ImageInvalid, "readable"),
        ([PictureUpload(b"\x89PNG" + b"\0" * 3000, "long.png")], ImageTooLarge, "byte limit"),
        ([PictureUpload(image_bytes(), "a.png", "thumbnail")], ValidationFailed, "role"),
        ([PictureUpload(image_bytes(), str(i)) for i in range(3)], ValidationFailed, "at most 2"),
    ]
    for pictures, error, message in cases:
        with pytest.raises(error, match=message):
            registry.register(lora_bytes, "bounded", pictures=pictures)
    assert registry.versions("bounded") == []  # nothing was registered


def test_names_are_display_text_only() -> None:
    assert clean_name("../../etc/passwd", "x") == "passwd"
    assert clean_name("a\u202eb\x00c\n.png", "x") == "abc.png"
    assert clean_name("C:\\evil\\", "fallback.png") == "fallback.png"
    assert len(clean_name("n" * 500, "x")) == 128


def test_verify_checks_pictures_and_gc_collects_orphan_ones(
    registry: Registry, store: Store, lora_bytes: bytes
) -> None:
    """``adapters verify`` knows the pictures' keys (they were reported as keys outside the layout),
    checks each listed picture's bytes against its record, and ``adapters gc`` lists a picture no
    record names (a registration that died between its pictures and its record) like an orphan blob."""
    import time

    from adapters.fsck import collect_garbage, verify_store

    version = registry.register(lora_bytes, "pics-fsck", pictures=[PictureUpload(image_bytes(), "a.png")])
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.orphan_pictures == []
    stray = image_bytes("PNG", color="yellow")
    import hashlib

    orphan = f"pictures/sha256/{hashlib.sha256(stray).hexdigest()}.png"
    store.put(orphan, stray)
    report = verify_store(store)
    assert report.ok and report.orphan_pictures == [orphan]
    done = collect_garbage(store, apply=True, now=time.time() + 7200)
    assert orphan in done.removed and not store.exists(orphan)
    assert store.exists(picture_key(version.pictures[0]))  # named by a record: kept
    store.put(picture_key(version.pictures[0]), image_bytes("PNG", color="green"))
    kinds = verify_store(store).kinds()
    assert kinds == {"picture_mismatch": 1}
    store.delete(picture_key(version.pictures[0]))
    assert verify_store(store).kinds() == {"picture_missing": 1}
