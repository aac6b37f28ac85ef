"""Eager references, written once and shared by tests and benchmarks.

:func:`residual_reference` is DESIGN.md section 3 applied literally to the
materialized contributions ``o_u`` (n, U, D) with einsums, as the paper's code
does; it is the "eager PyTorch" baseline of every benchmark.
"""

from __future__ import annotations

import torch


def spectral_reweight_reference(Z, R, t, lam, B, offsets) -> torch.Tensor:
    """Eager einsums over zero-padded components, materializing the (n, U, k) coefficients
    and the (n, U, D) per-unit contributions before summing them (as the paper's code does)."""
    from .spectral_reweight import pad_packed

    coef = torch.einsum("nuq,ukq->nuk", Z, pad_packed(R, offsets)) + pad_packed(t, offsets)
    contrib = torch.einsum("nuk,ukd->nud", coef * pad_packed(lam, offsets), pad_packed(B, offsets))
    return contrib.sum(dim=1)


def residual_reference(adapter, contributions: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """ResiDual's output computed from materialized contributions (DESIGN.md section 3).

    Padding 1 is written as ``centered + coef_k * (lam - 1) @ B_k``: components
    past ``k_u`` keep weight 1. It equals the sum over all kept components since
    ``o_u - m_u`` lies in their span.

    Args:
        adapter: a :class:`residual_fast.ResiDual`.
        contributions: (n, U, D) every unit's output-space contribution, residual-stream order.
        output: (n, D) the model's output (used by the ``"sum"`` ablation only through
            the non-adapted contributions, never directly).
    """
    dtype = contributions.dtype
    table = adapter.table
    adapted = torch.zeros(len(table), dtype=torch.bool)
    y = torch.zeros_like(output, dtype=dtype)
    means = adapter.means.to(device=contributions.device, dtype=dtype)
    for kind, group in adapter.groups.items():
        idx = table.indices(kind)
        adapted[idx] = True
        o = contributions[:, idx.to(contributions.device)]  # (n, U_k, D)
        lam = group.lam.to(dtype)
        if group.scalar:
            y = y + torch.einsum("nud,u->nd", o, lam)
            continue
        m = means[idx.to(means.device)]
        centered = o - m
        comps = group.padded_components().to(dtype)  # (U_k, k_max, D), zero rows past k_u
        units, pos = group.index()
        lam_pad = torch.zeros(comps.shape[:2], dtype=dtype, device=comps.device)
        lam_pad[units, pos] = lam - adapter.padding
        coef = torch.einsum("nud,ukd->nuk", centered, comps)
        y = y + torch.einsum("nuk,uk,ukd->nd", coef, lam_pad, comps)
        if adapter.padding == 1:
            # components past k_u keep weight 1: the centered contribution passes through
            y = y + centered.sum(dim=1)
        if adapter.add_means:
            y = y + m.sum(dim=0)
    rest = ~adapted
    if adapter.ablation == "sum":
        y = y + contributions[:, rest.to(contributions.device)].sum(dim=1)
    elif adapter.ablation == "mean":
        y = y + means[rest.to(means.device)].sum(dim=0)
    return y
