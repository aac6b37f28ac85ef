"""``python -m residual_fast.info``: versions and which kernel backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .ops.backends import cuda_status, interpreting, triton_status


def report() -> str:
    lines = [
        f"residual_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        "",
        "backends:",
        "  torch   available: reference and CPU path (any device)",
    ]
    ok, why = triton_status()
    lines.append(f"  triton  {'available' if ok else 'missing'}: {why}")
    ok, why = cuda_status()
    lines.append(f"  cuda    {'available' if ok else 'missing'}: {why}")
    try:
        import open_clip

        lines.append(f"\nopen_clip {open_clip.__version__}")
    except ImportError:
        lines.append("\nopen_clip not installed (pip install open_clip_torch)")
    if interpreting():
        lines.append("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m residual_fast.info", description=__doc__)
    ap.add_argument("--codegen", action="store_true",
                    help="compile every Triton and CUDA kernel for sm_90 (no GPU needed) and report tensor-core "
                         "instructions, registers, spills and shared memory; exit 1 on any problem")
    args = ap.parse_args(argv)
    if args.codegen:
        from .codegen import run

        raise SystemExit(run())
    print(report())


if __name__ == "__main__":
    main()
