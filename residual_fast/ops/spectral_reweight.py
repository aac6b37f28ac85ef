"""``spectral_reweight``: the fused core of ResiDual's factorized computation.

    y[n] = sum_u ((Z[n, u] @ R_u.T + t_u) * lam_u) @ B_u

with ``k_u`` components per unit packed along one axis: ``R`` (K, q),
``t``/``lam`` (K,), ``B`` (K, D), unit ``u`` owning rows
``offsets[u]:offsets[u + 1]``. This module holds the torch path (batched GEMM,
scale, one GEMM over the packed components) and the dispatch; fused kernels
plug in here.
"""

from __future__ import annotations

import torch


def packed_index(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For packed rows: the unit of each row, its position inside the unit, and max ``k``."""
    counts = offsets[1:] - offsets[:-1]
    units = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
    pos = torch.arange(int(offsets[-1]), device=offsets.device) - offsets[:-1][units]
    kmax = int(counts.max()) if counts.numel() else 0
    return units, pos, max(kmax, 1)


def pad_packed(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Packed rows (K, ...) to a zero-padded (U, k_max, ...) tensor."""
    units, pos, kmax = packed_index(offsets)
    out = x.new_zeros((offsets.numel() - 1, kmax) + tuple(x.shape[1:]))
    out[units, pos] = x
    return out


def _check(Z, R, t, lam, B, offsets) -> None:
    if Z.ndim != 3:
        raise ValueError(f"Z must be (n, U, q), got {tuple(Z.shape)}")
    U, q = Z.shape[1], Z.shape[2]
    K = R.shape[0]
    if offsets.ndim != 1 or offsets.numel() != U + 1:
        raise ValueError(f"offsets must have U + 1 = {U + 1} entries, got {tuple(offsets.shape)}")
    if R.shape != (K, q) or t.shape != (K,) or lam.shape != (K,) or B.ndim != 2 or B.shape[0] != K:
        raise ValueError(
            f"inconsistent packed shapes: R {tuple(R.shape)} (expected ({K}, {q})), t {tuple(t.shape)}, "
            f"lam {tuple(lam.shape)}, B {tuple(B.shape)}"
        )
    if int(offsets[-1]) != K:
        raise ValueError(f"offsets end at {int(offsets[-1])} but {K} components are packed")


def _spectral_reweight_torch(Z, R, t, lam, B, offsets):
    units, pos, _ = packed_index(offsets)
    Rp = pad_packed(R, offsets)  # (U, kmax, q)
    coef = torch.bmm(Z.transpose(0, 1), Rp.transpose(1, 2))  # (U, n, kmax)
    c = coef[units, :, pos].transpose(0, 1)  # (n, K)
    return ((c + t) * lam) @ B


def spectral_reweight(Z: torch.Tensor, R: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, B: torch.Tensor,
                      offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sum over units of the re-weighted spectral coefficients mapped back to output space.

    Args:
        Z: (n, U, q) small per-unit vectors.
        R: (K, q) packed coefficient maps (row ``k`` gives coefficient ``k`` of its unit).
        t: (K,) coefficient offsets.
        lam: (K,) weights.
        B: (K, D) packed components.
        offsets: (U + 1,) int64, unit ``u`` owns packed rows ``offsets[u]:offsets[u+1]``.
        backend: ``"auto"`` or ``"torch"``.

    Returns:
        (n, D). Differentiable in every floating input.
    """
    _check(Z, R, t, lam, B, offsets)
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown backend {backend!r}; available: 'auto', 'torch'")
    return _spectral_reweight_torch(Z, R, t, lam, B, offsets)
