"""The lean inference form of a ResiDual adapter (DESIGN.md section 4.5).

Every head's output-space component lies in the row space of the head's own
affine map ``F_u`` (``B_u = X_u F_u``), so the folded map of a head is
``G_u = R_u diag(w_u) B_u = A_u F_u`` with a ``q x q`` matrix ``A_u``
(``q = hd + 2``). Since ``F_u``'s rows are the model's own out-projection
columns times the layer scale, the final norm's scale and the projection, a
layer's heads read out as

    acc_w += (r_l @ blockdiag_h(A_h[:hd, :hd])) @ W_o,l.T * ls1_l  (+ bias and mean terms)

in width space, and once at the end ``y = ((acc_w * gamma) @ P + acc_D + v1) / s
+ (mu / s) v2 + c [+ out]`` through the model's own ``P``. The only new numbers
are ``H x hd x q`` per layer (``H`` scalars per layer for coarse). MLP and
embedding units have ``q = w + 2``; their folded ``(w, D)`` map is already the
small form (one per adapted layer), accumulated in output space (``acc_D``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .models.base import LiveReadout
from .ops.readout import readout
from .units import ln_stats

F64 = torch.float64


@dataclass
class LeanReadout:
    """What the adapted forward needs beyond the model: a few small tensors.

    ``head_A`` (L, H, hd, q): per-head maps applied before each layer's
    out-projection (its last two columns feed the bias and mean rows);
    ``head_scale`` (L, H): the coarse variant's per-head scalars instead;
    ``mlp_M`` (L, w, D) / ``emb_M`` (1, w, D): folded maps of adapted MLP /
    embedding units; ``v1``, ``v2``, ``c`` (D,): the ``1/s``, ``mu/s`` and
    constant terms; ``add_output``: add the model's own output (``"sum"`` ablation).
    """

    head_A: torch.Tensor | None
    head_scale: torch.Tensor | None
    mlp_M: torch.Tensor | None
    emb_M: torch.Tensor | None
    v1: torch.Tensor
    v2: torch.Tensor
    c: torch.Tensor
    add_output: bool
    head_weight: float  # the LayerNorm-constant share of one head, 1 / ((2L + 1) H)

    TENSORS = ("head_A", "head_scale", "mlp_M", "emb_M", "v1", "v2", "c")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def cast(self, dtype: torch.dtype, acc_dtype: torch.dtype, device: torch.device | None = None) -> LeanReadout:
        """Maps in the model's ``dtype``, the epilogue vectors in the accumulation dtype."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=acc_dtype if f.name in ("v1", "v2", "c") else dtype)
            out[f.name] = v
        return LeanReadout(**out)


# -- pushing per-unit row vectors through the model's own readout (no F materialized) --------------
def _ones_like_width(live: LiveReadout, w: int) -> torch.Tensor:
    return torch.ones(w, dtype=F64, device=live.layers[0].out_weight.device)


def head_rows_to_width(live: LiveReadout, Q: torch.Tensor, num_heads: int, head_weight: float) -> torch.Tensor:
    """``sum_u Q_u E_u`` for head rows ``Q`` (m, L, H, q), where ``F_u = E_u diag(gamma) P``: (m, w)."""
    m, L, H, q = Q.shape
    hd = q - 2
    w = H * hd
    out = Q.new_zeros(m, w)
    for layer, lr in enumerate(live.layers):
        u = Q[:, layer, :, :hd].reshape(m, w) @ lr.out_weight.to(F64).T
        if lr.out_bias is not None:
            u = u + Q[:, layer, :, hd].sum(-1)[:, None] * (lr.out_bias.to(F64) / num_heads)
        if lr.ls1 is not None:
            u = u * lr.ls1.to(F64)
        out = out + u
    return out - head_weight * Q[..., hd + 1].sum((1, 2))[:, None]


def raw_rows_to_width(live: LiveReadout, kind: str, Q: torch.Tensor, unit_w: float) -> torch.Tensor:
    """The same for MLP (Q: (m, L, w + 2)) or embedding (Q: (m, 1, w + 2)) rows: (m, w)."""
    w = Q.shape[-1] - 2
    r = Q[..., :w]
    if kind == "mlp":
        ones = _ones_like_width(live, w)
        r = r * torch.stack([lr.ls2.to(F64) if lr.ls2 is not None else ones for lr in live.layers])
    return r.sum(1) - unit_w * Q[..., w + 1].sum(1)[:, None]


def width_to_output(live: LiveReadout, x: torch.Tensor) -> torch.Tensor:
    """``(x * gamma) @ P`` through the model's own final-norm scale and projection."""
    dt = x.dtype
    if live.ln_weight is not None:
        x = x * live.ln_weight.to(dt)
    return x @ live.proj.to(dt) if live.proj is not None else x


