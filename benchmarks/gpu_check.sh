#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (device tool), under 8 minutes in all (the limits sum to 450 s):
# build the CUDA extension (timed, inside its own timeout), run the GPU tests, benchmark the kernels and the
# inference; results and a timeline in $OUT.
#   run: bash benchmarks/gpu_check.sh      (timeout_s 540; the GPU stack: python3, torch 2.11, triton 3.6)
# open_clip is not installed there and the machine reaches no registry: download its wheels here first,
#   pip download --no-deps -d wheels open_clip_torch==3.3.0 ftfy wcwidth
# (wheels/ is git-ignored: pass it with the device tool's carry). Without it the inference part is skipped.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# kernels run compiled on the GPU (tests/conftest.py would default to the interpreter); no hub downloads
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -d wheels ] && python3 -m pip install -q --no-deps --no-index wheels/*.whl > "$OUT/pip.txt" 2>&1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $1" | tee -a "$OUT/timeline.txt"; }

stamp "info"
python3 -m residual_fast.info > "$OUT/info.txt" 2>&1

stamp "JIT build of csrc/ (limit 120 s)"
timeout 120 python3 - > "$OUT/build.txt" 2>&1 <<'PY'
import time
t = time.time()
from residual_fast.ops.cuda import jit_build
jit_build(verbose=False)
print(f"JIT build ok in {time.time() - t:.0f} s")
PY
echo "rc=$?" >> "$OUT/build.txt"
python3 -m residual_fast.info >> "$OUT/info.txt" 2>&1

# GPU tests only: the kernel tests run on CUDA tensors here (triton compiled, cuda extension); the
# compile-only checks (codegen, offsets, source build) already ran on the CPU machine. No -x: every failure shows.
stamp "GPU tests (limit 90 s)"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py \
  -k "not codegen and not offsets and not compile_and_link and not offset_type" > "$OUT/tests.txt" 2>&1
echo "rc=$?" >> "$OUT/tests.txt"

stamp "kernel benchmarks (limit 80 s)"
timeout 80 python3 benchmarks/run_kernels.py --device cuda --ns 256 1024 4096 --dtypes float32 bfloat16 \
  --rounds 10 --out "$OUT" > "$OUT/kernels.txt" 2>&1
echo "rc=$?" >> "$OUT/kernels.txt"

# one run per model, each in its own limit (rows print as they are measured: a timeout keeps the earlier ones)
if python3 -c "import open_clip" 2> /dev/null; then
  for spec in "ViT-B-16 60" "ViT-L-14 100"; do
    set -- $spec
    stamp "inference ratios $1 (limit $2 s)"
    timeout "$2" python3 benchmarks/run_inference.py --device cuda --models "$1" --batches 1 32 256 \
      --dtypes float32 bfloat16 --variants fine --rounds 5 --out "$OUT/$1" > "$OUT/inference_$1.txt" 2>&1
    echo "rc=$?" >> "$OUT/inference_$1.txt"
  done
else
  echo "open_clip missing: carry wheels/ (see the header)" > "$OUT/inference.txt"
fi
stamp "done"
tail -n 4 "$OUT"/*.txt
