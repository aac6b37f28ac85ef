"""Residual units: their table, their raw activations and their affine readout.

Units are ordered along the residual stream: ``emb``, then for each layer its
``H`` heads and its MLP. Per kind, tensors are stacked in that order
(heads layer-major).

Each unit's output-space contribution is affine in the small vector
``z_u = [r_u / s, 1 / s, mu / s]`` (DESIGN.md section 4)::

    o_u = z_u @ F_u + const_u
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.base import UNIT_KINDS, ReadoutSpec


@dataclass(frozen=True)
class Unit:
    kind: str
    layer: int  # -1 for emb
    head: int  # -1 unless kind == "head"
    index: int  # position in the residual-stream order


class UnitTable:
    """The units of a model with ``L`` layers and ``H`` heads, in residual-stream order."""

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers = num_layers
        self.num_heads = num_heads
        units = [Unit("emb", -1, -1, 0)]
        for layer in range(num_layers):
            for h in range(num_heads):
                units.append(Unit("head", layer, h, len(units)))
            units.append(Unit("mlp", layer, -1, len(units)))
        self.units = units

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, i: int) -> Unit:
        return self.units[i]

    def count(self, kind: str) -> int:
        return {"emb": 1, "head": self.num_layers * self.num_heads, "mlp": self.num_layers}[kind]

    def indices(self, kind: str) -> torch.Tensor:
        """Positions of the units of ``kind`` in the residual-stream order (kind order)."""
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {kind!r}; expected one of {UNIT_KINDS}")
        return torch.tensor([u.index for u in self.units if u.kind == kind], dtype=torch.long)

    def names(self) -> list[str]:
        out = []
        for u in self.units:
            out.append("emb" if u.kind == "emb" else f"L{u.layer}H{u.head}" if u.kind == "head" else f"L{u.layer}mlp")
        return out

    def as_rows(self) -> list[dict]:
        return [{"kind": u.kind, "layer": u.layer, "head": u.head, "index": u.index} for u in self.units]


def unit_weight(spec: ReadoutSpec, kind: str) -> float:
    """Share of the LayerNorm constant given to one unit (they sum to 1)."""
    share = 1.0 / (2 * spec.num_layers + 1)
    return share / spec.num_heads if kind == "head" else share


def ln_stats(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``sqrt(var + eps)`` of the final residual, as the LayerNorm computes them."""
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    mu = zf.mean(dim=-1)
    var = zf.var(dim=-1, unbiased=False)
    return mu, torch.sqrt(var + eps)


