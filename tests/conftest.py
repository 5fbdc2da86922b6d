"""Test set-up. Without a CUDA device the Triton kernels run in the interpreter on CPU tensors; TRITON_INTERPRET
must be set before any @triton.jit function is defined, so it is set here, before fastmask.kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every backend that implements the per-parameter ops; op tests are parametrised over all of them.
OP_BACKENDS = ("reference", "cpp", "triton")
