"""orthoft's build record, the check of the running torch against it, and ``python -m orthoft``."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthoft import _C, _build, _build_config

BUILD_INFO_KEYS = {
    "orthoft",
    "torch_target",
    "torch_built",
    "torch_running",
    "cuda_built",
    "cuda_running",
    "cuda_archs",
    "cuda_kernels_present",
    "cuda_kernels_usable",
    "gpu",
    "python",
    "platform",
}


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_build_info_describes_this_build_and_the_running_torch() -> None:
    info = _build.build_info()
    assert set(info) == BUILD_INFO_KEYS
    assert info["orthoft"] == importlib.metadata.version("orthoft")
    assert info["torch_target"] == "2.10"
    assert info["torch_running"] == torch.__version__
    assert info["cuda_running"] == torch.version.cuda
    assert _release(info["torch_running"]) >= _release(info["torch_target"])
    assert _release(info["torch_built"]) >= _release(info["torch_target"])
    assert info["python"] == platform.python_version()
    assert info["platform"] == platform.platform()
    if not info["cuda_kernels_present"]:
        assert info["cuda_built"] is None
        assert info["cuda_archs"] == []
        assert not info["cuda_kernels_usable"]
    assert (info["gpu"] is not None) == torch.cuda.is_available()
    if info["cuda_kernels_usable"]:
        assert info["cuda_kernels_present"]
        assert torch.cuda.is_available()


def test_compiled_module_is_an_empty_limited_api_module() -> None:
    """_C is a cp310-abi3 module that only registers the operators; the build record is Python."""
    assert Path(_C.__file__).name == "_C.abi3.so"
    assert [name for name in vars(_C) if not name.startswith("__")] == []
    assert hasattr(torch.ops.orthoft, "butterfly_backward")


def test_check_accepts_the_running_torch() -> None:
    _build.check_torch_compatibility()


@pytest.mark.parametrize("running", ["2.9.1", "2.9.0+cu128", "1.13.1"])
def test_check_rejects_a_torch_older_than_the_target(monkeypatch: pytest.MonkeyPatch, running: str) -> None:
    monkeypatch.setattr(_build_config, "with_cuda", False)
    monkeypatch.setattr(_build_config, "cuda_version", None)
    monkeypatch.setattr(torch, "__version__", running)
    with pytest.raises(ImportError) as raised:
        _build.check_torch_compatibility()
    message = str(raised.value)
    assert "it needs torch 2.10 or newer" in message
    assert f"Found: torch {running}" in message
    assert 'pip install "torch>=2.10"' in message
    assert "pip install --no-build-isolation --no-binary orthoft" in message


@pytest.mark.parametrize("running", ["2.10.0", "2.13.0+cpu", "2.14.1", "2.20.0.dev20270101", "3.0.0"])
def test_check_accepts_the_target_and_every_newer_torch(
    monkeypatch: pytest.MonkeyPatch, running: str
) -> None:
    monkeypatch.setattr(_build_config, "with_cuda", False)
    monkeypatch.setattr(_build_config, "cuda_version", None)
    monkeypatch.setattr(torch, "__version__", running)
    _build.check_torch_compatibility()


def test_check_rejects_cpu_torch_for_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build_config, "with_cuda", True)
    monkeypatch.setattr(_build_config, "cuda_version", "12.8.93")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(
        ImportError, match=r"CUDA 12\.8\.93 kernels need a CUDA 12\.x build of torch"
    ) as raised:
        _build.check_torch_compatibility()
    message = str(raised.value)
    assert "(CPU-only)" in message
    assert "--index-url https://download.pytorch.org/whl/cu128" in message
    assert "the orthoft wheel of the torch variant found here (cpu)" in message


def test_check_rejects_another_cuda_major(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build_config, "with_cuda", True)
    monkeypatch.setattr(_build_config, "cuda_version", "13.0.88")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(ImportError, match=r"need a CUDA 13\.x build of torch") as raised:
        _build.check_torch_compatibility()
    assert "(cu126)" in str(raised.value)


@pytest.mark.parametrize("running_cuda", [None, "12.6", "13.0"])
def test_check_accepts_any_torch_variant_without_cuda_kernels(
    monkeypatch: pytest.MonkeyPatch, running_cuda: str | None
) -> None:
    monkeypatch.setattr(_build_config, "torch_version", "2.13.0+cu130")
    monkeypatch.setattr(_build_config, "with_cuda", False)
    monkeypatch.setattr(_build_config, "cuda_version", None)
    monkeypatch.setattr(torch.version, "cuda", running_cuda)
    _build.check_torch_compatibility()


def test_check_accepts_another_cuda_minor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build_config, "with_cuda", True)
    monkeypatch.setattr(_build_config, "cuda_version", "12.8.93")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    _build.check_torch_compatibility()


def test_missing_build_record_says_to_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "orthoft._build_config", None)
    with pytest.raises(ImportError, match=r"_build_config\.py.*is missing.*Reinstall orthoft"):
        _build.check_torch_compatibility()


@pytest.mark.parametrize(
    ("archs", "capability", "supported"),
    [
        ("8.0;8.6;8.9;9.0+PTX", (8, 0), True),
        ("8.0;8.6;8.9;9.0+PTX", (8, 7), True),
        ("8.0;8.6;8.9;9.0+PTX", (9, 0), True),
        ("8.0;8.6;8.9;9.0+PTX", (10, 0), True),
        ("8.0;8.6;8.9;9.0+PTX", (12, 0), True),
        ("8.0;8.6;8.9;9.0+PTX", (7, 5), False),
        ("8.0 8.6", (9, 0), False),
        ("8.6", (8, 0), False),
        ("7.5+PTX", (8, 6), True),
        ("Ampere", (8, 0), False),
        ("", (8, 0), False),
    ],
)
def test_archs_support_device(archs: str, capability: tuple[int, int], supported: bool) -> None:
    assert _build.archs_support_device(archs, capability) is supported


def test_python_m_orthoft_prints_the_build(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orthoft"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert set(lines) == BUILD_INFO_KEYS
    assert lines["orthoft"].strip() == importlib.metadata.version("orthoft")
    assert lines["torch_target"].strip() == "2.10"
    assert lines["torch_built"].strip() == _build_config.torch_version
    assert lines["torch_running"].strip() == torch.__version__
    assert lines["cuda_running"].strip() == (torch.version.cuda or "none")
    assert lines["cuda_kernels_present"].strip() == ("yes" if _build_config.with_cuda else "no")
