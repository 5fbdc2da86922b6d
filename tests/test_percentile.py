"""fastmask.percentile / fastmask.hard_mask (and torch.ops.fastmask.*) against numpy, the independent oracle.

What numpy (>= 2.0, whose NEP 50 promotion rules fix the interpolation precision) does per dtype, which is what
"equal to np.percentile over the concatenation" means here:
- float32 / float64: np.percentile on the array itself. With a Python-float q, numpy (NEP 50) interpolates in the
  array's precision: float32 data gives a float32 result, computed with float32 arithmetic.
- float16: numpy computes natively in float16 (each operation rounded to float16) and returns a float16.
- bfloat16: numpy has no bfloat16; the oracle is np.percentile over the exact float32 upcast (``t.float()``), a
  float32 result. fastmask.reference does the same.
- hard masks: ``a > t`` as numpy evaluates it, i.e. t rounded to the array's dtype (float16 natively, float32 for the
  bf16 upcast) before an exact comparison; NaN elements are never selected.
The op returns numpy's value exactly (as a Python float / 0-d float64 tensor), NaN where numpy's own interpolation
gives NaN (e.g. inf - inf), and the same sign of zero — except where the data hold both -0.0 and +0.0 and the
selected order statistics are zeros: numpy's sign then depends on the input order (its partition is not stable;
see test_signed_zero_ties), fastmask orders -0.0 before +0.0 and its answer is equal in value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastmask import ops
from fastmask.ops import reference

METHODS = ("linear", "lower", "higher", "nearest", "midpoint")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("bool", "uint8", "packed")

if np.lib.NumpyVersion(np.__version__) < "2.0.0":
    pytest.skip("the oracle's semantics are numpy >= 2.0's (NEP 50 promotion in np.percentile's interpolation)",
                allow_module_level=True)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """The flat array numpy computes on for ``t`` (bf16 through its exact float32 upcast)."""
    t = t.reshape(-1)
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


def check(tensors: list[torch.Tensor], q: float, method: str) -> None:
    got = ops.percentile(tensors, q, method, backend="cpp")
    assert_same(got, numpy_percentile(tensors, q, method), sign_of_zero=not has_mixed_zeros(tensors))


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


q_values = st.one_of(
    st.sampled_from([0.0, 100.0, 50.0, 25.0, 75.0, 1.0, 99.0, 99.9999, 1e-12, 100 - 1e-12, 33.333333333333336]),
    st.floats(0.0, 100.0),
)


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_lists(max_total=2000), q=q_values, method=st.sampled_from(METHODS))
def test_percentile_small_lists(tensors, q, method):
    check(tensors, q, method)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_lists(max_total=1_000_000), q=q_values, method=st.sampled_from(METHODS))
def test_percentile_large_lists(tensors, q, method):
    check(tensors, q, method)


def element_strategy(dtype: torch.dtype):
    width = {torch.float16: 16, torch.float32: 32, torch.float64: 64, torch.bfloat16: 32}[dtype]
    return st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True, width=width)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), q=q_values, method=st.sampled_from(METHODS))
def test_percentile_hypothesis_elements(data, dtype, q, method):
    """Every element drawn by hypothesis (it favours boundaries: ±0, ±inf, subnormals, extremes, repeats)."""
    npdtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
               torch.bfloat16: np.float32}[dtype]
    arrays = data.draw(st.lists(hnp.arrays(npdtype, st.integers(0, 40), elements=element_strategy(dtype)),
                                min_size=1, max_size=6).filter(lambda a: sum(x.size for x in a) > 0))
    with np.errstate(over="ignore"):
        tensors = [torch.from_numpy(a.copy()).to(dtype) for a in arrays]
    check(tensors, q, method)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_percentile_resnet_shapes(dtype, method):
    """Importance ratios of a ResNet-like parameter list: many small tensors and a few large ones."""
    shapes = [(64, 3, 7, 7), (64,), (64,), (64, 64, 3, 3), (128, 64, 3, 3), (128,), (256, 128, 1, 1), (512, 256, 3, 3)]
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.rand(s, generator=g) ** 4 * 7).to(dtype) for s in shapes]
    for q in (0.0, 10.0, 50.0, 90.0, 100.0, 12.345):
        check(tensors, q, method)


def test_signed_zero_ties():
    """-0.0 == +0.0. numpy's answer's sign depends on the order of the input (its introselect is not stable);
    fastmask's depends only on the values (it orders -0.0 first), equals numpy's in value and is one of the signs
    numpy gives for some order of the same values."""
    values = np.array([0.0] * 5 + [-0.0] * 5 + [1.0, -1.0], np.float32)
    for q, method in ((50.0, "lower"), (30.0, "linear"), (50.0, "higher"), (45.0, "midpoint")):
        numpy_signs, ours = set(), set()
        for seed in range(60):
            perm = np.random.default_rng(seed).permutation(values)
            want = float(np.percentile(perm, q, method=method))
            got = ops.percentile([torch.from_numpy(perm)], q, method, backend="cpp")
            assert got == want == 0.0
            numpy_signs.add(math.copysign(1.0, want))
            ours.add(math.copysign(1.0, got))
        assert len(ours) == 1 and ours <= numpy_signs


def test_percentile_only_negative_zero():
    """Without mixed zeros the sign of zero is deterministic in numpy, and matched: e.g. numpy's lerp gives +0.0
    for two -0.0 neighbours when gamma < 0.5 (-0.0 + 0.0) and -0.0 when gamma >= 0.5."""
    t = torch.full((7,), -0.0)
    for q in (0.0, 10.0, 50.0, 90.0, 100.0):
        for method in METHODS:
            check([t], q, method)


def test_percentile_inf_gives_numpy_nan():
    """numpy interpolates inf - inf into NaN; so does fastmask (it reproduces the formula, not a cleaner one)."""
    for values, q in (([0.0, 1.0, math.inf], 50.0), ([1.0, math.inf], 100.0), ([-math.inf, math.inf], 50.0)):
        t = torch.tensor(values)
        want = numpy_percentile([t], q, "linear")
        assert math.isnan(float(want))
        assert math.isnan(ops.percentile([t], q, backend="cpp"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_percentile_matches_reference_backend(dtype):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in ((100, 7), (3,), (0,), (5000,))]
    for method in METHODS:
        got = ops.percentile(tensors, 37.5, method, backend="cpp")
        assert got == ops.percentile(tensors, 37.5, method, backend="reference")


def numpy_gamma(n: int, q: float) -> float:
    """numpy's linear interpolation weight for n values at q (its float64 formula, _quantile / _get_gamma)."""
    v = (n - 1) * np.true_divide(q, 100)
    return float(v - np.floor(v))


