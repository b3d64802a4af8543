"""``python -m loadtests.ray_affinity``: adapter-affinity routing on Ray Serve, measured and simulated.

``--measure`` runs the loopback fleet (``run.py``: 4 tiny-sd replicas, 1,000 adapters, Zipf(1.1),
affinity vs random routing); the simulator (``sim.py``, the same routing code) then predicts that run
and extrapolates (100 replicas × 100,000 adapters, other Zipf exponents). ``--sim-only`` skips the
fleet. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loadtests.ray_affinity.sim import SimConfig, simulate, top_mass


def predict(base: SimConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy in ("affinity", "random"):
        result = simulate(replace(base, policy=policy))
        out[policy] = {"hit_rate": result.hit_rate, "p50_s": result.p50_s, "p99_s": result.p99_s}
    out["bound"] = top_mass(base.adapters, base.zipf_s, base.replicas * base.capacity)
    return out


def extrapolate(base: SimConfig, quick: bool) -> list[dict[str, Any]]:
    rows = []
    shapes = [(4, 1000, 16), (100, 100_000, 16), (100, 100_000, 160)]
    exponents = (0.8, 1.1, 1.4)
    for replicas, adapters, capacity in shapes:
        big = replicas >= 100
        for s in exponents:
            cfg = replace(
                base,
                replicas=replicas,
                adapters=adapters,
                capacity=capacity,
                zipf_s=s,
                concurrency=2 * replicas,
                requests=(10_000 if quick else 40_000) if big else 4000,
                warmup=(20_000 if quick else 60_000) if big else 2000,
            )
            started = time.monotonic()
            predicted = predict(cfg)
            rows.append(
                {
                    "replicas": replicas,
                    "adapters": adapters,
                    "capacity": capacity,
                    "zipf_s": s,
                    "affinity": predicted["affinity"]["hit_rate"],
                    "random": predicted["random"]["hit_rate"],
                    "bound": predicted["bound"],
                    "sim_s": time.monotonic() - started,
                }
            )
            row = rows[-1]
            print(
                f"  {replicas:>4} x {adapters:>7} cap {capacity:>3} s={s:<4}  affinity {row['affinity']:.3f}"
                f"  random {row['random']:.3f}  bound {row['bound']:.3f}",
                flush=True,
            )
    return rows


def capacity_sweep(base: SimConfig) -> list[dict[str, Any]]:
    """4 replicas x 1,000 adapters: the hit rates as the device tier grows (what reaches 90 %)."""
    rows = []
    for capacity in (16, 32, 64, 128, 250):
        cfg = replace(base, capacity=capacity, requests=4000, warmup=2000)
        predicted = predict(cfg)
        rows.append(
            {
                "capacity": capacity,
                "affinity": predicted["affinity"]["hit_rate"],
                "random": predicted["random"]["hit_rate"],
                "bound": predicted["bound"],
            }
        )
        row = rows[-1]
        print(
            f"  4 x 1000 cap {capacity:>3}  affinity {row['affinity']:.3f}  random {row['random']:.3f}"
            f"  bound {row['bound']:.3f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ray_affinity", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure", action="store_true", help="run the loopback Ray fleet too")
    mode.add_argument("--sim-only", action="store_true")
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="shorter extrapolation runs")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/ray_affinity.json"))
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"machine": platform.platform(), "note": "cpu-2c, shared with other helpers"}
    base = SimConfig(requests=args.requests, warmup=args.warmup, concurrency=args.concurrency)
    if args.measure:
        from loadtests.ray_affinity.run import RunConfig, measure

        cfg = RunConfig(requests=args.requests, warmup=args.warmup, concurrency=args.concurrency)
        with tempfile.TemporaryDirectory(prefix="ray-affinity-") as tmp:
            measured = measure(cfg, args.workdir or Path(tmp))
        report["measured"] = measured
        report["run_config"] = asdict(cfg)
        arm = measured["arms"]["affinity"]
        # the simulator with the service times the fleet showed
        base = replace(base, gen_s=arm["generate_s_median"], load_s=arm["adapter_load_s_median"])
    prediction = predict(base)
    report["sim_config"] = asdict(base)
    report["predicted"] = prediction
    print("\n4 replicas x 1,000 adapters, device tier 16 each, Zipf(1.1):")
    print(f"{'routing':<10}{'measured hits':>15}{'simulated hits':>16}{'p50 s':>9}{'p99 s':>9}")
    for policy in ("affinity", "random"):
        got = report.get("measured", {}).get("arms", {}).get(policy)
        hits = f"{got['hit_rate']:.3f}" if got else "-"
        p50 = f"{got['p50_s']:.3f}" if got else "-"
        p99 = f"{got['p99_s']:.3f}" if got else "-"
        print(f"{policy:<10}{hits:>15}{prediction[policy]['hit_rate']:>16.3f}{p50:>9}{p99:>9}")
    print(f"upper bound for any routing (top-64 mass): {prediction['bound']:.3f}\n")
    print("extrapolation (simulator):")
    report["capacity_sweep"] = capacity_sweep(base)
    report["extrapolation"] = extrapolate(base, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
