from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import orthoft

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not orthoft.cuda_kernels_available():
        pytest.skip("orthoft was built without CUDA kernels")
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _own_inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Inductor's cache is shared by everything on the machine and does not key compiled graphs by the
    operator schemas: a graph compiled against another build of orthoft must not be reused."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


@pytest.fixture
def summary_line(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Adds a line to the end of pytest's output (shown by plain ``pytest -q`` too)."""
    lines = request.config.stash.setdefault(_SUMMARY_LINES, [])
    return lines.append


_SUMMARY_LINES = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for line in config.stash.get(_SUMMARY_LINES, []):
        terminalreporter.write_line(line)
