"""The three inference paths the benchmarks and ``residual-fast bench`` time, built once for a model.

* ``plain``: the model's own forward, ``visual(x)``;
* ``merged``: :meth:`residual_fast.ResiDualVisual.merge` (one pass, lean readout, frozen);
* ``fused``: :class:`residual_fast.ResiDualVisual` (the same pass; keeps the trainable adapter);
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
from .models import get_adapter
from .ops import residual_reference
from .profiling import LiveBytes, persistent_extra_bytes, weight_bytes
from .residual import ResiDual
from .spectral import SpectralBases, UnitMoments, fit_bases

SMALL = dict(image_size=64, patch_size=8, width=256, layers=6, heads=8, mlp_ratio=4.0, output_dim=256)


def build_visual(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "small":
        from open_clip.transformer import VisionTransformer

        v = VisionTransformer(**SMALL)
    elif name.startswith(("open_clip:", "hf:", "timm:")):
        from .loading import load

        v = load(name, pretrained=False).visual
    else:
        import open_clip

        if name not in open_clip.list_models():
            raise ValueError(f"unknown model {name!r}: use 'small', an open_clip name (open_clip.list_models()) "
                             "or a timm: name")
        v = open_clip.create_model(name, pretrained=None).visual
    return v.eval().to(device=device, dtype=dtype)


def images(visual: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = visual.image_size
    p = next(visual.parameters())
    return torch.randn(n, 3, h, w, generator=g).to(device=p.device, dtype=p.dtype)


def full_rank_bases(visual: torch.nn.Module, units=("head",), count: int = 5000, seed: int = 0) -> SpectralBases:
    """Bases from moments with a full-rank covariance of every unit's small vector ``z_u``.

    The ranks real data gives (every head at ``hd + 2`` minus zero rows, every MLP
    at ``D``) without streaming thousands of images through a ViT on a CPU; the
    means and covariances are random, so the EVR profile is not a real model's.
    """
    spec = get_adapter(visual).spec()
    m = UnitMoments(spec, units)
    g = torch.Generator().manual_seed(seed)
    for mom in m.moments.values():
        U, q = mom.mean.shape
        mom.count = count
        mom.mean = torch.randn(U, q, generator=g, dtype=torch.float64)
        if mom.m2 is not None:
            G = torch.randn(U, q, q, generator=g, dtype=torch.float64)
            mom.m2 = G @ G.transpose(1, 2) * (count - 1) / q
    return m.bases()


def build_paths(visual: torch.nn.Module, variant: str, batch: int, calib_batch: int = 8, calib_batches: int = 2,
                full_rank: bool = True) -> tuple[dict[str, Callable[[], torch.Tensor]], ResiDual, dict]:
    """The paths, the adapter, and the modules whose memory at rest is reported."""
    units = ("head", "mlp") if variant == "full" else ("head",)
    if full_rank:
        bases = full_rank_bases(visual, units)
    else:
        bases = fit_bases(visual, [images(visual, calib_batch, seed=s + 1) for s in range(calib_batches)],
                          units=units, progress=False)
    p = next(visual.parameters())
    adapter = ResiDual.from_bases(bases, variant).to(p.device)
    fused = ResiDualVisual(visual, adapter)
    merged = fused.merge()
    x = images(visual, batch)

    def eager() -> torch.Tensor:
        dec = decompose(visual, x)
        return residual_reference(adapter, dec.contributions, dec.output)

    paths = {"plain": lambda: visual(x), "merged": lambda: merged(x), "fused": lambda: fused(x), "eager": eager}
    with torch.no_grad():
        paths["fused"]()  # fold the lambdas once, as a deployed encoder does
    return paths, adapter, {"merged": merged, "fused": fused, "eager": adapter}


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
            dtype: torch.dtype = torch.float32, full_rank: bool = True) -> list[dict]:
    """Interleaved rounds of every path; per-round ratios to plain, medians reported.

    ``at_rest_mib``: tensor bytes a path keeps alive between calls beyond the
    model's own (buffers, caches, the adapter; see
    :func:`residual_fast.profiling.persistent_extra_bytes`), ``at_rest_frac`` as a
    fraction of the model's weight bytes.
    """
    visual = build_visual(model, device, dtype)
    paths, adapter, holders = build_paths(visual, variant, batch, full_rank=full_rank)
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
    weights = weight_bytes(visual)
    rest = {name: persistent_extra_bytes(h, visual) for name, h in holders.items()}
    rest["plain"] = 0
    out = []
    for name, r in rows.items():
        out.append({
            "model": model, "variant": variant, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "params": adapter.num_parameters(), "path": name,
            "median_s": statistics.median(r["times"]), "time_ratio": statistics.median(r["ratios"]),
            "peak_mib": peaks[name] / 2**20, "mem_ratio": peaks[name] / max(peaks["plain"], 1),
            "at_rest_mib": rest[name] / 2**20, "at_rest_frac": rest[name] / weights,
        })
    return out


def rss_peak_of_call(model: str, variant: str, batch: int, path: str) -> dict:
    """Cross-check of the live-bytes peak against the process's own peak RSS, in a fresh subprocess.

    glibc with a fixed ``MALLOC_MMAP_THRESHOLD_`` hands large blocks back to the
    OS, so after ``5 > /proc/self/clear_refs`` ``VmHWM`` restarts at the current
    RSS and its growth over one call is that call's true peak (Linux only).
    """
    import json
    import os
    import subprocess
    import sys

    code = f"""
import json, torch
torch.set_num_threads({torch.get_num_threads()})
from residual_fast.bench import build_visual, build_paths, peak_bytes
v = build_visual({model!r})
paths, _, _ = build_paths(v, {variant!r}, {batch})
fn = paths[{path!r}]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
with torch.no_grad():
    fn(); fn()
    open("/proc/self/clear_refs", "w").write("5")
    base = hwm()
    fn()
    rss = hwm() - base
    live = peak_bytes(fn, "cpu")
print(json.dumps({{"rss_peak": rss, "live_peak": live}}))
"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
