#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds an orthoft wheel with its CUDA kernels against the
# installed torch, installs it, runs the whole test suite with the CUDA tests active, runs
# compute-sanitizer memcheck on the CUDA operator tests, and the CUDA benchmarks.
# Logs and results go to $OUT_DIR (default /tmp/orthoft-cuda). STEPS selects the steps;
# TESTS names the test files (default: tests).
# WHEEL=path installs that wheel instead of building one: the cp310-abi3 CUDA wheel loads in every torch
# from 2.10 of the same CUDA major, so it can be built on a machine without a GPU, against any CUDA 13
# torch there, and carried here:
#   ORTHOFT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip wheel --no-build-isolation --no-deps -w dist .
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
out=${OUT_DIR:-/tmp/orthoft-cuda}
steps=${STEPS:-"build test bench memcheck"}
export ORTHOFT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [[ $steps == *build* ]]; then
  start=$SECONDS
  if [ -z "${WHEEL:-}" ]; then
    "$python" -m pip wheel --no-build-isolation --no-deps -w "$out" . >"$out/build.log" 2>&1 \
      || { tail -n 60 "$out/build.log"; exit 1; }
    WHEEL=$(ls "$out"/orthoft-*.whl)
  fi
  "$python" -m pip install --no-deps --force-reinstall "$WHEEL" >>"$out/build.log" 2>&1 \
    || { tail -n 60 "$out/build.log"; exit 1; }
  echo "build and install: $((SECONDS - start)) s"
  "$python" -c "import orthoft; assert orthoft.cuda_kernels_available(), 'no CUDA kernels'; print(orthoft.__file__)" \
    || exit 1
fi

if [[ $steps == *test* ]]; then
  start=$SECONDS
  "$python" -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests} >"$out/pytest.log" 2>&1 || status=1
  tail -n 25 "$out/pytest.log"
  echo "tests: $((SECONDS - start)) s"
fi

if [[ $steps == *bench* ]]; then
  start=$SECONDS
  timeout ${BENCH_TIMEOUT:-1800} "$python" benchmarks/run.py --device cuda --out "$out" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1 || status=1
  tail -n 80 "$out/bench.log"
  echo "benchmarks: $((SECONDS - start)) s"
fi
if [[ $steps == *memcheck* ]]; then
  start=$SECONDS
  timeout ${MEMCHECK_TIMEOUT:-900} compute-sanitizer --tool memcheck --error-exitcode 3 "$python" -m pytest -q -p no:cacheprovider -x \
    -k "cuda and not gradcheck and not opcheck" tests/test_block_diag.py tests/test_cayley.py \
    tests/test_butterfly.py >"$out/memcheck.log" 2>&1 || status=1
  tail -n 8 "$out/memcheck.log"
  echo "memcheck: $((SECONDS - start)) s"
fi

exit $status
