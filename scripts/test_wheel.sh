#!/usr/bin/env bash
# Installs a built orthoft wheel into a fresh virtual environment of PYTHON with TORCH_SPEC and runs the
# tests against it from outside the source tree; the environment is removed afterwards.
# Usage: scripts/test_wheel.sh WHEEL PYTHON TORCH_SPEC [TEST...]   (default TEST: tests, the whole suite)
# Wheels of torch that are not on the package index's usual path can be put in ~/.cache/orthoft-wheels
# (or TORCH_FIND_LINKS): pip looks there first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(realpath "$1")
python=$(command -v "$2")
torch_spec=$3
shift 3
tests=("${@:-tests}")

work=$(mktemp -d "${TMPDIR:-/tmp}/orthoft-test-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
find_links=${TORCH_FIND_LINKS:-$HOME/.cache/orthoft-wheels}
pip_args=(-q)
[ -d "$find_links" ] && pip_args+=(--find-links "$find_links")

start=$SECONDS
"$python" -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip install "${pip_args[@]}" "$torch_spec"
"$venv_python" -m pip install "${pip_args[@]}" -c "$root/requirements/lock.txt" "$wheel[test,bench]"
echo "== $("$venv_python" -c 'import platform, torch; print("Python", platform.python_version(), "torch", torch.__version__)'): installed in $((SECONDS - start)) s"

# The tests, and the benchmark scripts, example and README some of them use, without the package sources.
mkdir "$work/run"
cp -r "$root/tests" "$root/benchmarks" "$root/examples" "$root/pyproject.toml" "$root/README.md" "$work/run/"
cd "$work/run"
"$venv_python" -m orthoft
"$venv_python" - "${tests[@]}" <<'PY'
import sys
import sysconfig
from pathlib import Path

import pytest

exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]])
# The tests must have used the installed wheel, not a source tree that happened to be importable.
site_packages = Path(sysconfig.get_paths()["platlib"]).resolve()
orthoft = sys.modules.get("orthoft")
if orthoft is None or not Path(orthoft.__file__).resolve().is_relative_to(site_packages):
    sys.exit(f"the tests imported orthoft from {orthoft and orthoft.__file__}, not from {site_packages}")
print(f"orthoft under test: {Path(orthoft.__file__).parent}")
sys.exit(exit_code)
PY
echo "== tests took $((SECONDS - start)) s in all"
