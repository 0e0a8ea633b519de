#!/usr/bin/env bash
# Builds an orthoft wheel from a copy of this tree against the torch of PYTHON, checks what the wheel
# holds, shows what auditwheel says of it, installs it into a fresh virtual environment with the same
# torch and runs the test suite against the installed wheel from outside the source tree.
# Usage: scripts/check_wheel.sh [PYTHON]   (default: .venv/bin/python; TORCH_SPEC overrides the torch
# installed with the wheel, which defaults to the version PYTHON has)
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
  --exclude=./.venv --exclude=./venv --exclude=./.ci-venv --exclude=__pycache__ --exclude='*.egg-info' \
  --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.so' --exclude='*.o' --exclude='*.whl' \
  -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$work/dist" "$work/src"
wheels=("$work"/dist/orthoft-*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "expected one orthoft wheel, got: ${wheels[*]}" >&2; exit 1; }
wheel=${wheels[0]}
phase build

echo "== checking $(basename "$wheel")"
"$python" - "$wheel" "linux_$(uname -m)" "$torch_version" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

wheel, platform_tag, torch_version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
errors = []
expected_name = rf"orthoft-[^-]+-{python_tag}-{python_tag}-{platform_tag}\.whl"
if not re.fullmatch(expected_name, wheel.name):
    errors.append(f"file name {wheel.name} does not match {expected_name}")
with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    dist_info = next(name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info"))
    wheel_metadata = archive.read(f"{dist_info}/WHEEL").decode()
    build_config = archive.read("orthoft/_build_config.py").decode() if "orthoft/_build_config.py" in names else ""
print("\n".join(f"  {name}" for name in names))

for tag_line in (f"Tag: {python_tag}-{python_tag}-{platform_tag}", "Root-Is-Purelib: false"):
    if tag_line not in wheel_metadata.splitlines():
        errors.append(f"{dist_info}/WHEEL lacks '{tag_line}'")
required = [r"orthoft/__init__\.py", r"orthoft/__main__\.py", r"orthoft/_build\.py", r"orthoft/_build_config\.py"]
required.append(rf"orthoft/_C\.cpython-{sys.version_info.major}{sys.version_info.minor}[^/]*\.so")
errors += [f"missing {pattern}" for pattern in required if not any(re.fullmatch(pattern, n) for n in names)]
forbidden = {
    "tests": r"(^|/)tests?/|(^|/)test_[^/]*\.py$|(^|/)conftest\.py$",
    "C++/CUDA sources": r"\.(c|cc|cpp|cxx|h|hh|hpp|cu|cuh)$",
    "build files": r"CMakeCache\.txt$|CMakeFiles/|cmake_install\.cmake$|\.ninja|\.(o|obj|a)$|(^|/)build/",
    "caches": r"__pycache__/|\.pyc$",
}
for what, pattern in forbidden.items():
    errors += [f"{what} in the wheel: {name}" for name in names if re.search(pattern, name)]
built_torch = re.search(r'^torch_version: str = "(.*)"$', build_config, re.MULTILINE)
if built_torch is None or built_torch[1] != torch_version:
    errors.append(f"_build_config.py does not record torch {torch_version}:\n{build_config}")
if errors:
    sys.exit("wheel check failed:\n  " + "\n  ".join(errors))
print(f"wheel contents OK ({len(names)} files, built for torch {torch_version})")
EOF
phase contents

echo "== auditwheel show (before repair the wheel is linux_*, not manylinux: that is expected)"
if "$python" -m auditwheel --version >/dev/null 2>&1; then
  auditwheel=("$python" -m auditwheel)
else
  "$python" -m venv "$work/tools"
  "$work/tools/bin/python" -m pip install -q auditwheel
  auditwheel=("$work/tools/bin/python" -m auditwheel)
fi
# Its exit status is 0 for a readable wheel whatever the tag; torch's libraries, found by soname at run
# time, are not on its search path and are left out of the report, as the repair leaves them out of wheels.
"${auditwheel[@]}" show "$wheel"
phase audit

echo "== installing the wheel into a fresh virtual environment"
torch_spec=${TORCH_SPEC:-torch==${torch_version%%+*}}
"$python" -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip install -q "$torch_spec"
"$venv_python" -m pip install -q "$wheel[test,bench]"
phase install

echo "== running the tests against the installed wheel"
# The tests, and the benchmark scripts some of them run, without the package sources beside them.
mkdir "$work/run"
cp -r "$root/tests" "$root/benchmarks" "$root/pyproject.toml" "$work/run/"
cd "$work/run"
"$venv_python" -m orthoft
"$venv_python" - <<'EOF'
import sys
import sysconfig
from pathlib import Path

import pytest

exit_code = pytest.main(["-q", "-p", "no:cacheprovider", "tests"])
# The tests must have used the installed wheel, not a source tree that happened to be importable.
site_packages = Path(sysconfig.get_paths()["platlib"]).resolve()
orthoft = sys.modules.get("orthoft")
if orthoft is None or not Path(orthoft.__file__).resolve().is_relative_to(site_packages):
    sys.exit(f"the tests imported orthoft from {orthoft and orthoft.__file__}, not from {site_packages}")
print(f"orthoft under test: {Path(orthoft.__file__).parent}")
sys.exit(exit_code)
EOF
phase tests
echo "== check_wheel.sh passed"
