#!/usr/bin/env bash
# The GPU checks, for a fresh CUDA machine with no network (torch and triton preinstalled):
# build the extension, run the CUDA tests, the kernel benchmarks and the CMake core's tests, then
# the U-Net profile, latency and training benchmarks.
#   bash benchmarks/gpu_check.sh OUT_DIR            # GPU_CHECK_BUDGET=460 seconds by default
#   GPU_CHECK_STEPS=build,cuda_tests,kernels bash benchmarks/gpu_check.sh OUT_DIR   # some steps only
#   GPU_CHECK_STEPS=build,ncu_kernels ...   # optional steps (ncu_kernels, latency_autotune) run only when named
# Steps run in order of importance, each cut at its own limit and at what is left of the
# budget, so the whole script ends inside it. Output: OUT_DIR/log.txt (every step's log), one
# JSON per benchmark (written as they go, so a cut run keeps what it measured) and
# inductor_code.tgz (the compiled U-Net's generated code); a short table is printed last.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BUDGET=${GPU_CHECK_BUDGET:-460}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1 BERDIFF_TEST_CUDA_TRITON=1   # compiled Triton on the GPU, not the interpreter
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
# Inductor's default mode, to fit the lease: the library's CUDA default, max-autotune-no-cudagraphs,
# tunes for minutes at the first call. Set BERDIFF_COMPILE_MODE to measure another.
export BERDIFF_COMPILE_MODE=${BERDIFF_COMPILE_MODE:-default}
PY=${PYTHON:-python3}
LOG=$OUT/log.txt
status=()

step() {  # step NAME LIMIT COMMAND...: run within min(LIMIT, budget left), log, remember pass/fail
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then return; fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then status+=("$(printf '%-18s %-9s' "$name" skipped)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "===== $name (limit ${limit}s) =====" >> "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 15
  local rc=${PIPESTATUS[0]}
  status+=("$(printf '%-18s %-9s %4ds' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAIL:$rc")" $((SECONDS - t0)))")
}

optional_step() {  # like step, but only when GPU_CHECK_STEPS names it
  if [[ ",${GPU_CHECK_STEPS:-}," == *",$1,"* ]]; then step "$@"; fi
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader
  $PY - <<'PY'
import platform, torch, triton
print(f"torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda} "
      f"python {platform.python_version()} device {torch.cuda.get_device_name()}")
PY
} 2>&1 | tee "$LOG"

step build 200 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
# GPU_CHECK_TESTS narrows the test files (e.g. to tests/test_cpp_ops.py after a csrc-only change).
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests/test_rng.py tests/test_kernels_triton.py tests/test_cpp_ops.py tests/test_fast_sampler.py}"
step cuda_tests 210 $PY -m pytest -q -rfE --durations=5 -p no:cacheprovider -m "not slow" "${TESTS[@]}" -k "cuda or CUDA"
step kernels 120 $PY benchmarks/kernels.py --impls triton cuda --repeats 9 --json "$OUT/kernels.json"
# Bool masks: the CUDA kernels' instance that reads its dtypes at run time (berdiff_kernels.cuh, visit_io).
step kernels_bool 60 $PY benchmarks/kernels.py --impls triton cuda --mask-dtype bool --ops q_sample ddim_step \
  --shape 64x1x512x512 --repeats 9 --json "$OUT/kernels_bool.json"
# The torch-free CMake core on the GPU: ctest's test_cuda_kernels runs the CUDA kernels against the CPU ones.
step ctest 90 bash -c 'cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  && cmake --build build/gpu -j "$MAX_JOBS" && ctest --test-dir build/gpu --output-on-failure'
# Where the U-Net's time goes (kernel categories), in profile_unet.py's default variants (or
# GPU_CHECK_PROFILE's): as compiled, without the ChannelsLastConcat pass, with cuDNN's
# algorithm timing (as the graph sampler), with the weights stored in bf16 and channels_last;
# Inductor's generated code of each variant comes back as one archive (the lease returns 8 files).
CODE=$(mktemp -d)
step profile_unet ${GPU_CHECK_PROFILE_LIMIT:-170} $PY benchmarks/profile_unet.py ${GPU_CHECK_PROFILE:+--variants "$GPU_CHECK_PROFILE"} \
  --dump-code "$CODE" --json "$OUT/profile_unet.json"
