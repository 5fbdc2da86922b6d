"""Triton kernels of fastmask, installed as ``fastmask.kernels``. They know nothing of models or loaders: each op
module (``fisher_accumulate``, ``soft_mask``, ``masked_adam``, ``masked_sgd``: the op's stem in the op table,
:mod:`fastmask.ops.table`) holds one op's ``@triton.jit`` kernel and its host launcher, and ``multi_tensor`` holds
what they share (launch tables, argument checks, IEEE helpers); :mod:`fastmask.ops` decides when they run."""