def const_row(live: LiveReadout, w: int) -> torch.Tensor:
    """``beta @ P + proj_bias``: the LayerNorm constant that every unit shares a part of."""
    dev = live.layers[0].out_weight.device
    beta = live.ln_bias.to(F64) if live.ln_bias is not None else torch.zeros(w, dtype=F64, device=dev)
    row = beta @ live.proj.to(F64) if live.proj is not None else beta
    return row + live.proj_bias.to(F64) if live.proj_bias is not None else row


def raw_map(live: LiveReadout, kind: str, layer: int, w: int) -> torch.Tensor:
    """The raw rows of ``F_u`` of an MLP / embedding unit: ``diag(ls * gamma) P`` (w, D), float64."""
    dev = live.layers[0].out_weight.device
    scale = torch.ones(w, dtype=F64, device=dev)
    if kind == "mlp" and live.layers[layer].ls2 is not None:
        scale = scale * live.layers[layer].ls2.to(F64)
    if live.ln_weight is not None:
        scale = scale * live.ln_weight.to(F64)
    P = live.proj.to(F64) if live.proj is not None else torch.eye(w, dtype=F64, device=dev)
    return scale[:, None] * P


# -- the fold --------------------------------------------------------------------------------------
def fold_lean(adapter, live: LiveReadout) -> LeanReadout:
    """The lean readout of ``adapter`` (a :class:`ResiDual`) with its current lambdas, in float64.

    Differentiable in the lambdas. Works one unit group at a time; MLP maps one
    layer at a time.
    """
    from .units import unit_weight

    spec = adapter.spec
    L, H, hd, w, D = spec.num_layers, spec.num_heads, spec.head_dim, spec.width, spec.out_dim
    dev = adapter.means.device
    sum_abl = 1.0 if adapter.ablation == "sum" else 0.0
    pad = float(adapter.padding)
    crow = const_row(live, w).to(dev)
    v1 = torch.zeros(D, dtype=F64, device=dev)
    v2 = torch.zeros_like(v1)
    c = torch.zeros_like(v1)
    head_A = head_scale = None
    maps: dict[str, torch.Tensor] = {}
    for kind, g in adapter.groups.items():
        wu = unit_weight(spec, kind)
        U = g.num_units
        lam = g.lam.to(F64)
        zmean = g.zmean.to(F64)
        if kind == "head":
            q = hd + 2
            eye = torch.eye(q, dtype=F64, device=dev)
            if g.scalar:
                s = lam - sum_abl
                A = s[:, None, None] * eye
                Qc = torch.zeros(U, q, dtype=F64, device=dev)
                head_scale = s.view(L, H)
            else:
                wts = lam - pad
                A0 = (g.pad(g.R.to(F64)) * g.pad(wts)[..., None]).transpose(1, 2) @ g.pad(g.X.to(F64))
                A = A0 + (pad - sum_abl) * eye
                # centering ((t * w) @ B = -zmean A0 F) and the padding's mean term
                Qc = -(zmean[:, None, :] @ A0)[:, 0] - pad * zmean
                head_A = A[:, :hd, :].reshape(L, H, hd, q)
            Q = torch.stack([A[:, hd], A[:, hd + 1], Qc]).view(3, L, H, q)
            rows = width_to_output(live, head_rows_to_width(live, Q, H, wu)).to(dev)
            v1, v2, c = v1 + rows[0], v2 + rows[1], c + rows[2]
            if g.scalar:
                c = c + s.sum() * wu * crow
        else:
            gP_last = -wu * width_to_output(live, torch.ones(1, w, dtype=F64, device=dev))[0]  # F_u's mu row
            Ms = []
            if g.scalar:
                s = lam - sum_abl
                for i in range(U):
                    Ms.append(s[i] * raw_map(live, kind, i, w))
                v2 = v2 + s.sum() * gP_last
                c = c + s.sum() * wu * crow
            else:
                wts = lam - pad
                lin = pad - sum_abl
                Rp, wp, Bp = g.pad(g.R.to(F64)), g.pad(wts), g.pad(g.components.to(F64))
                for i in range(U):
                    G = (Rp[i] * wp[i][:, None]).T @ Bp[i]  # (w + 2, D)
                    M = G[:w]
                    if lin:
                        M = M + lin * raw_map(live, kind, i, w)
                    Ms.append(M)
                    v1 = v1 + G[w]
                    v2 = v2 + G[w + 1]
                if lin:
                    v2 = v2 + lin * U * gP_last
                zrow = raw_rows_to_width(live, kind, zmean[None], wu)
                c = c + (g.t.to(F64) * wts) @ g.components.to(F64) - pad * width_to_output(live, zrow)[0]
            maps[kind] = torch.stack(Ms)
        if not g.scalar:
            if adapter.add_means:
                c = c + adapter.means[adapter.table.indices(kind).to(dev)].to(F64).sum(0)
            if sum_abl:
                c = c - U * wu * crow
    if adapter.ablation == "mean":
        c = c + adapter._rest_mean().to(F64)
    return LeanReadout(head_A, head_scale, maps.get("mlp"), maps.get("emb"), v1, v2, c,
                       add_output=adapter.ablation == "sum", head_weight=unit_weight(spec, "head"))


