#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (device tool): build the CUDA extension,
# run the GPU tests, run the benchmarks; everything lands under $OUT.
#   run: bash benchmarks/gpu_check.sh      (timeout ~540 s; the GPU stack: torch 2.11, triton 3.6)
# open_clip is not installed there and the machine reaches no registry: download its wheels here first,
#   pip download --no-deps -d wheels open_clip_torch==3.3.0 ftfy wcwidth
# (wheels/ is git-ignored: pass it with the device tool's carry).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
[ -d wheels ] && python -m pip install -q --no-deps --no-index wheels/*.whl > "$OUT/pip.txt" 2>&1
python -m residual_fast.info > "$OUT/info.txt" 2>&1
python - > "$OUT/build.txt" 2>&1 <<'PY'
import time
from residual_fast.ops.cuda import jit_build
t = time.time(); jit_build(verbose=False); print(f"JIT build ok in {time.time() - t:.0f} s")
PY
python -m residual_fast.info >> "$OUT/info.txt" 2>&1
timeout 150 python -m pytest -q -x tests/test_ops.py tests/test_fused.py tests/test_residual.py > "$OUT/tests.txt" 2>&1
timeout 120 python benchmarks/run_kernels.py --device cuda --ns 64 256 1024 4096 --peak-gbs 4800 --out "$OUT" \
  > "$OUT/kernels.txt" 2>&1
timeout 200 python benchmarks/run_inference.py --device cuda --models ViT-B-16 ViT-L-14 --batches 1 32 256 \
  --dtypes float32 bfloat16 --variants fine --rounds 10 --out "$OUT" > "$OUT/inference.txt" 2>&1
tail -n 3 "$OUT"/*.txt
