"""``spectral_reweight``: the core of ResiDual's factorized computation.

    y[n] = sum_u ((Z[n, u] @ R_u.T + t_u) * lam_u) @ B_u

with ``k_u`` components per unit packed along one axis: ``R`` (K, q),
``t``/``lam`` (K,), ``B`` (K, D), unit ``u`` owning rows
``offsets[u]:offsets[u + 1]``.

It is two steps (DESIGN.md section 5):

* :func:`coefficients` ``c = Z_u @ R_u.T + t`` (n, K): one batched GEMM in
  torch (cuBLAS on a GPU). While lambda trains these are constants of the
  cached data, so a training loop may compute them once and call
  :func:`reweight` directly;
* :func:`reweight` ``y = (c * lam) @ B``: the ``torch.library`` custom op
  ``residual_fast::reweight`` (fake implementation, registered autograd
  formula, a backward op ``residual_fast::reweight_backward``), dispatched to

  - ``torch``: one GEMM (any device; the CPU path and the reference of the kernels);
  - ``triton``: tensor-core GEMMs with the lambda prologue and the dlam
    epilogue fused (:mod:`.triton.spectral_reweight`);
  - ``cuda``: the same in CUDA C++ with WMMA (``csrc/``, :mod:`.cuda`).

Gradients flow to ``lam`` always and to ``Z`` (through ``c``) only when ``Z``
requires them; ``R``, ``t``, ``B`` and ``offsets`` are constants of a fitted
adapter. Half-precision inputs accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends import choose


def packed_index(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For packed rows: the unit of each row, its position inside the unit, and max ``k``."""
    counts = offsets[1:] - offsets[:-1]
    units = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
    pos = torch.arange(units.numel(), device=offsets.device) - offsets[:-1][units]
    kmax = int(counts.max()) if counts.numel() else 0
    return units, pos, max(kmax, 1)


def uniform_k(offsets: torch.Tensor) -> int | None:
    """``k`` when every unit has the same number of components (then packed == padded), else None."""
    counts = offsets[1:] - offsets[:-1]
    if counts.numel() and bool((counts == counts[0]).all()) and int(counts[0]) > 0:
        return int(counts[0])
    return None