@pytest.mark.parametrize("branch", ["gamma<0.5", "gamma>=0.5"])
def test_half_interpolation_weight_rounds_once(branch):
    """numpy casts gamma (or 1 - gamma) from float64 straight to float16. Going through float32 instead would round
    twice; pick a q whose gamma sits just above a float16 rounding midpoint, where the two differ."""
    half_mid = 0.25 + 2.0**-13  # halfway between the float16 values 0.25 and 0.25 + 2^-12
    target = half_mid if branch == "gamma<0.5" else 1.0 - half_mid - 2.0**-40
    n = 1001
    q = (500 + target + 2.0**-32) * 100 / (n - 1)
    while not (0 < numpy_gamma(n, q) - target < 2.0**-27):
        q = math.nextafter(q, math.inf if numpy_gamma(n, q) <= target else -math.inf)
    t = torch.cat([torch.zeros(501), torch.full((500,), 2048.0)]).half()
    check([t], q, "linear")
    # float32 rounding first would land exactly on the midpoint and tie to the other neighbour
    assert np.float16(np.float32(numpy_gamma(n, q))) != np.float16(numpy_gamma(n, q)) or branch == "gamma>=0.5"


def test_half_threshold_rounds_once():
    """numpy rounds a Python-float threshold straight to float16; via float32 it would tie to the even neighbour."""
    a, b = 1.0, 1.0 + 2.0**-10  # adjacent float16 values; 1.0 has the even mantissa
    threshold = 1.0 + 2.0**-11 + 2.0**-40  # just above their midpoint: float32 cannot tell it from the midpoint
    t = torch.tensor([a, b], dtype=torch.float16)
    for inclusive in (False, True):
        for layout in LAYOUTS:
            check_masks([t], threshold, inclusive, layout)
    assert numpy_mask(t, threshold, True).tolist() == [False, True]


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_names_the_tensor(dtype):
    tensors = [torch.zeros(10, dtype=dtype), torch.ones(3, 4, dtype=dtype), torch.zeros(70_000, dtype=dtype)]
    tensors[2][-1] = math.nan  # in the last chunk of the last tensor
    tensors[1][2, 3] = math.nan
    with pytest.raises(ValueError, match=r"tensors\[1\] \(shape \[3, 4\].*contains NaN"):
        ops.percentile(tensors, 50.0, backend="cpp")


