"""Run under torchrun: build a cache of digits with the Python API; with ``--die-after K`` rank 1 exits
abruptly (as a killed process) after writing K shards, to test per-rank resume. With ``--fit OUT`` the
completed cache's bases are all-reduced and the fine variant is then trained data parallel on it; rank 0 writes
the lambdas and the validation history."""

import argparse
import os

import torch
import torch.distributed as dist

import residual_fast as rf
from residual_fast.cache import build_cache
from residual_fast.distributed import shard_loader
from residual_fast.pipeline import load_splits

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--images", type=int, default=60)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--die-after", type=int, default=None)
p.add_argument("--fit", default=None)
args = p.parse_args()

dist.init_process_group("gloo")
torch.set_num_threads(1)
loaded = rf.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
data, idx = load_splits("digits", transform=loaded.preprocess, seed=0)["train"]
idx = idx[: args.images]
loader = shard_loader(data.dataset, idx, args.batch_size, dist.group.WORLD)


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


cache = build_cache(loaded.visual, DiesAfter(loader, args.die_after), args.out, progress=False,
                    source={"images": args.images, "batch_size": args.batch_size}, process_group=dist.group.WORLD)
if args.fit:
    import json

    from safetensors.torch import save_file

    from residual_fast.cache import fit_bases_from_cache
    from residual_fast.classifiers import prototype_head
    from residual_fast.train import fit_method

    split = cache.load()
    bases = fit_bases_from_cache(cache, loaded.visual, progress=False, process_group=dist.group.WORLD)
    head = prototype_head(split.output, split.labels, 10)
    module, result = fit_method("fine", split, split, head, bases=bases, epochs=3, progress=False,
                                process_group=dist.group.WORLD)
    if dist.get_rank() == 0:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items() if "lam" in k},
                  args.fit + ".safetensors")
        with open(args.fit + ".json", "w") as f:
            json.dump(result.to_dict(), f)
dist.destroy_process_group()
