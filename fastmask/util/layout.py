"""Memory-layout predicates shared by the fused kernels (which need them) and the ops (which route around them)."""

from __future__ import annotations

from torch import Tensor


def dense(t: Tensor) -> bool:
    """True if ``t``'s elements fill its memory span without gaps or overlaps (contiguous in some dim order): sorted
    by stride, each dimension's stride is the product of the sizes inside it. Such a tensor can be walked by one
    flat index alongside buffers with the same strides."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True
