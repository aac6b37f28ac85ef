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


def stratified_subset(labels: torch.Tensor, idx: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` of the indices ``idx``, every class keeping its share (at least one image each when ``n`` allows).

    Seeded and sorted. Taking the first ``n`` of a class-sorted split would leave
    whole classes out.
    """
    idx = torch.as_tensor(idx, dtype=torch.long)
    if n >= idx.numel():
        return idx
    if n < 1:
        raise ValueError(f"a subset needs at least 1 image, got {n}")
    lab = torch.as_tensor(labels)[idx]
    classes, counts = torch.unique(lab, return_counts=True)
    quota = counts.double() * n / idx.numel()
    take = quota.floor().long()
    if n >= classes.numel():
        take = take.clamp_min(1)
    while int(take.sum()) > n:  # the clamp above may overshoot: trim the largest
        take[int(torch.argmax(take))] -= 1
    order = torch.argsort(quota - take.double(), descending=True)
    i = 0
    while int(take.sum()) < n:
        c = int(order[i % order.numel()])
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, k in zip(classes, take.tolist(), strict=True):
        members = idx[lab == c]
        out.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.sort(torch.cat(out)).values
