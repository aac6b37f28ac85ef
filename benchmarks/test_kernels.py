"""pytest-benchmark cases for spectral_reweight fwd+bwd (``pytest benchmarks --benchmark-only``)."""

import pytest
import torch
from run_kernels import make, step

from residual_fast.ops import spectral_reweight, spectral_reweight_reference
from residual_fast.ops.backends import cuda_status, triton_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["eager", "torch"] + (["triton"] if DEVICE == "cuda" and triton_status()[0] else []) + (
    ["cuda"] if DEVICE == "cuda" and cuda_status()[0] else [])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [64, 256])
def test_spectral_reweight_fwd_bwd(benchmark, n, path):
    torch.set_num_threads(2)
    inputs = make(n, DEVICE, torch.float32)
    fn = spectral_reweight_reference if path == "eager" else (lambda *a: spectral_reweight(*a, backend=path))

    def run():
        step(fn, inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"spectral_reweight-n{n}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
