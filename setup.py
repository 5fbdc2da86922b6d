"""Builds fastmask._C: the CPU kernels (C++, OpenMP) always; the CUDA kernels as well when FASTMASK_BUILD_CUDA=1 and
a CUDA-enabled torch and nvcc are present. Every op's schema is declared once, in csrc/ops.cpp."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++20", "-fno-math-errno"]


def _want_cuda() -> bool:
    if os.environ.get("FASTMASK_BUILD_CUDA", "0") != "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError("FASTMASK_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
    return True


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        arch = os.environ.get("FASTMASK_CUDA_ARCH", "-gencode=arch=compute_80,code=sm_80 "
                              "-gencode=arch=compute_90,code=sm_90").split()
        return CUDAExtension(
            "fastmask._C", sources, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++20", *arch]}, extra_link_args=["-fopenmp"],
        )
    return CppExtension("fastmask._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