# -- the forward -----------------------------------------------------------------------------------
class LeanSink:
    """Receives the raw unit vectors during the walk and accumulates the lean readout.

    ``acc_w`` (n, w): head terms in width space (before the final norm's scale and
    the projection); ``acc_d`` (n, D): MLP / embedding maps; ``beta`` (n,): the
    heads' mean-row coefficients. No (n, U, ...) tensor is formed.
    """

    def __init__(self, lean: LeanReadout, live: LiveReadout, n: int, num_heads: int, acc_dtype: torch.dtype,
                 device: torch.device, backend: str):
        self.lean, self.live, self.H = lean, live, num_heads
        self.acc_dtype, self.backend = acc_dtype, backend
        w = live.layers[0].out_weight.shape[0]
        D = lean.v1.shape[0]
        heads = lean.head_A is not None or lean.head_scale is not None
        self.acc_w = torch.zeros(n, w, dtype=acc_dtype, device=device) if heads else None
        self.beta = torch.zeros(n, dtype=acc_dtype, device=device) if lean.head_A is not None else None
        maps = lean.mlp_M is not None or lean.emb_M is not None
        self.acc_d = torch.zeros(n, D, dtype=acc_dtype, device=device) if maps else None

    def _map(self, r: torch.Tensor, M: torch.Tensor) -> None:
        if r.dtype == self.acc_dtype and M.dtype == self.acc_dtype:
            if torch.compiler.is_compiling():
                self.acc_d.addmm_(r, M)
            else:
                readout(self.acc_d, r, M, backend=self.backend)
        else:  # low-precision model: product in its dtype, accumulation in fp32
            self.acc_d.add_(r @ M.to(r.dtype))

    def emb(self, r: torch.Tensor) -> None:
        if self.lean.emb_M is not None:
            self._map(r, self.lean.emb_M[0])

    def mlp(self, layer: int, r: torch.Tensor) -> None:
        if self.lean.mlp_M is not None:
            self._map(r, self.lean.mlp_M[layer])

    def attn(self, layer: int, r: torch.Tensor) -> None:
        lean = self.lean
        if self.acc_w is None:
            return
        n, w = r.shape
        H = self.H
        hd = w // H
        lr = self.live.layers[layer]
        alpha = None
        if lean.head_scale is not None:
            v = (r.view(n, H, hd) * lean.head_scale[layer].to(r.dtype)[:, None]).view(n, w)
        else:
            T = torch.bmm(r.view(n, H, hd).transpose(0, 1), lean.head_A[layer].to(r.dtype))  # (H, n, q)
            v = T[..., :hd].transpose(0, 1).reshape(n, w)
            ab = T[..., hd:].sum(0).to(self.acc_dtype)  # (n, 2): bias-row and mean-row coefficients
            alpha = ab[:, 0]
            self.beta.add_(ab[:, 1])
        u = F.linear(v, lr.out_weight.to(v.dtype)).to(self.acc_dtype)
        if alpha is not None and lr.out_bias is not None:
            u = u + alpha[:, None] * (lr.out_bias.to(self.acc_dtype) / H)
        if lr.ls1 is not None:
            u = u * lr.ls1.to(self.acc_dtype)
        self.acc_w.add_(u)

    def finish(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        lean, acc = self.lean, self.acc_dtype
        mu, s = ln_stats(z, self.live.ln_eps)
        mu, s = mu.to(acc)[:, None], s.to(acc)[:, None]
        y = lean.v1.to(acc).expand(z.shape[0], -1)
        if self.acc_w is not None:
            x = self.acc_w
            if self.beta is not None:
                x = x - lean.head_weight * self.beta[:, None]
            y = y + width_to_output(self.live, x)
        if self.acc_d is not None:
            y = y + self.acc_d
        y = y / s + (mu / s) * lean.v2.to(acc) + lean.c.to(acc)
        if lean.add_output:
            y = y + out.to(acc)
        return y.to(out.dtype)
