"""Triton kernel of the fused inference readout.

``acc (n, D) += r (n, w) @ M (w, D)``; with ``FINAL`` the same program applies
the final LayerNorm epilogue ``y = (acc + v1) / s + (mu / s) v2 + c [+ out]``
and writes ``y`` instead of ``acc``. ``r`` may be a strided view (the pooled row
of each image's token tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting


@triton.jit
def _readout_kernel(ACC, Rr, M, S, MU, V1, V2, C, OUT, Y,
                    n, W, D, s_an, s_rn, s_rw, s_mw, s_on, s_yn,
                    FINAL: tl.constexpr, HAS_OUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rw = tl.arange(0, BLOCK_W)
    mn = rn < n
    md = rd < D
    mask = mn[:, None] & md[None, :]
    acc = tl.load(ACC + rn[:, None] * s_an + rd[None, :], mask=mask, other=0.0)
    for w0 in range(0, W, BLOCK_W):
        ww = w0 + rw
        mw = ww < W
        r = tl.load(Rr + rn[:, None] * s_rn + ww[None, :] * s_rw, mask=mn[:, None] & mw[None, :],
                    other=0.0).to(tl.float32)
        m = tl.load(M + ww[:, None] * s_mw + rd[None, :], mask=mw[:, None] & md[None, :], other=0.0)
        acc += tl.dot(r, m, input_precision="ieee")
    if FINAL:
        s = tl.load(S + rn, mask=mn, other=1.0)
        mu = tl.load(MU + rn, mask=mn, other=0.0)
        v1 = tl.load(V1 + rd, mask=md, other=0.0)
        v2 = tl.load(V2 + rd, mask=md, other=0.0)
        c = tl.load(C + rd, mask=md, other=0.0)
        y = (acc + v1[None, :]) / s[:, None] + (mu / s)[:, None] * v2[None, :] + c[None, :]
        if HAS_OUT:
            y += tl.load(OUT + rn[:, None] * s_on + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rn[:, None] * s_yn + rd[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(ACC + rn[:, None] * s_an + rd[None, :], acc, mask=mask)


def _blocks(D: int) -> tuple[int, int, int]:
    if interpreting():
        return 64, 128, min(512, max(16, triton.next_power_of_2(D)))
    return 32, 32, 64


def readout(acc: torch.Tensor, r: torch.Tensor, M: torch.Tensor, epilogue: dict | None = None):
    """``acc += r @ M`` in place; with ``epilogue`` (s, mu, v1, v2, c, out) return ``y`` instead."""
    n, W = r.shape
    D = M.shape[1]
    bn, bw, bd = _blocks(D)
    grid = (triton.cdiv(n, bn), triton.cdiv(D, bd))
    if epilogue is None:
        _readout_kernel[grid](acc, r, M, acc, acc, acc, acc, acc, acc, acc, n, W, D,
                              acc.stride(0), r.stride(0), r.stride(1), M.stride(0), 0, 0,
                              FINAL=False, HAS_OUT=False, BLOCK_N=bn, BLOCK_W=bw, BLOCK_D=bd)
        return None
    out = epilogue["out"]
    y = torch.empty(n, D, dtype=epilogue["dtype"], device=acc.device)
    _readout_kernel[grid](acc, r, M, epilogue["s"], epilogue["mu"], epilogue["v1"], epilogue["v2"], epilogue["c"],
                          out if out is not None else acc, y, n, W, D,
                          acc.stride(0), r.stride(0), r.stride(1), M.stride(0),
                          out.stride(0) if out is not None else 0, y.stride(0),
                          FINAL=True, HAS_OUT=out is not None, BLOCK_N=bn, BLOCK_W=bw, BLOCK_D=bd)
    return y
