"""timm ``VisionTransformer`` adapter (supervised ViTs, DINOv2 ``vit_*_dinov2*`` with layer scale and registers).

The output decomposed is the model's own ``model(x)``: the pooled token
(``global_pool="token"``, final ``norm``) or the mean of the patch tokens
(``global_pool="avg"`` with ``fc_norm``), then ``head`` when it is a Linear
(a projection with a bias, shared like the LayerNorm constant).
"""

from __future__ import annotations

from torch import nn

from .base import UnsupportedModelError, layer_scale_gamma
from .generic import BlockView, LinearViTAdapter, fused_qkv


def _is_timm_vit(visual: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(visual, VisionTransformer)


class TimmViTAdapter(LinearViTAdapter):
    family = "timm_vit"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _is_timm_vit(visual)

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        m = visual
        if getattr(m, "attn_pool", None) is not None:
            raise UnsupportedModelError("attention pooling (global_pool='map') is not supported")
        pool = m.global_pool
        has_fc_norm = not isinstance(m.fc_norm, nn.Identity)
        if pool == "token":
            if not getattr(m, "has_class_token", m.cls_token is not None):
                raise UnsupportedModelError("global_pool='token' without a class token")
            if has_fc_norm:
                raise UnsupportedModelError("token pooling with fc_norm after a final norm is not supported")
            self.final_norm, self.pool_kind = m.norm, "cls"
        elif pool == "avg":
            if not has_fc_norm:
                raise UnsupportedModelError(
                    "mean pooling of tokens that were each normalized (global_pool='avg' without fc_norm) is not "
                    "linear in the residual units"
                )
            if not isinstance(m.norm, nn.Identity):
                raise UnsupportedModelError("mean pooling between two norms is not supported")
            self.final_norm, self.pool_kind = m.fc_norm, "mean"
        else:
            raise UnsupportedModelError(f"global_pool={pool!r} is not supported (use 'token' or 'avg')")
        self.num_prefix = 0 if getattr(m, "pool_include_prefix", False) else m.num_prefix_tokens
        self.blocks = []
        for i, blk in enumerate(m.blocks):
            attn = blk.attn
            if not (hasattr(attn, "qkv") and hasattr(attn, "proj")):
                raise UnsupportedModelError(f"block {i}: unsupported attention {type(attn).__name__}")
            if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None):
                raise UnsupportedModelError(f"block {i}: a norm or gate over the concatenated heads is not supported")
            if not all(hasattr(blk, a) for a in ("norm1", "norm2", "mlp", "ls1", "ls2")):
                raise UnsupportedModelError(f"block {i}: unsupported block type {type(blk).__name__}")
            self.blocks.append(BlockView(blk.norm1, fused_qkv(attn.qkv, attn.num_heads, attn.q_norm, attn.k_norm),
                                         attn.scale, attn.proj.weight, attn.proj.bias,
                                         layer_scale_gamma(blk.ls1, f"block {i} ls1"), blk.norm2, blk.mlp,
                                         layer_scale_gamma(blk.ls2, f"block {i} ls2")))
        self.num_heads = m.blocks[0].attn.num_heads
        self.width = m.embed_dim
        if isinstance(m.head, nn.Linear):
            self.proj_weight, self.proj_bias = m.head.weight.T, m.head.bias
        elif not isinstance(m.head, nn.Identity):
            raise UnsupportedModelError(f"unsupported head {type(m.head).__name__}")
        pe = m.patch_embed
        self.image_hw = None if getattr(pe, "dynamic_img_size", False) or getattr(m, "dynamic_img_size", False) \
            else tuple(pe.img_size)
        self.channels = pe.proj.in_channels

    def embed(self, images):
        m = self.visual
        # the model's own embedding steps (as in its forward_features)
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
