"""Build script.

The package installs as pure Python. CUDA kernels under ``csrc/`` are built as
an extension when a CUDA toolchain, a CUDA build of torch and a GPU are present
(``RESIDUAL_FAST_FORCE_CUDA=1`` forces the build, ``RESIDUAL_FAST_SKIP_CUDA=1``
skips it). Install with ``pip install --no-build-isolation`` so the build uses
the torch already installed.
"""

import glob
import os

from setuptools import setup

# the flags of residual_fast/ops/cuda.py's JIT build: one numerical behaviour whichever way it is built
# (no --use_fast_math: it would change the 3xTF32 split and the epilogue divisions)
NVCC_FLAGS = ["-O3", "-std=c++17"]


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if os.environ.get("RESIDUAL_FAST_SKIP_CUDA") == "1" or not sources:
        return [], {}
    force = os.environ.get("RESIDUAL_FAST_FORCE_CUDA") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            raise
        return [], {}
    # without a visible GPU (and no force) stay pure Python: the kernels are JIT-built on first use
    if not force and (CUDA_HOME is None or torch.version.cuda is None or not torch.cuda.is_available()):
        return [], {}
    ext = CUDAExtension(
        name="residual_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
