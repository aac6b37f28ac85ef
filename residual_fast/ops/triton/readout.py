"""Triton kernel of the fused inference readout (tensor cores).

``acc (n, D) += r (n, w) @ M (w, D)``; with ``FINAL`` the same program applies
the final LayerNorm epilogue ``y = (acc + v1) / s + (mu / s) v2 + c [+ out]``
and writes ``y`` instead of ``acc``. Every matrix is addressed through both of
its strides (``r`` is the pooled row of each image's token tensor; ``out`` or
``acc`` may be transposed views) with 64-bit offsets (``n * stride(r)`` passes
2^31 near batch 8k). ``r`` is upcast to fp32 and the product runs as 3xTF32
(``M`` and ``acc`` are fp32: plain TF32 or a bf16 ``M`` would cost the fp32
accuracy the adapter is fitted in).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting


@triton.jit
def _readout_kernel(ACC, Rr, M, S, MU, V1, V2, C, OUT, Y,
                    n, W, D, s_an, s_ad, s_rn, s_rw, s_mw, s_md, s_on, s_od, s_yn, s_yd,
                    FINAL: tl.constexpr, HAS_OUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rw0 = tl.arange(0, BLOCK_W).to(tl.int64)
    mn = rn < n
    md = rd < D
    mask = mn[:, None] & md[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ww = w0 + rw0
        mw = ww < W
        r = tl.load(Rr + rn[:, None] * s_rn + ww[None, :] * s_rw, mask=mn[:, None] & mw[None, :], other=0.0)
        m = tl.load(M + ww[:, None] * s_mw + rd[None, :] * s_md, mask=mw[:, None] & md[None, :], other=0.0)
        acc = tl.dot(r.to(tl.float32), m, acc, input_precision="tf32x3")
    acc += tl.load(ACC + rn[:, None] * s_an + rd[None, :] * s_ad, mask=mask, other=0.0)
    if FINAL:
        s = tl.load(S + rn, mask=mn, other=1.0)
        mu = tl.load(MU + rn, mask=mn, other=0.0)
        v1 = tl.load(V1 + rd, mask=md, other=0.0)
        v2 = tl.load(V2 + rd, mask=md, other=0.0)
        c = tl.load(C + rd, mask=md, other=0.0)
        y = (acc + v1[None, :]) / s[:, None] + (mu / s)[:, None] * v2[None, :] + c[None, :]
        if HAS_OUT:
            y += tl.load(OUT + rn[:, None] * s_on + rd[None, :] * s_od, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rn[:, None] * s_yn + rd[None, :] * s_yd, y.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(ACC + rn[:, None] * s_an + rd[None, :] * s_ad, acc, mask=mask)


# (BLOCK_N, BLOCK_W, BLOCK_D, warps, stages) on a GPU: one config (small n is the common case; the
# readout is launch- and memory-bound, DESIGN.md section 5). The interpreter gets few, large blocks.
CONFIG = (64, 32, 64, 8, 3)  # 8 warps: 4 spill in the bf16 epilogue


def _blocks(D: int) -> tuple[int, int, int, int, int]:
    if interpreting():
        return 64, 128, min(512, max(16, triton.next_power_of_2(D))), 4, 1
    return CONFIG


def readout(acc: torch.Tensor, r: torch.Tensor, M: torch.Tensor, epilogue: dict | None = None):
    """``acc += r @ M`` in place; with ``epilogue`` (s, mu, v1, v2, c, out) return ``y`` instead."""
    n, W = r.shape
    D = M.shape[1]
    bn, bw, bd, warps, stages = _blocks(D)
    grid = (triton.cdiv(n, bn), triton.cdiv(D, bd))
    common = dict(BLOCK_N=bn, BLOCK_W=bw, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    if epilogue is None:
        if n:
            _readout_kernel[grid](acc, r, M, acc, acc, acc, acc, acc, acc, acc, n, W, D,
                                  acc.stride(0), acc.stride(1), r.stride(0), r.stride(1), M.stride(0), M.stride(1),
                                  0, 0, 0, 0, FINAL=False, HAS_OUT=False, **common)
        return None
    out = epilogue["out"]
    y = torch.empty(n, D, dtype=epilogue["dtype"], device=acc.device)
    vecs = [epilogue[k].contiguous() for k in ("s", "mu", "v1", "v2", "c")]
    if n:
        _readout_kernel[grid](acc, r, M, *vecs, out if out is not None else acc, y, n, W, D,
                              acc.stride(0), acc.stride(1), r.stride(0), r.stride(1), M.stride(0), M.stride(1),
                              out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
                              y.stride(0), y.stride(1), FINAL=True, HAS_OUT=out is not None, **common)
    return y
