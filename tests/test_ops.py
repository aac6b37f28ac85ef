"""spectral_reweight and the fused readout: every available backend against the reference."""

import os
import shutil

import pytest
import torch

import residual_fast as rf
from residual_fast.ops import residual_reference, spectral_reweight, spectral_reweight_reference
from residual_fast.ops.backends import cuda_status, triton_status
from residual_fast.ops.readout import readout, readout_torch
from residual_fast.ops.spectral_reweight import _spectral_reweight_op

HAS_CUDA = torch.cuda.is_available()
KERNEL_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1])),
    pytest.param("cuda", marks=pytest.mark.skipif(not (HAS_CUDA and cuda_status()[0]),
                                                  reason="CUDA kernels need a GPU: " + cuda_status()[1])),
]
BACKENDS = [pytest.param("torch")] + KERNEL_BACKENDS
DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(n, ks, q, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    ks = torch.tensor(ks)
    offsets = torch.zeros(len(ks) + 1, dtype=torch.long)
    offsets[1:] = ks.cumsum(0)
    K = int(offsets[-1])
    Z = torch.randn(n, len(ks), q, generator=g)
    R = torch.randn(K, q, generator=g) / q**0.5
    t = torch.randn(K, generator=g)
    lam = torch.randn(K, generator=g) + 1
    B = torch.randn(K, D, generator=g) / D**0.5
    return [x.to(device=device, dtype=dtype) for x in (Z, R, t, lam, B)] + [offsets.to(device)]


def backend_device(backend):
    return "cuda" if backend == "cuda" else DEVICE


SHAPES = [  # (n, k per unit, q, D): odd n, k varying per unit (and 0), hd+2 = 66, D in 512/768/1024
    (1, [5], 18, 512),
    (37, [3, 0, 7, 30, 1], 66, 768),
    (70, [30, 29, 2, 66], 66, 1024),
    (130, [1, 17, 33], 34, 512),
    (33, [8, 8, 8], 18, 512),  # equal k_u: the packed layout is used as a padded view
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-U{len(s[1])}-q{s[2]}-D{s[3]}")
def test_forward_and_gradients_match_reference(backend, shape):
    n, ks, q, D = shape
    Z, R, t, lam, B, off = make_inputs(n, ks, q, D, device=backend_device(backend))
    Z.requires_grad_(True)
    lam.requires_grad_(True)
    ref = spectral_reweight_reference(Z, R, t, lam, B, off)
    g = torch.randn_like(ref)
    dz_ref, dl_ref = torch.autograd.grad(ref, (Z, lam), g)
    y = spectral_reweight(Z, R, t, lam, B, off, backend=backend)
    dz, dl = torch.autograd.grad(y, (Z, lam), g)
    scale = ref.abs().max()
    assert (y - ref).abs().max() <= 1e-5 * scale
    assert (dz - dz_ref).abs().max() <= 1e-5 * dz_ref.abs().max()
    assert (dl - dl_ref).abs().max() <= 1e-5 * dl_ref.abs().max()


@pytest.mark.parametrize("ks", [[2, 0, 3], [3, 3]])
def test_gradcheck_float64_torch_path(ks):
    Z, R, t, lam, B, off = make_inputs(6, ks, 5, 7, dtype=torch.float64, device="cpu")
    Z.requires_grad_(True)
    lam.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, l: spectral_reweight(z, R, t, l, B, off, backend="torch"), (Z, lam))
    assert torch.autograd.gradgradcheck is not None  # second order is not provided (not needed for training)


def test_opcheck():
    Z, R, t, lam, B, off = make_inputs(9, [2, 4, 1], 6, 8, device="cpu")
    Z.requires_grad_(True)
    lam.requires_grad_(True)
    torch.library.opcheck(_spectral_reweight_op, (Z, R, t, lam, B, off, "torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_backward_op(backend):
    """The backward op's fake impl promises the real layout (inductor asserts it), also for a strided Z."""
    from residual_fast.ops.spectral_reweight import _spectral_reweight_backward_op

    Z, R, t, lam, B, off = make_inputs(9, [2, 4, 1], 6, 8, device="cpu")
    grad = torch.randn(9, 8)
    Zt = Z.transpose(0, 1).contiguous().transpose(0, 1)  # (n, U, q) with non-standard strides
    for z in (Z, Zt):
        torch.library.opcheck(_spectral_reweight_backward_op, (grad, z, R, t, lam, B, off, backend),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_sweep_flash_attention_criterion(backend, dtype):
    """Error vs a float64 reference at most 2x the eager same-dtype error (forward and gradients)."""
    inputs = make_inputs(45, [7, 30, 0, 12], 66, 512, device=backend_device(backend))
    off = inputs[-1]
    exact = [x.double().requires_grad_(i in (0, 3)) for i, x in enumerate(inputs[:-1])]
    low = [x.to(dtype).requires_grad_(i in (0, 3)) for i, x in enumerate(inputs[:-1])]
    low_eager = [x.to(dtype).requires_grad_(i in (0, 3)) for i, x in enumerate(inputs[:-1])]
    y64 = spectral_reweight_reference(*exact, off)
    g = torch.randn_like(y64)
    d64 = torch.autograd.grad(y64, (exact[0], exact[3]), g)
    ye = spectral_reweight_reference(*low_eager, off)
    de = torch.autograd.grad(ye, (low_eager[0], low_eager[3]), g.to(dtype))
    yk = spectral_reweight(*low, off, backend=backend)
    dk = torch.autograd.grad(yk, (low[0], low[3]), g.to(dtype))

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert yk.dtype == dtype
    assert err(yk, y64) <= 2 * err(ye, y64) + 1e-6
    for a, e, ref in zip(dk, de, d64, strict=True):
        assert err(a, ref) <= 2 * err(e, ref) + 1e-6


def test_backend_choice_and_errors(monkeypatch):
    Z, R, t, lam, B, off = make_inputs(3, [2], 4, 5, device="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        spectral_reweight(Z, R, t, lam, B, off, backend="fast")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            spectral_reweight(Z, R, t, lam, B, off, backend="cuda")
    monkeypatch.setenv("RESIDUAL_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="RESIDUAL_FAST_BACKEND"):
        spectral_reweight(Z, R, t, lam, B, off)
    monkeypatch.setenv("RESIDUAL_FAST_BACKEND", "torch")
    assert torch.allclose(spectral_reweight(Z, R, t, lam, B, off), spectral_reweight_reference(Z, R, t, lam, B, off),
                          atol=1e-5)
    with pytest.raises(ValueError, match="offsets"):
        spectral_reweight(Z, R, t, lam, B, off[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        spectral_reweight(Z, R[:, :2], t, lam, B, off)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("final", [False, True])
def test_readout_kernel(backend, final):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(0)
    n, T, W, D = 19, 5, 96, 80
    tokens = torch.randn(n, T, W, generator=g).to(dev)
    r = tokens[:, 0]  # strided, as in the fused encoder
    M = torch.randn(W, D, generator=g).to(dev)
    acc0 = torch.randn(n, D, generator=g).to(dev)
    epi = None
    if final:
        epi = {"s": torch.rand(n, generator=g).to(dev) + 0.5, "mu": torch.randn(n, generator=g).to(dev),
               "v1": torch.randn(D, generator=g).to(dev), "v2": torch.randn(D, generator=g).to(dev),
               "c": torch.randn(D, generator=g).to(dev), "out": torch.randn(n, D, generator=g).to(dev),
               "dtype": torch.float32}
    acc_ref, acc = acc0.clone(), acc0.clone()
    ref = readout_torch(acc_ref, r, M, epi)
    got = readout(acc, r, M, epi, backend=backend)
    if final:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    else:
        assert got is None and torch.allclose(acc, acc_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_residual_paths_with_kernels(backend, small, calib):
    from conftest import images_for

    if backend == "cuda":
        pytest.skip("end-to-end CUDA runs in the GPU benchmark script")
    bases = rf.fit_bases(small, [calib], units=("head", "mlp"), progress=False)
    x = images_for(small, 7, seed=3)
    dec = rf.decompose(small, x)
    for variant in ("fine", "full"):
        adapter = rf.ResiDual.from_bases(bases, variant)
        ref = residual_reference(adapter, dec.contributions, dec.output)
        adapter.backend = backend
        with torch.no_grad():
            fac = adapter(dec.activations)
            fused = rf.ResiDualVisual(small, adapter, backend=backend)(x)
        assert (fac - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (fused - ref).abs().max() <= 1e-5 * ref.abs().max()


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


@pytest.mark.skipif(_cuda_home() is None or torch.version.cuda is None,
                    reason="needs the CUDA toolkit (CUDA_HOME) and a CUDA build of torch")
def test_cuda_sources_compile_and_link(tmp_path):
    """Catches compile errors in csrc/ on machines without a GPU (the kernels run only with one)."""
    if shutil.which("ninja") is None:
        pytest.importorskip("ninja")
    from residual_fast.ops.cuda import jit_build

    ext = jit_build(build_directory=str(tmp_path))
    for name in ("spectral_reweight_forward", "spectral_reweight_backward", "readout"):
        assert hasattr(ext, name)


def test_info_reports_every_backend():
    from residual_fast.info import report

    text = report()
    for word in ("torch", "triton", "cuda"):
        assert f"  {word}" in text
    if not HAS_CUDA:
        assert "no CUDA device" in text
