"""Intrinsic dimension of residual units: linear (spectral) measures and TwoNN."""

from __future__ import annotations

import torch

from ..spectral import SpectralBases


def linear_id(eigenvalues: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Smallest number of components whose cumulative explained variance reaches ``threshold``.

    ``eigenvalues``: (..., K) sorted descending (zero padding allowed).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    total = eigenvalues.sum(-1, keepdim=True).clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    cum = eigenvalues.cumsum(-1) / total
    return (cum < threshold - 1e-12).sum(-1) + 1


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """``(sum lambda)^2 / sum lambda^2``: 1 for one component, K for K equal ones."""
    return eigenvalues.sum(-1).square() / eigenvalues.square().sum(-1).clamp_min(torch.finfo(eigenvalues.dtype).tiny)


def first_component_evr(eigenvalues: torch.Tensor) -> torch.Tensor:
    return eigenvalues[..., 0] / eigenvalues.sum(-1).clamp_min(torch.finfo(eigenvalues.dtype).tiny)


def twonn(x: torch.Tensor, fraction: float = 0.9, chunk: int = 1024) -> float:
    """TwoNN intrinsic dimension (Facco et al., 2017) of the rows of ``x`` (n, D).

    ``mu = r2 / r1`` (second over first nearest-neighbour distance); the
    dimension is the slope, through the origin, of ``-log(1 - F(mu))`` against
    ``log(mu)`` over the smallest ``fraction`` of the empirical distribution.
    Distances are computed ``chunk`` rows at a time: memory O(chunk x n).
    """
    x = x.double()
    n = x.shape[0]
    if n < 3:
        raise ValueError("TwoNN needs at least 3 points")
    sq = x.square().sum(-1)
    mus = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d2 = (sq[rows, None] + sq[None, :] - 2 * x[rows] @ x.T).clamp_min(0)
        d2[torch.arange(d2.shape[0]), torch.arange(start, rows.stop)] = float("inf")  # not its own neighbour
        two = torch.topk(d2, 2, dim=1, largest=False).values.sqrt()
        mus[rows] = two[:, 1] / two[:, 0]
    mus = mus[torch.isfinite(mus) & (mus > 1)]  # duplicates give r1 = 0
    mus, _ = torch.sort(mus)
    m = mus.numel()
    keep = max(int(fraction * m), 2)
    F = torch.arange(1, m + 1, dtype=torch.float64) / m
    xs, ys = torch.log(mus[:keep]), -torch.log1p(-F[:keep].clamp(max=1 - 1e-12))
    return float((xs * ys).sum() / xs.square().sum())


def spectral_summary(bases: SpectralBases, kind: str = "head", threshold: float = 0.99) -> dict[str, torch.Tensor]:
    """Per-unit linear ID, first-component EVR and participation ratio from fitted bases."""
    eig = bases.eigenvalues(kind)
    return {"linear_id": linear_id(eig, threshold), "first_evr": first_component_evr(eig),
            "participation_ratio": participation_ratio(eig), "rank": bases.rank(kind)}


def per_layer(values: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Mean of a per-head quantity over the heads of each layer."""
    return values.float().view(num_layers, -1).mean(-1)
