"""Checks that a compiled orthoft module takes from torch only LibTorch's stable C shims.

Usage: python scripts/check_symbols.py path/to/_C.abi3.so   (with the torch to check against installed)

Fails when the module needs libtorch_python or libpython, when one of its undefined symbols that torch's
libraries define is not a C shim (``aoti_torch_*``, ``torch_*``), or when it needs any C++ symbol of
c10, ATen or torch (those change from one torch release to the next).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

SHIM = re.compile(r"(aoti_torch|torch)_\w+")
TORCH_CXX = re.compile(r"_Z\w*?N?(3c10|2at|5torch)")


def _symbols(path: Path, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()}


def main(module: Path) -> None:
    errors = []
    dynamic = subprocess.run(
        ["readelf", "-d", str(module)], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", dynamic)
    errors += [f"needs {lib}" for lib in needed if lib.startswith(("libtorch_python", "libpython"))]

    # Symbols of the C and C++ runtimes (some torch libraries export copies of them) are not torch's.
    resolved = re.findall(
        r"=> (/\S+)", subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
    )
    runtime = set().union(*(_symbols(Path(lib), "--defined-only") for lib in resolved if "torch" not in lib))
    undefined = _symbols(module, "--undefined-only") - runtime
    torch_libs = sorted((Path(torch.__file__).parent / "lib").glob("lib*.so*"))
    from_torch = undefined & set().union(*(_symbols(lib, "--defined-only") for lib in torch_libs))
    errors += [
        f"takes {name} from torch, which is not a stable C shim"
        for name in from_torch
        if not SHIM.fullmatch(name)
    ]
    errors += [f"needs the C++ symbol {name}" for name in undefined if TORCH_CXX.match(name)]
    if errors:
        sys.exit(f"{module.name}:\n  " + "\n  ".join(sorted(errors)))
    print(
        f"{module.name}: needs {', '.join(needed)}; takes {len(from_torch)} symbols from torch "
        f"{torch.__version__}, all stable C shims"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
