#!/usr/bin/env bash
# Rewrites requirements/lock.txt: the exact version of every third-party package that setup, the tests
# and the benchmarks install, for each Python orthoft supports (3.10 on), resolved from pyproject.toml's
# extras (test, bench), requirements/setup.in and ci-tools.in, with the newest releases they admit today.
# torch is not in it: TORCH_SPEC chooses it (scripts/setup.sh), and CI tests several.
# Usage: bash scripts/lock.sh   (then run the tests, and commit the lock if they pass)
set -euo pipefail
cd "$(dirname "$0")/.."

tools=$(mktemp -d "${TMPDIR:-/tmp}/orthoft-lock.XXXXXX")
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q "uv==0.13.10"

{
  echo "# The exact versions that scripts/setup.sh, CI and the wheel tests install (pip -c), for every Python"
  echo "# from 3.10. Written by scripts/lock.sh, never by hand; torch is chosen by TORCH_SPEC instead."
  "$tools/venv/bin/uv" pip compile pyproject.toml requirements/setup.in requirements/ci-tools.in --extra test --extra bench \
    --universal --python-version 3.10 --no-header --no-annotate --quiet \
    | grep -vE '^(torch|triton|nvidia-|cuda-)'
} >requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins)"
