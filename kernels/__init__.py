"""Triton kernels of fastmask, installed as ``fastmask.kernels``. They know nothing of models or loaders: each module
holds one op's ``@triton.jit`` kernel and its host launcher; fastmask/ops.py decides when they run."""
