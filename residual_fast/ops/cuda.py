"""The CUDA C++ extension: the built ``residual_fast._C``, or a JIT build of ``csrc/``."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("spectral_reweight.cu", "readout.cu", "bindings.cpp")
HEADERS = ("common.cuh", "gemm.cuh")
NVCC_FLAGS = ["-O3", "-std=c++17"]  # as setup.py; no --use_fast_math (the 3xTF32 split needs exact fp32 subtraction)


def _load_prebuilt():
    from residual_fast import _C  # built by setup.py when a CUDA toolchain was present

    return _C


def jit_build(verbose: bool = False, build_directory: str | None = None):
    """Compile ``csrc/`` with torch's extension machinery (needs nvcc and a CUDA torch)."""
    from torch.utils.cpp_extension import load

    missing = [s for s in SOURCES + HEADERS if not (CSRC / s).is_file()]
    if missing:
        raise FileNotFoundError(f"CUDA sources not found in {CSRC}: {missing} (an installed wheel has no csrc/)")
    return load(
        name="residual_fast_cuda",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(CSRC)],
        build_directory=build_directory,
        verbose=verbose,
    )


@functools.cache
def _extension():
    errors = []
    try:
        return _load_prebuilt(), "prebuilt residual_fast._C"
    except ImportError as e:
        errors.append(f"no prebuilt residual_fast._C ({e})")
    if os.environ.get("RESIDUAL_FAST_NO_JIT") == "1":
        errors.append("JIT build disabled by RESIDUAL_FAST_NO_JIT=1")
        return None, "; ".join(errors)
    if not torch.cuda.is_available():
        errors.append("no CUDA device, so no JIT build")
        return None, "; ".join(errors)
    try:
        return jit_build(), "JIT-compiled from csrc/"
    except Exception as e:  # noqa: BLE001 - surface any build failure as the reason
        errors.append(f"JIT build of csrc/ failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None, "; ".join(errors)


def extension_status() -> tuple[bool, str]:
    ext, why = _extension()
    if ext is not None and not torch.cuda.is_available():
        return False, f"{why} is importable but there is no CUDA device"
    return ext is not None, why


def load_extension():
    ext, why = _extension()
    if ext is None:
        raise RuntimeError(f"the CUDA extension is unavailable: {why}")
    return ext
