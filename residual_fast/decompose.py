"""Exact residual decomposition (the materializing reference, DESIGN.md section 2)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models import ReadoutSpec, VisualAdapter, get_adapter
from .units import Activations, UnitTable, ln_stats, unit_weight


@dataclass
class Decomposition:
    """Per-unit contributions of one batch of images.

    ``contributions`` (n, U, D) sum over units to ``output`` (n, D), the model's
    output; ``units`` says which unit each column is; ``mu``/``s`` are the final
    LayerNorm's mean and ``sqrt(var + eps)`` per image.
    """

    contributions: torch.Tensor
    units: UnitTable
    output: torch.Tensor
    mu: torch.Tensor
    s: torch.Tensor
    activations: Activations
    spec: ReadoutSpec

    def of(self, kind: str) -> torch.Tensor:
        """Contributions of the units of one kind: (n, U_kind, D)."""
        return self.contributions[:, self.units.indices(kind).to(self.contributions.device)]

    def total(self) -> torch.Tensor:
        return self.contributions.sum(dim=1)


@contextmanager
def eval_mode(module: nn.Module):
    """Temporarily put ``module`` in eval mode (dropout off), restoring it after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def capture(adapter: VisualAdapter | nn.Module, images: torch.Tensor) -> Activations:
    """One forward pass collecting every unit's raw vector at the pooled position.

    Args:
        adapter: the model itself (its image tower, as for :func:`decompose`) or the family
            adapter :func:`residual_fast.get_adapter` returns for it. An adapted encoder
            (:class:`residual_fast.ResiDualVisual`) is refused: its output is not the model's.
        images: preprocessed images ``(n, C, H, W)`` on the model's device.
    """
    if not isinstance(adapter, VisualAdapter):
        adapter = get_adapter(_plain(adapter, "capture"))
    adapter.check_images(images)
    acts = Activations()
    z, out = adapter.walk(images, acts)
    return acts.finish(z, out)


def _plain(visual: nn.Module, what: str) -> nn.Module:
    """``visual`` unless it is an adapted encoder, which is refused with what to pass instead."""
    if isinstance(visual, nn.Module) and "wrapped_visual" in visual._modules:
        raise TypeError(f"{what} takes the plain model; this is an adapted encoder ({type(visual).__name__}), whose "
                        f"output is not the model's. Pass its base model (.wrapped_visual or .unload())")
    return visual


def contributions_from_activations(acts: Activations, spec: ReadoutSpec, table: UnitTable) -> torch.Tensor:
    """Output-space contributions ``o_u`` (n, U, D) of DESIGN.md section 2, materialized."""
    dtype = acts.z.dtype if acts.z.dtype in (torch.float32, torch.float64) else torch.float32
    L, H, hd, w = spec.num_layers, spec.num_heads, spec.head_dim, spec.width
    mu, s = ln_stats(acts.z, spec.ln_eps)
    mu, s = mu.to(dtype), s.to(dtype)
    gamma, beta = spec.ln_weight.to(dtype), spec.ln_bias.to(dtype)
    n = acts.z.shape[0]
    wo = spec.attn_out_weight.to(dtype).view(L, w, H, hd)
    a = acts.attn_raw.to(dtype).view(n, L, H, hd)
    c_head = torch.einsum("nlhd,lwhd->nlhw", a, wo) + (spec.attn_out_bias.to(dtype) / H)[None, :, None, :]
    c_head = c_head * spec.ls_attn.to(dtype)[None, :, None, :]
    c_mlp = acts.mlp_raw.to(dtype) * spec.ls_mlp.to(dtype)[None]
    c_emb = acts.emb_raw.to(dtype)

    c = torch.empty(n, len(table), w, dtype=dtype, device=acts.z.device)
    c[:, table.indices("emb")] = c_emb[:, None]
    c[:, table.indices("head")] = c_head.reshape(n, L * H, w)
    c[:, table.indices("mlp")] = c_mlp
    weights = torch.tensor([unit_weight(spec, u.kind) for u in table], dtype=dtype, device=c.device)

    shift = gamma * (mu / s)[:, None] - beta  # (n, w)
    normed = gamma * c / s[:, None, None] - weights[None, :, None] * shift[:, None, :]
    o = normed @ spec.proj.to(dtype) if spec.proj is not None else normed
    if spec.proj_bias is not None:
        o = o + weights[None, :, None] * spec.proj_bias.to(dtype)
    return o


@torch.no_grad()
def decompose(visual: nn.Module, images: torch.Tensor) -> Decomposition:
    """Exact decomposition of ``visual(images)`` into its residual units.

    Args:
        visual: the image tower (for open_clip, ``model.visual``); an adapted encoder
            (:class:`residual_fast.ResiDualVisual`) is refused rather than silently decomposing
            the model it wraps.
        images: preprocessed images ``(n, C, H, W)`` on the model's device.

    Returns:
        A :class:`Decomposition` whose ``contributions.sum(1)`` equals the model's
        output up to floating-point rounding.
    """
    adapter = get_adapter(_plain(visual, "decompose"))
    with eval_mode(adapter.visual):
        acts = capture(adapter, images)
    spec = adapter.spec()
    table = UnitTable(spec.num_layers, spec.num_heads)
    contrib = contributions_from_activations(acts, spec, table)
    mu, s = ln_stats(acts.z, spec.ln_eps)
    return Decomposition(contrib, table, acts.output, mu, s, acts, spec)
