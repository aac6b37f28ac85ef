"""Side-by-side CPU inference benchmark: plain forward vs ResiDualVisual vs the eager reference.

    .venv/bin/python benchmarks/run_inference.py [--models small ViT-B-16] [--batch 8] [--rounds 5]

The three paths run interleaved, round after round, in one process; each
round's times are divided by that round's plain forward, and the medians of
those ratios are reported (the machines are shared and noisy). Peak memory is
the deterministic peak of live tensor bytes of one call. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import MODELS, build_paths, build_visual  # noqa: E402

import residual_fast as rf  # noqa: E402
from residual_fast.profiling import LiveBytes  # noqa: E402


def measure(model: str, variant: str, batch: int, rounds: int) -> list[dict]:
    visual = build_visual(model)
    paths, adapter = build_paths(visual, variant, batch)
    rows = {name: {"times": [], "ratios": []} for name in paths}
    with torch.no_grad():
        for fn in paths.values():  # warm-up
            fn()
        for _ in range(rounds):
            t = {}
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                t[name] = time.perf_counter() - start
            for name in paths:
                rows[name]["times"].append(t[name])
                rows[name]["ratios"].append(t[name] / t["plain"])
        peaks = {}
        for name, fn in paths.items():
            with LiveBytes() as lb:
                fn()
            peaks[name] = lb.peak
    out = []
    for name, r in rows.items():
        out.append({
            "model": model, "variant": variant, "params": adapter.num_parameters(), "path": name,
            "median_s": statistics.median(r["times"]), "time_ratio": statistics.median(r["ratios"]),
            "peak_mib": peaks[name] / 2**20, "mem_ratio": peaks[name] / peaks["plain"],
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=["fine", "full"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {args.threads} threads; "
          f"torch {torch.__version__}, residual_fast {rf.__version__}; batch {args.batch}, {args.rounds} rounds, fp32")
    print()
    print("| model | variant | lambdas | path | median time (s) | time / plain | peak live MiB | peak / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for variant in args.variants:
            for r in measure(model, variant, args.batch, args.rounds):
                print(f"| {r['model']} | {r['variant']} | {r['params']} | {r['path']} | {r['median_s']:.4f} | "
                      f"{r['time_ratio']:.3f}x | {r['peak_mib']:.2f} | {r['mem_ratio']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
