"""Nothing half-visible: the store checker, stale temp files after kill -9, and a bounded kill -9 run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import tempfiles
from adapters.format import Limits
from adapters.fsck import collect_garbage, verify_store
from adapters.identity import BaseIdentity
from adapters.records import AdapterVersion, blob_key, tombstone_key, version_key
from adapters.registry import Registry
from adapters.sources import LocalStore, Store
from basemodel.settings import Settings
from loadtests.faults import crash
from loadtests.faults.crash_kit import write_tiny_lora
from service.cli import main
from service.uploads import SPOOL_PREFIX, sweep_spool
from tests.adapters.conftest import base_identity, moto_endpoint, s3_bucket, store  # noqa: F401
from tests.service.conftest import RunningServer, start_server  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter_file(loraswap_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lora(loraswap_home, tmp_path_factory.mktemp("lora") / "lora.safetensors")


@pytest.fixture
def populated(store: Store, base_identity: BaseIdentity, adapter_file: Path) -> dict[str, AdapterVersion]:
    """style@1..3 live, other@1 deleted and purged, one unreferenced blob: a consistent store."""
    registry = Registry(store, base_identity)
    versions = {
        v.ref: v for v in (registry.register(adapter_file, "style", {"title": f"v{n}"}) for n in (1, 2, 3))
    }
    registry.register(adapter_file, "other")
    registry.delete("other", purge=True)
    orphan = b"a blob whose record was never written"
    store.put(blob_key(hashlib.sha256(orphan).hexdigest()), orphan)
    return versions


def test_a_consistent_store_passes(store: Store, populated: dict[str, AdapterVersion]) -> None:
    report = verify_store(store)
    assert report.ok, report.problems
    assert (report.adapters, report.live, report.deleted) == (2, 3, 1)
    assert len(report.orphan_blobs) == 1 and report.purged == ["other@1"]
    assert report.versions["style@2"] == populated["style@2"].sha256


def _flip_last_byte(store: Store, key: str) -> None:
    data = bytearray(store.get(key))
    data[-1] ^= 0xFF
    store.put(key, bytes(data))


def _point_at_other_blob(store: Store, versions: dict[str, AdapterVersion]) -> None:
    record = versions["style@2"].model_copy(update={"sha256": versions["style@1"].sha256})
    store.put(version_key("style", 2), record.record_json())


DAMAGE: dict[str, tuple[Callable[[Store, dict[str, AdapterVersion]], None], set[str]]] = {
    "missing blob": (lambda s, v: s.delete(blob_key(v["style@2"].sha256)), {"blob_missing"}),
    "modified blob": (lambda s, v: _flip_last_byte(s, blob_key(v["style@2"].sha256)), {"sha256_mismatch"}),
    "gap": (lambda s, v: s.delete(version_key("style", 2)), {"gap", "bad_index"}),
    "unreadable record": (
        lambda s, v: s.put(version_key("style", 2), b'{"adapter_id": "sty'),
        {"bad_record"},
    ),
    "record names another file": (_point_at_other_blob, {"blob_mismatch"}),
    "tombstone without record": (lambda s, v: s.put(tombstone_key("style", 9), b"{}"), {"orphan_tombstone"}),
    "key outside the layout": (lambda s, v: s.put("adapters/style/notes.txt", b"x"), {"unexpected_key"}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_is_found(
    store: Store,
    populated: dict[str, AdapterVersion],
    damage: str,
) -> None:
    apply, kinds = DAMAGE[damage]
    apply(store, populated)
    report = verify_store(store)
    assert not report.ok
    assert set(report.kinds()) == kinds, report.problems


def test_a_header_over_the_readers_cap_is_found(store: Store, populated: dict[str, AdapterVersion]) -> None:
    """A version readers cannot open (e.g. metadata that made its header exceed the cap) is a problem."""
    header_bytes = int.from_bytes(store.get(blob_key(populated["style@3"].sha256))[:8], "little")
    report = verify_store(store, limits=Limits(max_header_bytes=header_bytes - 1))
    assert report.kinds() == {"unopenable": 3}, report.problems


def test_versions_seen_before_must_stay(store: Store, populated: dict[str, AdapterVersion]) -> None:
    known = {
        "style@1": "0" * 64,
        "style@7": populated["style@3"].sha256,
        "style@2": populated["style@2"].sha256,
    }
    report = verify_store(store, known=known)
    assert report.kinds() == {"reused_number": 1, "lost_version": 1}, report.problems


def test_stray_temp_files_are_reported_and_a_live_writers_are_not(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("adapters/x/content/" + "0" * 64 + ".json", b'{"version": 1}')  # to have a folder
    folder = tmp_path / "store" / "adapters" / "x" / "content"
    _, live = tempfiles.make_temp(folder, ".tmp-")
    dead = folder / f".tmp-{tempfiles.HOST}-{_dead_pid()}-abc"
    dead.write_bytes(b"half")
    report = verify_store(store)
    assert [(p.kind, p.key) for p in report.problems if p.kind == "stray_temp"] == [
        ("stray_temp", dead.relative_to(store.root).as_posix())
    ]
    assert report.in_flight_temps == [live.relative_to(store.root).as_posix()]
    assert store.list() == ["adapters/x/content/" + "0" * 64 + ".json"]


def test_verify_command_exit_status_and_json(
    tmp_path: Path,
    base_identity: BaseIdentity,
    adapter_file: Path,
    loraswap_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    store = LocalStore(tmp_path / "store")
    version = Registry(store, base_identity).register(adapter_file, "style")
    assert main(["adapters", "verify", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    store.delete(blob_key(version.sha256))
    assert main(["adapters", "verify", "--store", str(store.root), "--json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["ok"] is False and body["problem_kinds"] == {"blob_missing": 1}


def test_gc_lists_orphan_blobs_and_removes_them_only_with_apply(
    store: Store, populated: dict[str, AdapterVersion]
) -> None:
    """``verify`` counted orphan blobs but nothing removed them: ``collect_garbage`` lists them (dry run by
    default), removes the old ones when applied, keeps young ones (a registration in flight) and every
    blob a record names."""
    before = store.list()
    (orphan,) = verify_store(store).orphan_blobs
    key = blob_key(orphan)
    dry = collect_garbage(store, now=time.time() + 7200)
    assert [(o.key, o.removable) for o in dry.orphans] == [(key, True)]
    assert dry.orphans[0].age_s is not None and dry.orphans[0].age_s >= 7200 - 60
    assert dry.removed == [] and store.list() == before  # a dry run removes nothing
    young = collect_garbage(store, apply=True)  # written a moment ago: maybe a registration in flight
    assert young.removed == [] and store.exists(key)
    done = collect_garbage(store, apply=True, min_age_s=0)
    assert done.removed == [key] and not store.exists(key)
    report = verify_store(store)
    assert report.ok and report.orphan_blobs == [] and report.live == 3
    assert set(store.list()) == set(before) - {key}
    assert collect_garbage(store, apply=True, min_age_s=0).orphans == []


def test_gc_command_is_a_dry_run_unless_applied(
    tmp_path: Path,
    base_identity: BaseIdentity,
    adapter_file: Path,
    loraswap_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    store = LocalStore(tmp_path / "store")
    Registry(store, base_identity).register(adapter_file, "style")
    orphan = b"a blob whose record was never written"
    key = blob_key(hashlib.sha256(orphan).hexdigest())
    store.put(key, orphan)
    root = str(store.root)
    assert main(["adapters", "gc", "--store", root]) == 0
    out = capsys.readouterr().out
    assert f"orphan {key} (" in out and "kept (young)" in out and "dry run" in out and store.exists(key)
    assert main(["adapters", "gc", "--store", root, "--min-age", "0"]) == 0
    assert "removable" in capsys.readouterr().out and store.exists(key)
    assert main(["adapters", "gc", "--store", root, "--min-age", "0", "--apply", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["applied"] is True and body["removed"] == [key] and not store.exists(key)
    assert main(["adapters", "verify", "--store", root]) == 0
    assert "(0 unreferenced)" in capsys.readouterr().out


# -- stale temp files: the regression test of the stray .tmp-* files after kill -9 -----------------------

WRITER = """
import os, sys, time
from adapters.sources.local import LocalStore

