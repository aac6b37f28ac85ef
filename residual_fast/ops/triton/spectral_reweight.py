"""Triton kernels of the re-weighting GEMMs behind ``spectral_reweight`` (tensor cores).

With the coefficients ``c = Z_u @ R_u.T + t`` (n, K) fixed (they are constants
of the cached data while lambda trains), one step is two GEMMs:

* forward  ``y = (c * lam) @ B``: the diagonal re-weighting is the prologue of
  the A operand (scaled in fp32, rounded once to ``B``'s dtype);
* backward ``gb = dY @ B.T``, with the epilogue ``dlam += colsum(c * gb)``
  (fp32 atomics: no tiles x K partial buffer) and, only when asked,
  ``dc = gb * lam``.

``tl.dot`` runs bf16/fp16 operands natively and fp32 operands as 3xTF32
(tensor cores, error close to fp32; plain TF32 is 1e-3 relative and would fail
the fp32 tolerance of the tests), accumulating in fp32. Every offset is 64-bit
(``n * stride`` passes 2^31 near n = 85k at ViT-L heads); any strides.
No block size depends on ``q`` or ``K``: both are loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import interpreting


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: 3xTF32 for fp32 operands; half operands are native (the flag is unused)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


@triton.jit
def _fwd_kernel(C, LAM, B, Y, n, K, D,
                s_cn, s_ck, s_bk, s_bd, s_yn, s_yd,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    # grouped tile order: GROUP row-tiles share the same B columns while they are in L2
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n, BLOCK_N)
    tiles_d = tl.cdiv(D, BLOCK_D)
    per_group = GROUP * tiles_d
    first_n = (pid // per_group) * GROUP
    rows = tl.minimum(tiles_n - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % rows
    pid_d = (pid % per_group) // rows
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rk0 = tl.arange(0, BLOCK_K).to(tl.int64)
    mn = rn < n
    md = rd < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        mk = rk < K
        c = tl.load(C + rn[:, None] * s_cn + rk[None, :] * s_ck, mask=mn[:, None] & mk[None, :], other=0.0)
        lam = tl.load(LAM + rk, mask=mk, other=0.0)
        a = (c.to(tl.float32) * lam.to(tl.float32)[None, :]).to(B.dtype.element_ty)  # the diagonal prologue
        b = tl.load(B + rk[:, None] * s_bk + rd[None, :] * s_bd, mask=mk[:, None] & md[None, :], other=0.0)
        if UPCAST:  # exact: a and b are already rounded to bf16
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(Y + rn[:, None] * s_yn + rd[None, :] * s_yd, acc.to(Y.dtype.element_ty),
             mask=mn[:, None] & md[None, :])


@triton.jit
def _bwd_kernel(G, B, C, LAM, DLAM, DC, n, K, D,
                s_gn, s_gd, s_bk, s_bd, s_cn, s_ck, s_dcn, s_dck,
                NEED_DC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_k = tl.program_id(0)  # K-tiles fastest: programs in flight share the dY rows
    pid_n = tl.program_id(1)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rd0 = tl.arange(0, BLOCK_D).to(tl.int64)
    mn = rn < n
    mk = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + rd0
        md = rd < D
        g = tl.load(G + rn[:, None] * s_gn + rd[None, :] * s_gd, mask=mn[:, None] & md[None, :], other=0.0)
        bt = tl.load(B + rk[None, :] * s_bk + rd[:, None] * s_bd, mask=md[:, None] & mk[None, :], other=0.0)
        if UPCAST:
            g, bt = g.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(g, bt, acc, input_precision=PREC)
    c = tl.load(C + rn[:, None] * s_cn + rk[None, :] * s_ck, mask=mn[:, None] & mk[None, :], other=0.0)
    tl.atomic_add(DLAM + rk, tl.sum(acc * c.to(tl.float32), axis=0), mask=mk)
    if NEED_DC:
        lam = tl.load(LAM + rk, mask=mk, other=0.0).to(tl.float32)
        tl.store(DC + rn[:, None] * s_dcn + rk[None, :] * s_dck, (acc * lam[None, :]).to(DC.dtype.element_ty),
                 mask=mn[:, None] & mk[None, :])


# (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages): the GPU candidates (autotuned) per operand family, each
# checked free of spills by ``python -m residual_fast.info --codegen`` (3xTF32 needs about three times the
# registers of a bf16 tile). The interpreter runs one large config (it pays per program and per loop
# iteration, and cannot autotune).
FWD_CONFIGS = {"fp32": [(128, 32, 64, 8, 3), (64, 32, 64, 4, 3)],
               "half": [(128, 64, 128, 8, 3), (64, 32, 128, 4, 4)]}
BWD_CONFIGS = {"fp32": [(128, 32, 64, 8, 3)],
               "half": [(128, 64, 64, 8, 3), (64, 64, 64, 8, 3)]}
INTERPRET_FWD = (64, 64, 128)
INTERPRET_BWD = (64, 64, 128)


def _upcast(dtype: torch.dtype) -> bool:
    """The Triton 3.8 interpreter's ``tl.dot`` returns garbage for bf16 operands (1e10 errors; fp16 is fine):
    there the rounded bf16 operands are widened to fp32 first, which is exact."""
    return interpreting() and dtype == torch.bfloat16


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _configs(table):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bk, bd, w, s in table]


_LAUNCHERS: dict[tuple[str, str], object] = {}


def _launcher(kind: str, fam: str):
    """The kernel itself under the interpreter, else its autotuner for the operand family (built once)."""
    if interpreting():
        return _fwd_kernel if kind == "fwd" else _bwd_kernel
    if (kind, fam) not in _LAUNCHERS:
        if kind == "fwd":
            _LAUNCHERS[kind, fam] = triton.autotune(_configs(FWD_CONFIGS[fam]), key=["K", "D"])(_fwd_kernel)
        else:  # the atomics in dlam must start from zero for every timed candidate
            _LAUNCHERS[kind, fam] = triton.autotune(_configs(BWD_CONFIGS[fam]), key=["K", "D", "NEED_DC"],
                                                    reset_to_zero=["DLAM"])(_bwd_kernel)
    return _LAUNCHERS[kind, fam]


def forward(c: torch.Tensor, lam: torch.Tensor, B: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(c * lam) @ B`` in ``out_dtype``; ``B``'s dtype sets the tensor-core operand type."""
    launch = _launcher("fwd", family(B.dtype))
    n, K = c.shape
    D = B.shape[1]
    y = torch.empty(n, D, dtype=out_dtype, device=c.device)
    if n == 0 or D == 0:
        return y
    args = (c, lam, B, y, n, K, D, c.stride(0), c.stride(1), B.stride(0), B.stride(1), y.stride(0), y.stride(1))
    if interpreting():
        bn, bk, bd = INTERPRET_FWD
        grid = (triton.cdiv(n, bn) * triton.cdiv(D, bd),)
        launch[grid](*args, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, GROUP=8, PREC=precision(B.dtype),
                     UPCAST=_upcast(B.dtype))
    else:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(D, meta["BLOCK_D"]),)
        launch[grid](*args, GROUP=8, PREC=precision(B.dtype), UPCAST=_upcast(B.dtype))
    return y


