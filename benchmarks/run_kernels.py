"""spectral_reweight forward+backward: each backend against the eager einsum reference.

    .venv/bin/python benchmarks/run_kernels.py [--device cpu|cuda] [--ns 64 256 1024] [--out DIR]

Shapes are ViT-L/14's heads: U = 384 units, q = hd + 2 = 66, about 30
components per unit (20..40, seeded), D = 768. Backends run interleaved in one
process; each round's time is divided by that round's eager time and the
median ratio is reported. On CUDA the achieved bandwidth of the forward is
reported against the bytes it must move (Z, the packed R, t, lam, B, y), next
to the device's peak when known. Writes a markdown table (stdout and
``DIR/kernels.md``) and a plot ``DIR/kernels.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from residual_fast.ops import spectral_reweight, spectral_reweight_reference
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


def step(fn, inputs):
    Z, R, t, lam, B, off = inputs
    Z = Z.detach().requires_grad_(True)
    lam = lam.detach().requires_grad_(True)
    y = fn(Z, R, t, lam, B, off)
    y.backward(torch.ones_like(y))
    return y


def timed(fn, inputs, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(fn, inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_bytes(inputs) -> int:
    Z, R, t, lam, B, _ = inputs
    return sum(x.numel() * x.element_size() for x in (Z, R, t, lam, B)) + Z.shape[0] * D * Z.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth for the roofline")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = ["torch"]
    if args.device == "cuda":
        if triton_status()[0]:
            backends.append("triton")
        if cuda_status()[0]:
            backends.append("cuda")
    fns = {"eager": spectral_reweight_reference}
    for b in backends:
        fns[b] = lambda *a, _b=b: spectral_reweight(*a, backend=_b)
    rows = []
    for n in args.ns:
        inputs = make(n, args.device, dtype)
        for fn in fns.values():
            step(fn, inputs)  # warm-up / compile
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(timed(fn, inputs, args.device))
        fwd_gbs = {}
        if args.device == "cuda":
            for k, fn in fns.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    fn(*inputs)
                torch.cuda.synchronize()
                fwd_gbs[k] = forward_bytes(inputs) * 10 / (time.perf_counter() - start) / 1e9
        for k in fns:
            ratio = statistics.median(te / tk for te, tk in zip(times["eager"], times[k], strict=True))
            rows.append({"n": n, "path": k, "median_ms": 1e3 * statistics.median(times[k]),
                         "speedup_vs_eager": ratio, "fwd_gbs": fwd_gbs.get(k)})
        print(f"n={n} done", flush=True)
    head = (f"spectral_reweight fwd+bwd, U={U}, q={Q}, k~U(20,40), D={D}, {args.dtype}, device {args.device} "
            f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{args.threads} threads'}), "
            f"torch {torch.__version__}, {args.rounds} rounds\n\n")
    table = "| n | path | median fwd+bwd (ms) | speed-up vs eager | fwd GB/s |\n|---|---|---|---|---|\n"
    for r in rows:
        gbs = "" if r["fwd_gbs"] is None else f"{r['fwd_gbs']:.0f}"
        if gbs and args.peak_gbs:
            gbs += f" ({100 * r['fwd_gbs'] / args.peak_gbs:.0f}% of {args.peak_gbs:.0f})"
        table += f"| {r['n']} | {r['path']} | {r['median_ms']:.2f} | {r['speedup_vs_eager']:.2f}x | {gbs} |\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{args.device}.md").write_text(head + table)
    print(head + table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k in fns:
            pts = [(r["n"], r["median_ms"]) for r in rows if r["path"] == k]
            ax.plot(*zip(*pts, strict=True), marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (samples)")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.set_title(f"spectral_reweight, ViT-L/14 head shapes, {args.device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"kernels_{args.device}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
