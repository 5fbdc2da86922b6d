"""Triton kernels of fastmask, installed as ``fastmask.kernels``. They know nothing of models or loaders: each op module
(fisher, soft_mask, masked_adam, masked_sgd) holds one op's ``@triton.jit`` kernel and its host launcher, and
multi_tensor holds what they share (launch tables, argument checks, IEEE helpers); fastmask/ops.py decides when they
run."""
