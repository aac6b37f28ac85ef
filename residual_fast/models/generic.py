"""A pre-norm ViT read through a few module handles: the base of the HF and timm adapters.

A family adapter says where things live (:class:`BlockView` per layer, the
embedding, the final LayerNorm, pooling, the projection); this class turns that
into the :class:`ReadoutSpec` and the walk. The walk runs the model's own
embedding, norms, MLPs and projections, and computes attention from the block's
own q/k/v weights through ``F.scaled_dot_product_attention`` so the per-head
output before the out-projection is available in the same pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerReadout, LiveReadout, ReadoutSpec, UnitSink, UnsupportedModelError, VisualAdapter


@dataclass
class BlockView:
    ln1: nn.Module
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # -> (n, H, T, hd) each
    scale: float
    out_weight: torch.Tensor  # (w, H * hd), torch Linear layout
    out_bias: torch.Tensor | None
    ls1: torch.Tensor | None  # layer scale of the attention branch
    ln2: nn.Module
    mlp: nn.Module
    ls2: torch.Tensor | None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, w = x.shape
    return x.view(n, t, heads, w // heads).transpose(1, 2)


def separate_qkv(attn: nn.Module, heads: int, q="q_proj", k="k_proj", v="v_proj"):
    """q/k/v from three Linear layers (HF CLIP, ViT, DINOv2)."""
    lq, lk, lv = getattr(attn, q), getattr(attn, k), getattr(attn, v)
    return lambda h: (split_heads(lq(h), heads), split_heads(lk(h), heads), split_heads(lv(h), heads))


def fused_qkv(linear: nn.Module, heads: int, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
    """q/k/v from one Linear producing [q; k; v] (BLIP, timm), with optional per-head q/k norms."""

    def run(h):
        n, t, _ = h.shape
        q, k, v = linear(h).view(n, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    return run


def _as_layernorm(module: nn.Module, what: str) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm):
        raise UnsupportedModelError(f"{what} must be a LayerNorm for an exact readout, got {type(module).__name__}")
    return module


class LinearViTAdapter(VisualAdapter):
    """Base of adapters for pre-norm ViTs with a LayerNorm (+ optional affine projection) readout.

    Subclasses set in ``__init__``: ``self.blocks`` (list of :class:`BlockView`),
    ``self.final_norm``, ``self.pool_kind`` (``"cls"`` or ``"mean"``),
    ``self.num_prefix`` (tokens before the patches), ``self.num_heads``,
    ``self.width``, ``self.proj_weight`` ((w, D) or None), ``self.proj_bias``
    ((D,) or None), ``self.image_hw`` and implement :meth:`embed`.
    """

    blocks: list[BlockView]
    final_norm: nn.LayerNorm
    pool_kind: str
    num_prefix: int
    num_heads: int
    width: int
    proj_weight: torch.Tensor | None = None
    proj_bias: torch.Tensor | None = None
    image_hw: tuple[int, int] | None = None
    channels: int = 3

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        super().check_images(images)
        if images.shape[1] != self.channels:
            raise ValueError(f"images must have {self.channels} channels, got shape {tuple(images.shape)}")
        if self.image_hw is not None and tuple(images.shape[-2:]) != tuple(self.image_hw):
            h, w = self.image_hw
            raise ValueError(f"images must be {h}x{w} for this model, got {tuple(images.shape[-2:])}")

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool_kind == "cls" else x[:, self.num_prefix:].mean(dim=1)

    vision_parts: list[tuple[str, nn.Module | None]] | None = None  # set where the module also has a text tower

    def named_tensors(self):
        if self.vision_parts is None:
            yield from super().named_tensors()
            return
        for prefix, mod in self.vision_parts:
            if mod is None:
                continue
            for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                if t.is_floating_point():
                    yield f"{prefix}.{name}", t

    def readout(self) -> LiveReadout:
        ln = _as_layernorm(self.final_norm, "the final norm")
        layers = [LayerReadout(b.out_weight, b.out_bias, b.ls1, b.ls2) for b in self.blocks]
        return LiveReadout(layers, ln.weight, ln.bias, float(ln.eps), self.proj_weight, self.proj_bias)

    def spec(self) -> ReadoutSpec:
        return ReadoutSpec.from_readout(self.family, self.pool_kind, self.num_heads, self.readout(), source=self)

    def walk(self, images: torch.Tensor, sink: UnitSink | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(images)
        if sink is not None:
            sink.emb(self._pool(x))
        for layer, b in enumerate(self.blocks):
            q, k, v = b.qkv(b.ln1(x))
            o = F.scaled_dot_product_attention(q, k, v, scale=b.scale)
            n, _, t, _ = o.shape
            heads = o.transpose(1, 2).reshape(n, t, -1)
            del q, k, v, o
            if sink is not None:
                sink.attn(layer, self._pool(heads))
            a = F.linear(heads, b.out_weight, b.out_bias)
            del heads
            x = x + (a * b.ls1 if b.ls1 is not None else a)
            del a
            m = b.mlp(b.ln2(x))
            if sink is not None:
                sink.mlp(layer, self._pool(m))
            x = x + (m * b.ls2 if b.ls2 is not None else m)
            del m
        z = self._pool(x)
        out = self.final_norm(z)
        if self.proj_weight is not None:
            out = out @ self.proj_weight
            if self.proj_bias is not None:
                out = out + self.proj_bias
        return z, out