class Activations:
    """Raw unit vectors at the pooled position, as a :class:`UnitSink` fills them.

    ``emb`` (n, w), ``attn`` (n, L, w) heads before out-proj, ``mlp`` (n, L, w),
    ``z`` (n, w) the pooled final residual, ``output`` (n, D) the model's output.
    """

    def __init__(self) -> None:
        self._attn: list[torch.Tensor] = []
        self._mlp: list[torch.Tensor] = []
        self.emb_raw: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    # UnitSink
    def emb(self, r: torch.Tensor) -> None:
        self.emb_raw = r

    def attn(self, layer: int, r: torch.Tensor) -> None:
        self._attn.append(r)

    def mlp(self, layer: int, r: torch.Tensor) -> None:
        self._mlp.append(r)

    def finish(self, z: torch.Tensor, output: torch.Tensor) -> Activations:
        self.z, self.output = z, output
        self.attn_raw = torch.stack(self._attn, dim=1)
        self.mlp_raw = torch.stack(self._mlp, dim=1)
        self._attn, self._mlp = [], []
        return self

    @classmethod
    def from_tensors(cls, emb, attn, mlp, z, output) -> Activations:
        a = cls()
        a.emb_raw, a.attn_raw, a.mlp_raw, a.z, a.output = emb, attn, mlp, z, output
        return a

    def raw(self, kind: str, spec: ReadoutSpec) -> torch.Tensor:
        """(n, U_kind, raw_dim) raw vectors of one kind."""
        if kind == "emb":
            return self.emb_raw[:, None, :]
        if kind == "mlp":
            return self.mlp_raw
        n = self.attn_raw.shape[0]
        return self.attn_raw.reshape(n, spec.num_layers * spec.num_heads, spec.head_dim)

    def zvec(self, kind: str, spec: ReadoutSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``z_u = [r_u / s, 1 / s, mu / s]`` for every unit of ``kind``: (n, U_kind, raw_dim + 2)."""
        mu, s = ln_stats(self.z, spec.ln_eps)
        dtype = dtype or mu.dtype
        r = self.raw(kind, spec).to(dtype)
        mu, s = mu.to(dtype), s.to(dtype)
        inv = (1.0 / s)[:, None, None]
        extra = torch.stack([1.0 / s, mu / s], dim=-1)[:, None, :].expand(-1, r.shape[1], -1)
        return torch.cat([r * inv, extra], dim=-1)


def check_finite_batch(acts: Activations, i: int, what: str) -> None:
    """Raise naming the batch and the images whose activations hold NaN or Inf."""
    bad = ~torch.isfinite(acts.z).all(1) | ~torch.isfinite(acts.output).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(f"{what}: batch {i}, image(s) {idx[:10]} give non-finite activations (NaN or Inf in the "
                         "input images or the model's weights)")


def affine_maps(spec: ReadoutSpec, kind: str, dtype: torch.dtype = torch.float64,
                layers: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F`` (U, raw_dim + 2, D) and ``const`` (U, D) with ``o_u = z_u @ F_u + const_u``.

    For every unit of ``kind``, or only for the units of ``layers`` (heads and MLPs;
    chunking keeps the peak at one layer's maps when U x q x D would be large).
    """
    L, H, hd, w = spec.num_layers, spec.num_heads, spec.head_dim, spec.width
    if layers is None or kind == "emb":
        layers = range(L)
    gamma = spec.ln_weight.to(dtype)
    beta = spec.ln_bias.to(dtype)
    P = spec.proj.to(dtype) if spec.proj is not None else torch.eye(w, dtype=dtype, device=gamma.device)
    wu = unit_weight(spec, kind)
    gP = gamma[:, None] * P  # diag(gamma) @ P, (w, D)
    const_row = beta @ P
    if spec.proj_bias is not None:
        const_row = const_row + spec.proj_bias.to(dtype)
    ones = torch.ones(w, dtype=dtype, device=gamma.device)
    if kind == "head":
        tops, bias_rows = [], []
        for layer in layers:
            lr = spec.layers[layer]
            ls1 = lr.ls1.to(dtype) if lr.ls1 is not None else ones
            wo = lr.out_weight.to(dtype).view(w, H, hd)  # (out=w, H, hd)
            # W_u = W_o,l,h.T * ls1_l : (hd, w); rows of F: W_u @ diag(gamma) @ P
            tops.append((wo.permute(1, 2, 0) * ls1) @ gP)  # (H, hd, D)
            b = lr.out_bias.to(dtype) * ls1 / H if lr.out_bias is not None else torch.zeros_like(ones)
            bias_rows.append((b @ gP).expand(H, -1))
        top = torch.cat(tops)
        bias_row = torch.cat(bias_rows)
    else:
        if kind == "mlp":
            scale = torch.stack([spec.layers[i].ls2.to(dtype) if spec.layers[i].ls2 is not None else ones
                                 for i in layers])
        else:
            scale = ones[None]
        top = scale[:, :, None] * gP[None]  # (U, w, D)
        bias_row = torch.zeros(top.shape[0], gP.shape[1], dtype=dtype, device=gamma.device)
    count = top.shape[0]
    mu_row = (-wu * (gamma @ P)).expand(count, -1)
    F = torch.cat([top, bias_row[:, None, :], mu_row[:, None, :]], dim=1)
    const = (wu * const_row).expand(count, -1).clone()
    return F, const
