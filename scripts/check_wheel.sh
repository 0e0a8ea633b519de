#!/usr/bin/env bash
# Builds an orthoft wheel from a copy of this tree against the torch of PYTHON and checks it: a
# cp310-abi3 wheel with the files it needs and no others, whose _C.abi3.so passes abi3audit and takes
# from torch nothing but its stable C shims (scripts/check_symbols.py); shows what auditwheel says of it;
# then installs it into a fresh virtual environment with the same torch and runs the test suite against
# the installed wheel from outside the source tree (scripts/test_wheel.sh).
# Usage: scripts/check_wheel.sh [PYTHON]   (default: .venv/bin/python)
#   TORCH_SPEC   the torch installed with the wheel (default: the version PYTHON has)
#   WHEEL_DIR    a folder to keep the wheel in, for further tests (scripts/test_wheel.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=$(command -v "${1:-$root/.venv/bin/python}")
case $python in /*) ;; *) python=$PWD/$python ;; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/orthoft-check-wheel.XXXXXX")
timings=()
phase_start=$SECONDS
phase() {
  timings+=("$(printf '%-9s %4ds' "$1" $((SECONDS - phase_start)))")
  phase_start=$SECONDS
}
finish() {
  echo "== time per phase:"
  printf '  %s\n' "${timings[@]}" "$(printf '%-9s %4ds' total "$SECONDS")"
  rm -rf "$work"
}
trap finish EXIT
torch_version=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')

echo "== building a wheel with $python"
# A copy, so that the build neither uses nor touches this tree's build/ folder and environments.
mkdir "$work/src"
tar -C "$root" --exclude-vcs --exclude=./build --exclude=./_skbuild --exclude=./dist --exclude=./wheelhouse \
  --exclude=./.venv --exclude=./.venv-releases --exclude=./benchmarks/runs --exclude=./venv --exclude=./.ci-venv --exclude=__pycache__ --exclude='*.egg-info' \
  --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.so' --exclude='*.o' --exclude='*.whl' \
  -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$work/dist" "$work/src"
wheels=("$work"/dist/orthoft-*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "expected one orthoft wheel, got: ${wheels[*]}" >&2; exit 1; }
wheel=${wheels[0]}
phase build

echo "== checking $(basename "$wheel")"
"$python" - "$wheel" "linux_$(uname -m)" "$torch_version" <<'PY'
import re
import sys
import zipfile
from pathlib import Path

wheel, platform_tag, torch_version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
errors = []
expected_name = rf"orthoft-[^-]+-cp310-abi3-{platform_tag}\.whl"
if not re.fullmatch(expected_name, wheel.name):
    errors.append(f"file name {wheel.name} does not match {expected_name}")
with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    dist_info = next(name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info"))
    wheel_metadata = archive.read(f"{dist_info}/WHEEL").decode()
    build_config = archive.read("orthoft/_build_config.py").decode() if "orthoft/_build_config.py" in names else ""
print("\n".join(f"  {name}" for name in names))

for tag_line in (f"Tag: cp310-abi3-{platform_tag}", "Root-Is-Purelib: false"):
    if tag_line not in wheel_metadata.splitlines():
        errors.append(f"{dist_info}/WHEEL lacks '{tag_line}'")
required = ["orthoft/__init__.py", "orthoft/__main__.py", "orthoft/_build.py", "orthoft/_build_config.py"]
required.append("orthoft/_C.abi3.so")
errors += [f"missing {name}" for name in required if name not in names]
forbidden = {
    "tests": r"(^|/)tests?/|(^|/)test_[^/]*\.py$|(^|/)conftest\.py$",
    "C++/CUDA sources": r"\.(c|cc|cpp|cxx|h|hh|hpp|cu|cuh)$",
    "build files": r"CMakeCache\.txt$|CMakeFiles/|cmake_install\.cmake$|\.ninja|\.(o|obj|a)$|(^|/)build/",
    "caches": r"__pycache__/|\.pyc$",
    "modules for one Python version": r"\.cpython-[^/]*\.so$",
}
for what, pattern in forbidden.items():
    errors += [f"{what} in the wheel: {name}" for name in names if re.search(pattern, name)]
for field, value in (("torch_version", torch_version), ("torch_target", "2.10")):
    recorded = re.search(rf'^{field}: str = "(.*)"$', build_config, re.MULTILINE)
    if recorded is None or recorded[1] != value:
        errors.append(f"_build_config.py does not record {field} {value}:\n{build_config}")
if errors:
    sys.exit("wheel check failed:\n  " + "\n  ".join(errors))
print(f"wheel contents OK ({len(names)} files, built with torch {torch_version} for torch >= 2.10)")
PY
phase contents

echo "== abi3audit, and the symbols _C.abi3.so takes from torch"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q -c "$root/requirements/lock.txt" -r "$root/requirements/ci-tools.in"
"$work/tools/bin/abi3audit" --strict --report "$wheel"
mkdir "$work/unpacked"
"$python" -m zipfile -e "$wheel" "$work/unpacked"
"$python" "$root/scripts/check_symbols.py" "$work/unpacked/orthoft/_C.abi3.so"
phase symbols

echo "== auditwheel show (before repair the wheel is linux_*, not manylinux: that is expected)"
# Its exit status is 0 for a readable wheel whatever the tag; torch's libraries, found by soname at run
# time, are not on its search path and are left out of the report, as the repair leaves them out of wheels.
"$work/tools/bin/python" -m auditwheel show "$wheel"
phase audit

if [ -n "${WHEEL_DIR:-}" ]; then
  mkdir -p "$WHEEL_DIR"
  cp "$wheel" "$WHEEL_DIR/"
fi

echo "== installing the wheel into a fresh virtual environment and running the tests"
bash "$root/scripts/test_wheel.sh" "$wheel" "$python" "${TORCH_SPEC:-torch==${torch_version%%+*}}"
phase tests
echo "== check_wheel.sh passed"
