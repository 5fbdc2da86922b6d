"""Exact percentiles by radix selection: BMFT's global threshold α = np.percentile(concat of R over E, rate)
([PB] Eq. 4; docs/algorithm.md §4), without concatenating the tensors.

np.percentile of n values is lerp(sorted[lo], sorted[hi], γ) (or sorted[lo] for the non-interpolating methods),
with lo, hi and γ from numpy's own float64 formulas (:func:`plan`). The two order statistics are found on
order-preserving integer keys of the floats' bit patterns (``csrc/order_keys.h``; a total order in which
-0.0 comes just before +0.0): each pass is one ``radix_histogram`` over the next 16 key bits of the elements that
share the prefix found so far, and picks the bin holding each target rank (:func:`select`). fp16 / bf16 take one
pass, fp32 two, fp64 four; the only memory is the histogram. The chosen keys decode back to exact values, which
are interpolated in numpy's precision for the dtype (:func:`lerp`).

The same driver serves one process (``fastmask.ops.percentile``: the histogram of the local tensors) and a
process group (``fastmask.parallel.percentile``: the local histograms summed by all-reduce before each choice),
so the two agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

#: The ``method`` values of np.percentile that fastmask reproduces.
METHODS = ("linear", "lower", "higher", "nearest", "midpoint")
# Key bits per pass, by device: a CPU thread's 2^16 uint32 bins stay in L2; on the GPU 2^11 bins per row fit a
# block's shared memory (csrc/cuda/radix_histogram_kernels.cu).
DIGIT_BITS = {"cpu": 16, "cuda": 11}
# numpy's view of each dtype: bf16 through its exact float32 upcast.
_NUMPY_DTYPE = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32,
                torch.float64: np.float64}
_BITS_DTYPE = {16: np.uint16, 32: np.uint32, 64: np.uint64}
DTYPES = tuple(_NUMPY_DTYPE)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}

#: (prefixes, prefix_bits, digit_bits) -> int64 counts [len(prefixes), 2^digit_bits]: the elements whose top
#: prefix_bits key bits equal prefixes[p], binned by their next digit_bits bits (``torch.ops.fastmask.radix_histogram``
#: over fixed tensors, possibly summed over ranks).
Histogram = Callable[[list[int], int, int], np.ndarray]


def describe(index: int, t: Tensor) -> str:
    """``tensors[3] (shape [64, 3, 7, 7], float32)``, as the C++ ops name a tensor."""
    return f"tensors[{index}] (shape {list(t.shape)}, {_DTYPE_NAMES.get(t.dtype, str(t.dtype))})"


def check_arguments(tensors: Sequence[Tensor], q: float, method: str) -> torch.dtype:
    """The common dtype of ``tensors`` after checking q, method and the dtypes (errors name the tensor)."""
    if method not in METHODS:
        raise ValueError(f"percentile: method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= q <= 100.0:  # also rejects NaN
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    if not tensors:
        raise ValueError("percentile: no tensors given")
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.dtype not in _NUMPY_DTYPE:
            raise TypeError(f"percentile: {describe(i, t)} is not float16, bfloat16, float32 or float64")
        if t.dtype != dtype:
            raise TypeError(f"percentile: {describe(i, t)} differs in dtype from {describe(0, tensors[0])}; pass "
                            "tensors of one dtype")
    return dtype


def plan(n: int, q: float, method: str) -> tuple[int, int, float, bool]:
    """(lo, hi, γ, interpolate): np.percentile of n sorted values is lerp(sorted[lo], sorted[hi], γ), or sorted[lo]
    when not interpolating; numpy's float64 formulas step by step (numpy/lib/_function_base_impl.py: _quantile,
    _get_indexes, _get_gamma, _QuantileMethods), so the ranks and γ come out bit for bit the same."""
    if n <= 0:
        raise ValueError("percentile: the tensors hold no elements")
    v = (n - 1) * (q / 100.0)
    if method == "lower":
        return min(n - 1, math.floor(v)), min(n - 1, math.floor(v)), 0.0, False
    if method == "higher":
        return min(n - 1, math.ceil(v)), min(n - 1, math.ceil(v)), 0.0, False
    if method == "nearest":  # np.around rounds half to even, as round() does
        return min(n - 1, round(v)), min(n - 1, round(v)), 0.0, False
    if method == "midpoint":
        v = 0.5 * (math.floor(v) + math.ceil(v))
    above = v >= n - 1  # numpy then takes the maximum twice, with gamma = v - (-1)
    previous = -1 if above else math.floor(v)
    gamma = v - previous
    if method == "midpoint":
        gamma = 0.0 if v % 1 == 0 else 0.5
    lo = n - 1 if above else previous
    return lo, (n - 1 if above else lo + 1), gamma, True


def key_bits(dtype: torch.dtype) -> int:
    """Width of ``dtype``'s order keys: its storage bits."""
    return torch.finfo(dtype).bits


