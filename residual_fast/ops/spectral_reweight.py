"""``spectral_reweight``: the fused core of ResiDual's factorized computation.

    y[n] = sum_u ((Z[n, u] @ R_u.T + t_u) * lam_u) @ B_u

with ``k_u`` components per unit packed along one axis: ``R`` (K, q),
``t``/``lam`` (K,), ``B`` (K, D), unit ``u`` owning rows
``offsets[u]:offsets[u + 1]``.

One ``torch.library`` custom op (``residual_fast::spectral_reweight``, with a
fake implementation and a registered autograd formula) dispatches to:

* ``torch``: batched GEMM for the coefficients, scale, one GEMM over the packed
  components (any device; the CPU path);
* ``triton``: fused forward/backward kernels (:mod:`.triton.spectral_reweight`);
* ``cuda``: the CUDA C++ kernels in ``csrc/`` (:mod:`.cuda`).

Gradients flow to ``Z`` and ``lam``; ``R``, ``t``, ``B`` and ``offsets`` are
constants of a fitted adapter. Half-precision inputs accumulate in fp32.
"""

from __future__ import annotations

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
    devices = {x.device for x in (Z, R, t, lam, B, offsets)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, x in (("Z", Z), ("R", R), ("t", t), ("lam", lam), ("B", B)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 and fp64 accumulate in themselves, half precisions in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# -- torch path ------------------------------------------------------------------
def _coefficients(Z, R, t, offsets):
    """(n, K) coefficients ``Z_u @ R_k + t_k``, by one batched GEMM over units."""
    coef = torch.bmm(Z.transpose(0, 1), pad_packed(R, offsets).transpose(1, 2))  # (U, n, kmax)
    if uniform_k(offsets) is not None:
        return coef.transpose(0, 1).reshape(Z.shape[0], -1) + t
    units, pos, _ = packed_index(offsets)
    return coef[units, :, pos].transpose(0, 1) + t


def _torch_forward(Z, R, t, lam, B, offsets):
    acc = acc_dtype(Z.dtype)
    c = _coefficients(Z.to(acc), R.to(acc), t.to(acc), offsets)
    return ((c * lam.to(acc)) @ B.to(acc)).to(Z.dtype)


def _torch_backward(grad, Z, R, t, lam, B, offsets):
    acc = acc_dtype(Z.dtype)
    Za, Ra, la = Z.to(acc), R.to(acc), lam.to(acc)
    c = _coefficients(Za, Ra, t.to(acc), offsets)
    gb = grad.to(acc) @ B.to(acc).T  # (n, K)
    dlam = (gb * c).sum(0)
    dc = gb * la
    dc_pad = pad_packed(dc.T.contiguous(), offsets)  # (U, kmax, n)
    dz = torch.bmm(dc_pad.transpose(1, 2), pad_packed(Ra, offsets))  # (U, n, q)
    return dz.transpose(0, 1).to(Z.dtype), dlam.to(lam.dtype)


# -- dispatch ------------------------------------------------------------------------
def _kernel_inputs(Z, R, t, lam, B, backend):
    """Kernels take one dtype (fp32/fp16/bf16); float64 stays on the torch path."""
    if Z.dtype == torch.float64:
        return "torch", (R, t, lam, B)
    return backend, tuple(x.to(Z.dtype) for x in (R, t, lam, B))


def _run_forward(Z, R, t, lam, B, offsets, backend):
    if backend != "torch":
        backend, (R, t, lam, B) = _kernel_inputs(Z, R, t, lam, B, backend)
    if backend == "triton":
        from .triton import spectral_reweight as tk

        return tk.forward(Z, R, t, lam, B, offsets)
    if backend == "cuda":
        from .cuda import load_extension

        return load_extension().spectral_reweight_forward(Z, R, t, lam, B, offsets)
    return _torch_forward(Z, R, t, lam, B, offsets)


def _run_backward(grad, Z, R, t, lam, B, offsets, backend):
    lam_dtype = lam.dtype
    if backend != "torch":
        backend, (R, t, lam, B) = _kernel_inputs(Z, R, t, lam, B, backend)
        grad = grad.to(Z.dtype)
    if backend == "triton":
        from .triton import spectral_reweight as tk

        dz, dlam = tk.backward(grad, Z, R, t, lam, B, offsets)
        return dz, dlam.to(lam_dtype)
    if backend == "cuda":
        from .cuda import load_extension

        dz, dlam = load_extension().spectral_reweight_backward(grad.contiguous(), Z, R, t, lam, B, offsets)
        return dz, dlam.to(lam_dtype)
    return _torch_backward(grad, Z, R, t, lam, B, offsets)


@torch.library.custom_op("residual_fast::spectral_reweight", mutates_args=())
def _spectral_reweight_op(Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor, lam: torch.Tensor,
                          B: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    backend = choose(backend, Z.device)
    return _run_forward(Z.contiguous(), R.contiguous(), t.contiguous(), lam.contiguous(), B.contiguous(),
                        offsets.contiguous(), backend)


@_spectral_reweight_op.register_fake
def _(Z, R, t, lam, B, offsets, backend):
    return Z.new_empty(Z.shape[0], B.shape[1])


@torch.library.custom_op("residual_fast::spectral_reweight_backward", mutates_args=())
def _spectral_reweight_backward_op(grad: torch.Tensor, Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor,
                                   lam: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor,
                                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    backend = choose(backend, Z.device)
    dz, dlam = _run_backward(grad.contiguous(), Z.contiguous(), R.contiguous(), t.contiguous(), lam.contiguous(),
                             B.contiguous(), offsets.contiguous(), backend)
    return dz.contiguous(), dlam.contiguous()  # the layout the fake promises, whatever the backend returns


@_spectral_reweight_backward_op.register_fake
def _(grad, Z, R, t, lam, B, offsets, backend):
    return Z.new_empty(Z.shape), lam.new_empty(lam.shape)  # contiguous, as the real op returns


def _setup_context(ctx, inputs, output):
    Z, R, t, lam, B, offsets, backend = inputs
    ctx.save_for_backward(Z, R, t, lam, B, offsets)
    ctx.backend = backend


def _backward(ctx, grad):
    Z, R, t, lam, B, offsets = ctx.saved_tensors
    need_z, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if not (need_z or need_lam):
        return None, None, None, None, None, None, None
    dz, dlam = _spectral_reweight_backward_op(grad, Z, R, t, lam, B, offsets, ctx.backend)
    return (dz if need_z else None), None, None, (dlam if need_lam else None), None, None, None


_spectral_reweight_op.register_autograd(_backward, setup_context=_setup_context)


def spectral_reweight(Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, B: torch.Tensor,
                      offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sum over units of the re-weighted spectral coefficients mapped back to output space.

    Args:
        Z: (n, U, q) small per-unit vectors.
        R: (K, q) packed coefficient maps (row ``k`` gives coefficient ``k`` of its unit).
        t: (K,) coefficient offsets.
        lam: (K,) weights.
        B: (K, D) packed components.
        offsets: (U + 1,) int64; unit ``u`` owns packed rows ``offsets[u]:offsets[u+1]``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (``RESIDUAL_FAST_BACKEND``
            overrides ``"auto"``).

    Returns:
        (n, D) in ``Z``'s dtype, accumulated in fp32 (fp64 for fp64 inputs).
        Differentiable in ``Z`` and ``lam``.
    """
    _check(Z, R, t, lam, B, offsets)
    choose(backend, Z.device)  # fail early, outside the op, with a clear message
    return _spectral_reweight_op(Z, R, t, lam, B, offsets, backend)