def pad_packed(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Packed rows (K, ...) to a zero-padded (U, k_max, ...) tensor (a view when all ``k_u`` are equal)."""
    k = uniform_k(offsets)
    if k is not None:
        return x.view((offsets.numel() - 1, k) + tuple(x.shape[1:]))
    units, pos, kmax = packed_index(offsets)
    out = x.new_zeros((offsets.numel() - 1, kmax) + tuple(x.shape[1:]))
    out[units, pos] = x
    return out


def _check(Z, R, t, lam, B, offsets) -> None:
    if Z.ndim != 3:
        raise ValueError(f"Z must be (n, U, q), got {tuple(Z.shape)}")
    U, q = Z.shape[1], Z.shape[2]
    K = R.shape[0]
    if offsets.ndim != 1 or offsets.numel() != U + 1 or offsets.dtype != torch.long:
        raise ValueError(f"offsets must be int64 with U + 1 = {U + 1} entries, got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if R.shape != (K, q) or t.shape != (K,) or lam.shape != (K,) or B.ndim != 2 or B.shape[0] != K:
        raise ValueError(
            f"inconsistent packed shapes: R {tuple(R.shape)} (expected ({K}, {q})), t {tuple(t.shape)}, "
            f"lam {tuple(lam.shape)}, B {tuple(B.shape)}"
        )
    devices = {x.device for x in (Z, R, t, lam, B)} | ({offsets.device} - {torch.device("cpu")})
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device (offsets may stay on the CPU), got "
                         f"{sorted(map(str, devices))}")
    for name, x in (("Z", Z), ("R", R), ("t", t), ("lam", lam), ("B", B)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 and fp64 accumulate in themselves, half precisions in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# -- coefficients (torch) -----------------------------------------------------------
class PackedLayout(NamedTuple):
    """The packing of ``offsets`` as the coefficient GEMM needs it: ``k`` when all units have the same
    number of components (else None), each packed row's unit and position (on the compute device), max ``k``."""

    uniform_k: int | None
    units: torch.Tensor
    pos: torch.Tensor
    kmax: int


def packed_layout(offsets: torch.Tensor) -> PackedLayout:
    """From ``offsets``: reads them on the host (a device-to-host sync when they live on a GPU, so callers
    that step many times compute it once, as :class:`residual_fast.ResiDual` does)."""
    units, pos, kmax = packed_index(offsets)
    return PackedLayout(uniform_k(offsets), units, pos, kmax)


def _coefficients(Z, R, t, offsets, layout: PackedLayout | None = None):
    """(n, K) coefficients ``Z_u @ R_k + t_k``, by one batched GEMM over units.

    Computed as (U, k, n) -> (K, n) and returned transposed: no (n, U, ...) tensor is ever formed (the
    adapter promises never to build one of (n, U, D) size, and with full-rank bases k = D)."""
    k, units, pos, kmax = layout if layout is not None else packed_layout(offsets)
    U = offsets.numel() - 1
    if k is not None:
        Rp = R.view(U, k, R.shape[1])
    else:
        units, pos = units.to(Z.device), pos.to(Z.device)  # no-ops when already there
        Rp = R.new_zeros(U, kmax, R.shape[1])
        Rp[units, pos] = R
    coef = torch.bmm(Rp, Z.permute(1, 2, 0))  # (U, kmax, n)
    coef = coef.view(-1, Z.shape[0]) if k is not None else coef[units, pos]  # (K, n)
    return coef.T + t


def coefficients(Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor, offsets: torch.Tensor,
                 layout: PackedLayout | None = None) -> torch.Tensor:
    """(n, K) per-sample coefficients ``Z_u @ R_u.T + t`` in the accumulation dtype (differentiable).
    ``layout`` (:func:`packed_layout` of ``offsets``, computed once) avoids reading ``offsets`` per call."""
    acc = acc_dtype(Z.dtype)
    return _coefficients(Z.to(acc), R.to(acc), t.to(acc), offsets, layout)


# -- the re-weighting GEMM -----------------------------------------------------------
def _kernel_operands(c, lam, B, out_dtype):
    """Kernels take c, lam in fp32 and B in the compute dtype (= the output dtype: fp32/fp16/bf16)."""
    return c.float(), lam.float().contiguous(), B.to(out_dtype)


def _run_forward(c, lam, B, out_dtype, backend):
    if backend != "torch" and out_dtype != torch.float64 and c.dtype != torch.float64:
        c, lam, B = _kernel_operands(c, lam, B, out_dtype)
        if backend == "triton":
            from .triton import spectral_reweight as tk

            return tk.forward(c, lam, B, out_dtype)
        if backend == "cuda":
            from .cuda import load_extension

            return load_extension().reweight_forward(c, lam, B)
    acc = c.dtype
    return ((c * lam.to(acc)) @ B.to(acc)).to(out_dtype)


def _run_backward(grad, c, lam, B, need_dc, backend):
    if backend != "torch" and grad.dtype != torch.float64 and c.dtype != torch.float64:
        cf, lamf, Bk = _kernel_operands(c, lam, B, grad.dtype)
        if backend == "triton":
            from .triton import spectral_reweight as tk

            dc, dlam = tk.backward(grad, cf, lamf, Bk, need_dc)
        elif backend == "cuda":
            from .cuda import load_extension

            dc, dlam = load_extension().reweight_backward(grad, cf, lamf, Bk, need_dc)
        if backend in ("triton", "cuda"):
            return (dc.to(c.dtype) if need_dc else c.new_empty(0)), dlam.to(lam.dtype)
    acc = c.dtype
    gb = grad.to(acc) @ B.to(acc).T  # (n, K)
    dlam = (gb * c).sum(0).to(lam.dtype)
    return ((gb * lam.to(acc)) if need_dc else c.new_empty(0)), dlam


@torch.library.custom_op("residual_fast::reweight", mutates_args=())
def _reweight_op(c: torch.Tensor, lam: torch.Tensor, B: torch.Tensor, out_dtype: torch.dtype,
                 backend: str) -> torch.Tensor:
    return _run_forward(c, lam, B, out_dtype, choose(backend, c.device))


@_reweight_op.register_fake
def _(c, lam, B, out_dtype, backend):
    return c.new_empty(c.shape[0], B.shape[1], dtype=out_dtype)


@torch.library.custom_op("residual_fast::reweight_backward", mutates_args=())
def _reweight_backward_op(grad: torch.Tensor, c: torch.Tensor, lam: torch.Tensor, B: torch.Tensor, need_dc: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dc, dlam = _run_backward(grad, c, lam, B, need_dc, choose(backend, c.device))
    return dc.contiguous(), dlam.contiguous()  # the layout the fake promises, whatever the backend returns


@_reweight_backward_op.register_fake
def _(grad, c, lam, B, need_dc, backend):
    return (c.new_empty(c.shape) if need_dc else c.new_empty(0)), lam.new_empty(lam.shape)


def _setup_context(ctx, inputs, output):
    c, lam, B, out_dtype, backend = inputs
    ctx.save_for_backward(c, lam, B)
    ctx.backend = backend


def _backward(ctx, grad):
    c, lam, B = ctx.saved_tensors
    need_c, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_c or need_lam):
        return None, None, None, None, None
    dc, dlam = _reweight_backward_op(grad, c, lam, B, need_c, ctx.backend)
    return (dc if need_c else None), (dlam if need_lam else None), None, None, None


_reweight_op.register_autograd(_backward, setup_context=_setup_context)


def reweight(c: torch.Tensor, lam: torch.Tensor, B: torch.Tensor, out_dtype: torch.dtype | None = None,
             backend: str = "auto") -> torch.Tensor:
    """``(c * lam) @ B``: (n, K) coefficients, (K,) weights, (K, D) components -> (n, D) in ``out_dtype``
    (default ``B``'s). Kernels compute in ``out_dtype`` on tensor cores (fp32 as 3xTF32), accumulate in fp32.
    Differentiable in ``c`` and ``lam``."""
    if c.ndim != 2 or lam.shape != (c.shape[1],) or B.ndim != 2 or B.shape[0] != c.shape[1]:
        raise ValueError(f"expected c (n, K), lam (K,), B (K, D); got {tuple(c.shape)}, {tuple(lam.shape)}, "
                         f"{tuple(B.shape)}")
    choose(backend, c.device)  # fail early, outside the op, with a clear message
    return _reweight_op(c, lam, B, out_dtype or B.dtype, backend)


def spectral_reweight(Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, B: torch.Tensor,
                      offsets: torch.Tensor, backend: str = "auto", *,
                      layout: PackedLayout | None = None) -> torch.Tensor:
    """Sum over units of the re-weighted spectral coefficients mapped back to output space.

    Args:
        Z: (n, U, q) small per-unit vectors.
        R: (K, q) packed coefficient maps (row ``k`` gives coefficient ``k`` of its unit).
        t: (K,) coefficient offsets.
        lam: (K,) weights.
        B: (K, D) packed components.
        offsets: (U + 1,) int64; unit ``u`` owns packed rows ``offsets[u]:offsets[u+1]`` (on the inputs'
            device or on the CPU).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (``RESIDUAL_FAST_BACKEND``
            overrides ``"auto"``); it selects the :func:`reweight` GEMM.
        layout: :func:`packed_layout` of ``offsets``, computed once: with it the torch path has no
            device-to-host sync (reading GPU ``offsets`` on every call would be one).

    Returns:
        (n, D) in ``Z``'s dtype, accumulated in fp32 (fp64 for fp64 inputs).
        Differentiable in ``Z`` (only computed when ``Z`` requires grad) and ``lam``.
    """
    _check(Z, R, t, lam, B, offsets)
    kind = choose(backend, Z.device)  # fail early, outside the op, with a clear message
    c = coefficients(Z, R, t, offsets, layout)
    if kind != "torch":
        c = c.contiguous()  # row-major (n, K): the layout the kernels are tuned and checked for
    return _reweight_op(c, lam, B, Z.dtype, backend)
