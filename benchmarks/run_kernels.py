"""spectral_reweight forward+backward (one training step): each backend against torch and the eager reference.

    .venv/bin/python benchmarks/run_kernels.py [--device cpu|cuda] [--ns 64 256 1024] [--dtypes float32 bfloat16]
        [--grad-z] [--out DIR]

Shapes are ViT-L/14's heads: U = 384 units, q = hd + 2 = 66, about 30
components per unit (20..40, seeded), D = 768. A step is the forward and the
backward for ``lam`` (``Z`` is cached data; ``--grad-z`` also asks for dZ).
Paths: ``eager`` (the einsum reference), each backend through
``spectral_reweight`` (coefficients recomputed per step), and ``<backend>+c``
through ``reweight`` on precomputed coefficients (the training form of
DESIGN.md section 5). They run interleaved in one process; each round's time
is divided by that round's eager and torch times and the medians are
reported. The op is compute-bound, so the figures are TFLOP/s (GEMM FLOPs:
4 n K D for the re-weighting, + 2 n K q for the coefficients, x 1.5 with dZ)
and the fraction of the tensor-core peak of the dtype (``--peak-tflops``:
bf16/fp16 dense; fp32 runs as 3xTF32, so its peak is the TF32 peak / 3).
Writes a markdown table (stdout and ``DIR/kernels_<device>.md``) and a plot.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from residual_fast.ops import coefficients, reweight, spectral_reweight, spectral_reweight_reference
from residual_fast.ops.backends import cuda_status, triton_status

U, Q, D = 384, 66, 768


def make(n: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(20, 41, (U,), generator=g)
    off = torch.zeros(U + 1, dtype=torch.long)
    off[1:] = ks.cumsum(0)
    K = int(off[-1])
    Z = torch.randn(n, U, Q, generator=g)
    R = torch.randn(K, Q, generator=g) / Q**0.5
    t = torch.randn(K, generator=g)
    lam = torch.randn(K, generator=g) + 1
    B = torch.randn(K, D, generator=g) / D**0.5
    return [x.to(device=device, dtype=dtype) for x in (Z, R, t, lam, B)] + [off.to(device)]


def step(fn, inputs, grad_z: bool = False):
    Z, R, t, lam, B, off = inputs
    Z = Z.detach().requires_grad_(grad_z)
    lam = lam.detach().requires_grad_(True)
    y = fn(Z, R, t, lam, B, off)
    y.backward(torch.ones_like(y))
    return y


def step_cached(backend: str, c, lam, B, dtype):
    lam = lam.detach().requires_grad_(True)
    y = reweight(c, lam, B, out_dtype=dtype, backend=backend)
    y.backward(torch.ones_like(y))
    return y


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paths(inputs, c, dtype, backends, grad_z) -> dict:
    """name -> a no-argument step: eager, each backend, and each backend on cached coefficients."""
    _, _, _, lam, B, _ = inputs
    fns = {"eager": functools.partial(step, spectral_reweight_reference, inputs, grad_z)}
    for b in backends:
        fns[b] = functools.partial(step, functools.partial(spectral_reweight, backend=b), inputs, grad_z)
        if not grad_z:
            fns[b + "+c"] = functools.partial(step_cached, b, c, lam, B, dtype)
    return fns


# dense tensor-core peaks of an H200 (TFLOP/s): the roofline of the fraction column
PEAK_TFLOPS = {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0 / 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(PEAK_TFLOPS))
    ap.add_argument("--grad-z", action="store_true", help="also compute dZ (the cached-data training does not)")
    ap.add_argument("--peak-tflops", type=float, nargs=2, default=None, metavar=("HALF", "FP32"),
                    help="tensor-core peaks for bf16/fp16 and for fp32-as-3xTF32 (default: an H200's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = dict(PEAK_TFLOPS)
    if args.peak_tflops:
        peaks.update(bfloat16=args.peak_tflops[0], float16=args.peak_tflops[0], float32=args.peak_tflops[1])
    backends = ["torch"]
    if args.device == "cuda":
        backends += [b for b, ok in (("triton", triton_status()[0]), ("cuda", cuda_status()[0])) if ok]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.ns:
            inputs = make(n, args.device, dtype)
            Z, R, t, lam, B, off = inputs
            c = coefficients(Z, R, t, off).detach()
            K = R.shape[0]
            flops = 4 * n * K * D + 2 * n * K * Q
            if args.grad_z:
                flops += 2 * n * K * D + 2 * n * K * Q
            fns = paths(inputs, c, dtype, backends, args.grad_z)
            for fn in fns.values():
                fn()  # warm-up / autotune / compile
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(timed(fn, args.device))
            for k in fns:
                med = statistics.median(times[k])
                fl = flops - (2 * n * K * Q if k.endswith("+c") else 0)
                rows.append({
                    "dtype": dtype_name, "n": n, "path": k, "median_ms": 1e3 * med, "tflops": fl / med / 1e12,
                    "roofline": fl / med / 1e12 / peaks[dtype_name],
                    "vs_eager": statistics.median(e / x for e, x in zip(times["eager"], times[k], strict=True)),
                    "vs_torch": statistics.median(e / x for e, x in zip(times["torch"], times[k], strict=True)),
                })
            print(f"{dtype_name} n={n} done", flush=True)
    head = (f"spectral_reweight step (fwd + bwd for lam{' and Z' if args.grad_z else ''}), U={U}, q={Q}, "
            f"k~U(20,40), D={D}, device {args.device} "
            f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{args.threads} threads'}), "
            f"torch {torch.__version__}, {args.rounds} rounds; roofline = tensor-core peak of the dtype "
            f"(bf16/fp16 {peaks['bfloat16']:.0f}, fp32 as 3xTF32 {peaks['float32']:.0f} TFLOP/s)\n\n")
    table = ("| dtype | n | path | median step (ms) | TFLOP/s | % of TC roofline | vs torch | vs eager |\n"
             "|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        table += (f"| {r['dtype']} | {r['n']} | {r['path']} | {r['median_ms']:.3f} | {r['tflops']:.3g} | "
                  f"{100 * r['roofline']:.2g} | {r['vs_torch']:.2f}x | {r['vs_eager']:.2f}x |\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{args.device}.md").write_text(head + table)
    print(head + table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for dt in args.dtypes:
            for k in sorted({r["path"] for r in rows}):
                pts = [(r["n"], r["median_ms"]) for r in rows if r["path"] == k and r["dtype"] == dt]
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{k} {dt}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (samples)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"spectral_reweight, ViT-L/14 head shapes, {args.device}")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"kernels_{args.device}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
