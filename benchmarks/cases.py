"""The three inference paths timed by the benchmarks, built once for a model.

* ``plain``: the model's own forward, ``visual(x)``;
* ``fused``: :class:`residual_fast.ResiDualVisual` (one pass, folded readout);
* ``eager``: the reference path, the exact decomposition materializing every
  unit's contribution (n, U, D) followed by DESIGN.md section 3's einsums
  (:func:`residual_fast.ops.residual_reference`), as the paper's code does.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
from open_clip.transformer import VisionTransformer

import residual_fast as rf
from residual_fast.ops import residual_reference

SMALL = dict(image_size=64, patch_size=8, width=256, layers=6, heads=8, mlp_ratio=4.0, output_dim=256)
MODELS = ("small", "ViT-B-16")


def build_visual(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "small":
        v = VisionTransformer(**SMALL)
    else:
        v = open_clip.create_model(name, pretrained=None).visual
    return v.eval().to(device=device, dtype=dtype)


def images(visual: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = visual.image_size
    p = next(visual.parameters())
    return torch.randn(n, 3, h, w, generator=g).to(device=p.device, dtype=p.dtype)


def build_paths(visual: torch.nn.Module, variant: str, batch: int, calib_batch: int = 8, calib_batches: int = 2
                ) -> tuple[dict[str, Callable[[], torch.Tensor]], rf.ResiDual]:
    units = ("head", "mlp") if variant == "full" else ("head",)
    bases = rf.fit_bases(visual, [images(visual, calib_batch, seed=s + 1) for s in range(calib_batches)],
                         units=units, progress=False)
    adapter = rf.ResiDual.from_bases(bases, variant)
    fused = rf.ResiDualVisual(visual, adapter)
    x = images(visual, batch)

    def eager() -> torch.Tensor:
        dec = rf.decompose(visual, x)
        return residual_reference(adapter, dec.contributions, dec.output)

    paths = {"plain": lambda: visual(x), "fused": lambda: fused(x), "eager": eager}
    with torch.no_grad():
        paths["fused"]()  # fold the lambdas once, as a deployed encoder does
    return paths, adapter
