"""Streamed, exact per-unit PCA bases (DESIGN.md section 4.2).

Only the float64 mean and scatter of each unit's small vector ``z_u`` are
accumulated while images stream through the model; the PCA of the unit's
output-space contribution ``o_u = z_u @ F_u + const_u`` then comes from a
``(q x q)`` eigenproblem with ``q = raw_dim + 2``. Memory does not grow with the
number of images, and moments from several batches, loaders or processes merge
exactly (Chan et al.'s pairwise update).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .decompose import _plain, capture, eval_mode
from .models import UNIT_KINDS, ReadoutSpec, fingerprint_mismatch, get_adapter
from .serialization import (
    CorruptFileError,
    check_meta,
    check_tensor,
    is_dict,
    is_float,
    is_int,
    is_str,
    list_of,
    load_bundle,
    one_of,
    save_bundle,
)
from .units import Activations, UnitTable, affine_maps, check_finite_batch


class StreamingMoments:
    """Count, mean and (optionally) scatter matrix of ``(U, q)`` vectors, in float64."""

    def __init__(self, units: int, dim: int, second: bool = True, device: torch.device | str = "cpu"):
        self.count = 0
        self.mean = torch.zeros(units, dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(units, dim, dim, dtype=torch.float64, device=device) if second else None

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape (n, U, q)."""
        x = x.to(device=self.mean.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        bmean = x.mean(dim=0)
        bm2 = None
        if self.m2 is not None:
            xc = x - bmean
            bm2 = torch.einsum("nuq,nur->uqr", xc, xc)
        self._combine(n, bmean, bm2)

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold ``other`` (same shapes) into ``self``; returns ``self``."""
        if other.mean.shape != self.mean.shape or (other.m2 is None) != (self.m2 is None):
            raise ValueError("cannot merge moments of different shapes")
        if other.count:
            m2 = None if other.m2 is None else other.m2.to(self.mean.device)
            self._combine(other.count, other.mean.to(self.mean.device), m2)
        return self

    def _combine(self, n: int, bmean: torch.Tensor, bm2: torch.Tensor | None) -> None:
        tot = self.count + n
        delta = bmean - self.mean
        if self.m2 is not None:
            corr = torch.einsum("uq,ur->uqr", delta, delta) * (self.count * n / tot)
            self.m2 += bm2 + corr
        self.mean += delta * (n / tot)
        self.count = tot

    def all_reduce(self, group) -> StreamingMoments:
        """Replace these moments by those of the union of every rank's data (exact parallel merge, float64).

        ``mean = sum_r n_r mean_r / N`` and ``M2 = sum_r [M2_r + n_r (mean_r - mean)(mean_r - mean)^T]``
        (Chan et al.'s pairwise update, all pairs at once); rank 0's result is broadcast so every rank
        holds bitwise the same moments.
        """
        from .distributed import active, all_reduce_count, all_reduce_sum, broadcast_tensor

        if not active(group):
            return self
        total = all_reduce_count(self.count, group)
        if total == 0:
            return self
        mean = all_reduce_sum(self.mean * self.count, group) / total
        if self.m2 is not None:
            d = self.mean - mean
            m2 = all_reduce_sum(self.m2 + torch.einsum("uq,ur->uqr", d, d) * self.count, group)
            self.m2 = broadcast_tensor(m2, group)
        self.mean = broadcast_tensor(mean, group)
        self.count = total
        return self

    def covariance(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        return self.m2 / (self.count - 1)


class UnitMoments:
    """Moments of ``z_u`` for every unit of a model: first order for all, second for ``units``."""

    def __init__(self, spec: ReadoutSpec, units: Sequence[str] = ("head",), device: torch.device | str = "cpu"):
        units = _check_kinds(units)
        self.spec = spec
        self.units = units
        self.table = UnitTable(spec.num_layers, spec.num_heads)
        self.fingerprint = spec.fingerprint()
        self.moments = {
            k: StreamingMoments(self.table.count(k), spec.raw_dim(k) + 2, second=k in units, device=device)
            for k in UNIT_KINDS
        }

    @property
    def count(self) -> int:
        return self.moments["emb"].count

    def update(self, acts: Activations) -> None:
        for kind, mom in self.moments.items():
            mom.update(acts.zvec(kind, self.spec, dtype=torch.float64))

    def merge(self, other: UnitMoments) -> UnitMoments:
        """Fold moments accumulated elsewhere (another loader, process or machine) into these."""
        why = fingerprint_mismatch(self.fingerprint, other.fingerprint)
        if why:
            raise ValueError(f"cannot merge moments of different models: {why}")
        if tuple(other.units) != tuple(self.units):
            raise ValueError(f"cannot merge moments of units {other.units} into {self.units}")
        for kind in UNIT_KINDS:
            self.moments[kind].merge(other.moments[kind])
        return self

    def all_reduce(self, group) -> UnitMoments:
        """Merge the moments of every rank of ``group`` (a ``torch.distributed`` group) into each rank's."""
        from .distributed import active, check_same_model

        if active(group):
            check_same_model(self.fingerprint, group)
            for kind in UNIT_KINDS:
                self.moments[kind].all_reduce(group)
        return self

    def bases(self, rtol: float = 1e-10) -> SpectralBases:
        """Per-unit PCA of the output-space contributions from the accumulated moments."""
        check_rtol(rtol)
        if self.count == 0:
            raise ValueError("no images were seen: the calibration data is empty")
        if self.count < 2:
            raise ValueError("need at least 2 calibration images")
        means = torch.empty(len(self.table), self.spec.out_dim, dtype=torch.float64)
        pca = {}
        for kind in UNIT_KINDS:
            F, const = affine_maps(self.spec, kind)
            F, const = F.to(self.moments[kind].mean.device), const.to(self.moments[kind].mean.device)
            zbar = self.moments[kind].mean
            means[self.table.indices(kind)] = (torch.einsum("uq,uqd->ud", zbar, F) + const).cpu()
            if kind in self.units:
                pca[kind] = _pca_from_moments(F, self.moments[kind].covariance(), rtol)
                pca[kind]["zmean"] = zbar.cpu()
        return SpectralBases(self.spec, self.units, means, pca, self.count, rtol, fingerprint=self.fingerprint)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for kind, mom in self.moments.items():
            tensors[f"{kind}.mean"] = mom.mean
            if mom.m2 is not None:
                tensors[f"{kind}.m2"] = mom.m2
        meta = {
            "kind": "unit_moments",
            "version": __version__,
            "units": list(self.units),
            "count": self.count,
            "fingerprint": self.fingerprint,
        }
        save_bundle(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, visual: nn.Module) -> UnitMoments:
        tensors, meta = load_bundle(path, "unit_moments")
        where = f"moments at {path}"
        check_meta(meta, {"version": is_str, "units": list_of(one_of(*UNIT_KINDS), non_empty=True, unique=True),
                          "count": is_int(0), "fingerprint": is_dict}, where)
        spec = get_adapter(visual).spec()
        why = fingerprint_mismatch(meta["fingerprint"], spec.fingerprint())
        if why:
            raise ValueError(f"moments at {path} were accumulated on another model: {why}")
        out = cls(spec, meta["units"])
        for kind, mom in out.moments.items():
            U, q = mom.mean.shape
            mom.count = int(meta["count"])
            mom.mean = check_tensor(tensors, f"{kind}.mean", where, (U, q)).to(torch.float64)
            if mom.m2 is not None:
                mom.m2 = check_tensor(tensors, f"{kind}.m2", where, (U, q, q)).to(torch.float64)
        return out


def check_rtol(rtol: float) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be a number in (0, 1) (components below rtol x the largest variance are "
                         f"dropped), got {rtol!r}")


def _check_kinds(units: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(units, str):
        units = (units,)
    units = tuple(units)
    bad = [u for u in units if u not in UNIT_KINDS]
    if bad or not units:
        raise ValueError(f"units must be a non-empty subset of {UNIT_KINDS}, got {units}")
    return tuple(k for k in UNIT_KINDS if k in units)


def _pca_from_moments(F: torch.Tensor, cov_z: torch.Tensor, rtol: float) -> dict[str, torch.Tensor]:
    """PCA of ``o = z @ F`` given ``Cov(z)``, through the small (q x q) problem.

    ``Cov(o) = F.T C F``; with ``C = G G.T`` the eigenvectors of ``Cov(o)`` are
    the left singular vectors of ``A = F.T G`` and its eigenvalues their squares.
    """
    evals, V = torch.linalg.eigh(cov_z)
    G = V * evals.clamp_min(0).sqrt()[:, None, :]
    A = F.transpose(1, 2) @ G  # (U, D, q)
    Uo, S, _ = torch.linalg.svd(A, full_matrices=False)
    eig = S.square()
    comps = Uo.transpose(1, 2)  # (U, r, D)
    # deterministic signs: largest-magnitude coordinate positive
    pivot = comps.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(comps, -1, pivot))
    sign[sign == 0] = 1
    comps = comps * sign
    total = eig.sum(dim=-1)
    keep = eig > rtol * eig[:, :1].clamp_min(torch.finfo(eig.dtype).tiny)
    rank = keep.sum(dim=-1)
    kmax = int(rank.max()) if rank.numel() else 0
    eig = torch.where(keep, eig, torch.zeros_like(eig))[:, :kmax]
    comps = (comps * keep[..., None])[:, :kmax]
    return {"components": comps.cpu(), "eigenvalues": eig.cpu(), "rank": rank.cpu(), "total_variance": total.cpu()}


class SpectralBases:
    """Per-unit PCA of output-space contributions, fitted by :func:`fit_bases`.

    For every unit: ``means`` (U, D) calibration mean of ``o_u``. For every unit of
    the fitted kinds (``units``): orthonormal ``components`` (U_kind, K, D) sorted
    by variance, ``eigenvalues`` (U_kind, K), ``rank`` (U_kind,) the number of
    components with non-zero variance (rows past it are zero), the unit's
    ``total_variance`` and the mean ``zmean`` of its small vector ``z_u``.
    Eigenvalues are unbiased variances (divided by ``n - 1``).
    """

    def __init__(self, spec: ReadoutSpec, units: tuple[str, ...], means: torch.Tensor,
                 pca: dict[str, dict[str, torch.Tensor]], num_samples: int, rtol: float,
                 fingerprint: dict | None = None):
        self.spec = spec
        self.units = units
        self.table = UnitTable(spec.num_layers, spec.num_heads)
        self.means = means
        self.pca = pca
        self.num_samples = num_samples
        self.rtol = rtol
        self.fingerprint = fingerprint if fingerprint is not None else spec.fingerprint()

    def _kind(self, kind: str) -> dict[str, torch.Tensor]:
        if kind not in self.pca:
            raise KeyError(f"no bases were fitted for unit kind {kind!r} (fitted: {self.units}); "
                           f"pass units=(..., {kind!r}) to fit_bases")
        return self.pca[kind]

    def components(self, kind: str) -> torch.Tensor:
        return self._kind(kind)["components"]

    def eigenvalues(self, kind: str) -> torch.Tensor:
        return self._kind(kind)["eigenvalues"]

    def rank(self, kind: str) -> torch.Tensor:
        return self._kind(kind)["rank"]

    def zmean(self, kind: str) -> torch.Tensor:
        return self._kind(kind)["zmean"]

    def evr(self, kind: str) -> torch.Tensor:
        """Explained-variance ratio of each component (U_kind, K)."""
        p = self._kind(kind)
        return p["eigenvalues"] / p["total_variance"].clamp_min(torch.finfo(torch.float64).tiny)[:, None]

    def unit_means(self, kind: str) -> torch.Tensor:
        return self.means[self.table.indices(kind)]

    def k_for_evr(self, kind: str, threshold: float) -> torch.Tensor:
        """Smallest ``k`` per unit whose cumulative EVR exceeds ``threshold`` (at most the rank)."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"evr threshold must be in (0, 1], got {threshold}")
        cum = self.evr(kind).cumsum(dim=-1)
        k = (cum <= threshold - 1e-12).sum(dim=-1) + 1
        return torch.minimum(k, self.rank(kind)).clamp_min(1)

    def __repr__(self) -> str:
        """Shapes and ranks at a glance (never the tensors)."""
        s = self.spec
        parts = []
        for kind in self.units:
            r = self.rank(kind)
            k90 = self.k_for_evr(kind, 0.9).double().mean().item()
            parts.append(f"{kind}: {r.numel()} units, rank {int(r.min())}-{int(r.max())}, "
                         f"k at 90% EVR {k90:.1f} on average")
        return (f"SpectralBases(family={s.family!r}, layers={s.num_layers}, heads={s.num_heads}, width={s.width}, "
                f"out_dim={s.out_dim}, samples={self.num_samples}, " + "; ".join(parts) + ")")

    def summary(self) -> dict[str, Any]:
        out = {"num_samples": self.num_samples, "units": list(self.units)}
        for kind in self.units:
            r = self.rank(kind)
            out[kind] = {"units": int(r.numel()), "rank_min": int(r.min()), "rank_max": int(r.max())}
        return out

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"means": self.means}
        for kind, p in self.pca.items():
            for name, t in p.items():
                tensors[f"{kind}.{name}"] = t
        meta = {
            "kind": "spectral_bases",
            "version": __version__,
            "units": list(self.units),
            "num_samples": self.num_samples,
            "rtol": self.rtol,
            "fingerprint": self.fingerprint,
        }
        save_bundle(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, visual: nn.Module) -> SpectralBases:
        tensors, meta = load_bundle(path, "spectral_bases")
        where = f"bases at {path}"
        check_meta(meta, {"version": is_str, "units": list_of(one_of(*UNIT_KINDS), non_empty=True, unique=True),
                          "num_samples": is_int(2), "rtol": is_float(0, 1, open_lo=True, open_hi=True),
                          "fingerprint": is_dict}, where)
        spec = get_adapter(visual).spec()
        why = fingerprint_mismatch(meta["fingerprint"], spec.fingerprint())
        if why:
            raise ValueError(f"bases at {path} were fitted on another model: {why}")
        table = UnitTable(spec.num_layers, spec.num_heads)
        D = spec.out_dim
        means = check_tensor(tensors, "means", where, (len(table), D))
        pca = {}
        for kind in UNIT_KINDS:
            if kind not in meta["units"]:
                continue
            U, q = table.count(kind), spec.raw_dim(kind) + 2
            comps = check_tensor(tensors, f"{kind}.components", where, (U, None, D))
            kmax = comps.shape[1]
            if kmax > min(q, D):
                raise CorruptFileError(f"{where}: {kind} has {kmax} components, more than its rank bound")
            rank = check_tensor(tensors, f"{kind}.rank", where, (U,), floating=False)
            if bool((rank < 0).any() or (rank > kmax).any()):
                raise CorruptFileError(f"{where}: {kind}.rank outside [0, {kmax}]")
            pca[kind] = {"components": comps, "eigenvalues": check_tensor(tensors, f"{kind}.eigenvalues", where,
                                                                           (U, kmax)),
                         "rank": rank, "total_variance": check_tensor(tensors, f"{kind}.total_variance", where, (U,)),
                         "zmean": check_tensor(tensors, f"{kind}.zmean", where, (U, q))}
        return cls(spec, tuple(k for k in UNIT_KINDS if k in meta["units"]), means, pca, int(meta["num_samples"]),
                   float(meta["rtol"]))


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "pixel_values"):
            if key in batch:
                return batch[key]
    raise TypeError(
        "each calibration batch must be an image tensor, an (images, ...) tuple or a dict with 'image'; "
        f"got {type(batch).__name__}"
    )


@torch.no_grad()
def accumulate_moments(visual: nn.Module, batches: Iterable, units: Sequence[str] = ("head",), *,
                       moments: UnitMoments | None = None, progress: bool = True,
                       max_batches: int | None = None, process_group=None) -> UnitMoments:
    """Stream ``batches`` through ``visual`` and accumulate the moments of every unit.

    Pass ``moments`` to continue an earlier accumulation; merge the results of
    several processes with :meth:`UnitMoments.merge`, or pass ``process_group``
    (a ``torch.distributed`` group; each rank streams its own disjoint shard of
    the data) to get the all-reduced moments of the union on every rank.
    ``visual`` is the plain model: an adapted encoder (:class:`residual_fast.ResiDualVisual`)
    is refused, since bases describe the base model.
    """
    adapter = get_adapter(_plain(visual, "accumulate_moments / fit_bases"))
    spec = adapter.spec()
    device = next(adapter.visual.parameters()).device
    if moments is None:
        moments = UnitMoments(spec, units, device=device)
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    with eval_mode(adapter.visual):
        bar = tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress)
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            images = _images_of(batch).to(device, non_blocking=True)
            acts = capture(adapter, images)
            check_finite_batch(acts, i, "calibration")
            moments.update(acts)
            bar.set_postfix(images=moments.count)
    return moments.all_reduce(process_group)


def fit_bases(visual: nn.Module, batches: Iterable, units: Sequence[str] = ("head",), *,
              rtol: float = 1e-10, progress: bool = True, max_batches: int | None = None,
              process_group=None) -> SpectralBases:
    """Fit exact per-unit PCA bases by streaming ``batches`` of images through ``visual``.

    Args:
        visual: the image tower (``model.visual`` for open_clip); not an adapted encoder
            (refused: the bases describe the base model, pass ``.unload()`` of it).
        batches: any iterable of image tensors ``(n, C, H, W)`` (or of ``(images,
            labels)`` tuples, as a DataLoader yields); moved to the model's device.
        units: unit kinds to fit PCA bases for, a subset of ``("emb", "head", "mlp")``.
            Calibration means are kept for every unit (for mean ablation).
        rtol: components with variance below ``rtol`` times the unit's largest are
            dropped (they carry no signal; a head has at most ``head_dim + 2``).
        progress: show a progress bar.
        max_batches: stop after this many batches.
        process_group: a ``torch.distributed`` group whose ranks each pass a disjoint shard of the
            calibration data (see :func:`residual_fast.distributed.shard_range`); the moments are
            all-reduced in float64, so every rank gets the bases of the whole data (equal to one
            process's to float64 rounding).
    """
    units = _check_kinds(units)
    check_rtol(rtol)
    return accumulate_moments(visual, batches, units, progress=progress, max_batches=max_batches,
                              process_group=process_group).bases(rtol)
