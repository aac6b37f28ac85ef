"""GPU readiness without a GPU: compile every kernel for sm_90 and read what the compiler made of it.

``python -m residual_fast.info --codegen`` prints one line per kernel and
configuration: the tensor-core instruction found (PTX ``wgmma`` / ``mma`` and
SASS ``HGMMA`` / ``HMMA``, or none), registers, spill bytes (ptxas ``-v``) and
shared memory. It exits 1 when a kernel uses no tensor cores, spills, or needs
more than the 227 KB of shared memory an H100/H200 block may have.

* Triton kernels are compiled by Triton's own compiler for
  ``GPUTarget("cuda", 90, 32)`` at the configurations the package launches
  (every autotune candidate, fp32 and bf16; fp16 shares bf16's code path). The
  re-weighting GEMMs see the coefficients ``c`` (n, K), so ``q`` never reaches
  them: the head units (q = 66) and the MLP units (q = 770 / 1026) run the same
  binaries (``q`` only sizes the cuBLAS batched GEMM of :func:`coefficients`).
* The CUDA sources are compiled with ``nvcc -arch=sm_90 -cubin -Xptxas -v`` and
  disassembled with ``cuobjdump -sass`` (the toolkit's, else the copy Triton ships).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
TARGET = ("cuda", 90, 32)


@dataclass
class KernelReport:
    name: str
    config: str
    tensor_core: str  # e.g. "wgmma/HGMMA", "mma/HMMA", or "none"
    registers: int
    spill_bytes: int
    smem_bytes: int
    offsets: str = "-"  # integer type(s) of the pointer offsets in the Triton IR ("i64" wanted)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.tensor_core == "none":
            out.append("no tensor-core instruction")
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} B spilled")
        if self.offsets not in ("-", "i64"):
            out.append(f"{self.offsets} pointer offsets")
        if self.smem_bytes > SMEM_LIMIT:
            out.append(f"shared memory {self.smem_bytes} B > {SMEM_LIMIT} B")
        return out

    def line(self) -> str:
        status = "ok" if not self.problems else "FAIL: " + ", ".join(self.problems)
        return (f"{self.name:<30} {self.config:<48} tc={self.tensor_core:<12} regs={self.registers:<4} "
                f"spill={self.spill_bytes:<5} smem={self.smem_bytes:<7} offsets={self.offsets:<4} {status}")


def _triton_tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _tool(name: str) -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (Path(home) / "bin" / name, _triton_tools() / name):
        if cand.is_file():
            return str(cand)
    return shutil.which(name)


def _ptxas_usage(text: str) -> dict[str, tuple[int, int, int]]:
    """Per entry function from ``ptxas -v`` output: (registers, spill bytes, static smem bytes)."""
    usage: dict[str, tuple[int, int, int]] = {}
    name = None
    spill = 0
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = int(m.group(1)) + int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            usage[name] = (int(m.group(1)), spill, int(smem.group(1)) if smem else 0)
            spill = 0
    return usage


def _sass_tensor_ops(cubin: Path) -> dict[str, set[str]]:
    """Per function: the tensor-core SASS opcodes (HGMMA, HMMA) in its disassembly."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    found: dict[str, set[str]] = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            found[name] = set()
        elif name:
            found[name].update(re.findall(r"\b(HGMMA|HMMA)\b", line))
    return found


def _tc_label(ptx_ops: set[str], sass_ops: set[str] | None) -> str:
    parts = sorted(ptx_ops)
    if sass_ops:
        parts += sorted(sass_ops)
    return "/".join(parts) if parts else "none"


