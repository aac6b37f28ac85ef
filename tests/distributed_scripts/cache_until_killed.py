"""Run under torchrun: build a cache of digits with the Python API; with ``--die-after K`` rank 1 exits
abruptly (as a killed process) after writing K shards, to test per-rank resume."""

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

import residual_fast as rf
from residual_fast.cache import build_cache
from residual_fast.distributed import shard_range
from residual_fast.pipeline import load_splits

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--images", type=int, default=60)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--die-after", type=int, default=None)
args = p.parse_args()

dist.init_process_group("gloo")
torch.set_num_threads(1)
loaded = rf.load("open_clip:ViT-B-32", pretrained=False, image_size=32)
data, idx = load_splits("digits", transform=loaded.preprocess, seed=0)["train"]
idx = idx[: args.images]
lo, hi = shard_range(idx.numel(), dist.group.WORLD, args.batch_size)
loader = DataLoader(Subset(data.dataset, idx[lo:hi].tolist()), batch_size=args.batch_size)


class DiesAfter:
    """Yields the loader's batches; on rank 1, ends the process once K shards are on disk."""

    def __init__(self, loader, k):
        self.loader, self.k = loader, k

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.k is not None and dist.get_rank() == 1 and i == self.k:
                os._exit(3)
            yield batch


build_cache(loaded.visual, DiesAfter(loader, args.die_after), args.out, progress=False,
            source={"images": args.images, "batch_size": args.batch_size}, process_group=dist.group.WORLD)
dist.destroy_process_group()
