"""The ResiDual module (DESIGN.md section 3) and its factorized computation (section 4.3)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._version import __version__
from .models import UNIT_KINDS, ReadoutSpec, fingerprint_mismatch, get_adapter
from .ops import spectral_reweight
from .ops.spectral_reweight import PackedLayout, packed_index
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
from .spectral import SpectralBases, _check_kinds
from .units import Activations, UnitTable, affine_maps

VARIANTS: dict[str, dict] = {
    # one scalar per head, no PCA, other units dropped
    "coarse": {"units": ("head",), "scalar": True, "k": None, "evr_threshold": None, "padding": 0, "ablation": "zero"},
    # head components up to 90% cumulative EVR, the rest dropped
    "fine": {"units": ("head",), "scalar": False, "k": None, "evr_threshold": 0.9, "padding": 0, "ablation": "zero"},
    # every component of heads and MLPs, the embedding passed through
    "full": {"units": ("head", "mlp"), "scalar": False, "k": "all", "evr_threshold": None, "padding": 1,
             "ablation": "sum"},
}
ABLATIONS = ("sum", "mean", "zero")
INITS = ("ones", "randn", "eigen")


class UnitGroup(nn.Module):
    """The adapted units of one kind: packed components, their lambdas, spec-derived maps.

    ``bind`` derives, one layer at a time (never a K x q x D tensor), the
    coefficient maps ``R`` (K, q) with ``R_k = F_u B_k``, offsets ``t`` (K,) and,
    for heads, ``X`` (K, q) with ``B_u = X_u F_u`` (the components lie in the row
    space of the unit's affine map), plus the constants ``zF = sum_u zmean_u F_u``
    and ``const_sum = sum_u const_u``.
    """

    def __init__(self, kind: str, scalar: bool, components: torch.Tensor, offsets: torch.Tensor,
                 zmean: torch.Tensor, eigenvalues: torch.Tensor, lam: torch.Tensor):
        super().__init__()
        self.kind = kind
        self.scalar = scalar
        self.register_buffer("components", components)  # (K, D) packed
        self.register_buffer("offsets", offsets)  # (U + 1,)
        self.register_buffer("zmean", zmean)  # (U, q)
        self.register_buffer("eigenvalues", eigenvalues)  # (K,)
        self.lam = nn.Parameter(lam)
        # the packing as Python numbers: padding needs no device sync and traces under torch.compile/export
        self._ks = tuple(int(k) for k in (offsets[1:] - offsets[:-1]).tolist())
        self._starts = tuple(int(o) for o in offsets.tolist())
        self._kmax = max(max(self._ks, default=0), 1)
        self._uniform = bool(self._ks) and len(set(self._ks)) == 1 and self._ks[0] > 0
        units, pos, _ = packed_index(offsets)
        self.register_buffer("_units", units, persistent=False)
        self.register_buffer("_pos", pos, persistent=False)

    @property
    def num_units(self) -> int:
        return len(self._ks)

    def layout(self) -> PackedLayout:
        """The packing from the host-side numbers: spectral_reweight then never reads ``offsets`` (no sync)."""
        return PackedLayout(self._ks[0] if self._uniform else None, self._units, self._pos, self._kmax)

    def ks(self) -> list[int]:
        return list(self._ks)

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._units, self._pos

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows (K, ...) as (U, k_max, ...), zero-padded (a view when every ``k_u`` is equal)."""
        rest = tuple(x.shape[1:])
        if self._uniform:
            return x.view((self.num_units, self._ks[0]) + rest)
        out = x.new_zeros((self.num_units, self._kmax) + rest)
        return out.index_put((self._units, self._pos), x)

    def padded_components(self) -> torch.Tensor:
        return self.pad(self.components)

    def chunks(self, spec: ReadoutSpec) -> list[tuple[int, int, range]]:
        """(first unit, end unit, layers) per layer: the unit of bounded work."""
        if self.kind == "emb":
            return [(0, 1, range(0, 1))]
        per = spec.num_heads if self.kind == "head" else 1
        return [(layer * per, (layer + 1) * per, range(layer, layer + 1)) for layer in range(spec.num_layers)]

    @torch.no_grad()
    def bind(self, spec: ReadoutSpec) -> None:
        """Derive ``R``, ``t``, ``X``, ``zF``, ``const_sum`` from the model, one layer at a time (float64)."""
        dev = self.zmean.device
        f64 = torch.float64
        zmean = self.zmean.to(f64)
        q, D = zmean.shape[1], spec.out_dim
        K = self.components.shape[0]
        zF = torch.zeros(D, dtype=f64, device=dev)
        const_sum = torch.zeros(D, dtype=f64, device=dev)
        R = None if self.scalar else torch.zeros(K, q, dtype=f64, device=dev)
        X = None if self.scalar or self.kind != "head" else torch.zeros(K, q, dtype=f64, device=dev)
        # a model cast to half precision moves F by its rounding: tolerate that, not a foreign basis (~1)
        tol = max(1e-6, 30 * torch.finfo(spec.layers[0].out_weight.dtype).eps)
        for u0, u1, layers in self.chunks(spec):
            F, const = affine_maps(spec, self.kind, layers=layers)
            F, const = F.to(dev), const.to(dev)
            zF += torch.einsum("uq,uqd->d", zmean[u0:u1], F)
            const_sum += const.sum(0)
            if self.scalar:
                continue
            k0, k1 = self._starts[u0], self._starts[u1]
            if k0 == k1:
                continue
            lu, pos = self._units[k0:k1] - u0, self._pos[k0:k1]
            Bp = torch.zeros(u1 - u0, self._kmax, D, dtype=f64, device=dev)
            Bp[lu, pos] = self.components[k0:k1].to(f64)
            R[k0:k1] = (F @ Bp.transpose(1, 2))[lu, :, pos]  # (Kc, q)
            if X is not None:
                Xc = Bp @ torch.linalg.pinv(F)
                # the factorization needs B_u = X_u F_u: components outside the unit's output space (a tampered
                # or hand-made file) would be projected silently
                off = (Xc @ F - Bp).norm() / Bp.norm().clamp_min(1e-300)
                if off > tol:
                    raise CorruptFileError(f"{self.kind} components of layer {layers.start} do not lie in their units'"
                                           f" output space (relative residual {float(off):.1e}): not bases of this "
                                           "model")
                X[k0:k1] = Xc[lu, pos]
        self.register_buffer("zF", zF, persistent=False)
        self.register_buffer("const_sum", const_sum, persistent=False)
        if R is not None:
            self.register_buffer("R", R, persistent=False)
            self.register_buffer("t", -(zmean[self._units] * R).sum(dim=-1), persistent=False)
        if X is not None:
            self.register_buffer("X", X, persistent=False)


class ResiDual(nn.Module):
    """Spectral re-weighting of residual units (Basile et al., TMLR 2025, arXiv 2411.00246).

    Build it with :meth:`from_bases`. Its only parameters are the ``lambdas``.
    ``forward(acts)`` computes the adapted output embedding from the raw unit
    vectors of one pass (:class:`residual_fast.Activations`), never materializing
    an (n, U, D) tensor; :func:`residual_fast.ops.residual_reference` computes the
    same from materialized contributions.

    Semantics (per adapted unit ``u`` with mean ``m_u``, components ``B_u``)::

        y = sum_{u in A} ((o_u - m_u) @ B_u.T * lambda_u) @ B_u   [+ m_u if add_means]  + rest

    where components past ``k_u`` get ``padding`` (0 drops them, 1 passes them
    through) and ``rest`` is the sum of the other units' contributions (``"sum"``),
    of their calibration means (``"mean"``) or nothing (``"zero"``). The
    ``coarse`` variant instead scales each whole head contribution by one scalar.
    """

    def __init__(self, spec: ReadoutSpec, groups: dict[str, UnitGroup], means: torch.Tensor, *, variant: str,
                 padding: int, ablation: str, add_means: bool, init: str, seed: int, fingerprint: dict | None = None):
        super().__init__()
        self.table = UnitTable(spec.num_layers, spec.num_heads)
        self.groups = nn.ModuleDict(groups)
        self.register_buffer("means", means)  # (U, D) calibration means of every unit
        self.variant = variant
        self.padding = int(padding)
        self.ablation = ablation
        self.add_means = bool(add_means)
        self.init = init
        self.seed = seed
        self.fingerprint = fingerprint if fingerprint is not None else spec.fingerprint()
        self.out_dim = spec.out_dim
        self.backend = "auto"  # spectral_reweight implementation (see residual_fast.ops.backends)
        self._bind(spec)

    def _bind(self, spec: ReadoutSpec) -> None:
        self.spec = spec
        for g in self.groups.values():
            g.bind(spec)
        self._consts_cache = {}

    def _apply(self, fn, *args, **kwargs):
        """Casts and moves; under ``.half()`` / ``.bfloat16()`` every floating tensor stays in float32.

        The forward accumulates in float32 whatever the activations' dtype (half-precision
        activations are upcast), so rounding the bases, maps and lambdas to 8-11 bits would only
        add error - as much as the half-precision model's own (measured in tests/test_adoption.py).
        """
        self._consts_cache = {}
        return keep_fp32_under_half_casts(self, lambda: super(ResiDual, self)._apply(fn, *args, **kwargs))

    def _consts(self, dtype: torch.dtype) -> dict:
        """Everything the factorized forward needs that does not depend on the lambdas, in ``dtype``.

        Cached: converting the maps and forming the constants on every training
        step would cost more than the step itself. The dense ``F`` (U, q, D) is
        formed only for groups that apply it (coarse, or ``padding`` differing
        from the ablation's pass-through).
        """
        key = (dtype, self.means.device)
        if torch.compiler.is_compiling():
            # traced into the graph: a cache written here would hold graph outputs tied to autograd
            return self._build_consts(dtype)
        if key not in self._consts_cache:
            self._consts_cache[key] = self._build_consts(dtype)
        return self._consts_cache[key]

    def _build_consts(self, dtype: torch.dtype) -> dict:
        out = {"rest_mean": self._rest_mean().to(dtype) if self.ablation == "mean" else None}
        sum_abl = 1.0 if self.ablation == "sum" else 0.0
        for kind, g in self.groups.items():
            item = {"const_unit": (g.const_sum / g.num_units).to(dtype)}
            if g.scalar or self.padding - sum_abl:
                item["F"] = affine_maps(self.spec, kind)[0].to(device=g.zmean.device, dtype=dtype)
            if not g.scalar:
                item.update(R=g.R.to(dtype), t=g.t.to(dtype), B=g.components.to(dtype),
                            constant=self._group_constant(g).to(dtype))
            out[kind] = item
        return out

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_bases(cls, bases: SpectralBases, variant: str = "fine", *, units: Sequence[str] | None = None,
                   k: int | str | None = None, evr_threshold: float | None = None, padding: int | None = None,
                   ablation: str | None = None, add_means: bool = False, init: str = "randn",
                   seed: int = 0) -> ResiDual:
        """A ResiDual adapter from fitted bases.

        Args:
            bases: from :func:`residual_fast.fit_bases`.
            variant: ``"coarse"``, ``"fine"`` or ``"full"`` (the paper's three); the keyword
                arguments below override the variant's defaults.
            units: unit kinds to adapt (``"emb"``, ``"head"``, ``"mlp"``).
            k: components per unit: an int (clipped to each unit's rank) or ``"all"``.
            evr_threshold: instead of ``k``, the smallest ``k`` whose cumulative explained
                variance exceeds this (fine: 0.9).
            padding: weight of components past ``k``: 0 drops them, 1 passes them through.
            ablation: what the non-adapted units contribute: ``"sum"`` (their contributions),
                ``"mean"`` (their calibration means) or ``"zero"``.
            add_means: add the adapted units' calibration means back (the paper's code does not).
            init: lambda initialization: ``"randn"`` (the default, the paper's: N(1, 1), seeded),
                ``"ones"`` (every kept component at weight 1) or ``"eigen"`` (each component's standard
                deviation, ``sqrt(eigenvalue)``). No init is an identity start in general: the
                adapted model differs from the base model before training (``fine`` drops the
                other units and the kept ones' means; ``randn`` perturbs every weight).
            seed: seed of the ``randn`` initialization.
        """
        if not isinstance(bases, SpectralBases):
            raise TypeError(f"bases must be SpectralBases (from rf.fit_bases), got {type(bases).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)}")
        cfg = dict(VARIANTS[variant])
        if units is not None:
            cfg["units"] = _check_kinds(units)
        if k is not None or evr_threshold is not None:
            if k is not None and evr_threshold is not None:
                raise ValueError("give either k or evr_threshold, not both")
            cfg["k"], cfg["evr_threshold"] = k, evr_threshold
        if padding is not None:
            cfg["padding"] = padding
        if ablation is not None:
            cfg["ablation"] = ablation
        if cfg["padding"] not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {cfg['padding']!r}")
        if cfg["ablation"] not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {cfg['ablation']!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if cfg["scalar"] and (k is not None or evr_threshold is not None):
            raise ValueError(f"the {variant!r} variant has one scalar per unit and no components: k and "
                             "evr_threshold do not apply")
        if cfg["scalar"] and init == "eigen":
            raise ValueError("init='eigen' needs PCA components; the coarse variant has none")
        if cfg["scalar"] and add_means:
            raise ValueError("add_means applies to centered (PCA) variants, not to coarse")

        spec = bases.spec
        table = bases.table
        gen = torch.Generator().manual_seed(seed)
        groups = {}
        for kind in cfg["units"]:
            if cfg["scalar"]:
                n = table.count(kind)
                q = spec.raw_dim(kind) + 2
                lam = _init_lambda(init, torch.zeros(n), gen)
                groups[kind] = UnitGroup(kind, True, torch.zeros(0, spec.out_dim, dtype=torch.float64),
                                         torch.arange(n + 1), torch.zeros(n, q, dtype=torch.float64),
                                         torch.zeros(0, dtype=torch.float64), lam)
                continue
            if kind not in bases.pca:
                raise ValueError(f"the bases have no PCA for {kind!r} units (fitted: {bases.units}); "
                                 f"refit with fit_bases(..., units={tuple(cfg['units'])})")
            rank = bases.rank(kind)
            ks = _select_k(bases, kind, cfg["k"], cfg["evr_threshold"], rank)
            comps = bases.components(kind)
            eig = bases.eigenvalues(kind)
            offsets = torch.zeros(ks.numel() + 1, dtype=torch.long)
            offsets[1:] = ks.cumsum(0)
            units_idx, pos, _ = packed_index(offsets)
            packed = comps[units_idx, pos]
            packed_eig = eig[units_idx, pos]
            lam = _init_lambda(init, packed_eig, gen)
            groups[kind] = UnitGroup(kind, False, packed, offsets, bases.zmean(kind).clone(), packed_eig, lam)
        return cls(spec, groups, bases.means.clone(), variant=variant, padding=cfg["padding"],
                   ablation=cfg["ablation"], add_means=add_means, init=init, seed=seed, fingerprint=bases.fingerprint)

    # -- introspection ----------------------------------------------------------
    @property
    def lambdas(self) -> dict[str, nn.Parameter]:
        return {kind: g.lam for kind, g in self.groups.items()}

    def num_parameters(self) -> int:
        """Number of trainable numbers (the lambdas)."""
        return sum(p.numel() for p in self.parameters())

    def ks(self) -> dict[str, list[int]]:
        """Components per adapted unit (1 per unit for coarse)."""
        return {kind: g.ks() for kind, g in self.groups.items()}

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, units={tuple(self.groups)}, padding={self.padding}, "
                f"ablation={self.ablation!r}, add_means={self.add_means}, parameters={self.num_parameters()}")

    # -- the factorized computation --------------------------------------------
    def forward(self, acts: Activations) -> torch.Tensor:
        """Adapted output embedding (n, D) from one pass's raw unit vectors."""
        if not isinstance(acts, Activations):
            raise TypeError("ResiDual expects residual_fast.Activations (from a capture or cache); "
                            "to adapt an image encoder use rf.ResiDualVisual(visual, adapter)")
        dtype = acts.output.dtype if acts.output.dtype in (torch.float32, torch.float64) else torch.float32
        y = torch.zeros(acts.output.shape[0], self.out_dim, dtype=dtype, device=acts.output.device)
        sum_abl = 1.0 if self.ablation == "sum" else 0.0
        consts = self._consts(dtype)
        for kind, g in self.groups.items():
            Z = acts.zvec(kind, self.spec, dtype=dtype)
            c = consts[kind]
            lam = g.lam.to(dtype)
            if g.scalar:
                y = y + _flat_mm(Z * (lam - sum_abl)[:, None], c["F"]) + (lam - sum_abl).sum() * c["const_unit"]
                continue
            y = y + spectral_reweight(Z, c["R"], c["t"], lam - self.padding, c["B"], g.offsets,
                                      backend=self.backend, layout=g.layout())
            lin = self.padding - sum_abl
            if lin:
                y = y + lin * _flat_mm(Z, c["F"])
            y = y + c["constant"]
        if self.ablation == "sum":
            y = y + acts.output.to(dtype)
        elif self.ablation == "mean":
            y = y + consts["rest_mean"].to(y.device)
        return y

    def _group_constant(self, g: UnitGroup) -> torch.Tensor:
        """Constant of a PCA group: ``-padding * zmean F + add_means * m - [sum] const``."""
        out = -self.padding * g.zF
        if self.add_means:
            idx = self.table.indices(g.kind).to(self.means.device)
            out = out + self.means[idx].to(g.zF.dtype).sum(0)
        if self.ablation == "sum":
            out = out - g.const_sum
        return out

    def _rest_mean(self) -> torch.Tensor:
        rest = torch.ones(len(self.table), dtype=torch.bool)
        for kind in self.groups:
            rest[self.table.indices(kind)] = False
        return self.means[rest.to(self.means.device)].sum(0)

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
        """Write the adapter to the folder ``path`` (safetensors tensors + JSON metadata), exactly (float64 bases).

        ``base_model_name_or_path`` is recorded for people; the model check on load is by
        fingerprint. For small float32 files see :meth:`residual_fast.ResiDualVisual.save_pretrained`.
        """
        tensors = {"means": self.means}
        for kind, g in self.groups.items():
            for name in ("components", "offsets", "zmean", "eigenvalues"):
                tensors[f"{kind}.{name}"] = getattr(g, name)
            tensors[f"{kind}.lambda"] = g.lam
        meta = {
            "kind": "residual_adapter",
            "version": __version__,
            "variant": self.variant,
            "units": list(self.groups),
            "scalar": {k: g.scalar for k, g in self.groups.items()},
            "k": self.ks(),
            "padding": self.padding,
            "ablation": self.ablation,
            "add_means": self.add_means,
            "init": self.init,
            "seed": self.seed,
            "num_parameters": self.num_parameters(),
            "fingerprint": self.fingerprint,
            "base_model_name_or_path": base_model_name_or_path,
        }
        save_bundle(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, visual: nn.Module) -> ResiDual:
        """Load an adapter saved with :meth:`save` onto ``visual`` (the model it was fitted on).

        The file is untrusted: its checksum, metadata (schema, allowed values,
        consistency with the tensors) and tensors (shapes, finiteness) are checked,
        and so is the model's fingerprint; any problem is one clear error.
        """
        tensors, meta = load_bundle(path, "residual_adapter")
        where = f"adapter at {path}"
        check_meta(meta, {
            "version": is_str, "variant": one_of(*VARIANTS),
            "units": list_of(one_of(*UNIT_KINDS), non_empty=True, unique=True),
            "scalar": is_dict, "k": is_dict, "padding": one_of(0, 1), "ablation": one_of(*ABLATIONS),
            "add_means": is_bool, "init": one_of(*INITS), "seed": is_int(), "num_parameters": is_int(0),
            "fingerprint": is_dict,
        }, where)
        if "base_model_name_or_path" in meta:  # absent from files of earlier versions
            check_meta(meta, {"base_model_name_or_path": optional(is_str)}, where)
        spec = get_adapter(visual).spec()
        why = fingerprint_mismatch(meta["fingerprint"], spec.fingerprint())
        if why:
            raise ValueError(f"the adapter at {path} was fitted on another model: {why}")
        table = UnitTable(spec.num_layers, spec.num_heads)
        D = spec.out_dim
        means = check_tensor(tensors, "means", where, (len(table), D), floating=True)
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
            K = sum(ks)
            offsets = check_tensor(tensors, f"{kind}.offsets", where, (U + 1,), floating=False)
            if offsets[0].item() != 0 or (offsets[1:] - offsets[:-1]).tolist() != ks:
                raise CorruptFileError(f"{where}: {kind}.offsets disagree with the recorded 'k'")
            nc = 0 if scalar else K
            comps = check_tensor(tensors, f"{kind}.components", where, (nc, D))
            zmean = check_tensor(tensors, f"{kind}.zmean", where, (U, q))
            eig = check_tensor(tensors, f"{kind}.eigenvalues", where, (nc,))
            lam = check_tensor(tensors, f"{kind}.lambda", where, (K,))
            groups[kind] = UnitGroup(kind, scalar, comps, offsets, zmean, eig, lam)
        if meta["num_parameters"] != sum(g.lam.numel() for g in groups.values()):
            raise CorruptFileError(f"{where}: 'num_parameters' disagrees with the stored lambdas")
        if meta["add_means"] and any(g.scalar for g in groups.values()):
            raise CorruptFileError(f"{where}: 'add_means' applies to PCA variants only")
        out = cls(spec, groups, means, variant=meta["variant"], padding=meta["padding"],
                  ablation=meta["ablation"], add_means=meta["add_means"], init=meta["init"], seed=meta["seed"])
        return out.to(spec.ln_weight.device)


HALF = (torch.float16, torch.bfloat16)


def keep_fp32_under_half_casts(module: nn.Module, apply: Callable[[], nn.Module]) -> nn.Module:
    """Run ``apply`` (a ``Module._apply``) and put back in float32 what it cast from fp32/fp64 to a half dtype.

    Parameters keep their identity (their ``.data`` is replaced, as ``Module._apply`` does), so an
    optimizer built before the cast still holds them.
    """
    before = {}
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.dtype in (torch.float32, torch.float64):
                    before[(id(mod), name)] = t.detach()
    out = apply()
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                old = before.get((id(mod), name))
                if t is None or old is None or t.dtype not in HALF:
                    continue
                fixed = old.to(device=t.device, dtype=torch.float32)
                if isinstance(t, nn.Parameter):
                    t.data = fixed
                    if t.grad is not None:
                        t.grad = t.grad.to(torch.float32)
                else:
                    store[name] = fixed
    return out


def _flat_mm(Z: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``sum_u Z[:, u] @ F[u]`` as one GEMM (an einsum would materialize (U, n, D))."""
    return Z.reshape(Z.shape[0], -1) @ F.reshape(-1, F.shape[-1])


def _select_k(bases: SpectralBases, kind: str, k, evr_threshold, rank: torch.Tensor) -> torch.Tensor:
    if evr_threshold is not None:
        return bases.k_for_evr(kind, float(evr_threshold))
    if k is None or k == "all":
        return rank.clone()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int or 'all', got {k!r}")
    return torch.clamp(rank, max=k)


def _init_lambda(init: str, eigenvalues: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = eigenvalues.numel()
    if init == "ones":
        return torch.ones(n)
    if init == "randn":
        return torch.randn(n, generator=gen) + 1.0
    return eigenvalues.to(torch.float32).clamp_min(0).sqrt()
