"""What every model family exposes to residual_fast.

A family adapter (one file per family) reads a vision transformer's modules and
provides two things:

* a :class:`ReadoutSpec`: the linear maps that carry each residual unit's raw
  vector to the output embedding (DESIGN.md section 2), read from the module;
* a walk of the model's forward that hands each unit's raw vector at the pooled
  position to a :class:`UnitSink` while the ViT runs, and returns the pooled
  final residual and the model's output.

Everything above this layer (decomposition, bases, ResiDual, the fused encoder)
is written against these two objects only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

UNIT_KINDS = ("emb", "head", "mlp")


class UnsupportedModelError(ValueError):
    """The model (or one of its configurations) cannot be decomposed exactly."""


@dataclass
class LayerReadout:
    """One block's tensors on the readout path: the model's own (live) weights."""

    out_weight: torch.Tensor  # (w, H * hd), torch Linear layout (out, in)
    out_bias: torch.Tensor | None  # (w,)
    ls1: torch.Tensor | None  # (w,) layer scale of the attention branch, None if none
    ls2: torch.Tensor | None  # (w,) layer scale of the MLP branch, None if none


@dataclass
class LiveReadout:
    """The model's own tensors that carry the residual units to the output, read from its modules.

    No copies: ``proj`` may be a transposed view (HF ``Linear`` heads). Read it
    again after the model is cast or moved (``.half()`` swaps each parameter's data).
    """

    layers: list[LayerReadout]
    ln_weight: torch.Tensor | None  # (w,)
    ln_bias: torch.Tensor | None  # (w,)
    ln_eps: float
    proj: torch.Tensor | None  # (w, D) or None for the identity
    proj_bias: torch.Tensor | None  # (D,)


@dataclass
class ReadoutSpec:
    """Where the residual units of a ViT live and how they reach the output.

    Shapes: ``L`` layers, ``H`` heads of dim ``hd``, width ``w = H * hd``,
    output dim ``D``. Tensors are detached views of the model's own weights; the
    per-layer stacks (``attn_out_weight`` ...) are built on demand, so a spec
    holds no copy of the model.
    """

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    width: int
    out_dim: int
    pool: str  # "cls" or "mean"
    ln_weight: torch.Tensor  # (w,)
    ln_bias: torch.Tensor  # (w,)
    ln_eps: float
    proj: torch.Tensor | None  # (w, D) or None for the identity
    proj_bias: torch.Tensor | None  # (D,) or None
    layers: list[LayerReadout]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_readout(cls, family: str, pool: str, num_heads: int, live: LiveReadout) -> ReadoutSpec:
        w = live.layers[0].out_weight.shape[0]
        ref = live.layers[0].out_weight

        def det(t):
            return None if t is None else t.detach()

        ln_w = det(live.ln_weight) if live.ln_weight is not None else ref.new_ones(w).detach()
        ln_b = det(live.ln_bias) if live.ln_bias is not None else ref.new_zeros(w).detach()
        return cls(
            family=family, num_layers=len(live.layers), num_heads=num_heads, head_dim=w // num_heads, width=w,
            out_dim=live.proj.shape[1] if live.proj is not None else w, pool=pool, ln_weight=ln_w, ln_bias=ln_b,
            ln_eps=float(live.ln_eps), proj=det(live.proj), proj_bias=det(live.proj_bias),
            layers=[LayerReadout(l.out_weight.detach(), det(l.out_bias), det(l.ls1), det(l.ls2)) for l in live.layers],
        )

    def _stack(self, name: str, fill: float) -> torch.Tensor:
        ref = self.layers[0].out_weight
        return torch.stack([getattr(l, name) if getattr(l, name) is not None else
                            torch.full((self.width,), fill, dtype=ref.dtype, device=ref.device) for l in self.layers])

    @property
    def attn_out_weight(self) -> torch.Tensor:
        """(L, w, w) out-projection weights (a new stacked tensor)."""
        return torch.stack([l.out_weight for l in self.layers])

    @property
    def attn_out_bias(self) -> torch.Tensor:
        """(L, w) out-projection biases (zeros where none)."""
        return self._stack("out_bias", 0.0)

    @property
    def ls_attn(self) -> torch.Tensor:
        """(L, w) layer scale of the attention branch (ones if none)."""
        return self._stack("ls1", 1.0)

    @property
    def ls_mlp(self) -> torch.Tensor:
        """(L, w) layer scale of the MLP branch (ones if none)."""
        return self._stack("ls2", 1.0)

    @property
    def num_units(self) -> int:
        return 1 + self.num_layers * (self.num_heads + 1)

    def raw_dim(self, kind: str) -> int:
        """Length of a unit's raw vector ``r_u``."""
        return self.head_dim if kind == "head" else self.width

    def dims(self) -> dict:
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "width": self.width,
            "out_dim": self.out_dim,
            "pool": self.pool,
            "ln_eps": self.ln_eps,
            "has_proj": self.proj is not None,
            "has_proj_bias": self.proj_bias is not None,
        }

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight the readout depends on (float32 bytes; per-layer stacks hashed layer by layer,
        the same digest as the stacked tensor without forming it)."""
        def per_layer(name: str, fill: float):
            for lr in self.layers:
                t = getattr(lr, name)
                yield t if t is not None else torch.full((self.width,), fill)

        named = {
            "ln_weight": [self.ln_weight],
            "ln_bias": [self.ln_bias],
            "proj": None if self.proj is None else [self.proj],
            "proj_bias": None if self.proj_bias is None else [self.proj_bias],
            "attn_out_weight": (lr.out_weight for lr in self.layers),
            "attn_out_bias": per_layer("out_bias", 0.0),
            "ls_attn": per_layer("ls1", 1.0),
            "ls_mlp": per_layer("ls2", 1.0),
        }
        out = {}
        for name, parts in named.items():
            if parts is None:
                out[name] = "none"
                continue
            h = hashlib.sha256()
            for t in parts:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            out[name] = h.hexdigest()[:16]
        return out

    def fingerprint(self) -> dict:
        return {"dims": self.dims(), "weights": self.weight_hashes()}


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """A sentence naming the first difference between two fingerprints, or None."""
    for key, val in expected["dims"].items():
        got = actual["dims"].get(key)
        if got != val:
            return f"{key} is {val!r} in the saved model but {got!r} in this one"
    for key, val in expected["weights"].items():
        got = actual["weights"].get(key)
        if got != val:
            return f"weight '{key}' differs (hash {val} saved, {got} here)"
    return None


def layer_scale_gamma(module: nn.Module, where: str) -> torch.Tensor | None:
    """The per-channel scale of a layer-scale module (``gamma``), None for ``nn.Identity``."""
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, torch.Tensor):
        raise UnsupportedModelError(f"{where}: unsupported layer-scale module {type(module).__name__}")
    return gamma


class UnitSink(Protocol):
    """Receives the raw unit vectors at the pooled position during a walk."""

    def emb(self, r: torch.Tensor) -> None: ...  # (n, w)

    def attn(self, layer: int, r: torch.Tensor) -> None: ...  # (n, w) = H heads of hd, pre out-proj

    def mlp(self, layer: int, r: torch.Tensor) -> None: ...  # (n, w)


class VisualAdapter:
    """Base class of the model-family adapters."""

    family: str = "base"

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        raise NotImplementedError

    def spec(self) -> ReadoutSpec:
        raise NotImplementedError

    def readout(self) -> LiveReadout:
        """The model's own readout tensors, read from its modules now (no copies)."""
        raise NotImplementedError

    def walk(self, images: torch.Tensor, sink: UnitSink | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the ViT; return ``(z, output)``: pooled final residual (n, w), output (n, D)."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for input the model cannot take."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        p = next(self.visual.parameters())
        if images.device != p.device:
            raise ValueError(f"images are on {images.device} but the model is on {p.device}")
