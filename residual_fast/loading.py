"""Loading open_clip models by name (random weights offline, pretrained where reachable)."""

from __future__ import annotations

import torch
from torch import nn


def load_open_clip(name: str, pretrained: str | None = None, *, image_size: int | None = None,
                   device: str | torch.device = "cpu", seed: int = 0) -> tuple[nn.Module, object, object]:
    """``(model, preprocess, tokenizer)`` for an open_clip model name such as ``"ViT-B-32"``.

    ``pretrained=None`` builds random weights (works offline); a tag such as
    ``"laion2b_s34b_b79k"`` downloads weights and fails with a clear error offline.
    ``image_size`` overrides the input resolution (random weights only). Random
    weights are drawn from ``seed`` (without touching the global RNG), so separate
    commands see the same model.
    """
    import open_clip

    if name.startswith("open_clip:"):
        name = name.split(":", 1)[1]
    if "/" in name and pretrained is None:
        name, pretrained = name.split("/", 1)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    kwargs = {}
    if image_size is not None:
        if pretrained:
            raise ValueError("image_size can only be changed for random weights")
        kwargs["force_image_size"] = image_size
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                         **kwargs)
    except Exception as e:  # noqa: BLE001 - report any hub / file failure with the name that caused it
        raise RuntimeError(f"could not load open_clip {name!r} with pretrained={pretrained!r}: {e}") from e
    return model.eval(), preprocess, open_clip.get_tokenizer(name)
