"""The fused inference readout of :class:`residual_fast.ResiDualVisual`, with backend dispatch.

Per adapted unit group and layer, ``acc (n, D) += r (n, w) @ M (w, D)`` while
the ViT runs; the last product is fused with the final LayerNorm epilogue
``y = (acc + v1) / s + (mu / s) v2 + c [+ out]``. ``acc``, ``M`` and the
epilogue vectors are fp32 (fp64 for fp64 models); ``r`` and ``out`` are in the
model's dtype. The torch path (``addmm_``) is the reference and the CPU path.
"""

from __future__ import annotations

import torch

from .backends import choose


def readout_torch(acc, r, M, epilogue=None):
    acc.addmm_(r.to(acc.dtype), M)
    if epilogue is None:
        return None
    s, mu = epilogue["s"][:, None], epilogue["mu"][:, None]
    y = (acc + epilogue["v1"]) / s + (mu / s) * epilogue["v2"] + epilogue["c"]
    if epilogue["out"] is not None:
        y = y + epilogue["out"].to(acc.dtype)
    return y.to(epilogue["dtype"])


def readout(acc: torch.Tensor, r: torch.Tensor, M: torch.Tensor, epilogue: dict | None = None,
            backend: str = "auto") -> torch.Tensor | None:
    """``acc += r @ M``; with ``epilogue`` (keys s, mu, v1, v2, c, out, dtype) return the final ``y``."""
    kind = choose(backend, acc.device, op="readout")
    if acc.dtype != torch.float32 or torch.is_grad_enabled() and (M.requires_grad or acc.requires_grad):
        kind = "torch"  # kernels are fp32, forward-only
    if kind == "triton":
        from .triton.readout import readout as triton_readout

        return triton_readout(acc, r, M, epilogue)
    if kind == "cuda":
        from .cuda import load_extension

        ext = load_extension()
        if epilogue is None:
            ext.readout(acc, r, M, False, None, None, None, None, None, None)
            return None
        out = epilogue["out"]
        vecs = [epilogue[k].contiguous() for k in ("s", "mu", "v1", "v2", "c")]
        y = ext.readout(acc, r, M, True, *vecs, None if out is None else out.to(r.dtype))
        return y.to(epilogue["dtype"])
    return readout_torch(acc, r, M, epilogue)
