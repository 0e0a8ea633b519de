#!/usr/bin/env bash
# One prepared validation run on a machine with an NVIDIA GPU, sized for one call of at most 10 minutes:
# install (or build) orthoft with its CUDA kernels, run the whole test suite with the CUDA tests active,
# compute-sanitizer memcheck and racecheck on the CUDA operator tests, and the benchmarks with
# --device cuda (operators, layers, convs, the whole-model training step, the mixture-of-experts step,
# the output-side LyCORIS layers beside LyCORIS's own GPU kernels, and the export to LoRA). Every log and
# result goes to $OUT_DIR (default /tmp/orthoft-cuda); with the device tool's $OUT set, they come back as
# one archive, $OUT/validate-cuda.tgz, and the benchmark tables beside it (the tool returns 8 files at most).
#
# Without a GPU the same script is a rehearsal: it builds and tests on the CPU, runs the benchmarks on
# the CPU in --quick size, and says which CUDA steps it skipped, so that a GPU call is not spent on a typo.
#
# STEPS selects the steps (default: "install test memcheck racecheck bench"); TESTS names the test files;
# BENCH_SIZE the benchmark size (default --quick). With a carried wheel the time limits add up to under
# 10 minutes (install 60, tests 180, memcheck 60, racecheck 60, benchmarks 150 + 45 for the LoRA export).
# WHEEL=path installs that wheel instead of building one. The cp310-abi3 CUDA wheel loads in every torch
# from 2.10 with the same CUDA major, so build it on a machine without a GPU, against a CUDA 13 torch, and
# carry it (e.g. in dist/, named in the device call's carry list):
#   ORTHOFT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=2 \
#     pip wheel --no-build-isolation --no-deps -w dist .
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
out=${OUT_DIR:-/tmp/orthoft-cuda}
steps=${STEPS:-"install test memcheck racecheck bench"}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0

if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  device=cuda
  export ORTHOFT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
else
  device=cpu
  export ORTHOFT_CUDA=0
  echo "no GPU here: a rehearsal on the CPU; the CUDA-only steps are skipped" | tee "$out/device.txt"
fi
"$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/device.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $out/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-15}" "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

if [[ $steps == *install* ]]; then
  # Test-only packages the GPU machine lacks, carried as wheels at the lock's versions, e.g. for its Python
  # 3.12: pip download --no-deps --only-binary=:all: --python-version 3.12 -d dist/wheels \
  #   diffusers==0.42.1 scikit-learn==1.9.1 bitsandbytes==0.50.2 torchao==0.18.0 hqq==0.2.8.post1 \
  #   lycoris-lora==4.1.3 hypothesis==6.170.29 peft==0.22.0 einops toml sortedcontainers
  extra=(${EXTRA_WHEELS:-dist/wheels}/*.whl)
  if [ -e "${extra[0]}" ]; then
    step extras 60 "$python" -m pip install --no-deps --no-index "${extra[@]}"
  fi
  if [ -z "${WHEEL:-}" ]; then
    step build "${BUILD_TIMEOUT:-420}" "$python" -m pip wheel --no-build-isolation --no-deps -w "$out" . || exit 1
    WHEEL=$(ls "$out"/orthoft-*.whl)
  fi
  step install 60 "$python" -m pip install --no-deps --force-reinstall "$WHEEL" || exit 1
  check="import orthoft; print(orthoft.__file__, orthoft.build_info())"
  [ "$device" = cpu ] || check+="; assert orthoft.cuda_kernels_available(), 'the installed orthoft has no usable CUDA kernels'"
  "$python" -c "$check" | tee -a "$out/device.txt" || exit 1
fi

if [[ $steps == *test* ]]; then
  # -rs lists every skip: on a GPU, the only skips left should be the few that need something else.
  step pytest "${TEST_TIMEOUT:-180}" "$python" -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests}
fi

# The CUDA operator tests under compute-sanitizer; gradcheck/opcheck would take too long there.
sanitizer_tests=(tests/test_block_diag.py tests/test_cayley.py tests/test_butterfly.py)
for tool in memcheck racecheck; do
  [[ $steps == *$tool* ]] || continue
  if [ "$device" = cpu ]; then
    echo "== $tool: skipped (no GPU)"
    continue
  fi
  if ! command -v compute-sanitizer >/dev/null; then
    echo "== $tool: compute-sanitizer is not on this machine" | tee "$out/$tool.log"
    status=1
    continue
  fi
  step "$tool" "${SANITIZER_TIMEOUT:-60}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
    "$python" -m pytest -q -p no:cacheprovider -x -k "cuda and not gradcheck and not opcheck" "${sanitizer_tests[@]}"
  if grep -qiE "not supported|unable to|cannot be profiled|device .* is not" "$out/$tool.log"; then
    echo "== $tool: compute-sanitizer refused this device (see $tool.log)"
  fi
done

if [[ $steps == *bench* ]]; then
  # --quick: every suite, the whole-model and mixture-of-experts steps and the LyCORIS layers included, in
  # the size that fits this call; then orthoft's export to LoRA beside PEFT's converter.
  step bench "${BENCH_TIMEOUT:-150}" "$python" benchmarks/run.py --device "$device" --out "$out" ${BENCH_SIZE:---quick} ${BENCH_ARGS:-}
  step lora_export "${LORA_TIMEOUT:-45}" "$python" benchmarks/lora_export.py --device "$device" --quick --out "$out"
fi

if [ -n "${OUT:-}" ] && [ "$OUT" != "$out" ]; then
  tar -C "$out" -czf "$OUT/validate-cuda.tgz" .
  cp "$out"/*.md "$OUT"/ 2>/dev/null
fi
exit $status
