"""Which implementation runs an op: availability, the reason when missing, and the choice.

``backend="auto"`` follows :data:`AUTO_ORDER`: a kernel backend enters it only
once a GPU measurement (BENCHMARKS.md, "Kernel backends") shows it faster than
the torch path for that op; until then ``auto`` is torch (cuBLAS on a GPU) on
every device. ``RESIDUAL_FAST_BACKEND`` (``torch``, ``triton``, ``cuda``)
overrides ``auto`` everywhere. Triton on CPU tensors runs only under
``TRITON_INTERPRET=1`` (the tests use it).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV = "RESIDUAL_FAST_BACKEND"

# What ``auto`` tries on CUDA tensors, per op, fastest first (torch is always the last resort).
#
#   op        measured on               triton vs torch   cuda vs torch   source
#   reweight  not measured (no GPU yet)  --                --              BENCHMARKS.md "Kernel backends"
#   readout   not measured (no GPU yet)  --                --              BENCHMARKS.md "Kernel backends"
#
# Add a backend here only with the measurement (benchmarks/gpu_check.sh) that shows it faster.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"reweight": (), "readout": ()}


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(available, why not)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report any import failure
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if interpreting():
        return True, "interpreter (TRITON_INTERPRET=1): runs on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_status() -> tuple[bool, str]:
    from .cuda import extension_status

    return extension_status()


def choose(requested: str, device: torch.device, op: str = "reweight") -> str:
    """Resolve ``requested`` for ``op`` on ``device``; raise a clear error if it cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested == "auto":
        requested = os.environ.get(ENV, "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"{ENV}={requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda":
            status = {"cuda": cuda_status, "triton": triton_status}
            for kind in AUTO_ORDER.get(op, ()):
                if status[kind]()[0]:
                    return kind
        return "torch"
    if requested == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend 'triton' is unavailable: {why}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if requested == "cuda":
        ok, why = cuda_status()
        if not ok:
            raise RuntimeError(f"backend 'cuda' is unavailable: {why}")
        if device.type != "cuda":
            raise RuntimeError("backend 'cuda' needs CUDA tensors")
    return requested