def backward(grad: torch.Tensor, c: torch.Tensor, lam: torch.Tensor, B: torch.Tensor,
             need_dc: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(``dc = (grad @ B.T) * lam`` in ``c``'s dtype or None, ``dlam = colsum(c * (grad @ B.T))`` fp32)."""
    launch = _launcher("bwd", family(B.dtype))
    n, K = c.shape
    D = B.shape[1]
    dlam = torch.zeros(K, dtype=torch.float32, device=c.device)
    dc = torch.empty(n, K, dtype=c.dtype, device=c.device) if need_dc else None
    if n == 0 or K == 0:
        return dc, dlam
    out = dc if dc is not None else dlam  # a valid pointer when dc is not written
    args = (grad, B, c, lam, dlam, out, n, K, D, grad.stride(0), grad.stride(1), B.stride(0), B.stride(1),
            c.stride(0), c.stride(1), out.stride(0), out.stride(-1))
    if interpreting():
        bn, bk, bd = INTERPRET_BWD
        launch[(triton.cdiv(K, bk), triton.cdiv(n, bn))](*args, NEED_DC=need_dc, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd,
                                                      PREC=precision(B.dtype), UPCAST=_upcast(B.dtype))
    else:
        def grid(meta):
            return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch[grid](*args, NEED_DC=need_dc, PREC=precision(B.dtype), UPCAST=_upcast(B.dtype))
    return dc, dlam
