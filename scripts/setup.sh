#!/usr/bin/env bash
# Creates .venv, installs torch and the build/test dependencies, then builds and installs orthoft.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

pip install -q --upgrade pip
pip install -q "$torch_spec"
pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
# The extension must be compiled against the torch it runs with: no build isolation.
pip install -q --no-build-isolation ".[test,bench]"
.venv/bin/python -c "import orthoft, orthoft._C as c; print('orthoft', orthoft.__version__, 'torch', c.torch_version, 'cuda', c.cuda_version)"
