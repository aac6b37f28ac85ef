"""Spectral similarity between two bases of the same unit."""

from __future__ import annotations

import torch


def spectral_similarity(B1: torch.Tensor, e1: torch.Tensor, B2: torch.Tensor, e2: torch.Tensor) -> float:
    """Similarity of two pruned spectral bases (rows of ``B`` orthonormal, ``e`` their eigenvalues).

    Absolute cosines between components, weighted by ``sqrt(q1_i q2_j)`` with
    ``q = e / ||e||`` (so that identical bases score exactly 1), matched greedily
    one to one (largest remaining entry first); the score is the L2 norm of the
    matched values. Invariant to component signs; below 1 when the subspaces or
    their spectra differ.
    """
    B1, B2 = B1.double(), B2.double()
    q1 = e1.double().clamp_min(0) / e1.double().clamp_min(0).norm().clamp_min(1e-300)
    q2 = e2.double().clamp_min(0) / e2.double().clamp_min(0).norm().clamp_min(1e-300)
    W = (B1 @ B2.T).abs() * (q1[:, None] * q2[None, :]).sqrt()
    matched = []
    W = W.clone()
    for _ in range(min(W.shape)):
        flat = int(W.argmax())
        i, j = divmod(flat, W.shape[1])
        if W[i, j] <= 0:
            break
        matched.append(W[i, j].item())
        W[i, :] = -1
        W[:, j] = -1
    return float(torch.tensor(matched, dtype=torch.float64).norm()) if matched else 0.0


def bases_similarity(a, b, kind: str = "head") -> torch.Tensor:
    """Per-unit spectral similarity of two :class:`SpectralBases` of the same model shape."""
    ra, rb = a.rank(kind), b.rank(kind)
    out = torch.empty(ra.numel(), dtype=torch.float64)
    for u in range(ra.numel()):
        ka, kb = int(ra[u]), int(rb[u])
        out[u] = spectral_similarity(a.components(kind)[u, :ka], a.eigenvalues(kind)[u, :ka],
                                     b.components(kind)[u, :kb], b.eigenvalues(kind)[u, :kb])
    return out