def stall(*args, **kwargs):  # the temp file is written and fsynced; stop before linking it
    print("linking", flush=True)
    time.sleep(600)

os.link = stall
LocalStore(sys.argv[1]).create("adapters/style/versions/1.json", b'{"half": "written"}')
"""


def test_temp_files_of_a_killed_writer_are_removed_at_open_and_a_live_writers_are_kept(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    settings = Settings(home=tmp_path / "home", store=str(root))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "linking\n"
        temps = list(root.rglob(".tmp-*"))
        assert len(temps) == 1
        registry = Registry.from_settings(settings)  # another process opens the store meanwhile
        assert temps[0].exists(), "a live writer's temp file was removed"
        assert registry.store.list() == [] and verify_store(registry.store).ok
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(60)
    assert verify_store(LocalStore(root)).kinds() == {"stray_temp": 1}
    registry = Registry.from_settings(settings)  # the next open (CLI command, server start) sweeps
    assert not temps[0].exists()
    report = verify_store(registry.store)
    assert report.ok and not report.in_flight_temps


def test_the_server_sweeps_its_store_at_start(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """The server's store is wrapped in a circuit breaker: the sweep must still reach the local folder."""
    root = tmp_path / "store"
    (root / "blobs").mkdir(parents=True)
    dead = root / "blobs" / f".tmp-{tempfiles.HOST}-{_dead_pid()}-abc"
    dead.write_bytes(b"half a blob")
    start_server(store=str(root))
    assert not dead.exists()


