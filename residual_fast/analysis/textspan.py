"""Text decomposition of units: TextSpan and simultaneous orthogonal matching pursuit (SOMP).

Both take a unit's contributions ``C`` (n, D) (or its principal components) and
a dictionary of text embeddings ``T`` (m, D) from the model's text tower, and
return the chosen descriptions with the variance explained at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextSelection:
    indices: list[int]
    explained: list[float]  # cumulative fraction of the variance of C explained after each step

    def describe(self, texts: list[str]) -> list[tuple[str, float]]:
        return [(texts[i], e) for i, e in zip(self.indices, self.explained, strict=True)]


def textspan(C: torch.Tensor, T: torch.Tensor, steps: int = 5, rank: int | None = None) -> TextSelection:
    """Greedy TextSpan (Gandelsman et al., 2024).

    Project the dictionary onto the top-``rank`` singular subspace of the centered
    ``C``; pick the description whose projections of ``C`` vary most across
    samples; remove that direction from ``C`` and from the remaining
    descriptions (orthogonalize); repeat ``steps`` times.
    """
    C = C.double() - C.double().mean(0)
    T = T.double()
    _, _, vh = torch.linalg.svd(C, full_matrices=False)
    V = vh[: rank or vh.shape[0]]
    P = T @ V.T @ V  # dictionary in the unit's subspace
    total = C.square().sum()
    chosen, explained = [], []
    for _ in range(min(steps, T.shape[0])):
        norms = P.norm(dim=-1, keepdim=True)
        dirs = P / norms.clamp_min(1e-12)
        var = (C @ dirs.T).var(0)
        if chosen:
            var[chosen] = -1
        j = int(var.argmax())
        d = dirs[j]
        chosen.append(j)
        C = C - (C @ d)[:, None] * d
        P = P - (P @ d)[:, None] * d
        explained.append(float(1 - C.square().sum() / total))
    return TextSelection(chosen, explained)


def somp(C: torch.Tensor, T: torch.Tensor, steps: int = 5) -> TextSelection:
    """Simultaneous OMP in float64: atoms = unit-norm dictionary rows; the atom with the largest summed
    absolute correlation with the residual joins, then all chosen atoms are refit by least squares."""
    C = C.double()
    A = torch.nn.functional.normalize(T.double(), dim=-1)
    R = C.clone()
    total = C.square().sum()
    chosen, explained = [], []
    for _ in range(min(steps, A.shape[0])):
        score = (R @ A.T).abs().sum(0)
        if chosen:
            score[chosen] = -1
        chosen.append(int(score.argmax()))
        S = A[chosen]  # (k, D)
        X = torch.linalg.lstsq(S.T, C.T).solution.T  # C ~ X @ S
        R = C - X @ S
        explained.append(float(1 - R.square().sum() / total))
    return TextSelection(chosen, explained)
