"""Side-by-side inference benchmark: plain forward vs merged / un-merged ResiDualVisual vs the eager reference.

    .venv/bin/python benchmarks/run_inference.py [--models small ViT-B-16] [--batches 1 32] \
        [--dtypes float32 bfloat16] [--device cpu|cuda] [--rounds 5] [--out benchmarks/results] [--rss]

The paths run interleaved, round after round, in one process; each round's
times are divided by that round's plain forward, and the medians of those
ratios are reported (the machines are shared and noisy). Peak memory is the
deterministic peak of live tensor bytes of one call on CPU and
``torch.cuda.max_memory_allocated`` above the resident weights on GPU; "at
rest" is what each path keeps alive between calls beyond the model's own
tensors. Bases are full rank (``--calibration images`` fits them from 16 random
images instead). ``--rss`` cross-checks the CPU peak of one call against the
process's peak RSS in a subprocess. Prints markdown tables; with ``--out``,
also writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import MODELS, measure, rss_peak_of_call  # noqa: E402

import residual_fast as rf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=["fine", "full"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", default="full-rank", choices=["full-rank", "images"])
    ap.add_argument("--rss", action="store_true", help="cross-check the CPU peak against peak RSS (subprocess)")
    ap.add_argument("--out", default=None, help="folder for inference_<device>.json / .png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {args.threads} threads"
    print(f"device: {args.device} ({where}); torch {torch.__version__}, residual_fast {rf.__version__}; "
          f"{args.rounds} rounds; peak = {'max_memory_allocated' if args.device == 'cuda' else 'live tensor bytes'}")
    print()
    print("| model | variant | lambdas | batch | dtype | path | median time (s) | time / plain | peak MiB "
          "| peak / plain | at rest MiB | at rest / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for model in args.models:
        for dtype in args.dtypes:
            for batch in args.batches:
                for variant in args.variants:
                    for r in measure(model, variant, batch, args.rounds, args.device, getattr(torch, dtype),
                                     full_rank=args.calibration == "full-rank"):
                        results.append(r)
                        print(f"| {r['model']} | {r['variant']} | {r['params']} | {r['batch']} | {r['dtype']} | "
                              f"{r['path']} | {r['median_s']:.4f} | {r['time_ratio']:.3f}x | {r['peak_mib']:.2f} | "
                              f"{r['mem_ratio']:.3f}x | {r['at_rest_mib']:.2f} | {100 * r['at_rest_frac']:.3f}% |",
                              flush=True)
    if args.rss and args.device == "cpu":
        print()
        print("| model | variant | batch | path | live-bytes peak MiB | RSS peak MiB |")
        print("|---|---|---|---|---|---|")
        for model in args.models:
            for variant in args.variants:
                for path in ("plain", "merged"):
                    r = rss_peak_of_call(model, variant, args.batches[-1], path)
                    print(f"| {model} | {variant} | {args.batches[-1]} | {path} | {r['live_peak'] / 2**20:.2f} | "
                          f"{r['rss_peak'] / 2**20:.2f} |", flush=True)
    if args.out:
        write_outputs(results, Path(args.out), args.device)


def write_outputs(results: list[dict], out: Path, device: str) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"inference_{device}.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = sorted({(r["model"], r["variant"], r["batch"], r["dtype"]) for r in results})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    width = 0.27
    for j, path in enumerate(("merged", "fused", "eager")):
        vals = [next(r["time_ratio"] for r in results if (r["model"], r["variant"], r["batch"], r["dtype"]) == k
                     and r["path"] == path) for k in keys]
        ax.bar([i + (j - 1) * width for i in range(len(keys))], vals, width, label=path)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{m}\n{v} b{b}\n{d}" for m, v, b, d in keys], fontsize=7)
    ax.set_ylabel("time / plain forward")
    ax.set_title(f"adapted inference vs plain forward ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"inference_{device}.png", dpi=120)


if __name__ == "__main__":
    main()
