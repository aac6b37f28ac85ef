"""Head specialization: per-head zero-shot accuracy, text-direction correlation, greedy head selection.

Head contributions are formed one unit at a time from cached raw activations
(``o_u = z_u @ F_u + const_u``), so memory is (n x D) per step whatever the
number of heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..cache import CachedSplit
from ..classifiers import Classifier
from ..models import ReadoutSpec
from ..spectral import SpectralBases
from ..units import affine_maps


class HeadContributions:
    """Output-space contributions of the heads of a cached split, one head at a time."""

    def __init__(self, split: CachedSplit, spec: ReadoutSpec):
        self.spec = spec
        self.acts = split.activations(dtype=torch.float64)
        self.Z = self.acts.zvec("head", spec, dtype=torch.float64)  # (n, U, q): small
        self.F, self.const = affine_maps(spec, "head")
        self.output = split.output.double()
        self.labels = split.labels

    @property
    def num_heads(self) -> int:
        return self.Z.shape[1]

    def __call__(self, u: int) -> torch.Tensor:
        return self.Z[:, u] @ self.F[u] + self.const[u]

    def sum(self, units: Iterable[int]) -> torch.Tensor:
        units = list(units)
        if not units:
            return torch.zeros_like(self.output)
        idx = torch.tensor(units)
        return self.Z[:, idx].reshape(self.Z.shape[0], -1) @ self.F[idx].reshape(-1, self.F.shape[-1]) + \
            self.const[idx].sum(0)


def per_head_accuracy(heads: HeadContributions, classifier: Classifier) -> torch.Tensor:
    """Top-1 accuracy of each head's contribution alone through the classifier."""
    acc = torch.empty(heads.num_heads)
    for u in range(heads.num_heads):
        acc[u] = (classifier(heads(u).float()).argmax(-1) == heads.labels).float().mean()
    return acc


def _pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)


def correlation_scores(heads: HeadContributions, directions: torch.Tensor) -> torch.Tensor:
    """Per head: Pearson correlation over samples between the projections of the head's contribution and of
    the model's output onto an orthonormal basis of ``directions`` (m, D), averaged over the basis."""
    Q, _ = torch.linalg.qr(directions.double().T)  # (D, m) orthonormal columns
    out_proj = heads.output @ Q
    scores = torch.empty(heads.num_heads)
    for u in range(heads.num_heads):
        scores[u] = _pearson_columns(heads(u) @ Q, out_proj).mean()
    return scores


def random_directions(m: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _counts(ks: Sequence[int | float], total: int) -> list[int]:
    out = []
    for k in ks:
        n = round(k * total) if isinstance(k, float) and k <= 1 else int(k)
        if not 0 <= n <= total:
            raise ValueError(f"cannot select {k} of {total} heads")
        out.append(n)
    return out


def greedy_selection(heads: HeadContributions, scores: torch.Tensor, ks: Sequence[int | float],
                     classifier: Classifier, *, ablation: str = "zero", bases: SpectralBases | None = None
                     ) -> list[dict]:
    """Accuracy when only the top-``k`` heads by ``scores`` are kept (``k`` a count or a fraction).

    The other units (heads, MLPs, embedding) are zero-ablated, or mean-ablated with the
    calibration means of ``bases`` (never means of the evaluated data).
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    if ablation == "mean" and bases is None:
        raise ValueError("mean ablation needs the calibration bases (their unit means)")
    order = torch.argsort(scores, descending=True).tolist()
    table = bases.table if bases is not None else None
    results = []
    for k in _counts(ks, heads.num_heads):
        chosen = order[:k]
        y = heads.sum(chosen)
        if ablation == "mean":
            head_pos = table.indices("head")
            keep = torch.zeros(len(table), dtype=torch.bool)
            keep[head_pos[torch.tensor(chosen, dtype=torch.long)]] = True
            y = y + bases.means[~keep].sum(0)
        acc = (classifier(y.float()).argmax(-1) == heads.labels).float().mean().item()
        results.append({"k": k, "heads": sorted(chosen), "accuracy": acc})
    return results


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0
