"""Under torchrun: time streamed calibration (fit_bases) of random-weight open_clip on this rank's block of
digits; rank 0 prints one JSON line with the images/s of the whole group (model loading not timed)."""

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import residual_fast as rf
from residual_fast.distributed import shard_range
from residual_fast.pipeline import load_splits

p = argparse.ArgumentParser()
p.add_argument("--model", default="ViT-B-32")
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--images", type=int, default=256)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()

dist.init_process_group("gloo")
group = dist.group.WORLD
torch.set_num_threads(args.threads)
loaded = rf.load(f"open_clip:{args.model}", pretrained=False, image_size=args.image_size)
data, idx = load_splits("digits", transform=loaded.preprocess, seed=0)["train"]
idx = idx[: args.images]
lo, hi = shard_range(idx.numel(), group, args.batch_size)
images = torch.stack([data.dataset[i][0] for i in idx[lo:hi].tolist()])  # decoded up front: time the model
loader = DataLoader(images, batch_size=args.batch_size)
dist.barrier()
start = time.perf_counter()
bases = rf.fit_bases(loaded.visual, loader, progress=False, process_group=group)
dist.barrier()
seconds = time.perf_counter() - start
if dist.get_rank() == 0:
    print(json.dumps({"world": dist.get_world_size(), "threads_per_rank": args.threads, "images": idx.numel(),
                      "seconds": seconds, "images_per_s": idx.numel() / seconds,
                      "bases_samples": bases.num_samples}))
dist.destroy_process_group()
