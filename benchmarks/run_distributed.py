"""Calibration throughput with 1 and 2 processes (torchrun, gloo, CPU), alternated in one run.

    .venv/bin/python benchmarks/run_distributed.py --model ViT-B-32 --images 256 --rounds 3

Each configuration uses the same total number of threads (``--cores``): one process with all of them, or
two with half each; the ratio is the median of per-round ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("calibrate_worker.py")


def run(nproc: int, threads: int, args) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), "--model", args.model,
           "--image-size", str(args.image_size), "--images", str(args.images), "--batch-size",
           str(args.batch_size), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ratios, rows = [], []
    for _ in range(args.rounds):
        one = run(1, args.cores, args)
        two = run(2, max(1, args.cores // 2), args)
        rows += [one, two]
        ratios.append(two["images_per_s"] / one["images_per_s"])
    print("| processes | threads / process | images | images/s (median) |")
    print("|---|---|---|---|")
    for world in (1, 2):
        r = [x for x in rows if x["world"] == world]
        print(f"| {world} | {r[0]['threads_per_rank']} | {r[0]['images']} | "
              f"{statistics.median(x['images_per_s'] for x in r):.2f} |")
    print(f"2 vs 1 process throughput ratio (median of {args.rounds} alternated rounds): "
          f"{statistics.median(ratios):.3f}x  (per round: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