@pytest.mark.parametrize(
    ("tensors", "q", "method", "error", "match"),
    [
        ([torch.ones(3)], -1.0, "linear", ValueError, r"q must be in \[0, 100\]"),
        ([torch.ones(3)], 100.5, "linear", ValueError, r"q must be in \[0, 100\]"),
        ([torch.ones(3)], math.nan, "linear", ValueError, r"q must be in \[0, 100\]"),
        ([torch.ones(3)], 50.0, "median_unbiased", ValueError, "method must be one of"),
        ([], 50.0, "linear", ValueError, "no tensors given"),
        ([torch.ones(0), torch.ones(0, 3)], 50.0, "linear", ValueError, "no elements"),
        ([torch.ones(3), torch.ones(2, dtype=torch.float64)], 50.0, "linear", TypeError, r"tensors\[1\].*in dtype"),
        ([torch.ones(3, dtype=torch.int64)], 50.0, "linear", TypeError, r"tensors\[0\].*is not float16"),
    ],
)
def test_percentile_errors(tensors, q, method, error, match):
    with pytest.raises(error, match=match):
        ops.percentile(tensors, q, method, backend="cpp")


def test_hard_mask_bad_layout():
    with pytest.raises(ValueError, match="layout must be"):
        torch.ops.fastmask.hard_mask([torch.ones(3)], 0.5, False, "bits")


# --- hard masks ------------------------------------------------------------------------------------------------------


def numpy_mask(t: torch.Tensor, threshold: float, inclusive: bool) -> np.ndarray:
    a = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    with np.errstate(all="ignore"):  # NaN elements; a threshold beyond the dtype's range
        return a >= threshold if inclusive else a > threshold


def check_masks(tensors: list[torch.Tensor], threshold: float, inclusive: bool, layout: str) -> None:
    got = ops.hard_mask(tensors, threshold, inclusive=inclusive, layout=layout, backend="cpp")
    for i, (t, m) in enumerate(zip(tensors, got, strict=True)):
        want = numpy_mask(t, threshold, inclusive)
        if layout == "packed":
            assert m.dtype == torch.uint8 and m.shape == ((t.numel() + 7) // 8,), i
            np.testing.assert_array_equal(m.numpy(), np.packbits(want.reshape(-1), bitorder="little"), err_msg=str(i))
        else:
            assert m.dtype == (torch.bool if layout == "bool" else torch.uint8) and m.shape == t.shape, i
            np.testing.assert_array_equal(m.numpy(), want.astype(m.numpy().dtype), err_msg=str(i))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_lists(max_total=5000, max_tensors=30), pick=st.integers(0, 2**31), inclusive=st.booleans(),
       layout=st.sampled_from(LAYOUTS), how=st.sampled_from(("element", "between", "special", "any", "percentile")),
       any_float=st.floats(allow_nan=True, allow_infinity=True))
def test_hard_mask_matches_numpy(tensors, pick, inclusive, layout, how, any_float):
    flat = np.concatenate([numpy_view(t).astype(np.float64) for t in tensors])
    if how == "element":
        threshold = float(flat[pick % flat.size])
    elif how == "between":  # a threshold between two of the dtype's values: numpy rounds it to the dtype first
        a, b = np.sort(flat)[[pick % flat.size, (pick + 1) % flat.size]]
        threshold = float(a + (b - a) * 0.499) if np.isfinite(a) and np.isfinite(b) else float(a)
    elif how == "special":
        threshold = float(special_values(tensors[0].dtype)[pick % 18])
    elif how == "percentile":
        threshold = ops.percentile(tensors, pick % 101, backend="cpp")
    else:
        threshold = any_float
    check_masks(tensors, threshold, inclusive, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hard_mask_nan_elements_and_threshold(dtype, layout):
    t = torch.tensor([math.nan, 1.0, -0.0, 0.0, -math.nan, math.inf, -math.inf, 2.0, 0.5, math.nan], dtype=dtype)
    for threshold in (0.0, -0.0, 0.5, math.inf, -math.inf, math.nan):
        for inclusive in (False, True):
            check_masks([t, t[:3], t[:0]], threshold, inclusive, layout)


def test_hard_mask_odd_sizes_packed():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=g) for n in (1, 7, 8, 9, 255, 256, 257, 4097, 70_001)]
    for layout in LAYOUTS:
        check_masks(tensors, 0.1, False, layout)


# --- radix_histogram (the pass behind both, and behind fastmask.distributed) -----------------------------------------


