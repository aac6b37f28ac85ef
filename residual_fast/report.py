"""Report folder: results as JSON and CSV, plots of the trained lambdas and the per-unit spectra."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from .residual import ResiDual
from .spectral import SpectralBases

RESULT_FIELDS = ("model", "weights", "dataset", "method", "trainable_parameters", "accuracy", "fit_seconds",
                 "cache_seconds", "bases", "bases_images")


def write_results(rows: list[dict], folder: str | Path) -> None:
    """``results.json`` (everything) and ``results.csv`` (the standard columns) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(rows, indent=1))
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lambda_grid(adapter: ResiDual) -> torch.Tensor:
    """Mean |lambda| of each head as a (layers x heads) grid (the coarse variant: lambda itself)."""
    g = adapter.groups["head"]
    spec = adapter.spec
    lam = g.lam.detach().float().abs()
    if g.scalar:
        per_unit = lam
    else:
        units, _ = g.index()
        sums = torch.zeros(g.num_units).index_add_(0, units, lam)
        counts = torch.bincount(units, minlength=g.num_units).clamp_min(1)
        per_unit = sums / counts
    return per_unit.view(spec.num_layers, spec.num_heads)


def plot_lambdas(adapter: ResiDual, path: str | Path) -> None:
    plt = _plt()
    grid = lambda_grid(adapter)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * grid.shape[1], 1 + 0.35 * grid.shape[0]))
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_title(f"trained |lambda| per head (mean over components), {adapter.variant}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(bases: SpectralBases, path: str | Path, kind: str = "head") -> None:
    plt = _plt()
    evr = bases.evr(kind).cumsum(-1)
    rank = bases.rank(kind)
    spec = bases.spec
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    for u in range(evr.shape[0]):
        layer = u // spec.num_heads if kind == "head" else u
        r = int(rank[u])
        ax.plot(range(1, r + 1), evr[u, :r].numpy(), color=cmap(layer / max(spec.num_layers - 1, 1)), lw=0.8)
    ax.axhline(0.9, color="k", lw=0.6, ls="--")
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title(f"per-{kind} spectra (color: layer, dark = early)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