def test_temp_staleness_by_owner_and_age(tmp_path: Path) -> None:
    _, mine = tempfiles.make_temp(tmp_path, SPOOL_PREFIX, ".safetensors")
    dead = tmp_path / f"{SPOOL_PREFIX}{tempfiles.HOST}-{_dead_pid()}-x.safetensors"
    foreign = tmp_path / f"{SPOOL_PREFIX}0000abcd-1-x.safetensors"  # another host: only age counts
    legacy = tmp_path / f"{SPOOL_PREFIX}k2j4h5.safetensors"  # no owner in the name
    old_foreign = tmp_path / f"{SPOOL_PREFIX}0000abcd-2-y.safetensors"
    for path in (dead, foreign, legacy, old_foreign):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * tempfiles.STALE_AFTER_S
    os.utime(old_foreign, (hours_ago, hours_ago))
    assert sorted(sweep_spool(tmp_path)) == sorted([dead, old_foreign])
    assert mine.exists() and foreign.exists() and legacy.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(60)
    return proc.pid


# -- a bounded kill -9 run ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang, not slowness: five Python-with-torch starts on a loaded machine
def test_kill_9_of_the_cli_and_the_server_leaves_a_consistent_store(
    loraswap_home: Path, tmp_path: Path
) -> None:
    """The quick run: the CLI killed at a crash point and at random, the server mid-upload (local store)."""
    rows = {row["scenario"]: row for row in crash.run(True, home=loraswap_home, workdir=tmp_path)}
    for row in rows.values():
        assert row["problems"] == 0 and row["stray_after_restart"] == 0, row
    cli, server = rows["cli"], rows["server"]
    assert cli["kills"] >= 1 and cli["registrations"] >= 1  # the store-phase kill may come after the end
    assert cli["stray_after_kill"] >= 1 and cli["orphan_blobs"] >= 1  # what the crash point left
    assert server["kills"] == 1 and server["registrations"] >= 1
    assert server["spool_after_kill"] >= 1  # killed mid-upload: its spool file was there, then swept
