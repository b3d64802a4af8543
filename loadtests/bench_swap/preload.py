"""Phase ``preload``, outside-in: ``POST /v1/adapters/{id}/preload`` over loopback HTTP against a real
server on the benchmark's pipeline, from a client in its own process (``http_client``: a user's client
does not share the server's interpreter lock), for a cold adapter (device and host tiers emptied first;
the file in the local store, its bytes verified earlier in this process — and again as a first read, its
BLAKE3 computed too) and for one already resident, against diffusers' ``load_lora_weights`` +
``unload_lora_weights`` of the same file in the same process, rounds rotated and mirrored every other
round (``timing.rotated_mirrored``: no variant always follows diffusers' load + unload)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
import uvicorn

from basemodel.loader import BaseModel, BaseModelRef
from basemodel.settings import Settings
from service.app import create_app
from service.engine.runtime import Runtime

from .cold import cold_diffusers
from .fixtures import Bench, assert_no_peft_layers, phase
from .http_client import RemoteClient
from .timing import median, medians, paired, rotated_mirrored, rounds

RESIDENT_TARGET_S = 0.002  # a preload of a resident adapter: ≤2 ms round trip
COLD_TARGET = 20.0  # cold preload ≥20× faster than diffusers' load + unload (issue 21)


@contextmanager
def serving(bench: Bench) -> Iterator[tuple[RemoteClient, Runtime]]:
    """A uvicorn server in this process on the benchmark's pipeline and local store, and a keep-alive
    client to it in another process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    identity = bench.registry.base
    assert identity is not None
    base = BaseModel(
        BaseModelRef(identity.name, bench.workdir, "diffusers"),
        bench.pipe,
        identity.fingerprint,
        identity.architecture,
        bench.device,
        bench.dtype,
    )
    settings = Settings.model_validate(
        {
            "home": bench.workdir / "home",
            "store": str(bench.store.root),
            "port": port,
            "warmup": False,
            "log_level": "warning",
            "max_lora_rank": max(64, bench.sizes.rank),
        }
    )
    app = create_app(settings, loader=lambda _: base)
    runtime: Runtime = app.state.runtime
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{port}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls below: no INFO line each
    with httpx.Client(base_url=url, timeout=120) as http, RemoteClient(url) as client:
        while time.monotonic() < deadline:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("the benchmark server never became ready")
        try:
            yield client, runtime
        finally:
            server.should_exit = True
            thread.join(30)


def bench_preload(bench: Bench) -> None:
    s = bench.sizes
    with phase(bench, "preload") as out, serving(bench) as (http, runtime):
        manager = runtime.adapters
        assert manager is not None
        count = len(bench.versions)

        def preload(index: int, collect: bool = False) -> float:
            """The round trip as the client process times it. ``collect``: a full collection in the
            server's process right before (what ``timed`` does for in-process calls; it leaves every
            cache cold: the SD1.5 shape's resident preload goes from ~0.9 to ~2.4 ms), an info row only:
            a server does not collect before each request."""
            if collect:
                gc.collect()
            path = f"/v1/adapters/{bench.versions[index].adapter_id}/preload"
            status, seconds, text = http.request("POST", path)
            assert status == 200, text
            return seconds

        def cold(state: dict[str, int], first_read: bool = False, collect: bool = False) -> float:
            index = state["i"] = (state["i"] + 1) % count
            manager.cache.drop(lambda _key: True)
            if first_read:  # as if the server had never read the file: BLAKE3 and header parse too
                manager.cache.forget_reads(bench.versions[index])
            return preload(index, collect)

        def resident(state: dict[str, int], collect: bool = False) -> float:
            return preload(state["i"], collect)

        def diffusers(state: dict[str, int]) -> float:
            return cold_diffusers(bench.pipe, bench.files[state["i"]], bench.device)["diffusers_load_unload"]

        state = {"i": 0}
        for index in range(count):  # every file read and verified once in this process (a warm server)
            preload(index)
        variants = [
            ("cold", partial(cold, state)),
            ("cold_first_read", partial(cold, state, True)),
            ("resident", partial(resident, state)),
            ("cold_after_gc", partial(cold, state, collect=True)),
            ("resident_after_gc", partial(resident, state, collect=True)),
            ("diffusers_load_unload", partial(diffusers, state)),
        ]
        samples = rounds(variants, s.cold_repeats, order=rotated_mirrored, warmup=1)
        assert_no_peft_layers(bench)
        med = medians(samples)
        out.update(
            median_s=med,
            samples_s=samples,
            ratio_load_unload_over_cold=paired(samples["diffusers_load_unload"], samples["cold"]),
            ratio_load_unload_over_cold_first_read=paired(
                samples["diffusers_load_unload"], samples["cold_first_read"]
            ),
            ratio_load_unload_over_cold_after_gc=paired(
                samples["diffusers_load_unload"], samples["cold_after_gc"]
            ),
            resident_target_s=RESIDENT_TARGET_S,
            cold_target_ratio=COLD_TARGET,
            resident_met=median(samples["resident"]) <= RESIDENT_TARGET_S,
            note="HTTP round trip over loopback, timed by the client (one httpx keep-alive client in its "
            "own process; uvicorn in this process on the benchmark's pipeline); "
            "cold = device and host tiers emptied before the call, the file in the local store and its bytes "
            "verified earlier in this process (a warm server); cold_first_read = the same with the "
            "server's record of verified files cleared, so the file's BLAKE3 is computed too; *_after_gc = "
            "a full gc.collect() in the server's process right before the request (diffusers' in-process "
            "load + unload is timed after one, as every in-process call)",
        )


def preload_rows(out: dict[str, Any]) -> list[list[str]]:
    from .report import fmt_s, verdict

    med = out["median_s"]
    ratio = out["ratio_load_unload_over_cold"]
    return [
        [
            "preload over HTTP, cold: POST /v1/adapters/{id}/preload vs load_lora_weights+unload",
            fmt_s(med["cold"]),
            fmt_s(med["diffusers_load_unload"]),
            f"{ratio:.1f}× faster",
            f"≥{COLD_TARGET:g}× faster",
            verdict(ratio >= COLD_TARGET),
        ],
        [
            "preload over HTTP, cold, first read in the process (+ BLAKE3 of the file)",
            fmt_s(med["cold_first_read"]),
            fmt_s(med["diffusers_load_unload"]),
            f"{out['ratio_load_unload_over_cold_first_read']:.1f}× faster",
            f"≥{COLD_TARGET:g}× faster",
            verdict(out["ratio_load_unload_over_cold_first_read"] >= COLD_TARGET),
        ],
        [
            "preload over HTTP, already resident",
            fmt_s(med["resident"]),
            "",
            "",
            f"≤{fmt_s(RESIDENT_TARGET_S)}",
            verdict(out["resident_met"]),
        ],
        *_after_gc_rows(out),
    ]


def _after_gc_rows(out: dict[str, Any]) -> list[list[str]]:
    """The same requests right after a full collection in the server's process (info; older JSON files
    have no such samples)."""
    from .report import fmt_s

    med = out["median_s"]
    if "cold_after_gc" not in med:
        return []
    ratio = out["ratio_load_unload_over_cold_after_gc"]
    return [
        [
            "  cold preload right after a full gc.collect() in the server's process",
            fmt_s(med["cold_after_gc"]),
            fmt_s(med["diffusers_load_unload"]),
            f"{ratio:.1f}× faster",
            "(info)",
            "",
        ],
        [
            "  resident preload right after a full gc.collect()",
            fmt_s(med["resident_after_gc"]),
            "",
            "",
            "(info)",
            "",
        ],
    ]
