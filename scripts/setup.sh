#!/usr/bin/env bash
# Creates .venv, installs torch and the build/test dependencies at the versions of requirements/lock.txt,
# then builds and installs orthoft.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
lock=requirements/lock.txt

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

pip install -q -c "$lock" pip
pip install -q "$torch_spec"
pip install -q -c "$lock" -r requirements/setup.in
# Built against the torch installed here (its stable-ABI headers), without an isolated build environment
# that would download another torch.
pip install -q -c "$lock" --no-build-isolation ".[test,bench]"
.venv/bin/python -c "import orthoft; from orthoft import _build_config as c; print('orthoft', orthoft.__version__, 'for torch >=', c.torch_target, 'cuda', c.cuda_version)"
