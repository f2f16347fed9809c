#!/usr/bin/env bash
# The GPU checks, for a fresh CUDA machine with no network (torch 2.11 / triton 3.6 preinstalled):
# build the extension, run the CUDA tests, then the latency and kernel benchmarks.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Every JSON lands in OUT_DIR; a short table is printed last. Budget: about 8 minutes.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1 BERDIFF_TEST_CUDA_TRITON=1   # compiled Triton on the GPU, not the interpreter
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
PY=${PYTHON:-python3}
status=()

step() {  # step NAME TIMEOUT COMMAND...: run, log to OUT/NAME.log, remember pass/fail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-22s %-6s %4ds' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" $((SECONDS - t0)))")
  tail -n 25 "$OUT/$name.log"
}

$PY - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, platform
print(f"torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda} "
      f"python {platform.python_version()} device {torch.cuda.get_device_name()}")
PY
step build 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
step cuda_tests 200 $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
  tests/test_rng.py tests/test_kernels_triton.py tests/test_cpp_ops.py tests/test_fast_sampler.py -k "cuda or CUDA"
step kernels 120 $PY benchmarks/kernels.py --json "$OUT/kernels.json"
step train_step 120 $PY benchmarks/train_step.py --device cuda --quick --json "$OUT/train_step.json"
step latency_s10 150 $PY benchmarks/latency.py --preset lidc --k 16 --steps 10 --repeats 5 --json "$OUT/latency_lidc_k16_s10.json"
step latency_s50 200 $PY benchmarks/latency.py --preset lidc --k 16 --steps 50 --repeats 5 \
  --modes original,compiled,graph --json "$OUT/latency_lidc_k16_s50.json"

echo
echo "== gpu_check summary ($(cat "$OUT/versions.txt")) =="
printf '%s\n' "${status[@]}"
for f in "$OUT"/latency_*.json; do
  [ -f "$f" ] && $PY - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for mode, v in r["results"].items():
    sp = v.get("speedup_vs_original") or 0
    print(f"latency steps={r['steps']:<3} {mode:9s} {v['seconds_per_image']*1e3:8.1f} ms/image  x{sp:5.1f}  "
          f"{v.get('peak_memory_gb', 0):.2f} GB")
PY
done
