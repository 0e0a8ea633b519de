#!/usr/bin/env bash
# Compile-only check of every CUDA source (cuda/*.cu) against the torch of the current `python`, for sm_80
# and sm_90, with the flags a torch extension gets. Needs nvcc, no GPU. Fails on any compile error.
#   JOBS=2                          parallel compiles (default 2)
#   NVCC_FLAGS=--resource-usage     extra nvcc flags, e.g. to print registers, shared memory and spills
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-2}"

# One flag per line: torch's include directories and its C++ ABI.
mapfile -t torch_flags < <("$PYTHON" - <<'PY'
import os
import torch
from torch.utils.cpp_extension import include_paths
for path in include_paths():
    print("-isystem")
    print(path)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# A CPU-only torch wheel ships the c10/cuda headers without their generated cuda_cmake_macros.h (which
# only defines a Windows export macro); tell CUDAMacros.h not to look for it.
if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in include_paths()):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
PY
)

flags=(
  -c -std=c++17 -O3 -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -Icpp "${torch_flags[@]}"
  -DTORCH_EXTENSION_NAME=_C --expt-relaxed-constexpr
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
  -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
)
read -r -a extra_flags <<< "${NVCC_FLAGS:-}"

OUT_DIR="$(mktemp -d /tmp/orthoft_cuda.XXXXXX)"
trap 'rm -rf "$OUT_DIR"' EXIT
export OUT_DIR

# compile_one SRC NVCC FLAGS...: prints ok/FAILED and the compiler's output; fails with the compiler.
compile_one() {
  local src=$1
  shift
  local log
  log="$OUT_DIR/$(basename "$src").log"
  if "$@" "$src" -o "$OUT_DIR/$(basename "$src").o" >"$log" 2>&1; then
    echo "ok      $src"
    cat "$log"
  else
    echo "FAILED  $src"
    cat "$log"
    return 1
  fi
}
export -f compile_one

sources=(cuda/*.cu)
echo "compiling ${#sources[@]} CUDA sources with $("$NVCC" --version | tail -n 1), $JOBS at a time"
printf '%s\n' "${sources[@]}" |
  xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {} "$NVCC" "${flags[@]}" "${extra_flags[@]}"
