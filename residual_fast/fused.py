"""The drop-in adapted image encoder (DESIGN.md section 4.4).

One pass of the ViT; at every layer the pooled row of the attention output
before ``out_proj`` (and of the MLP output, when MLPs are adapted) is multiplied
by the folded map ``M_l`` and accumulated into an (n, D) buffer. The final
LayerNorm's ``1/s`` and ``mu/s`` are applied once at the end. No (n, U, D) or
(n, U, k) tensor exists at any point.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import fingerprint_mismatch, get_adapter
from .ops.readout import readout
from .residual import ResiDual
from .units import ln_stats


class _FoldedSink:
    """Accumulates ``r_l @ M_l`` while the walk runs; the last product carries the epilogue."""

    def __init__(self, maps: dict, last: tuple[str, int], n: int, dtype: torch.dtype, device: torch.device,
                 backend: str):
        self.maps = maps
        self.last = last
        self.backend = backend
        self.acc = torch.zeros(n, maps["v1"].shape[0], dtype=dtype, device=device)
        self.final_pair = None

    def _add(self, kind: str, layer: int, r: torch.Tensor) -> None:
        m = self.maps.get(kind)
        if m is None:
            return
        M = m if kind == "emb" else m[layer]
        if (kind, layer) == self.last:
            self.final_pair = (r.contiguous(), M)  # a small copy: the token tensor can be freed
        else:
            readout(self.acc, r, M, backend=self.backend)

    def emb(self, r: torch.Tensor) -> None:
        self._add("emb", -1, r)

    def attn(self, layer: int, r: torch.Tensor) -> None:
        self._add("head", layer, r)

    def mlp(self, layer: int, r: torch.Tensor) -> None:
        self._add("mlp", layer, r)

    def finish(self, z: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
        mu, s = ln_stats(z, eps)
        epilogue = {
            "s": s.to(self.acc.dtype), "mu": mu.to(self.acc.dtype), "v1": self.maps["v1"], "v2": self.maps["v2"],
            "c": self.maps["c"], "out": out if self.maps["add_output"] else None, "dtype": out.dtype,
        }
        r, M = self.final_pair
        return readout(self.acc, r, M, epilogue, backend=self.backend)


class ResiDualVisual(nn.Module):
    """``visual`` with a :class:`ResiDual` adapter fused into its forward.

    ``model.visual = ResiDualVisual(model.visual, adapter)`` makes
    ``model.encode_image`` return adapted features. Attributes not defined here
    (``image_size``, ``output_dim``, ...) are read from the wrapped encoder.
    ``backend`` selects the readout kernels (``"auto"``: CUDA extension or Triton
    on GPU, torch on CPU; see :mod:`residual_fast.ops.backends`).
    """

    def __init__(self, visual: nn.Module, adapter: ResiDual, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        if not isinstance(adapter, ResiDual):
            raise TypeError(f"adapter must be a residual_fast.ResiDual, got {type(adapter).__name__}")
        model_adapter = get_adapter(visual)
        spec = model_adapter.spec()
        why = fingerprint_mismatch(adapter.fingerprint, spec.fingerprint())
        if why:
            raise ValueError(f"the adapter was fitted on another model: {why}")
        if getattr(visual, "output_tokens", False):
            raise ValueError("ResiDualVisual returns pooled features only; build the model with output_tokens=False")
        p = next(visual.parameters())
        self.wrapped_visual = visual
        self.adapter = adapter.to(p.device)
        self._walker = model_adapter
        self._spec = spec
        self._cache_key = None
        self._cache = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped_visual"), name)

    def _maps(self, dtype: torch.dtype, device: torch.device) -> dict:
        """Folded per-layer maps in the compute dtype, cached until the lambdas change."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter.parameters())
        key = (dtype, device, tuple((p.data_ptr(), p._version) for p in self.adapter.parameters()))
        if not needs_grad and key == self._cache_key:
            return self._cache
        folded = self.adapter.fold()
        spec = self._spec
        L, w = spec.num_layers, spec.width
        maps = {}
        for kind, G in folded.G.items():
            raw = G[:, :-2]  # (U, raw, D)
            if kind == "head":
                raw = raw.reshape(L, w, -1)  # heads of a layer stacked along the width
            elif kind == "emb":
                raw = raw[0]
            maps[kind] = raw.to(device=device, dtype=dtype)
        maps["v1"] = folded.v1.to(device=device, dtype=dtype)
        maps["v2"] = folded.v2.to(device=device, dtype=dtype)
        maps["c"] = folded.c.to(device=device, dtype=dtype)
        maps["add_output"] = folded.add_output
        if not needs_grad:
            self._cache_key, self._cache = key, maps
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._walker.check_images(images)
        dtype = next(self.wrapped_visual.parameters()).dtype
        acc_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        maps = self._maps(acc_dtype, images.device)
        sink = _FoldedSink(maps, self._last_unit, images.shape[0], acc_dtype, images.device, self.backend)
        z, out = self._walker.walk(images, sink)
        return sink.finish(z, out, self._spec.ln_eps)

    @property
    def _last_unit(self) -> tuple[str, int]:
        """The adapted unit the walk reaches last (its product carries the epilogue)."""
        kinds = self.adapter.groups
        layer = self._spec.num_layers - 1
        return ("mlp", layer) if "mlp" in kinds else ("head", layer) if "head" in kinds else ("emb", -1)
