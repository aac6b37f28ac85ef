"""HF transformers adapters: CLIP, BLIP, DINOv2 (with and without registers), supervised ViT.

Which module to pass, and what its output is:

| module | output decomposed |
|---|---|
| ``CLIPVisionModel`` | ``pooler_output`` (post_layernorm of CLS) |
| ``CLIPVisionModelWithProjection`` | ``image_embeds`` |
| ``CLIPModel`` | ``get_image_features`` (visual_projection of the pooled CLS) |
| ``BlipVisionModel`` | ``last_hidden_state[:, 0]`` (post_layernorm of CLS; its pooler applies the LayerNorm twice) |
| ``BlipForImageTextRetrieval`` | ``vision_proj(last_hidden_state[:, 0])`` (ITM image feature; projection with bias) |
| ``Dinov2Model`` / ``Dinov2WithRegistersModel`` | ``pooler_output`` (layernorm of CLS; layer scale on both branches) |
| ``ViTModel`` | ``last_hidden_state[:, 0]`` (layernorm of CLS; the tanh pooler is not linear) |
| ``ViTForImageClassification`` | ``logits`` (classifier on the normalized CLS) |
"""

from __future__ import annotations

import torch
from torch import nn

from .base import UnsupportedModelError
from .generic import BlockView, LinearViTAdapter, fused_qkv, separate_qkv


def _tf(name: str):
    try:
        import transformers
    except ImportError:
        return None
    return getattr(transformers, name, None)


def _isinstance(obj, *names: str) -> bool:
    classes = tuple(c for c in (_tf(n) for n in names) if c is not None)
    return bool(classes) and isinstance(obj, classes)


def _image_hw(config) -> tuple[int, int]:
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)



class HFCLIPAdapter(LinearViTAdapter):
    family = "hf_clip"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _isinstance(visual, "CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        vm = visual if _isinstance(visual, "CLIPVisionModel") else visual.vision_model
        cfg = vm.config
        self.vm = vm
        self.num_heads, self.width = cfg.num_attention_heads, cfg.hidden_size
        self.blocks = [
            BlockView(layer.layer_norm1, separate_qkv(layer.self_attn, self.num_heads), layer.self_attn.scale,
                      layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias, None, layer.layer_norm2,
                      layer.mlp, None)
            for layer in vm.encoder.layers
        ]
        self.final_norm = vm.post_layernorm
        self.pool_kind, self.num_prefix = "cls", 1
        proj = getattr(visual, "visual_projection", None)
        self.vision_parts = [("vision_model", vm), ("visual_projection", proj)]
        self.proj_weight = proj.weight.T if proj is not None else None
        self.proj_bias = proj.bias if proj is not None else None
        self.image_hw, self.channels = _image_hw(cfg), cfg.num_channels

    def embed(self, images):
        return self.vm.pre_layrnorm(self.vm.embeddings(images))


class HFBlipAdapter(LinearViTAdapter):
    family = "hf_blip"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _isinstance(visual, "BlipVisionModel", "BlipForImageTextRetrieval")

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        vm = visual if _isinstance(visual, "BlipVisionModel") else visual.vision_model
        cfg = vm.config
        self.vm = vm
        self.num_heads, self.width = cfg.num_attention_heads, cfg.hidden_size
        self.blocks = [
            BlockView(layer.layer_norm1, fused_qkv(layer.self_attn.qkv, self.num_heads), layer.self_attn.scale,
                      layer.self_attn.projection.weight, layer.self_attn.projection.bias, None, layer.layer_norm2,
                      layer.mlp, None)
            for layer in vm.encoder.layers
        ]
        self.final_norm = vm.post_layernorm
        self.pool_kind, self.num_prefix = "cls", 1
        proj = getattr(visual, "vision_proj", None)
        self.vision_parts = [("vision_model", vm), ("vision_proj", proj)]
        self.proj_weight = proj.weight.T if proj is not None else None
        self.proj_bias = proj.bias if proj is not None else None
        self.image_hw, self.channels = _image_hw(cfg), 3

    def embed(self, images):
        return self.vm.embeddings(images)


class HFDinov2Adapter(LinearViTAdapter):
    family = "hf_dinov2"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _isinstance(visual, "Dinov2Model", "Dinov2WithRegistersModel")

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        cfg = visual.config
        self.num_heads, self.width = cfg.num_attention_heads, cfg.hidden_size
        self.blocks = []
        for layer in visual.encoder.layer:
            attn = layer.attention
            self.blocks.append(BlockView(layer.norm1, separate_qkv(attn, self.num_heads), attn.scaling,
                                         attn.o_proj.weight, attn.o_proj.bias, layer.layer_scale1.lambda1,
                                         layer.norm2, layer.mlp, layer.layer_scale2.lambda1))
        self.final_norm = visual.layernorm
        self.pool_kind = "cls"
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.image_hw = None  # DINOv2 interpolates its position embeddings to any size
        self.channels = cfg.num_channels

    def embed(self, images):
        return self.visual.embeddings(images)


class HFViTAdapter(LinearViTAdapter):
    family = "hf_vit"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        return _isinstance(visual, "ViTModel", "ViTForImageClassification")

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        vit = visual if _isinstance(visual, "ViTModel") else visual.vit
        cfg = vit.config
        self.vit = vit
        self.num_heads, self.width = cfg.num_attention_heads, cfg.hidden_size
        self.blocks = []
        layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
        for layer in layers:
            attn = layer.attention
            if not hasattr(attn, "q_proj"):
                raise UnsupportedModelError("this transformers version's ViTAttention layout is not supported")
            self.blocks.append(BlockView(layer.layernorm_before, separate_qkv(attn, self.num_heads), attn.scaling,
                                         attn.o_proj.weight, attn.o_proj.bias, None, layer.layernorm_after,
                                         layer.mlp, None))
        self.final_norm = vit.layernorm
        self.pool_kind, self.num_prefix = "cls", 1
        head = getattr(visual, "classifier", None)
        if head is not None and not isinstance(head, nn.Identity):
            self.proj_weight, self.proj_bias = head.weight.T, head.bias
        self.image_hw, self.channels = _image_hw(cfg), cfg.num_channels

    def embed(self, images):
        return self.vit.embeddings(images)


def own_output(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's own forward for the output each HF adapter decomposes (used by tests and checks)."""
    if _isinstance(visual, "CLIPVisionModel", "Dinov2Model", "Dinov2WithRegistersModel"):
        return visual(pixel_values=images).pooler_output
    if _isinstance(visual, "CLIPVisionModelWithProjection"):
        return visual(pixel_values=images).image_embeds
    if _isinstance(visual, "CLIPModel"):
        out = visual.get_image_features(pixel_values=images)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    if _isinstance(visual, "BlipVisionModel", "ViTModel"):
        return visual(pixel_values=images).last_hidden_state[:, 0]
    if _isinstance(visual, "BlipForImageTextRetrieval"):
        return visual.vision_proj(visual.vision_model(pixel_values=images).last_hidden_state[:, 0])
    if _isinstance(visual, "ViTForImageClassification"):
        return visual(pixel_values=images).logits
    raise TypeError(f"not an HF model residual_fast knows: {type(visual).__name__}")


ADAPTERS = [HFCLIPAdapter, HFBlipAdapter, HFDinov2Adapter, HFViTAdapter]
