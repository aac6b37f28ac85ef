"""spectral_reweight and the fused readout: every available backend against the reference."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import residual_fast as rf
from residual_fast.ops import coefficients, residual_reference, reweight, spectral_reweight, spectral_reweight_reference
from residual_fast.ops.backends import cuda_status, interpreting, triton_status
from residual_fast.ops.readout import readout, readout_torch
from residual_fast.ops.spectral_reweight import _reweight_backward_op, _reweight_op

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
    _check_against_reference(backend, shape)


def _check_against_reference(backend, shape):
    """Output, dZ and dlam of the op equal the eager reference to 1e-5 of their scale."""
    n, ks, q, D = shape
    Z, R, t, lam, B, off = make_inputs(n, ks, q, D, device=backend_device(backend))
    Z.requires_grad_(True)
    lam.requires_grad_(True)
    ref = spectral_reweight_reference(Z, R, t, lam, B, off)
    g = torch.randn_like(ref)
    dz_ref, dl_ref = torch.autograd.grad(ref, (Z, lam), g)
    y = spectral_reweight(Z, R, t, lam, B, off, backend=backend)
    dz, dl = torch.autograd.grad(y, (Z, lam), g)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (dz - dz_ref).abs().max() <= 1e-5 * dz_ref.abs().max()
    assert (dl - dl_ref).abs().max() <= 1e-5 * dl_ref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, [3, 0, 20], 770, 768), (2, [0, 12], 1026, 1024)],
                         ids=["n1-mlpB-q770", "n2-mlpL-q1026"])
def test_mlp_sized_units(backend, shape):
    """MLP units (q = width + 2) once needed more shared memory than a GPU has; any q is fine now."""
    _check_against_reference(backend, shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed/strided views of every input give the contiguous result (kernels take any strides)."""
    dev = backend_device(backend)
    Z, R, t, lam, B, off = make_inputs(21, [5, 0, 17, 3], 66, 200, device=dev)
    Zs = Z.transpose(0, 1).contiguous().transpose(0, 1)  # (n, U, q) stored unit-major
    Rs = torch.stack([R, R], dim=2)[..., 0]  # column stride 2
    Bs = B.T.contiguous().T  # (K, D) stored column-major
    lams = torch.stack([lam, lam], dim=1)[:, 0]  # stride 2
    for x, y in ((Zs, Z), (Rs, R), (Bs, B), (lams, lam)):
        assert not x.is_contiguous() and torch.equal(x, y)
    lam.requires_grad_(True)
    lams = lams.detach().requires_grad_(True)
    ref = spectral_reweight_reference(Z, R, t, lam, B, off)
    g = torch.randn_like(ref)
    (dl_ref,) = torch.autograd.grad(ref, (lam,), g)
    y = spectral_reweight(Zs, Rs, t, lams, Bs, off, backend=backend)
    (dl,) = torch.autograd.grad(y, (lams,), g.T.contiguous().T)  # a column-major upstream gradient too
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (dl - dl_ref).abs().max() <= 1e-5 * dl_ref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reweight_on_cached_coefficients(backend):
    """The training form: c computed once (here a transposed view), lam trained; dc only when c needs it."""
    dev = backend_device(backend)
    Z, R, t, lam, B, off = make_inputs(13, [4, 9], 18, 96, device=dev)
    c = coefficients(Z, R, t, off).T.contiguous().T
    lam.requires_grad_(True)
    c64, lam64, B64 = c.double(), lam.detach().double().requires_grad_(True), B.double()
    y64 = (c64 * lam64) @ B64
    g = torch.randn_like(y64)
    (dl64,) = torch.autograd.grad(y64, (lam64,), g)
    y = reweight(c, lam, B, backend=backend)
    (dl,) = torch.autograd.grad(y, (lam,), g.float())
    assert (y.double() - y64).abs().max() <= 1e-5 * y64.abs().max()
    assert (dl.double() - dl64).abs().max() <= 1e-5 * dl64.abs().max()
    dc, dlam = _reweight_backward_op(g.float(), c, lam.detach(), B, False, backend)
    assert dc.numel() == 0 and torch.allclose(dlam.double(), dl64, rtol=1e-5, atol=1e-6)
    c64.requires_grad_(True)
    (dc64,) = torch.autograd.grad((c64 * lam64.detach()) @ B64, (c64,), g)
    dc, _ = _reweight_backward_op(g.float(), c, lam.detach(), B, True, backend)
    assert (dc.double() - dc64).abs().max() <= 1e-5 * dc64.abs().max()