def select(dtype: torch.dtype, ranks: tuple[int, int], histogram: Histogram, digit_bits: int = 16) -> tuple[int, int]:
    """The order keys of the elements at ``ranks`` (0-based positions in sorted order), most significant digit
    first, ``digit_bits`` key bits per pass. Each target keeps its own prefix, so two order statistics that part ways
    are refined in one histogram pass per level (two rows)."""
    targets, prefix, prefix_bits = list(ranks), [0, 0], 0
    width = key_bits(dtype)
    while prefix_bits < width:
        digit = min(digit_bits, width - prefix_bits)
        rows = sorted(set(prefix))
        counts = histogram(rows, prefix_bits, digit)
        for t in range(2):
            before = np.cumsum(counts[rows.index(prefix[t])])  # elements below the end of each bin
            b = int(np.searchsorted(before, targets[t], side="right"))
            if b == len(before):  # the first pass counted every element: only changed data can get here
                raise RuntimeError("percentile: the data changed between histogram passes (or the ranks of a "
                                   "process group disagree on q or method)")
            targets[t] -= int(before[b - 1]) if b > 0 else 0
            prefix[t] = (prefix[t] << digit) | b
        prefix_bits += digit
    return prefix[0], prefix[1]


def value(key: int, dtype: torch.dtype) -> np.floating:
    """The value whose order key is ``key``, as numpy's scalar type for ``dtype`` (bf16 as its float32 upcast)."""
    width = key_bits(dtype)
    sign = 1 << (width - 1)
    bits = key ^ sign if key & sign else ~key & ((1 << width) - 1)
    if dtype == torch.bfloat16:
        return np.array(bits << 16, np.uint32).view(np.float32)[()]
    return np.array(bits, _BITS_DTYPE[width]).view(_NUMPY_DTYPE[dtype])[()]


def lerp(a: np.floating, b: np.floating, gamma: float) -> float:
    """numpy's _lerp in numpy's own scalar arithmetic: a Python-float γ takes the array's precision (NEP 50), so
    float16 data interpolate in float16 and float32 data in float32, as np.percentile does."""
    with np.errstate(all="ignore"):  # inf - inf is NaN in numpy too
        diff = b - a
        return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def percentile_of(n: int, q: float, method: str, dtype: torch.dtype, histogram: Histogram,
                  digit_bits: int = 16) -> float:
    """np.percentile over n elements of ``dtype`` that ``histogram`` counts: :func:`plan`, :func:`select`, then
    :func:`value` and :func:`lerp`."""
    lo, hi, gamma, interpolate = plan(n, q, method)
    key_lo, key_hi = select(dtype, (lo, hi), histogram, digit_bits)
    a = value(key_lo, dtype)
    return lerp(a, value(key_hi, dtype), gamma) if interpolate else float(a)


def percentile(tensors: Sequence[Tensor], q: float, method: str,
               radix_histogram: Callable[[list[Tensor], list[int], int, int], Tensor]) -> float:
    """np.percentile over the concatenation of ``tensors`` (one dtype, one device), each pass one call of the
    ``radix_histogram`` kernel (``torch.ops.fastmask.radix_histogram`` or the reference's). NaN raises, naming the
    tensor (from the first pass)."""
    dtype = check_arguments(tensors, q, method)
    tensors = list(tensors)

    def histogram(prefixes: list[int], prefix_bits: int, digit_bits: int) -> np.ndarray:
        return radix_histogram(tensors, prefixes, prefix_bits, digit_bits).cpu().numpy()

    digit_bits = DIGIT_BITS.get(tensors[0].device.type, 16)
    return percentile_of(sum(t.numel() for t in tensors), q, method, dtype, histogram, digit_bits)
