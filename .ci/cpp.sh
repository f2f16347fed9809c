#!/usr/bin/env bash
# The C++ core's checks (issue #4), run by .ci/run after the Python tests:
#  1. CMake build of csrc/ without Python or torch, and its ctest unit tests (Philox known-answer
#     vectors, the Triton stream, the scalar math against the Python reference, the CPU kernels
#     of every instruction set, the CUDA kernels' tiles on the host); with nvcc present the
#     pure-CUDA kernels compile too;
#  2. nvcc compile (no GPU needed, no link) of the torch-side CUDA launchers against the
#     installed torch's headers, so CUDA code that does not compile cannot land.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

# cmake >= 3.24 with CUDA 20 support (the system cmake 3.25 fails with nvcc 13) and ninja, from PyPI.
python - <<'PY' || python -m pip install -q "cmake>=3.26" ninja
import shutil, subprocess, sys
out = subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout.split()
ok = len(out) > 2 and tuple(int(x) for x in out[2].split(".")[:2]) >= (3, 26) and shutil.which("ninja")
sys.exit(0 if ok else 1)
PY

NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
CUDA_ARGS=()
if [ -n "$NVCC" ]; then
  CUDA_ARGS=(-DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_HOST_COMPILER="$(command -v g++)")
fi

BUILD=build/cmake
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${CUDA_ARGS[@]}"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure

if [ -z "$NVCC" ]; then
  echo "cpp.sh: no nvcc found: CUDA launchers not compiled" >&2
  exit 1
fi

# The torch launchers: ops_cuda.cu with nvcc, bindings_cuda.cpp with the host compiler.
OUT=build/cuda_check
mkdir -p "$OUT/include/c10/cuda/impl"
read -r -a TORCH_INC < <(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INC="-I$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
EXTRA_INC=()
if ! python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  # A CPU build of torch ships c10/cuda's headers but not this generated one: its content for a
  # shared-library build of torch, for this compile-only check.
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/include/c10/cuda/impl/cuda_cmake_macros.h"
  EXTRA_INC=(-I"$OUT/include")
fi
STD="$(python -c "import torch; v = tuple(int(x) for x in torch.__version__.split('.')[:2]); print('c++20' if v >= (2, 13) else 'c++17')")"
"$NVCC" -std="$STD" -O3 -arch=sm_90 -Icsrc "${TORCH_INC[@]}" "${EXTRA_INC[@]}" "$PY_INC" \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
  -c csrc/cuda/ops_cuda.cu -o "$OUT/ops_cuda.o" &
g++ -std="$STD" -O1 -fPIC -Wall -Icsrc "${TORCH_INC[@]}" "${EXTRA_INC[@]}" "$PY_INC" \
  -c csrc/cuda/bindings_cuda.cpp -o "$OUT/bindings_cuda.o" &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
[ "$status" -eq 0 ] || { echo "cpp.sh: the CUDA sources failed to compile" >&2; exit 1; }
echo "cpp.sh: CMake core tests passed; CUDA launchers compiled with $("$NVCC" --version | tail -1)"
