"""The PEFT-style surface: one-call construction, ``save_pretrained`` / ``from_pretrained``.

Alongside the step-by-step API (``fit_bases`` -> ``ResiDual.from_bases`` -> ``ResiDualVisual``):

* :func:`get_residual_model` (like ``peft.get_peft_model``): a model, calibration images and a
  variant in, the adapted model out;
* :func:`save_pretrained` / :func:`from_pretrained`: a folder with ``tensors.safetensors`` and
  ``meta.json`` (checksummed, written atomically, no pickle; see :mod:`residual_fast.serialization`)
  recording the base model's name and fingerprint. Tensors are float32. By default the file holds
  only what the adapter needs on its base model: the lambdas and, for heads, each kept
  component's coordinates in its unit's ``q``-dimensional input space (``B_u = X_u F_u``, ``F_u``
  read back from the model; DESIGN.md 4.5) instead of the ``D``-dimensional components - a fine
  adapter of a ViT-B is a few hundred KB. ``include_bases=True`` also stores the components and
  every unit's calibration mean as fitted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .decompose import _plain
from .fused import MergedResiDualVisual, ResiDualVisual
from .models import UNIT_KINDS, fingerprint_mismatch, get_adapter
from .residual import ABLATIONS, INITS, VARIANTS, ResiDual, UnitGroup
from .serialization import (
    CorruptFileError,
    check_meta,
    check_tensor,
    is_bool,
    is_dict,
    is_int,
    is_str,
    list_of,
    load_bundle,
    one_of,
    optional,
    save_bundle,
)
from .spectral import fit_bases
from .units import UnitTable, affine_maps

KIND = "residual_pretrained"
FORMAT = 1


def get_residual_model(model: nn.Module, calibration_data: Iterable | torch.Tensor, variant: str = "fine", *,
                       rtol: float = 1e-10, max_batches: int | None = None, progress: bool = False,
                       backend: str = "auto", **adapter_kwargs) -> ResiDualVisual:
    """Fit the spectral bases of ``model`` on ``calibration_data`` and return it adapted (trainable lambdas).

    The model's own parameters are frozen (``requires_grad=False``, as ``peft.get_peft_model`` does), so
    ``[p for p in adapted.parameters() if p.requires_grad]`` is exactly the lambdas.

    The one-call form of ``rf.fit_bases`` + ``rf.ResiDual.from_bases`` + ``rf.ResiDualVisual``.

    Args:
        model: the image tower (open_clip ``model.visual``, an HF CLIP / DINOv2 / ViT / BLIP
            model, a timm ViT); it is wrapped, not copied or changed.
        calibration_data: a tensor of preprocessed images ``(n, C, H, W)`` or an iterable of
            them (or of ``(images, labels)`` batches, as a DataLoader yields).
        variant: ``"coarse"``, ``"fine"`` or ``"full"`` (see :data:`residual_fast.VARIANTS`).
        rtol, max_batches, progress: as for :func:`residual_fast.fit_bases`.
        backend: the adapted forward's kernels (see :class:`residual_fast.ResiDualVisual`).
        **adapter_kwargs: passed to :meth:`residual_fast.ResiDual.from_bases` (``units``, ``k``,
            ``evr_threshold``, ``padding``, ``ablation``, ``add_means``, ``init``, ``seed``). The
            default ``init="randn"`` draws lambdas from N(1, 1): the adapted model does **not**
            start as the base model; ``init="ones"`` keeps every kept component at its weight.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)}")
    units = adapter_kwargs.get("units") or VARIANTS[variant]["units"]
    pca_units = ("head",) if VARIANTS[variant]["scalar"] else tuple(units)
    batches = [calibration_data] if isinstance(calibration_data, torch.Tensor) else calibration_data
    bases = fit_bases(model, batches, pca_units, rtol=rtol, progress=progress, max_batches=max_batches)
    # as PEFT does: the base weights are frozen, so the optimizer sees only the lambdas
    model.requires_grad_(False)
    return ResiDualVisual(model, ResiDual.from_bases(bases, variant, **adapter_kwargs), backend=backend)


