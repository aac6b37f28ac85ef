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

:func:`adapted_output` gives an adapted encoder's keyword call (``pixel_values=...``) the wrapped
model's own output class, with the decomposed field holding the adapted features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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


def _pooled(out) -> torch.Tensor:
    """A ``get_*_features`` result as a tensor (transformers >= 5 returns a ``BaseModelOutputWithPooling``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def features_output(y: torch.Tensor, return_dict: bool | None = None) -> Any:
    """What ``get_image_features`` returns in the installed transformers, holding ``y``."""
    import transformers as tf

    if int(tf.__version__.split(".")[0]) < 5:  # 4.x returns the projected features as a bare tensor
        return y
    out = tf.modeling_outputs.BaseModelOutputWithPooling(pooler_output=y)
    return out.to_tuple() if return_dict is False else out


def refuse_unadapted_options(kwargs: dict) -> None:
    """Options that would return (or need) the base model's own image computations."""
    if kwargs.pop("interpolate_pos_encoding", False):
        raise ValueError("interpolate_pos_encoding=True is not supported by the adapted encoder (the adapter's maps "
                         "assume the model's own image size); resize the images instead")
    for k in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(k, None):
            raise ValueError(f"{k}=True: the adapted encoder returns only the adapted pooled features (hidden states "
                             "and attentions would be the base model's); call .wrapped_visual for those")


def adapted_output(visual: nn.Module, features: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                   kwargs: dict) -> Any:
    """``visual(pixel_values=..., **kwargs)`` with the adapted ``features(pixel_values)`` in place of its own.

    The model's own output class where one holds the decomposed output (``pooler_output``,
    ``image_embeds``, ``logits``); fields that would hold the base model's (unadapted) hidden
    states are left unset. A ``CLIPModel`` scores the adapted image embeddings against the texts
    (``input_ids`` needed, as for the model itself). Models whose decomposed output is no field of
    their output class (``ViTModel``, BLIP) return the feature tensor.
    """
    import transformers as tf

    kwargs = dict(kwargs)
    return_dict = kwargs.pop("return_dict", None)
    refuse_unadapted_options(kwargs)
    text = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask", "position_ids") if k in kwargs}
    return_loss = kwargs.pop("return_loss", None) if _isinstance(visual, "CLIPModel") else None
    if kwargs:
        raise TypeError(f"the adapted {type(visual).__name__} does not take {sorted(kwargs)}")
    if text and not _isinstance(visual, "CLIPModel"):
        raise TypeError(f"{type(visual).__name__} takes no text inputs ({sorted(text)})")
    if _isinstance(visual, "CLIPModel"):
        if "input_ids" not in text:
            raise TypeError("CLIPModel's forward scores images against texts and needs input_ids; for the adapted "
                            "image features call get_image_features(pixel_values=...)")
        image = features(pixel_values)
        text_out = visual.get_text_features(**text)
        text_embeds = _pooled(text_out)
        image_embeds = image / image.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.t().to(text_embeds.dtype) * visual.logit_scale.exp()
        loss = None
        if return_loss:  # CLIP's symmetric contrastive loss, on the adapted logits
            target = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.t(), target)) / 2
        out = tf.models.clip.modeling_clip.CLIPOutput(
            loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text, text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=None if isinstance(text_out, torch.Tensor) else text_out)
    elif _isinstance(visual, "CLIPVisionModelWithProjection"):
        out = tf.models.clip.modeling_clip.CLIPVisionModelOutput(image_embeds=features(pixel_values))
    elif _isinstance(visual, "CLIPVisionModel", "Dinov2Model", "Dinov2WithRegistersModel"):
        out = tf.modeling_outputs.BaseModelOutputWithPooling(pooler_output=features(pixel_values))
    elif _isinstance(visual, "ViTForImageClassification"):
        out = tf.modeling_outputs.ImageClassifierOutput(logits=features(pixel_values))
    else:
        return features(pixel_values)
    return out.to_tuple() if return_dict is False else out


ADAPTERS = [HFCLIPAdapter, HFBlipAdapter, HFDinov2Adapter, HFViTAdapter]
