"""``python -m orthoft``: print how orthoft was built and what it runs with, for bug reports."""

from __future__ import annotations

from ._build import build_info


def _format(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def main() -> None:
    info = build_info()
    width = max(len(key) for key in info) + 1
    for key, value in info.items():
        print(f"{key + ':':<{width}} {_format(value)}")


if __name__ == "__main__":
    main()