@pytest.mark.parametrize("ks", [[2, 0, 3], [3, 3]])
def test_precomputed_layout_gives_the_same_result(ks):
    """The host-side layout (what ResiDual passes to avoid reading GPU offsets) equals reading the offsets."""
    from residual_fast.ops.spectral_reweight import packed_layout

    Z, R, t, lam, B, off = make_inputs(5, ks, 6, 9, device="cpu")
    layout = packed_layout(off)
    assert layout.uniform_k == (3 if ks == [3, 3] else None)
    want = spectral_reweight_reference(Z, R, t, lam, B, off)
    got = spectral_reweight(Z, R, t, lam, B, off, backend="torch", layout=layout)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("ks", [[2, 0, 3], [3, 3]])
def test_gradcheck_float64_torch_path(ks):
    Z, R, t, lam, B, off = make_inputs(6, ks, 5, 7, dtype=torch.float64, device="cpu")
    Z.requires_grad_(True)
    lam.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, l: spectral_reweight(z, R, t, l, B, off, backend="torch"), (Z, lam))
    assert torch.autograd.gradgradcheck is not None  # second order is not provided (not needed for training)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    if backend == "triton" and not triton_status()[0]:
        pytest.skip(triton_status()[1])
    Z, R, t, lam, B, off = make_inputs(9, [2, 4, 1], 6, 8, device=DEVICE if backend == "triton" else "cpu")
    c = coefficients(Z, R, t, off).requires_grad_(True)
    lam.requires_grad_(True)
    torch.library.opcheck(_reweight_op, (c, lam, B, torch.float32, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("need_dc", [True, False])
def test_opcheck_backward_op(backend, need_dc):
    """The backward op's fake impl promises the real layout (inductor asserts it), also for a strided c."""
    if backend == "triton" and not triton_status()[0]:
        pytest.skip(triton_status()[1])
    Z, R, t, lam, B, off = make_inputs(9, [2, 4, 1], 6, 8, device=DEVICE if backend == "triton" else "cpu")
    grad = torch.randn(9, 8, device=Z.device)
    c = coefficients(Z, R, t, off)
    ct = c.T.contiguous().T  # (n, K) with transposed strides
    for cc in (c, ct):
        torch.library.opcheck(_reweight_backward_op, (grad, cc, lam, B, need_dc, backend),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(45, [7, 30, 0, 12], 66, 512), (3, [9, 0, 40], 770, 768)],
                         ids=["heads-q66", "mlp-q770"])
def test_dtype_sweep_flash_attention_criterion(backend, dtype, shape):
    """Error vs a float64 reference at most 2x the eager same-dtype error (forward and gradients)."""
    inputs = make_inputs(*shape, device=backend_device(backend))
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
    acc_ref, acc = acc0.clone(), acc0.T.contiguous().T  # the kernels take a column-major acc too
    if final:
        epi["out"] = epi["out"].T.contiguous().T
    ref = readout_torch(acc_ref, r, M, epi)
    got = readout(acc, r, M, epi, backend=backend)
    if final:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    else:
        assert got is None and torch.allclose(acc, acc_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_residual_paths_with_kernels(backend, small, calib):
    from conftest import images_for

    if backend == "cuda" or not interpreting():
        pytest.skip("end-to-end on CPU tensors (Triton through the interpreter); the GPU benchmark script runs it")
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
    for name in ("reweight_forward", "reweight_backward", "readout"):
        assert hasattr(ext, name)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_env():
    return dict(os.environ, TRITON_INTERPRET="0", CUDA_HOME=_cuda_home() or "/usr/local/cuda")


def test_codegen_gate_fails_on_each_problem():
    """The --codegen exit status is only worth something if every problem it looks for fails a kernel."""
    from residual_fast.codegen import KernelReport, _ptxas_usage

    good = dict(name="k", config="c", tensor_core="wgmma/HGMMA", registers=128, spill_bytes=0, smem_bytes=1024,
                offsets="i64")
    assert KernelReport(**good).problems == []
    for change in ({"tensor_core": "none"}, {"spill_bytes": 8}, {"smem_bytes": 228 * 1024}, {"offsets": "i32+i64"}):
        assert KernelReport(**{**good, **change}).problems, change
    text = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z3fooPf\n"
            "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 96 registers, used 1 barriers, 24064 bytes smem\n")
    assert _ptxas_usage(text) == {"_Z3fooPf": (96, 8, 24064)}


def test_offset_type_reader():
    from residual_fast.codegen import offset_types

    assert offset_types("%a = tt.addptr %p, %o : tensor<64x!tt.ptr<f32>>, tensor<64xi64> loc(#l)") == "i64"
    assert offset_types("%a = tt.addptr %p, %o : !tt.ptr<f32>, i32\n%b = tt.addptr %q, %r : "
                        "tensor<8x1x!tt.ptr<bf16>>, tensor<8x1xi64>") == "i32+i64"


@pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1])
def test_triton_offsets_are_64_bit():
    """Every pointer offset in the sm_90 Triton IR is int64: n * stride passes 2^31 near n = 85k (ViT-L heads).
    Compiled in a subprocess: the interpreter (TRITON_INTERPRET=1 here) cannot compile."""
    pytest.importorskip("triton.backends.nvidia")
    res = subprocess.run([sys.executable, "-m", "residual_fast.codegen", "--offsets"], capture_output=True, text=True,
                         env=_compile_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split("\t") for ln in res.stdout.splitlines()]
    assert {r[0] for r in rows} >= {"reweight_fwd", "reweight_bwd", "reweight_bwd+dc", "readout", "readout+epilogue"}
    assert all(r[2] == "i64" for r in rows), res.stdout


