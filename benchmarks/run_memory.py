"""Adapter memory at full rank: construction peak and bytes at rest, per model and variant.

    .venv/bin/python benchmarks/run_memory.py [--models ViT-B-32 ViT-B-16 ViT-L-14] [--variants coarse fine full]

For each open_clip model (random init) the bases are full rank (moments with a
full-rank covariance of every unit's small vector: heads at ``hd + 2`` minus zero
rows, MLPs at ``D``, as real data gives). Reported:

- construction: the peak of live tensor bytes of ``ResiDual.from_bases`` and the
  adapter's own size (parameters + buffers), and the build time;
- at rest: tensor bytes kept alive beyond the model's own by the un-merged
  ``ResiDualVisual`` (after one forward) and by its ``merge()``, in MiB and as a
  fraction of the model's weight bytes;
- the merged output's largest relative difference from the un-merged one.
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

import residual_fast as rf
from residual_fast.bench import full_rank_bases
from residual_fast.profiling import LiveBytes, persistent_extra_bytes, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16", "ViT-L-14"])
    ap.add_argument("--variants", nargs="+", default=["coarse", "fine", "full"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, residual_fast {rf.__version__}, {args.threads} threads, CPU")
    print()
    print("| model | variant | lambdas | build (s) | build peak MiB | adapter MiB | peak / adapter | un-merged at rest "
          "MiB | / weights | merged at rest MiB | / weights | merged vs un-merged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        visual = open_clip.create_model(name, pretrained=None).visual.eval()
        weights = weight_bytes(visual)
        units = ("head", "mlp") if "full" in args.variants else ("head",)
        bases = full_rank_bases(visual, units)
        x = torch.randn(2, 3, *visual.image_size)
        for variant in args.variants:
            start = time.perf_counter()
            with LiveBytes() as lb:
                adapter = rf.ResiDual.from_bases(bases, variant)
            build = time.perf_counter() - start
            own = weight_bytes(adapter)
            fused = rf.ResiDualVisual(visual, adapter)
            with torch.no_grad():
                y = fused(x)
                merged = fused.merge()
                diff = ((merged(x) - y).abs().max() / y.abs().max()).item()
            un, me = persistent_extra_bytes(fused, visual), persistent_extra_bytes(merged, visual)
            mib = 2**20
            print(f"| {name} | {variant} | {adapter.num_parameters()} | {build:.1f} | {lb.peak / mib:.1f} | "
                  f"{own / mib:.1f} | {lb.peak / max(own, 1):.2f}x | {un / mib:.2f} | {100 * un / weights:.2f}% | "
                  f"{me / mib:.3f} | {100 * me / weights:.3f}% | {diff:.1e} |", flush=True)
            del fused, merged, adapter


if __name__ == "__main__":
    main()
