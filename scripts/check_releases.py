"""Runs the tests that talk to other libraries against their newest releases, or their oldest supported
ones, instead of the versions in requirements/lock.txt, and names the package whose change broke a test.

    python scripts/check_releases.py              # the newest release of each package
    python scripts/check_releases.py --oldest     # the lower bounds of pyproject.toml's extras
    python scripts/check_releases.py -- -k peft   # extra arguments go to pytest

In a virtual environment of its own (``.venv-releases``, git-ignored, kept between runs), it installs torch
(``TORCH_SPEC``), orthoft and the locked packages, runs the interop tests once as locked, then with every
tracked package moved to its target version. If that run fails tests the locked one passed, it goes back to
the lock and moves one package at a time, rerunning only those tests, and reports which package breaks
which test. Exit status 1 when a move breaks a test, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
VENV = ROOT / ".venv-releases"

# The libraries orthoft exchanges files, layers or models with, and those whose changes reach them.
TRACKED = [
    "peft",
    "transformers",
    "diffusers",
    "lycoris-lora",
    "bitsandbytes",
    "torchao",
    "hqq",
    "safetensors",
    "accelerate",
    "huggingface-hub",
]

# The tests that run another library's code: PEFT's loader and saver, transformers' and diffusers' models,
# the Trainer, LyCORIS, the quantization libraries. Globs, so that a new test file of a kind is included.
TEST_GLOBS = [
    "tests/test_peft_*.py",
    "tests/test_layers_peft.py",
    "tests/test_real_models.py",
    "tests/test_models_end_to_end.py",
    "tests/test_quantized.py",
    "tests/test_trainers.py",
    "tests/test_adapter_io.py",
    "tests/test_embedding.py",
    "tests/test_examples.py",
    "tests/test_lora_*.py",
    "tests/test_lycoris*.py",
    "tests/test_*moe*.py",
    "tests/test_target_parameters*.py",
]


def run(*command: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(c) for c in command), flush=True)
    return subprocess.run([str(c) for c in command], check=check, text=True, cwd=ROOT)


def pip(*args: str) -> None:
    run(VENV / "bin" / "python", "-m", "pip", "install", "-q", *args)


def installed_versions() -> dict[str, str]:
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {row["name"].lower().replace("_", "-"): row["version"] for row in json.loads(out)}


def newest(package: str) -> str:
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "index", "versions", package],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out, re.MULTILINE | re.IGNORECASE)
    if found is None:
        raise SystemExit(f"pip index versions {package} printed no version:\n{out}")
    return found.group(1)


def oldest_supported() -> dict[str, str]:
    """The ``>=`` lower bounds of the tracked packages in pyproject.toml's extras."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bounds = {}
    for requirement in (Requirement(text) for group in extras.values() for text in group):
        name = requirement.name.lower()
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if name in TRACKED and lower:
            bounds[name] = lower[0]
    return bounds


def set_up() -> None:
    if not (VENV / "bin" / "python").exists():
        run(sys.executable, "-m", "venv", VENV)
    pip("-c", str(LOCK), "pip")
    pip(os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    pip("-c", str(LOCK), "-r", str(ROOT / "requirements" / "setup.in"))
    pip("-c", str(LOCK), "--no-build-isolation", ".[test,bench]")


def back_to_lock() -> None:
    pip("-r", str(LOCK))


def failures(tests: list[str], pytest_args: list[str]) -> set[str]:
    """The test ids that failed or errored."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        command = [VENV / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        run(*command, f"--junit-xml={report}", *tests, *pytest_args, check=False)
        if not report.exists():
            raise SystemExit("pytest wrote no report: it could not collect the tests")
        failed = set()
        for case in ET.parse(report).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(f"{case.get('classname')}::{case.get('name')}")
        return failed


def node_ids(test_ids: set[str]) -> list[str]:
    """pytest node ids from junit names: ``tests.test_x::test_y[p]``, or ``::tests.test_x`` for a file
    that failed to be collected."""
    out = []
    for test_id in sorted(test_ids):
        module, _, name = test_id.partition("::")
        out.append(f"{name.replace('.', '/')}.py" if not module else f"{module.replace('.', '/')}.py::{name}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--oldest", action="store_true", help="the oldest supported versions, not the newest")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    tests = sorted({str(p.relative_to(ROOT)) for g in TEST_GLOBS for p in ROOT.glob(g)})

    set_up()
    locked = installed_versions()
    targets = oldest_supported() if args.oldest else {name: newest(name) for name in TRACKED}
    moves = {
        name: (locked.get(name), version) for name, version in targets.items() if locked.get(name) != version
    }
    against = "oldest supported" if args.oldest else "newest"
    print(f"\n== as locked: {', '.join(f'{n} {locked.get(n)}' for n in TRACKED)}")
    broken_when_locked = failures(tests, args.pytest_args)
    if not moves:
        print(f"\n== every tracked package is at its {against} version already")
        return 1 if broken_when_locked else 0

    print(f"\n== {against}: " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in moves.items()))
    pip(*(f"{name}=={version}" for name, (_, version) in moves.items()))
    broken = failures(tests, args.pytest_args) - broken_when_locked
    lines = [f"{against} releases: " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in moves.items())]
    if broken_when_locked:
        lines.append(f"failing as locked too (not counted): {', '.join(sorted(broken_when_locked))}")
    if not broken:
        lines.append(
            f"PASS: the tests that pass as locked pass with the {against} releases ({len(tests)} files)"
        )
    else:
        lines.append(f"BROKEN: {len(broken)} tests fail with the {against} releases only")
        blamed: set[str] = set()
        for name, (was, version) in moves.items():
            back_to_lock()
            pip(f"{name}=={version}")
            by_this = failures(node_ids(broken), args.pytest_args) & broken
            blamed |= by_this
            for test in sorted(by_this):
                lines.append(f"  {name} {was} -> {version} breaks {test}")
        for test in sorted(broken - blamed):
            lines.append(f"  only several moves together break {test}")
        back_to_lock()
    print("\n== report\n" + "\n".join(lines))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
