"""fastmask.ops.percentile (np.percentile over the concatenation, by radix selection: BMFT's global threshold)
against numpy, the independent oracle (its semantics per dtype: tests/percentile_cases.py), on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import backend_device, op_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from percentile_cases import (
    DTYPES,
    METHODS,
    assert_same,
    has_mixed_zeros,
    numpy_percentile,
    special_values,
    tensor_lists,
)

from fastmask import ops

BACKENDS = op_backends("percentile")


def check(tensors: list[torch.Tensor], q: float, method: str, backend: str = "cpp") -> None:
    got = ops.percentile(tensors, q, method, backend=backend)
    assert_same(got, numpy_percentile(tensors, q, method), sign_of_zero=not has_mixed_zeros(tensors))


q_values = st.one_of(
    st.sampled_from([0.0, 100.0, 50.0, 25.0, 75.0, 1.0, 99.0, 99.9999, 1e-12, 100 - 1e-12, 33.333333333333336]),
    st.floats(0.0, 100.0),
)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_backend_matches_numpy(backend, dtype):
    """Each backend of the op table that runs here, on its device: odd sizes, an empty and a 0-d tensor, heavy
    duplicates and the adversarial values, every method."""
    g = torch.Generator().manual_seed(6)
    values = torch.randn(5000, generator=g).to(dtype)
    values[::7] = values[3]  # duplicates
    values[1:40] = torch.from_numpy(np.resize(special_values(dtype), 39)).to(dtype)
    device = backend_device(backend)
    tensors = [t.to(device) for t in (values[:4097], values[4097:4098].reshape(()), values[:0], values[4098:])]
    for method in METHODS:
        for q in (0.0, 0.1, 37.5, 50.0, 99.9, 100.0):
            check(tensors, q, method, backend)


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


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_names_the_tensor(dtype):
    tensors = [torch.zeros(10, dtype=dtype), torch.ones(3, 4, dtype=dtype), torch.zeros(70_000, dtype=dtype)]
    tensors[2][-1] = math.nan  # in the last chunk of the last tensor
    tensors[1][2, 3] = math.nan
    with pytest.raises(ValueError, match=r"tensors\[1\] \(shape \[3, 4\].*contains NaN"):
        ops.percentile(tensors, 50.0, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_names_the_tensor_on_every_backend(backend):
    """The reference names it "tensor 1 (shape (3, 4))", the radix passes "tensors[1] (shape [3, 4], float32)"."""
    tensors = [torch.zeros(10), torch.ones(3, 4), torch.zeros(5)]
    tensors[1][2, 3] = math.nan
    with pytest.raises(ValueError, match=r"1\]? \(shape [\[(]3, 4[\])].*contains NaN"):
        ops.percentile([t.to(backend_device(backend)) for t in tensors], 50.0, backend=backend)


ERRORS = [  # (tensors, q, method, error, match)
    ([torch.ones(3)], -1.0, "linear", ValueError, r"q must be in \[0, 100\]"),
    ([torch.ones(3)], 100.5, "linear", ValueError, r"q must be in \[0, 100\]"),
    ([torch.ones(3)], math.nan, "linear", ValueError, r"q must be in \[0, 100\]"),
    ([torch.ones(3)], 50.0, "median_unbiased", ValueError, "method must be one of"),
    ([], 50.0, "linear", ValueError, "no tensors given"),
    ([torch.ones(0), torch.ones(0, 3)], 50.0, "linear", ValueError, "no elements"),
    ([torch.ones(3), torch.ones(2, dtype=torch.float64)], 50.0, "linear", TypeError, r"tensors\[1\].*in dtype"),
    ([torch.ones(3, dtype=torch.int64)], 50.0, "linear", TypeError, r"tensors\[0\].*is not float16"),
]


@pytest.mark.parametrize(("tensors", "q", "method", "error", "match"), ERRORS)
def test_percentile_errors(tensors, q, method, error, match):
    with pytest.raises(error, match=match):
        ops.percentile(tensors, q, method, backend="cpp")


@pytest.mark.parametrize(("tensors", "q", "method", "error", "match"), ERRORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_on_every_backend(backend, tensors, q, method, error, match):
    with pytest.raises(error, match=match):
        ops.percentile([t.to(backend_device(backend)) for t in tensors], q, method, backend=backend)


def test_compile_traces_the_ops():
    def threshold_and_mask(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        alpha = ops.percentile([a, b], 50.0, "linear", backend="cpp")
        return torch.ops.fastmask.hard_mask([a, b], alpha, False, "bool")

    a, b = torch.randn(40, 3), torch.randn(11)
    compiled = torch.compile(threshold_and_mask, backend="eager")
    for got, want in zip(compiled(a, b), threshold_and_mask(a, b), strict=True):
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