def numpy_keys(tensors: list[torch.Tensor]) -> tuple[np.ndarray, int]:
    """Order keys of the storage bits, per the contract in csrc/percentile_keys.h: bits | sign for non-negative
    values, ~bits for negative ones."""
    width = torch.finfo(tensors[0].dtype).bits
    as_int = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    bits = np.concatenate([t.reshape(-1).view(as_int).numpy().view(f"u{width // 8}") for t in tensors])
    bits = bits.astype(np.uint64)
    sign = np.uint64(1 << (width - 1))
    full = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
    return np.where(bits & sign, ~bits & full, bits | sign), width


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("digit", [16, 11, 5])
def test_radix_histogram_counts(dtype, digit):
    rng = np.random.default_rng(5)
    tensors = split(make_values(rng, 30_000, dtype, "mixed"), [10_000, 0, 7, 19_993])
    keys, width = numpy_keys(tensors)
    first = torch.ops.fastmask.radix_histogram(tensors, [0], 0, digit)
    want = np.bincount((keys >> np.uint64(width - digit)).astype(np.int64), minlength=1 << digit)
    np.testing.assert_array_equal(first.numpy(), want[None, :])
    if digit == width:
        return  # fp16 / bf16 keys are one 16-bit digit: nothing left to refine
    # second pass, two rows: the two fullest bins, refined by the next digit
    top = [int(b) for b in np.argsort(-want, kind="stable")[:2]]
    digit2 = min(digit, width - digit)
    second = torch.ops.fastmask.radix_histogram(tensors, top, digit, digit2)
    for row, prefix in enumerate(top):
        inside = keys[(keys >> np.uint64(width - digit)) == np.uint64(prefix)]
        sub = (inside >> np.uint64(width - digit - digit2)) & np.uint64((1 << digit2) - 1)
        np.testing.assert_array_equal(second[row].numpy(), np.bincount(sub.astype(np.int64), minlength=1 << digit2))


@pytest.mark.parametrize(
    ("prefixes", "prefix_bits", "digit_bits", "match"),
    [
        ([0], 0, 17, r"digit_bits must be in \[1, 16\]"),
        ([0], 30, 16, "must be <= 32"),
        ([0, 1, 2], 4, 4, "expected 1 or 2 prefixes"),
        ([0, 1], 0, 8, "one histogram"),
        ([16], 4, 4, "does not fit"),
    ],
)
def test_radix_histogram_errors(prefixes, prefix_bits, digit_bits, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.fastmask.radix_histogram([torch.ones(3)], prefixes, prefix_bits, digit_bits)


# --- torch.library.opcheck -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in ((17, 3), (5,), (0,))]
    for layout in LAYOUTS:
        torch.library.opcheck(torch.ops.fastmask.hard_mask.default, (tensors, 0.25, True, layout))
    torch.library.opcheck(torch.ops.fastmask.radix_histogram.default, (tensors, [0], 0, 12))


def test_compile_traces_the_ops():
    def threshold_and_mask(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        alpha = ops.percentile([a, b], 50.0, "linear", backend="cpp")
        return torch.ops.fastmask.hard_mask([a, b], alpha, False, "bool")

    a, b = torch.randn(40, 3), torch.randn(11)
    compiled = torch.compile(threshold_and_mask, backend="eager")
    for got, want in zip(compiled(a, b), threshold_and_mask(a, b), strict=True):
        assert torch.equal(got, want)


def test_reference_and_cpp_masks_agree_for_float32():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.rand(s, generator=g) for s in ((33, 7), (1,), (4097,))]
    alpha = ops.percentile(tensors, 50.0, backend="cpp")
    for layout in LAYOUTS:
        for got, want in zip(ops.hard_mask(tensors, alpha, layout=layout, backend="cpp"),
                             reference.hard_mask(tensors, alpha, False, layout), strict=True):
            assert torch.equal(got, want)


def test_more_than_2_pow_31_elements():
    """2^31 + 2^20 + 2 bf16 elements (4.3 GB): ranks and counts beyond int32. The data are constant blocks, so the
    sorted order, and numpy's answer for each rank, is known without sorting: [-1, 1 x 2^31, 2 x 2^20, 3]."""
    block = 1 << 25
    tensors = [torch.full((block,), 1.0, dtype=torch.bfloat16) for _ in range(64)]
    tensors += [torch.full((1 << 10, 1 << 10), 2.0, dtype=torch.bfloat16), torch.tensor([3.0, -1.0]).bfloat16()]
    n = (1 << 31) + (1 << 20) + 2
    q_edge = 100 * ((1 << 31) + 0.5) / (n - 1)  # virtual index between the last 1.0 (rank 2^31) and the first 2.0
    v = (n - 1) * (q_edge / 100)
    assert math.floor(v) == 1 << 31 and v % 1 > 0
    expected = {(q_edge, "lower"): 1.0, (q_edge, "higher"): 2.0, (99.99, "midpoint"): 2.0}
    for (q, method), want in expected.items():
        assert ops.percentile(tensors, q, method, backend="cpp") == want, (q, method)