# -- Triton ----------------------------------------------------------------------------
def triton_cases() -> list[tuple[str, str, object, dict, dict, dict]]:
    """(name, config label, kernel, signature, constexprs, options) for every configuration launched."""
    from .ops.triton import readout as ro
    from .ops.triton import spectral_reweight as sr

    cases = []
    for dt in ("fp32", "bf16"):
        prec = "tf32x3" if dt == "fp32" else "ieee"
        for bn, bk, bd, w, s in sr.FWD_CONFIGS["fp32" if dt == "fp32" else "half"]:
            sig = {"C": "*fp32", "LAM": "*fp32", "B": f"*{dt}", "Y": f"*{dt}", "n": "i32", "K": "i32", "D": "i32",
                   "s_cn": "i32", "s_ck": "constexpr", "s_bk": "i32", "s_bd": "constexpr", "s_yn": "i32",
                   "s_yd": "constexpr"}
            const = {"s_ck": 1, "s_bd": 1, "s_yd": 1, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd, "GROUP": 8,
                     "PREC": prec, "UPCAST": False}
            cases.append(("reweight_fwd", f"{dt} N{bn} K{bk} D{bd} w{w} s{s}", sr._fwd_kernel, sig, const,
                          {"num_warps": w, "num_stages": s}))
        for need_dc in (False, True):
            for bn, bk, bd, w, s in sr.BWD_CONFIGS["fp32" if dt == "fp32" else "half"][: None if not need_dc else 1]:
                sig = {"G": f"*{dt}", "B": f"*{dt}", "C": "*fp32", "LAM": "*fp32", "DLAM": "*fp32", "DC": "*fp32",
                       "n": "i32", "K": "i32", "D": "i32", "s_gn": "i32", "s_gd": "constexpr", "s_bk": "i32",
                       "s_bd": "constexpr", "s_cn": "i32", "s_ck": "constexpr", "s_dcn": "i32",
                       "s_dck": "constexpr"}
                const = {"s_gd": 1, "s_bd": 1, "s_ck": 1, "s_dck": 1, "NEED_DC": need_dc, "BLOCK_N": bn,
                         "BLOCK_K": bk, "BLOCK_D": bd, "PREC": prec, "UPCAST": False}
                cases.append(("reweight_bwd" + ("+dc" if need_dc else ""), f"{dt} N{bn} K{bk} D{bd} w{w} s{s}",
                              sr._bwd_kernel, sig, const, {"num_warps": w, "num_stages": s}))
        bn, bw, bd, w, s = ro.CONFIG
        for final in (False, True):
            sig = {"ACC": "*fp32", "Rr": f"*{dt}", "M": "*fp32", "S": "*fp32", "MU": "*fp32", "V1": "*fp32",
                   "V2": "*fp32", "C": "*fp32", "OUT": f"*{dt}", "Y": f"*{dt}", "n": "i32", "W": "i32", "D": "i32",
                   "s_an": "i32", "s_ad": "constexpr", "s_rn": "i32", "s_rw": "constexpr", "s_mw": "i32",
                   "s_md": "constexpr", "s_on": "i32", "s_od": "constexpr", "s_yn": "i32", "s_yd": "constexpr"}
            const = {"s_ad": 1, "s_rw": 1, "s_md": 1, "s_od": 1, "s_yd": 1, "FINAL": final, "HAS_OUT": final,
                     "BLOCK_N": bn, "BLOCK_W": bw, "BLOCK_D": bd}
            cases.append(("readout" + ("+epilogue" if final else ""), f"r {dt} N{bn} W{bw} D{bd} w{w} s{s}",
                          ro._readout_kernel, sig, const, {"num_warps": w, "num_stages": s}))
    return cases


