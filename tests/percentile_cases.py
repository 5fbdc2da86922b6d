"""Shared cases for the radix-selection op tests (tests/test_percentile.py, tests/test_radix_histogram.py,
tests/test_hard_mask.py, tests/test_distributed_percentile.py): numpy, the independent oracle, and the makers of
adversarial values.

What numpy (>= 2.0, whose NEP 50 promotion rules fix the interpolation precision) does per dtype, which is what
"equal to np.percentile over the concatenation" means here:
- float32 / float64: np.percentile on the array itself. With a Python-float q, numpy (NEP 50) interpolates in the
  array's precision: float32 data gives a float32 result, computed with float32 arithmetic.
- float16: numpy computes natively in float16 (each operation rounded to float16) and returns a float16.
- bfloat16: numpy has no bfloat16; the oracle is np.percentile over the exact float32 upcast (``t.float()``), a
  float32 result. fastmask.ops.reference does the same.
- hard masks: ``a > t`` as numpy evaluates it, i.e. t rounded to the array's dtype (float16 natively, float32 for the
  bf16 upcast) before an exact comparison; NaN elements are never selected.
The ops return numpy's value exactly (as a Python float / 0-d float64 tensor), NaN where numpy's own interpolation
gives NaN (e.g. inf - inf), and the same sign of zero — except where the data hold both -0.0 and +0.0 and the
selected order statistics are zeros: numpy's sign then depends on the input order (its partition is not stable;
see test_percentile.py::test_signed_zero_ties), fastmask orders -0.0 before +0.0 and its answer is equal in value.

Importing this module skips the importing test module under numpy < 2.0, whose semantics differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

METHODS = ("linear", "lower", "higher", "nearest", "midpoint")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

if np.lib.NumpyVersion(np.__version__) < "2.0.0":
    pytest.skip("the oracle's semantics are numpy >= 2.0's (NEP 50 promotion in np.percentile's interpolation)",
                allow_module_level=True)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """The flat array numpy computes on for ``t`` (bf16 through its exact float32 upcast), on the host."""
    t = t.detach().cpu().reshape(-1)
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def numpy_percentile(tensors: list[torch.Tensor], q: float, method: str) -> np.floating:
    with np.errstate(all="ignore"):  # numpy's own inf - inf and overflow warnings
        return np.percentile(np.concatenate([numpy_view(t) for t in tensors]), q, method=method)


def has_mixed_zeros(tensors: list[torch.Tensor]) -> bool:
    flat = np.concatenate([numpy_view(t) for t in tensors])
    zeros = flat[flat == 0]
    return bool(np.signbit(zeros).any() and (~np.signbit(zeros)).any())


def assert_same(got: float, want: np.floating, sign_of_zero: bool = True) -> None:
    want = float(want)
    if math.isnan(want):
        assert math.isnan(got), f"numpy gives nan, got {got!r}"
        return
    assert got == want, f"got {got!r}, numpy gives {want!r}"
    if sign_of_zero:
        assert math.copysign(1.0, got) == math.copysign(1.0, want), f"got {got!r}, numpy gives {want!r}"


# --- adversarial values --------------------------------------------------------------------------------------------


def special_values(dtype: torch.dtype) -> np.ndarray:
    """±0, ±inf, the smallest / largest subnormal, the smallest normal, ±max, ±1 and neighbours, in the dtype."""
    fi = torch.finfo(dtype)
    tiny_sub = fi.smallest_normal * fi.eps  # smallest subnormal
    vals = [0.0, -0.0, math.inf, -math.inf, tiny_sub, -tiny_sub, fi.smallest_normal - tiny_sub, fi.smallest_normal,
            -fi.smallest_normal, fi.max, -fi.max, fi.max / 2, 1.0, -1.0, 1.0 + fi.eps, 1.0 - fi.eps / 2, 2.0, 0.5]
    return torch.tensor(vals, dtype=torch.float64).to(dtype).double().numpy()


def make_values(rng: np.random.Generator, n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """n values of ``dtype``, drawn by ``kind``: normal, lognormal (many binades), few (heavy duplicates), equal,
    special (mostly adversarial values), mixed."""
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "lognormal":
        x = rng.lognormal(0.0, 8.0, n) * rng.choice([-1.0, 1.0], n)
    elif kind == "few":
        x = rng.choice(rng.standard_normal(5), n)
    elif kind == "equal":
        x = np.full(n, rng.choice(special_values(dtype)[[0, 1, 2, 4, 12]]))
    elif kind == "special":
        x = rng.choice(special_values(dtype), n)
    else:
        x = np.where(rng.random(n) < 0.1, rng.choice(special_values(dtype), n), rng.standard_normal(n) * 1e3)
    with np.errstate(over="ignore"):
        return torch.from_numpy(x).to(dtype)


SHAPES = ((), (-1,), (-1, 3), (2, -1, 1))


def split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """x cut into tensors of the given sizes, reshaped to assorted ranks (empty tensors included)."""
    out, at = [], 0
    for i, s in enumerate(sizes):
        part = x[at: at + s].clone()
        at += s
        shape = SHAPES[i % len(SHAPES)]
        if shape == () and s == 1:
            part = part.reshape(())
        elif shape != () and s % math.prod(d for d in shape if d > 0) == 0:
            part = part.reshape(shape)
        out.append(part)
    return out


@st.composite
def tensor_lists(draw, max_total: int, max_tensors: int = 200):
    dtype = draw(st.sampled_from(DTYPES))
    ntensors = draw(st.integers(1, max_tensors))
    sizes = draw(st.lists(st.integers(0, max_total), min_size=ntensors, max_size=ntensors))
    scale = max_total / max(1, sum(sizes))
    sizes = [int(s * scale) if scale < 1 else s for s in sizes]
    if sum(sizes) == 0:
        sizes[0] = 1
    kind = draw(st.sampled_from(("normal", "lognormal", "few", "equal", "special", "mixed")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return split(make_values(rng, sum(sizes), dtype, kind), sizes)
