#!/usr/bin/env bash
# Compile-only check of every CUDA source (cuda/*.cu) against the stable-ABI headers of the torch of the
# current `python`, for sm_80 and sm_90, with the flags CMakeLists.txt gives them. Needs nvcc, no GPU (and
# no CUDA build of torch: the stable headers are the same in every variant). Fails on any compile error.
#   JOBS=2                          parallel compiles (default 2)
#   NVCC_FLAGS=--resource-usage     extra nvcc flags, e.g. to print registers, shared memory and spills
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-2}"

torch_include=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
# TORCH_TARGET_VERSION 2.10, as CMakeLists.txt sets it.
flags=(
  -c -std=c++17 -O3 -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -Icpp -isystem "$torch_include"
  -DTORCH_TARGET_VERSION=0x20a000000000000ULL -DUSE_CUDA --expt-relaxed-constexpr
)
read -r -a extra_flags <<< "${NVCC_FLAGS:-}"

OUT_DIR="$(mktemp -d /tmp/orthoft_cuda.XXXXXX)"
trap 'rm -rf "$OUT_DIR"' EXIT
export OUT_DIR

# compile_one SRC NVCC FLAGS...: prints ok/FAILED, the seconds it took and the compiler's output.
compile_one() {
  local src=$1
  shift
  local log start
  log="$OUT_DIR/$(basename "$src").log"
  start=$SECONDS
  if "$@" "$src" -o "$OUT_DIR/$(basename "$src").o" >"$log" 2>&1; then
    echo "ok      $src ($((SECONDS - start)) s)"
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
