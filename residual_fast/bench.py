"""The three inference paths the benchmarks and ``residual-fast bench`` time, built once for a model.

* ``plain``: the model's own forward, ``visual(x)``;
* ``fused``: :class:`residual_fast.ResiDualVisual` (one pass, folded readout);
* ``eager``: the reference path, the exact decomposition materializing every
  unit's contribution (n, U, D) followed by DESIGN.md section 3's einsums
  (:func:`residual_fast.ops.residual_reference`), as the paper's code does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .decompose import decompose
from .fused import ResiDualVisual
from .ops import residual_reference
from .profiling import LiveBytes
from .residual import ResiDual
from .spectral import fit_bases

SMALL = dict(image_size=64, patch_size=8, width=256, layers=6, heads=8, mlp_ratio=4.0, output_dim=256)


def build_visual(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "small":
        from open_clip.transformer import VisionTransformer

        v = VisionTransformer(**SMALL)
    else:
        import open_clip

        v = open_clip.create_model(name, pretrained=None).visual
    return v.eval().to(device=device, dtype=dtype)


def images(visual: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = visual.image_size
    p = next(visual.parameters())
    return torch.randn(n, 3, h, w, generator=g).to(device=p.device, dtype=p.dtype)


def build_paths(visual: torch.nn.Module, variant: str, batch: int, calib_batch: int = 8, calib_batches: int = 2
                ) -> tuple[dict[str, Callable[[], torch.Tensor]], ResiDual]:
    units = ("head", "mlp") if variant == "full" else ("head",)
    bases = fit_bases(visual, [images(visual, calib_batch, seed=s + 1) for s in range(calib_batches)],
                      units=units, progress=False)
    adapter = ResiDual.from_bases(bases, variant)
    fused = ResiDualVisual(visual, adapter)
    x = images(visual, batch)

    def eager() -> torch.Tensor:
        dec = decompose(visual, x)
        return residual_reference(adapter, dec.contributions, dec.output)

    paths = {"plain": lambda: visual(x), "fused": lambda: fused(x), "eager": eager}
    with torch.no_grad():
        paths["fused"]()  # fold the lambdas once, as a deployed encoder does
    return paths, adapter


def peak_bytes(fn: Callable, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes() as lb:
        fn()
    return lb.peak


def timed(fn: Callable, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: str, variant: str, batch: int, rounds: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> list[dict]:
    """Interleaved rounds of the three paths; per-round ratios to plain, medians reported."""
    visual = build_visual(model, device, dtype)
    paths, adapter = build_paths(visual, variant, batch)
    rows = {name: {"times": [], "ratios": []} for name in paths}
    with torch.no_grad():
        for fn in paths.values():  # warm-up
            fn()
        for _ in range(rounds):
            t = {name: timed(fn, device) for name, fn in paths.items()}
            for name in paths:
                rows[name]["times"].append(t[name])
                rows[name]["ratios"].append(t[name] / t["plain"])
        peaks = {name: peak_bytes(fn, device) for name, fn in paths.items()}
    out = []
    for name, r in rows.items():
        out.append({
            "model": model, "variant": variant, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "params": adapter.num_parameters(), "path": name,
            "median_s": statistics.median(r["times"]), "time_ratio": statistics.median(r["ratios"]),
            "peak_mib": peaks[name] / 2**20, "mem_ratio": peaks[name] / max(peaks["plain"], 1),
        })
    return out
