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

import weakref
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
    # the model's named tensors, for the fingerprint: a weak reference, so a spec never keeps a model alive
    source: object | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_readout(cls, family: str, pool: str, num_heads: int, live: LiveReadout,
                     source: VisualAdapter | None = None) -> ReadoutSpec:
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
            source=None if source is None else _AdapterRef(source),
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

    def readout_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the readout depends on, by name."""
        out = {"ln_weight": self.ln_weight, "ln_bias": self.ln_bias}
        if self.proj is not None:
            out["proj"] = self.proj
        if self.proj_bias is not None:
            out["proj_bias"] = self.proj_bias
        for i, lr in enumerate(self.layers):
            for name in ("out_weight", "out_bias", "ls1", "ls2"):
                t = getattr(lr, name)
                if t is not None:
                    out[f"layers.{i}.{name}"] = t
        return out

    def fingerprint(self, readout_only: bool = False) -> dict:
        """Dimensions and a per-tensor sketch of every weight of the vision tower (or of the readout only).

        Sketches (:func:`tensor_sketch`) are compared at a tolerance far above a
        dtype cast's rounding and far below any real change of the weights, so the
        same model in fp32, fp16 or bf16, on any device, has one fingerprint.
        """
        if readout_only:
            named = self.readout_tensors()
        else:
            if self.source is None or self.source() is None:
                raise RuntimeError("this spec is no longer attached to its model; call get_adapter(visual).spec()")
            named = dict(self.source().named_tensors())
        return {"dims": self.dims(), "sketch": SKETCH_VERSION,
                "tensors": {name: tensor_sketch(t) for name, t in named.items()}}




class _AdapterRef:
    """A weak handle on a model: re-creates its family adapter on demand, never keeps the model alive."""

    def __init__(self, adapter: VisualAdapter):
        self.cls = type(adapter)
        self.ref = weakref.ref(adapter.visual)

    def __call__(self) -> VisualAdapter | None:
        visual = self.ref()
        return None if visual is None else self.cls(visual)


SKETCH_VERSION = 1
_SKETCH_PERIODS = (64, 61)  # coprime: a permutation of blocks changes the second family of sketches
_SKETCH_TOL = 2e-2


def _signs(period: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + period)
    return (torch.randint(0, 2, (period, 3), generator=g) * 2 - 1).to(device=device, dtype=torch.float32)


@torch.no_grad()
def tensor_sketch(t: torch.Tensor) -> list[float]:
    """``[numel, sum, sum of squares, 6 signed sums]`` of a tensor's values, accumulated in float64.

    A dtype cast perturbs each signed sum by about ``2^-9 sqrt(sum sq)`` (bf16); a
    different tensor by about ``sqrt(2 sum sq)``: :func:`sketch_mismatch` compares at
    ``2e-2 sqrt(sum sq)``.
    """
    x = t.detach().reshape(-1)
    if not x.is_floating_point():
        x = x.double()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    out = [float(x.numel()), float(x.sum(dtype=torch.float64)), float((x.double() ** 2).sum())]
    for period in _SKETCH_PERIODS:
        n = (x.numel() // period) * period
        signs = _signs(period, x.device).to(x.dtype)
        body = (x[:n].view(-1, period).sum(0) if n else x.new_zeros(period)) @ signs
        tail = x[n:] @ signs[: x.numel() - n] if x.numel() > n else x.new_zeros(3)
        out.extend(float(v) for v in (body + tail).double())
    return out


def sketch_mismatch(a: list, b: list) -> bool:
    """Whether two sketches belong to different tensors (see :func:`tensor_sketch`)."""
    if len(a) != len(b) or a[0] != b[0]:
        return True
    scale = max(abs(a[2]), abs(b[2])) ** 0.5
    if abs(a[2] - b[2]) > _SKETCH_TOL * max(abs(a[2]), abs(b[2])):
        return True
    return any(abs(x - y) > _SKETCH_TOL * scale for x, y in zip(a[1:2] + a[3:], b[1:2] + b[3:], strict=True))


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """A sentence naming the first difference between two fingerprints, or None.

    A saved fingerprint that is missing or malformed is a difference too (it must
    never let a file through unchecked).
    """
    if not isinstance(expected, dict) or not isinstance(expected.get("dims"), dict) or not (
            isinstance(expected.get("tensors"), dict) and expected["tensors"]
            or isinstance(expected.get("weights"), dict) and expected["weights"]):
        return "the saved model fingerprint is missing or malformed"
    for key, val in expected["dims"].items():
        got = actual["dims"].get(key)
        if got != val:
            return f"{key} is {val!r} in the saved model but {got!r} in this one"
    if "tensors" in expected:
        exp, act = expected["tensors"], actual.get("tensors", {})
        for name, sk in exp.items():
            if name not in act:
                return f"weight '{name}' of the saved model is missing in this one"
            if not isinstance(sk, list) or not all(isinstance(v, (int, float)) for v in sk):
                return "the saved model fingerprint is malformed"
            if sketch_mismatch(sk, act[name]):
                return f"weight '{name}' differs"
        extra = sorted(set(act) - set(exp))
        if extra:
            return f"this model has weights the saved one has not ({', '.join(extra[:3])})"
        return None
    return ("the saved fingerprint covers only the readout weights (written by an earlier residual_fast); "
            "refit or re-save it with this version")


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

    def vision_module(self) -> nn.Module:
        """The module holding every weight the image features depend on (overridden where ``visual`` also holds
        a text tower)."""
        return self.visual

    def named_tensors(self):
        """Every floating-point parameter and buffer of the vision tower, by name."""
        mod = self.vision_module()
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.is_floating_point():
                yield name, t

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