def compile_triton(kernel, signature: dict, constexprs: dict, options: dict):
    """``triton.compile`` for sm_90 with no GPU (constexpr arguments go in both the signature and constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # under TRITON_INTERPRET=1 the decorator made an interpreted one
        kernel = JITFunction(kernel.fn)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = triton.compiler.ASTSource(kernel, sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget(*TARGET), options=options)


def offset_types(ttir: str) -> str:
    """The integer types of every ``tt.addptr`` offset in Triton IR, e.g. ``"i64"`` or ``"i32+i64"``."""
    found = {m.group(1) for m in re.finditer(r"tt\.addptr [^:]*: [^,]*, (?:tensor<[\dx]*)?(i\d+)", ttir)}
    return "+".join(sorted(found)) or "none"


def triton_reports() -> list[KernelReport]:
    ptxas = _tool("ptxas")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg, kernel, sig, const, opts) in enumerate(triton_cases()):
            ck = compile_triton(kernel, sig, const, opts)
            ptx = ck.asm["ptx"]
            ptx_ops = set()
            if "wgmma.mma_async" in ptx:
                ptx_ops.add("wgmma")
            if re.search(r"\bmma\.sync", ptx):
                ptx_ops.add("mma")
            cubin = Path(tmp) / f"k{i}.cubin"
            cubin.write_bytes(ck.asm["cubin"])
            sass = _sass_tensor_ops(cubin)
            regs, spill = -1, -1
            if ptxas is not None:
                ptx_file = Path(tmp) / f"k{i}.ptx"
                ptx_file.write_text(ptx)
                res = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx_file), "-o", str(Path(tmp) / "o.cubin")],
                                     capture_output=True, text=True)
                usage = _ptxas_usage(res.stdout + res.stderr)
                if usage:
                    regs, spill, _ = next(iter(usage.values()))
            sass_ops = set().union(*sass.values()) if sass else None
            reports.append(KernelReport(f"triton:{name}", cfg, _tc_label(ptx_ops, sass_ops), regs, spill,
                                        int(ck.metadata.shared), offset_types(ck.asm["ttir"])))
    return reports


# -- CUDA C++ ----------------------------------------------------------------------------
def _demangle_label(mangled: str) -> tuple[str, str]:
    kernel = re.search(r"(reweight_forward_kernel|reweight_backward_kernel|readout_kernel)", mangled)
    dtype = re.search(r"kernelI(13__nv_bfloat16|6__half|f)E", mangled)
    dt = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}.get(dtype.group(1), "?") if dtype else "?"
    return (kernel.group(1) if kernel else mangled[:40]), dt


def cuda_reports(csrc: Path | None = None) -> list[KernelReport]:
    from .ops.cuda import CSRC

    csrc = csrc or CSRC
    nvcc = _tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(csrc.glob("*.cu")):
            cubin = Path(tmp) / (src.stem + ".cubin")
            from .ops.cuda import NVCC_FLAGS

            res = subprocess.run([nvcc, *NVCC_FLAGS, "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                                  str(src)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{res.stderr[-2000:]}")
            usage = _ptxas_usage(res.stdout + res.stderr)
            sass = _sass_tensor_ops(cubin)
            for fn, (regs, spill, smem) in sorted(usage.items()):
                kernel, dt = _demangle_label(fn)
                ops = sass.get(fn)
                reports.append(KernelReport(f"cuda:{kernel}", f"{dt} {src.name} 64x64x16 tile, 4 warps",
                                            _tc_label(set(), ops) if ops is not None else "none", regs, spill, smem))
    return reports


def run() -> int:
    """Print the table; 0 when every kernel is fine, 1 otherwise (a missing toolchain is a failure too)."""
    reports: list[KernelReport] = []
    failed = False
    for what, fn in (("triton", triton_reports), ("cuda", cuda_reports)):
        try:
            reports += fn()
        except Exception as e:  # noqa: BLE001 - report why a family could not be compiled
            print(f"{what}: could not compile ({type(e).__name__}: {e})")
            failed = True
    print(f"codegen for sm_90 ({len(reports)} kernels; q does not enter the GEMM kernels, see "
          f"residual_fast/codegen.py)")
    for r in reports:
        print(r.line())
        failed |= bool(r.problems)
    return 1 if failed or not reports else 0


if __name__ == "__main__":  # python -m residual_fast.codegen --offsets: the offset types of each Triton kernel
    import sys

    if sys.argv[1:] != ["--offsets"]:
        raise SystemExit("usage: python -m residual_fast.codegen --offsets   (the table: python -m residual_fast.info "
                         "--codegen)")
    for name, cfg, kernel, sig, const, opts in triton_cases():
        print(name, cfg, offset_types(compile_triton(kernel, sig, const, opts).asm["ttir"]), sep="\t")
