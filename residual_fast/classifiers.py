"""Frozen classification heads ResiDual is trained against.

* :func:`zero_shot_head`: class names x prompt templates through the CLIP text
  tower; each prompt embedding normalized, averaged per class, normalized again.
* :func:`prototype_head`: normalized class means of (normalized) train features,
  for models without a text tower.

Both give a :class:`Classifier`: ``logits = logit_scale * cos(features, class)``
(or a raw dot product with ``normalize=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.prompts import fill


class Classifier(nn.Module):
    def __init__(self, weights: torch.Tensor, logit_scale: float = 100.0, normalize: bool = True):
        super().__init__()
        self.register_buffer("weights", weights)  # (C, D), unit rows
        self.logit_scale = float(logit_scale)
        self.normalize = normalize

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.weights.shape[1]:
            raise ValueError(f"features have dim {features.shape[-1]}, the classifier expects {self.weights.shape[1]}")
        f = F.normalize(features.float(), dim=-1) if self.normalize else features.float()
        return self.logit_scale * f @ self.weights.float().T


@torch.no_grad()
def text_head(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str], templates: Sequence, *,
              logit_scale: float = 100.0, batch_size: int = 256, progress: bool = True,
              normalize: bool = True) -> Classifier:
    """Zero-shot classifier from any text encoder ``encode_text(list_of_str) -> (n, D)``.

    Each prompt embedding is normalized, averaged per class and normalized again.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    weights = []
    for name in tqdm(classnames, desc="zero-shot head", disable=not progress):
        texts = [fill(t, name) for t in templates]
        emb = torch.cat([encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        weights.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1))
    return Classifier(torch.stack(weights), logit_scale, normalize)


def zero_shot_head(model, tokenizer=None, classnames: Sequence[str] = (), templates: Sequence = (), *,
                   batch_size: int = 256, progress: bool = True, normalize: bool = True) -> Classifier:
    """Zero-shot classifier from a CLIP text tower over ``templates x classnames``.

    ``model`` is an open_clip CLIP (``encode_text``; ``tokenizer`` required, e.g.
    ``open_clip.get_tokenizer(name)``), an HF ``CLIPModel`` (``get_text_features``; ``tokenizer``
    is its HF tokenizer, or None for CLIP's BPE built offline, see
    :class:`residual_fast.loading.OfflineCLIPTokenizer`), an adapted encoder wrapping one, or what
    :func:`residual_fast.load` returns (its ``encode_text``; ``tokenizer`` is ignored). The logit
    scale is the model's own (``exp(logit_scale)``), else 100.
    """
    from .loading import LoadedModel, hf_clip_text_encoder

    if isinstance(model, LoadedModel):
        if model.encode_text is None:
            raise TypeError(f"{model.name} gives no text encoder ({model.no_text_reason or 'no text tower'}); use "
                            "prototype_head instead")
        encode, owner = model.encode_text, model.model
    elif hasattr(model, "encode_text"):
        if tokenizer is None:
            raise TypeError("an open_clip model needs its tokenizer: zero_shot_head(model, "
                            "open_clip.get_tokenizer(name), ...)")
        device = next(model.parameters()).device
        encode, owner = (lambda texts: model.encode_text(tokenizer(texts).to(device))), model
    elif hasattr(model, "get_text_features"):
        encode, owner = hf_clip_text_encoder(model, tokenizer), model
    else:
        raise TypeError(f"{type(model).__name__} has no text tower (encode_text / get_text_features); use "
                        "prototype_head instead")
    scale = owner.logit_scale.exp().item() if isinstance(getattr(owner, "logit_scale", None), torch.Tensor) else 100.0
    return text_head(encode, classnames, templates, logit_scale=scale, batch_size=batch_size, progress=progress,
                     normalize=normalize)


def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *,
                   logit_scale: float = 100.0) -> Classifier:
    """Nearest-class-mean classifier: normalized means of normalized ``features`` per class."""
    labels = torch.as_tensor(labels, device=features.device).long()
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} features but labels of shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for {num_classes} classes")
    f = F.normalize(features.float(), dim=-1)
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without examples: {torch.nonzero(counts == 0).flatten().tolist()}")
    return Classifier(F.normalize(sums / counts[:, None], dim=-1), logit_scale)
