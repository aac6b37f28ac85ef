"""open_clip ``VisionTransformer`` adapter.

Everything is read from the module: layers, heads, widths, the final norm, the
projection, layer scales and pooling. The walk runs the model's own submodules
(patch embedding, norms, MLPs, layer scales, ``ln_post``) and computes attention
with the block's own weights through the same SDPA call, so that the per-head
output before ``out_proj`` is available without a second pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    LayerReadout,
    LiveReadout,
    ReadoutSpec,
    UnitSink,
    UnsupportedModelError,
    VisualAdapter,
    layer_scale_gamma,
)


def _is_open_clip_vit(visual: nn.Module) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return isinstance(visual, VisionTransformer)


class OpenCLIPVisualAdapter(VisualAdapter):
    family = "open_clip"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _is_open_clip_vit(visual)

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        self._validate()

    # -- configuration read from the module ---------------------------------
    def _validate(self) -> None:
        v = self.visual
        if getattr(v, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                "open_clip VisionTransformer with an attentional pooler (attn_pool) is not "
                "supported: the pooler mixes tokens non-linearly after the residual stream"
            )
        pool_type = getattr(v, "pool_type", "tok")
        if pool_type == "none":
            raise UnsupportedModelError("pool_type='none' returns all tokens; only pooled outputs are supported")
        if pool_type == "avg" and not getattr(v, "final_ln_after_pool", False):
            raise UnsupportedModelError(
                "mean pooling of tokens that were each normalized by ln_post (final_ln_after_pool=False) "
                "is not linear in the residual units; use final_ln_after_pool=True or CLS pooling"
            )
        if pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"unknown pool_type {pool_type!r}")
        if not isinstance(v.ln_post, nn.LayerNorm):
            raise UnsupportedModelError(
                f"ln_post must be a LayerNorm for the readout to be exact, got {type(v.ln_post).__name__}"
            )
        for i, blk in enumerate(v.transformer.resblocks):
            attn = blk.attn
            if hasattr(blk, "ln_1_kv"):
                raise UnsupportedModelError(f"block {i} is a cross-attention block")
            if isinstance(attn, nn.MultiheadAttention):
                if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                    raise UnsupportedModelError(
                        f"block {i}: nn.MultiheadAttention with separate q/k/v dims, bias_k/bias_v or "
                        "add_zero_attn is not supported"
                    )
            elif hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj") and hasattr(attn, "num_heads"):
                # open_clip's own Attention (CustomResidualAttentionBlock)
                if not isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity):
                    raise UnsupportedModelError(
                        f"block {i}: an inner norm over the concatenated heads (scale_attn_inner) mixes heads "
                        "non-linearly and is not supported"
                    )
                if getattr(attn, "logit_scale", None) is not None:
                    # open_clip 3.3's own forward of this path fails on 4-D inputs, so it cannot be checked
                    raise UnsupportedModelError(f"block {i}: scaled cosine attention is not supported")
                if not isinstance(getattr(blk, "ln_attn", nn.Identity()), nn.Identity):
                    raise UnsupportedModelError(
                        f"block {i}: a norm after attention (scale_attn) is not linear in the heads and is "
                        "not supported"
                    )
            else:
                raise UnsupportedModelError(f"block {i}: unsupported attention module {type(attn).__name__}")

    @property
    def pool(self) -> str:
        return "cls" if getattr(self.visual, "pool_type", "tok") == "tok" else "mean"

    def readout(self) -> LiveReadout:
        v = self.visual
        layers = []
        for blk in v.transformer.resblocks:
            o = blk.attn.out_proj
            layers.append(LayerReadout(o.weight, o.bias, layer_scale_gamma(blk.ls_1, "open_clip block"),
                                       layer_scale_gamma(blk.ls_2, "open_clip block")))
        ln = v.ln_post
        return LiveReadout(layers, ln.weight, ln.bias, float(ln.eps), getattr(v, "proj", None), None)

    def spec(self) -> ReadoutSpec:
        heads = self.visual.transformer.resblocks[0].attn.num_heads
        return ReadoutSpec.from_readout(self.family, self.pool, heads, self.readout(), source=self)

    # -- the walk -------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        super().check_images(images)
        v = self.visual
        channels = v.conv1.in_channels
        if images.shape[1] != channels:
            raise ValueError(f"images must have {channels} channels, got shape {tuple(images.shape)}")
        size = tuple(v.image_size)
        if tuple(images.shape[-2:]) != size:
            raise ValueError(f"images must be {size[0]}x{size[1]} for this model, got {tuple(images.shape[-2:])}")

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (n, grid*grid, w)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)

    @staticmethod
    def _heads(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Concatenated per-head attention outputs before ``out_proj``: (n, T, w)."""
        n, t, w = h.shape
        nh = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(n, t, 3, nh, w // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (n, H, T, hd)
        if isinstance(attn, nn.MultiheadAttention):
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(attn.ln_q(q), attn.ln_k(k), v)
            if getattr(attn, "head_scale", None) is not None:
                o = o * attn.head_scale
        return o.transpose(1, 2).reshape(n, t, w)

    def walk(self, images: torch.Tensor, sink: UnitSink | None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        if v.training and not isinstance(v.patch_dropout, nn.Identity):
            raise RuntimeError("patch dropout is active in training mode; call visual.eval() first")
        x = self._embed(images)
        if sink is not None:
            sink.emb(self._pool(x))
        for layer, blk in enumerate(v.transformer.resblocks):
            heads = self._heads(blk.attn, blk.ln_1(x))
            if sink is not None:
                sink.attn(layer, self._pool(heads))
            # drop each intermediate as soon as it is consumed: peak memory stays the plain model's
            x = x + blk.ls_1(F.linear(heads, blk.attn.out_proj.weight, blk.attn.out_proj.bias))
            del heads
            m = blk.mlp(blk.ln_2(x))
            if sink is not None:
                sink.mlp(layer, self._pool(m))
            x = x + blk.ls_2(m)
            del m
        z = self._pool(x)
        pooled = v.ln_post(z)
        out = pooled @ v.proj if v.proj is not None else pooled
        return z, out
