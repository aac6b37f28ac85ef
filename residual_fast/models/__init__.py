"""Model-family adapters: where each family keeps its residual units."""

from __future__ import annotations

from torch import nn

from .base import (
    UNIT_KINDS,
    LayerReadout,
    LiveReadout,
    ReadoutSpec,
    UnitSink,
    UnsupportedModelError,
    VisualAdapter,
    fingerprint_mismatch,
)
from .hf import ADAPTERS as HF_ADAPTERS
from .open_clip import OpenCLIPVisualAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: list[type[VisualAdapter]] = [OpenCLIPVisualAdapter, TimmViTAdapter, *HF_ADAPTERS]


def get_adapter(visual: nn.Module) -> VisualAdapter:
    """The family adapter for ``visual`` (the image tower), or a clear error."""
    if not isinstance(visual, nn.Module):
        raise TypeError(f"expected an nn.Module image encoder, got {type(visual).__name__}")
    inner = getattr(visual, "wrapped_visual", None)
    if inner is not None:  # a ResiDualVisual: decompose the model it wraps
        visual = inner
    for cls in ADAPTERS:
        if cls.accepts(visual):
            return cls(visual)
    hint = " (pass model.visual, not the whole CLIP model)" if hasattr(visual, "visual") else ""
    raise UnsupportedModelError(
        f"no residual_fast adapter for {type(visual).__module__}.{type(visual).__name__}{hint}; "
        f"supported families: {', '.join(c.family for c in ADAPTERS)}"
    )


__all__ = [
    "ADAPTERS",
    "UNIT_KINDS",
    "LayerReadout",
    "LiveReadout",
    "OpenCLIPVisualAdapter",
    "ReadoutSpec",
    "UnitSink",
    "UnsupportedModelError",
    "VisualAdapter",
    "fingerprint_mismatch",
    "get_adapter",
]
