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

import functools
import math
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


SKETCH_VERSION = 2
_SKETCH_PERIODS = (64, 61)  # coprime: a permutation of blocks changes the second family of signed sums
# per-element rounding of each dtype: relative (unit roundoff, with a factor 2 of margin) and absolute (subnormals)
_ROUNDING = {"float64": (2.0**-52, 0.0), "float32": (2.0**-23, 2.0**-149), "float16": (2.0**-10, 2.0**-24),
             "bfloat16": (2.0**-7, 2.0**-133)}
_SUM_NOISE = 1e-9  # float64 accumulation in another order (threads, devices), relative to sum |x|


@functools.cache
def _signs(period: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + period)
    return (torch.randint(0, 2, (period, 3), generator=g) * 2 - 1).to(device=device, dtype=torch.float64)


@torch.no_grad()
def tensor_sketch(t: torch.Tensor) -> dict:
    """``{"dtype", "s": [numel, sum, sum of squares, sum of |x|, 6 signed sums]}``, accumulated in float64.

    :func:`sketch_mismatch` allows exactly the rounding a cast between the two
    recorded dtypes can cause (none between equal dtypes): a model and its fp16 /
    bf16 copy match; a weight changed by more than that rounding does not.
    """
    x = t.detach().reshape(-1)
    dtype = str(x.dtype).replace("torch.", "")
    x = x.double()
    out = [float(x.numel()), float(x.sum()), float((x * x).sum()), float(x.abs().sum())]
    for period in _SKETCH_PERIODS:
        n = (x.numel() // period) * period
        signs = _signs(period, x.device)
        body = x[:n].view(-1, period).sum(0) @ signs if n else x.new_zeros(3)
        tail = x[n:] @ signs[: x.numel() - n] if x.numel() > n else x.new_zeros(3)
        out.extend(float(v) for v in body + tail)
    return {"dtype": dtype, "s": out}


def _valid_sketch(sk) -> bool:
    return (isinstance(sk, dict) and sk.get("dtype") in _ROUNDING and isinstance(sk.get("s"), list)
            and len(sk["s"]) == 10 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in sk["s"]))


def sketch_mismatch(a: dict, b: dict) -> bool:
    """Whether two sketches belong to different tensors, beyond what a cast between their dtypes explains."""
    sa, sb = a["s"], b["s"]
    if sa[0] != sb[0]:
        return True
    n = sa[0]
    rel = max(_ROUNDING[a["dtype"]][0], _ROUNDING[b["dtype"]][0]) if a["dtype"] != b["dtype"] else 0.0
    absolute = (_ROUNDING[a["dtype"]][1] + _ROUNDING[b["dtype"]][1]) if a["dtype"] != b["dtype"] else 0.0
    l1 = max(sa[3], sb[3])
    lin = rel * l1 + n * absolute + _SUM_NOISE * l1  # |sum w (x - x')| <= sum |x - x'| for |w| <= 1
    sq = (2 * rel + rel * rel) * max(sa[2], sb[2]) + 2 * absolute * l1 + n * absolute**2 + _SUM_NOISE * max(
        sa[2], sb[2])
    if abs(sa[2] - sb[2]) > sq:
        return True
    return any(abs(x - y) > lin for x, y in zip(sa[1:2] + sa[3:], sb[1:2] + sb[3:], strict=True))


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """A sentence naming the first difference between two fingerprints, or None.

    A saved fingerprint that is missing or malformed is a difference too (it must
    never let a file through unchecked).
    """
    malformed = "the saved model fingerprint is missing or malformed"
    if not isinstance(expected, dict) or not isinstance(expected.get("dims"), dict):
        return malformed
    if "tensors" not in expected and isinstance(expected.get("weights"), dict):
        return ("the saved fingerprint covers only the readout weights (written by an earlier residual_fast); "
                "refit or re-save it with this version")
    if expected.get("sketch") != SKETCH_VERSION or not isinstance(expected.get("tensors"), dict) \
            or not expected["tensors"] or set(expected["dims"]) != set(actual["dims"]):
        return malformed
    for key, val in expected["dims"].items():
        got = actual["dims"].get(key)
        if got != val:
            return f"{key} is {val!r} in the saved model but {got!r} in this one"
    exp, act = expected["tensors"], actual["tensors"]
    for name, sk in exp.items():
        if not _valid_sketch(sk):
            return malformed
        if name not in act:
            return f"weight '{name}' of the saved model is missing in this one"
        if not _valid_sketch(act[name]):
            return f"weight '{name}' of this model holds NaN or Inf"
        if sketch_mismatch(sk, act[name]):
            return f"weight '{name}' differs"
    extra = sorted(set(act) - set(exp))
    if extra:
        return f"this model has weights the saved one has not ({', '.join(extra[:3])})"
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