@pytest.mark.skipif(_cuda_home() is None or torch.version.cuda is None,
                    reason="needs the CUDA toolkit (CUDA_HOME) and a CUDA build of torch")
def test_codegen_cli_every_kernel_on_tensor_cores():
    """``python -m residual_fast.info --codegen`` compiles all kernels for sm_90 and exits 0."""
    pytest.importorskip("triton.backends.nvidia")
    res = subprocess.run([sys.executable, "-m", "residual_fast.info", "--codegen"], capture_output=True, text=True,
                         env=_compile_env(), cwd=REPO, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("triton:", "cuda:"))]
    assert res.returncode == 0, res.stdout + res.stderr
    kernels = {ln.split()[0] for ln in lines}
    assert {"triton:reweight_fwd", "triton:reweight_bwd", "triton:readout", "cuda:reweight_forward_kernel",
            "cuda:reweight_backward_kernel", "cuda:readout_kernel"} <= kernels
    assert all(ln.endswith("ok") and "tc=none" not in ln and "spill=0 " in ln for ln in lines), res.stdout
    assert all("offsets=i64" in ln for ln in lines if ln.startswith("triton:")), res.stdout


def test_info_reports_every_backend():
    from residual_fast.info import report

    text = report()
    for word in ("torch", "triton", "cuda"):
        assert f"  {word}" in text
    if not HAS_CUDA:
        assert "no CUDA device" in text
