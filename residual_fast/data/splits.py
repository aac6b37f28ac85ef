"""Seeded stratified splits (validation carved from train, as in the paper)."""

from __future__ import annotations

import torch


def stratified_split(labels: torch.Tensor, fractions: dict[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """Split indices so that every class is spread over the parts in the given proportions.

    ``fractions`` maps part names to shares summing to 1; returns sorted index tensors.
    """
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in fractions}
    names = list(fractions)
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        start = 0
        for i, name in enumerate(names):
            stop = idx.numel() if i == len(names) - 1 else start + round(fractions[name] * idx.numel())
            parts[name].append(idx[start:stop])
            start = stop
    return {k: torch.sort(torch.cat(v)).values if v else torch.zeros(0, dtype=torch.long) for k, v in parts.items()}