[ -n "$(ls -A "$CODE")" ] && tar czf "$OUT/inductor_code.tgz" -C "$CODE" .
# Optional, for issue #4's remaining gap: hardware counters (Nsight Compute) of the DDIM step and
# q_sample kernels, Triton's and CUDA's, at 64x1x512x512; a table of them is printed last.
NCU=$(command -v ncu || ls "$CUDA_HOME"/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
optional_step ncu_kernels 150 "${NCU:-ncu}" --clock-control none --launch-count 40 -k "regex:step_kernel|q_sample_kernel" \
  --metrics gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
  --csv --log-file "$OUT/ncu_kernels.csv" $PY benchmarks/kernels.py --impls triton cuda --ops q_sample ddim_step \
  --shape 64x1x512x512 --repeats 1 --inner 1
step latency_s50 150 $PY benchmarks/latency.py --preset lidc --k 16 --steps 50 --repeats 5 \
  --modes "${GPU_CHECK_S50_MODES:-original,eager,compiled,graph}" --json "$OUT/latency_s50.json"
step latency_s10 90 $PY benchmarks/latency.py --preset lidc --k 16 --steps 10 --repeats 5 \
  --modes original,compiled,graph --json "$OUT/latency_s10.json"
step train_step 60 $PY benchmarks/train_step.py --device cuda --quick --json "$OUT/train_step.json"
# Optional, for issue #5: the library's CUDA compile mode, whose tuning takes minutes at the first
# call (reported as first_call_seconds). Last, so that it gets what is left of the budget;
# or a call of its own:
#   GPU_CHECK_BUDGET=540 GPU_CHECK_STEPS=build,latency_autotune bash benchmarks/gpu_check.sh OUT
optional_step latency_autotune 480 env BERDIFF_COMPILE_MODE=max-autotune-no-cudagraphs $PY benchmarks/latency.py \
  --preset lidc --k 16 --steps 50 --repeats 5 --modes graph --json "$OUT/latency_autotune.json"

echo
echo "== gpu_check summary: $(sed -n 2p "$LOG") =="
printf '%s\n' "${status[@]}"
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, "kernels*.json"))):
    k = json.load(open(f))
    mask = k["meta"]["mask_dtype"]
    for r in k["results"]:
        if r["impl"] == "torch" and r["op"] != "loss_fwd_bwd":
            continue
        g = f"{r['graph_us']:7.1f}" if r.get("graph_us") else "      -"
        c = f"{100 * r['frac_copy']:5.1f}%" if r.get("frac_copy") else "     -"
        print(f"kernel {r['op']:<14} {r['shape']:<13} {mask:<6} {r['impl']:<7} {r['median_us']:9.1f} us  graph {g} us "
              f" {c} of copy  x{r['speedup_vs_eager']:.1f} eager")
f = os.path.join(out, "profile_unet.json")
if os.path.exists(f):
    r = json.load(open(f))
    for name, v in r["results"].items():
        cats = " ".join(f"{c} {ms:.2f}" for c, ms in v["kernel_ms_by_category"].items() if ms >= 0.05)
        ct = f"conv {v['conv_tflops']:.0f} TFLOP/s" if v.get("conv_tflops") else ""
        print(f"unet {name:<18} {v['ms_per_forward']:6.2f} ms/forward {v['tflops']:4.0f} TFLOP/s  first call "
              f"{v.get('compile_seconds', 0):4.0f} s  {ct}  ms: {cats}")
f = os.path.join(out, "ncu_kernels.csv")
if os.path.exists(f):  # one line per profiled launch: kernel, then each metric's value
    import csv
    launches = {}
    for row in csv.DictReader(l for l in open(f) if l.startswith('"')):
        k = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"][:60]})
        k[row["Metric Name"].split("__")[1].split(".")[0]] = row["Metric Value"]
    for k in launches.values():
        print("ncu " + "  ".join(f"{n} {v}" for n, v in k.items()))
for f in sorted(glob.glob(os.path.join(out, "latency_*.json"))):
    r = json.load(open(f))
    for mode, v in r["results"].items():
        sp = v.get("speedup_vs_original") or 0
        fl = v.get("fraction_of_flop_floor") or 0
        tag = ("+cudnn.benchmark" if r.get("cudnn_benchmark") else "") + \
            ("" if r.get("compile_mode") == "default" else f" [{r.get('compile_mode')}]")
        print(f"latency steps={r['steps']:<3} {mode + tag:24s} {v['seconds_per_image'] * 1e3:8.1f} ms/image  x{sp:6.1f}  "
              f"floor {fl:5.2f}  {v.get('peak_memory_gb', 0):.2f} GB  first call {v.get('first_call_seconds', 0):.0f} s  "
              f"ops {r.get('backend')}")  # not triton: the package was not installed (build step)
f = os.path.join(out, "train_step.json")
if os.path.exists(f):
    for r in json.load(open(f))["results"]:
        sp = r.get("speedup_vs_reference") or 0
        print(f"train_step {r['variant']:<10} {r['backend']:<7} {r['steps_per_s']:7.2f} steps/s  "
              f"{r['ms_per_step']:7.1f} ms/step  x{sp:.2f} reference  ops {r['bernoulli_ops_ms']:.2f} ms")
PY
