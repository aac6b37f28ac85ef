"""Triton forward and backward of ``spectral_reweight``.

Forward: each program owns a (BLOCK_N x BLOCK_D) tile of ``y``; for every unit
and every chunk of its packed components it forms the coefficients
``(Z_u @ R_k.T + t_k) * lam_k`` in registers and multiplies them straight into
the tile. Backward: each program owns BLOCK_N rows; per unit and chunk it
recomputes the coefficients, forms ``gB = dY @ B_k.T``, writes a per-tile
partial of ``dlam`` and accumulates ``dZ_u``. Neither the (n, U, k)
coefficients nor any (n, U, D) tensor reaches global memory; accumulation is
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting


@triton.jit
def _fwd_kernel(Z, R, T, LAM, B, OFF, Y,
                n, U, Q, D,
                s_zn, s_zu, s_zq, s_rk, s_rq, s_bk, s_bd, s_yn, s_yd,
                BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rq = tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_K)
    mn = rn < n
    md = rd < D
    mq = rq < Q
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for u in range(0, U):
        z = tl.load(Z + rn[:, None] * s_zn + u * s_zu + rq[None, :] * s_zq,
                    mask=mn[:, None] & mq[None, :], other=0.0).to(tl.float32)
        k0 = tl.load(OFF + u)
        k1 = tl.load(OFF + u + 1)
        for kb in range(k0, k1, BLOCK_K):
            kk = kb + rk
            mk = kk < k1
            r = tl.load(R + kk[None, :] * s_rk + rq[:, None] * s_rq, mask=mq[:, None] & mk[None, :],
                        other=0.0).to(tl.float32)  # (Q, K)
            t = tl.load(T + kk, mask=mk, other=0.0).to(tl.float32)
            lam = tl.load(LAM + kk, mask=mk, other=0.0).to(tl.float32)
            c = (tl.dot(z, r, input_precision=PREC) + t[None, :]) * lam[None, :]
            b = tl.load(B + kk[:, None] * s_bk + rd[None, :] * s_bd, mask=mk[:, None] & md[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(c, b, input_precision=PREC)
    tl.store(Y + rn[:, None] * s_yn + rd[None, :] * s_yd, acc.to(Y.dtype.element_ty),
             mask=mn[:, None] & md[None, :])


@triton.jit
def _bwd_kernel(Z, R, T, LAM, B, OFF, G, DZ, DLAM,
                n, U, Q, D,
                s_zn, s_zu, s_zq, s_rk, s_rq, s_bk, s_bd, s_gn, s_gd, s_dzn, s_dzu, s_dzq, s_dlt,
                BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rq = tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_K)
    rd0 = tl.arange(0, BLOCK_D)
    mn = rn < n
    mq = rq < Q
    for u in range(0, U):
        z = tl.load(Z + rn[:, None] * s_zn + u * s_zu + rq[None, :] * s_zq,
                    mask=mn[:, None] & mq[None, :], other=0.0).to(tl.float32)
        dz = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
        k0 = tl.load(OFF + u)
        k1 = tl.load(OFF + u + 1)
        for kb in range(k0, k1, BLOCK_K):
            kk = kb + rk
            mk = kk < k1
            r = tl.load(R + kk[None, :] * s_rk + rq[:, None] * s_rq, mask=mq[:, None] & mk[None, :],
                        other=0.0).to(tl.float32)  # (Q, K)
            t = tl.load(T + kk, mask=mk, other=0.0).to(tl.float32)
            lam = tl.load(LAM + kk, mask=mk, other=0.0).to(tl.float32)
            c = tl.dot(z, r, input_precision=PREC) + t[None, :]
            gb = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + rd0
                md = rd < D
                g = tl.load(G + rn[:, None] * s_gn + rd[None, :] * s_gd, mask=mn[:, None] & md[None, :],
                            other=0.0).to(tl.float32)
                bt = tl.load(B + kk[None, :] * s_bk + rd[:, None] * s_bd, mask=md[:, None] & mk[None, :],
                             other=0.0).to(tl.float32)  # (D, K)
                gb += tl.dot(g, bt, input_precision=PREC)
            tl.store(DLAM + pid * s_dlt + kk, tl.sum(gb * c, axis=0), mask=mk)
            dz += tl.dot(gb * lam[None, :], tl.trans(r), input_precision=PREC)
        tl.store(DZ + rn[:, None] * s_dzn + u * s_dzu + rq[None, :] * s_dzq, dz.to(DZ.dtype.element_ty),
                 mask=mn[:, None] & mq[None, :])


def _blocks(q: int, d: int) -> tuple[int, int, int, int]:
    bq = max(16, triton.next_power_of_2(q))
    bd = min(128, max(16, triton.next_power_of_2(d)))
    if interpreting():  # the interpreter pays per program and per iteration: few, large blocks
        return 64, bq, 64, max(bd, min(256, triton.next_power_of_2(d)))
    return 32, bq, 32, bd


def _prec(dtype: torch.dtype) -> str:
    return "ieee"  # operands are upcast to fp32; keep full fp32 products (no TF32 rounding)


def forward(Z, R, t, lam, B, offsets) -> torch.Tensor:
    n, U, Q = Z.shape
    D = B.shape[1]
    y = torch.empty(n, D, dtype=Z.dtype, device=Z.device)
    bn, bq, bk, bd = _blocks(Q, D)
    grid = (triton.cdiv(n, bn), triton.cdiv(D, bd))
    _fwd_kernel[grid](Z, R, t, lam, B, offsets, y, n, U, Q, D,
                      Z.stride(0), Z.stride(1), Z.stride(2), R.stride(0), R.stride(1), B.stride(0), B.stride(1),
                      y.stride(0), y.stride(1),
                      BLOCK_N=bn, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, PREC=_prec(Z.dtype))
    return y


def backward(grad, Z, R, t, lam, B, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    n, U, Q = Z.shape
    D = B.shape[1]
    K = R.shape[0]
    bn, bq, bk, bd = _blocks(Q, D)
    tiles = triton.cdiv(n, bn)
    dz = torch.empty_like(Z)
    dlam_part = torch.zeros(tiles, K, dtype=torch.float32, device=Z.device)
    grad = grad.contiguous()
    _bwd_kernel[(tiles,)](Z, R, t, lam, B, offsets, grad, dz, dlam_part, n, U, Q, D,
                          Z.stride(0), Z.stride(1), Z.stride(2), R.stride(0), R.stride(1), B.stride(0), B.stride(1),
                          grad.stride(0), grad.stride(1), dz.stride(0), dz.stride(1), dz.stride(2),
                          dlam_part.stride(0),
                          BLOCK_N=bn, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, PREC=_prec(Z.dtype))
    return dz, dlam_part.sum(0).to(lam.dtype)
