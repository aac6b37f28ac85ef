"""Frozen classification heads ResiDual is trained against.

* :func:`zero_shot_head`: class names x prompt templates through the CLIP text
  tower; each prompt embedding normalized, averaged per class, normalized again.
* :func:`prototype_head`: normalized class means of (normalized) train features,
  for models without a text tower.

Both give a :class:`Classifier`: ``logits = logit_scale * cos(features, class)``
(or a raw dot product with ``normalize=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
def zero_shot_head(model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence, *,
                   batch_size: int = 256, progress: bool = True, normalize: bool = True) -> Classifier:
    """Zero-shot classifier from ``model.encode_text`` (open_clip CLIP) over ``templates x classnames``."""
    if not hasattr(model, "encode_text"):
        raise TypeError(f"{type(model).__name__} has no text tower (encode_text); use prototype_head instead")
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    device = next(model.parameters()).device
    weights = []
    for name in tqdm(classnames, desc="zero-shot head", disable=not progress):
        texts = [fill(t, name) for t in templates]
        emb = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device))
                         for i in range(0, len(texts), batch_size)])
        weights.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1))
    scale = model.logit_scale.exp().item() if hasattr(model, "logit_scale") else 100.0
    return Classifier(torch.stack(weights), scale, normalize)


def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *,
                   logit_scale: float = 100.0) -> Classifier:
    """Nearest-class-mean classifier: normalized means of normalized ``features`` per class."""
    labels = torch.as_tensor(labels, device=features.device).long()
    num_classes = num_classes or int(labels.max()) + 1
    f = F.normalize(features.float(), dim=-1)
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without examples: {torch.nonzero(counts == 0).flatten().tolist()}")
    return Classifier(F.normalize(sums / counts[:, None], dim=-1), logit_scale)
