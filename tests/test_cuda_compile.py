"""Every pure-CUDA kernel file (csrc/cuda/*_kernels.cu: kernels plus extern "C" launchers, no torch headers)
compiles with nvcc for sm_80 and sm_90. Runs where nvcc is on PATH (it is a compile-only check: no GPU needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted((ROOT / "csrc" / "cuda").glob("*_kernels.cu"))
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    cmd = ["nvcc", "-c", "-O2", "-std=c++17", *ARCHS, "-Xcompiler", "-Wall", str(source), "-o",
           str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