def base_model_name(model: nn.Module) -> str | None:
    """The name a model was loaded under, where its library records one (HF ``name_or_path``, timm's hub id)."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name:
        return name
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        for key in ("hf_hub_id", "architecture"):
            if isinstance(cfg.get(key), str) and cfg[key]:
                return cfg[key]
    return None


def _needs_means(adapter: ResiDual) -> bool:
    return adapter.ablation == "mean" or adapter.add_means


def adapter_tensors(module: ResiDualVisual, include_bases: bool = False) -> dict[str, torch.Tensor]:
    """The float32 tensors :func:`save_pretrained` writes, under the file's keys."""
    if not isinstance(module, ResiDualVisual):
        raise TypeError(f"expected a residual_fast.ResiDualVisual, got {type(module).__name__}")
    adapter = module.adapter
    out: dict[str, torch.Tensor] = {}
    for kind, g in adapter.groups.items():
        out[f"{kind}.lambda"] = g.lam.detach().float()
        out[f"{kind}.offsets"] = g.offsets.detach()
        out[f"{kind}.zmean"] = g.zmean.detach().float()
        out[f"{kind}.eigenvalues"] = g.eigenvalues.detach().float()
        if g.scalar:
            continue
        if kind == "head" and not include_bases:
            out["head.coordinates"] = g.X.detach().float()  # (K, q): the components are X_u F_u on the model
        else:
            out[f"{kind}.components"] = g.components.detach().float()
    if include_bases or _needs_means(adapter):
        out["means"] = adapter.means.detach().float()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def save_pretrained(module: ResiDualVisual, directory: str | os.PathLike, *, include_bases: bool = False,
                    base_model_name_or_path: str | None = None) -> Path:
    """Write ``module``'s adapter to the folder ``directory`` (see the module docstring for what it holds).

    ``base_model_name_or_path`` is recorded for people (defaults to what the model records, see
    :func:`base_model_name`); the model check on load is by fingerprint.
    """
    if not isinstance(module, ResiDualVisual):
        raise TypeError(f"save_pretrained takes a residual_fast.ResiDualVisual, got {type(module).__name__} (a merged "
                        "module keeps no lambdas: save the ResiDualVisual it was merged from)")
    module._check_model()
    adapter = module.adapter
    name = base_model_name_or_path or getattr(module, "base_model_name_or_path", None) or \
        base_model_name(module.wrapped_visual)
    meta = {
        "kind": KIND, "format": FORMAT, "version": __version__, "variant": adapter.variant,
        "units": list(adapter.groups), "scalar": {k: g.scalar for k, g in adapter.groups.items()},
        "k": adapter.ks(), "padding": adapter.padding, "ablation": adapter.ablation, "add_means": adapter.add_means,
        "init": adapter.init, "seed": adapter.seed, "num_parameters": adapter.num_parameters(),
        "fingerprint": adapter.fingerprint, "base_model_name_or_path": name,
        "base_model_class": f"{type(module.wrapped_visual).__module__}.{type(module.wrapped_visual).__qualname__}",
        "family": module._walker.family, "include_bases": bool(include_bases), "dtype": "float32",
    }
    return save_bundle(directory, adapter_tensors(module, include_bases), meta)


SCHEMA = {
    "format": one_of(FORMAT), "version": is_str, "variant": one_of(*VARIANTS),
    "units": list_of(one_of(*UNIT_KINDS), non_empty=True, unique=True), "scalar": is_dict, "k": is_dict,
    "padding": one_of(0, 1), "ablation": one_of(*ABLATIONS), "add_means": is_bool, "init": one_of(*INITS),
    "seed": is_int(), "num_parameters": is_int(0), "fingerprint": is_dict, "base_model_name_or_path": optional(is_str),
    "base_model_class": is_str, "family": is_str, "include_bases": is_bool, "dtype": one_of("float32"),
}


def read_pretrained(model: nn.Module, directory: str | os.PathLike) -> tuple[ResiDual, dict]:
    """The :class:`ResiDual` saved in ``directory``, bound to ``model``, and the file's metadata.

    Everything read is checked: checksum, schema, the model's fingerprint, every tensor's
    name, shape, dtype class and finiteness, the packing, and that head components lie in
    their units' output spaces.
    """
    tensors, meta = load_bundle(directory, KIND)
    where = f"adapter at {directory}"
    check_meta(meta, SCHEMA, where)
    spec = get_adapter(_plain(model, "from_pretrained")).spec()
    why = fingerprint_mismatch(meta["fingerprint"], spec.fingerprint())
    if why:
        raise ValueError(f"the adapter at {directory} was fitted on another model: {why}")
    if meta["family"] != spec.family:
        raise ValueError(f"the adapter at {directory} is for a {meta['family']} model, this is {spec.family}")
    table = UnitTable(spec.num_layers, spec.num_heads)
    D, f64 = spec.out_dim, torch.float64
    expected = set()
    groups = {}
    for kind in meta["units"]:
        scalar = meta["scalar"].get(kind)
        if not isinstance(scalar, bool):
            raise CorruptFileError(f"{where}: 'scalar' must map {kind!r} to true or false")
        U, q = table.count(kind), spec.raw_dim(kind) + 2
        ks = meta["k"].get(kind)
        why = list_of(is_int(1 if scalar else 0, 1 if scalar else min(q, D)))(ks)
        if why or len(ks) != U:
            raise CorruptFileError(f"{where}: 'k' of {kind!r} must list {U} component counts ({why or ks!r})")
        K, nc = sum(ks), (0 if scalar else sum(ks))
        offsets = check_tensor(tensors, f"{kind}.offsets", where, (U + 1,), floating=False)
        if offsets[0].item() != 0 or (offsets[1:] - offsets[:-1]).tolist() != ks:
            raise CorruptFileError(f"{where}: {kind}.offsets disagree with the recorded 'k'")
        lam = check_tensor(tensors, f"{kind}.lambda", where, (K,)).float()
        zmean = check_tensor(tensors, f"{kind}.zmean", where, (U, q)).to(f64)
        eig = check_tensor(tensors, f"{kind}.eigenvalues", where, (nc,)).to(f64)
        expected |= {f"{kind}.{n}" for n in ("offsets", "lambda", "zmean", "eigenvalues")}
        if scalar:
            comps = torch.zeros(0, D, dtype=f64)
        elif kind == "head" and not meta["include_bases"]:
            X = check_tensor(tensors, "head.coordinates", where, (K, q)).to(f64)
            expected.add("head.coordinates")
            comps = _components_from_coordinates(spec, X, offsets)
        else:
            comps = check_tensor(tensors, f"{kind}.components", where, (K, D)).to(f64)
            expected.add(f"{kind}.components")
        groups[kind] = UnitGroup(kind, scalar, comps.to(zmean.device), offsets, zmean, eig, lam)
    if meta["include_bases"] or meta["ablation"] == "mean" or meta["add_means"]:
        means = check_tensor(tensors, "means", where, (len(table), D)).to(f64)
        expected.add("means")
    else:  # not read by this adapter's forward (no mean ablation, no added means)
        means = torch.zeros(len(table), D, dtype=f64)
    extra = set(tensors) - expected
    if extra:
        raise CorruptFileError(f"{where}: unexpected tensors {sorted(extra)}")
    if meta["num_parameters"] != sum(g.lam.numel() for g in groups.values()):
        raise CorruptFileError(f"{where}: 'num_parameters' disagrees with the stored lambdas")
    if meta["add_means"] and any(g.scalar for g in groups.values()):
        raise CorruptFileError(f"{where}: 'add_means' applies to PCA variants only")
    adapter = ResiDual(spec, groups, means, variant=meta["variant"], padding=meta["padding"],
                       ablation=meta["ablation"], add_means=meta["add_means"], init=meta["init"], seed=meta["seed"])
    return adapter.to(spec.ln_weight.device), meta


def _components_from_coordinates(spec, X: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Head components ``B_k = X_k F_u`` (K, D) from their coordinates, one layer's maps at a time."""
    H = spec.num_heads
    out = torch.zeros(X.shape[0], spec.out_dim, dtype=torch.float64, device=X.device)
    starts = offsets.tolist()
    for layer in range(spec.num_layers):
        F, _ = affine_maps(spec, "head", layers=range(layer, layer + 1))
        F = F.to(X.device)
        for h in range(H):
            u = layer * H + h
            k0, k1 = starts[u], starts[u + 1]
            out[k0:k1] = X[k0:k1] @ F[h]
    return out


def from_pretrained(model: nn.Module, directory: str | os.PathLike, *, merged: bool = False,
                    backend: str = "auto") -> ResiDualVisual | MergedResiDualVisual:
    """``model`` adapted by the adapter saved in ``directory`` (by :func:`save_pretrained`).

    Returns a trainable :class:`ResiDualVisual`, or with ``merged=True`` its frozen
    :meth:`~residual_fast.ResiDualVisual.merge`. The model may be cast (fp16 / bf16) or
    moved: the fingerprint check accepts the same weights in any dtype.
    """
    adapter, meta = read_pretrained(model, directory)
    module = ResiDualVisual(model, adapter, backend=backend)
    module.base_model_name_or_path = meta["base_model_name_or_path"]
    return module.merge() if merged else module
