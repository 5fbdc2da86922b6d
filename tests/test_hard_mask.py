"""fastmask.ops.hard_mask (BMFT Eq. 4: M = 1[x > threshold], ``inclusive``: >=) against numpy's comparison, the
independent oracle (tests/percentile_cases.py says how numpy compares each dtype), in every layout, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import backend_device, op_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from percentile_cases import DTYPES, numpy_view, special_values, tensor_lists

from fastmask import ops
from fastmask.ops import reference

BACKENDS = op_backends("hard_mask")
LAYOUTS = ("bool", "bits")
# The devices of the torch.ops.fastmask.hard_mask kernels (cpp, cuda) that run here.
DEVICES = tuple(dict.fromkeys(backend_device(b).type for b in BACKENDS if b != "reference"))


# --- against numpy ---------------------------------------------------------------------------------------------------


def numpy_mask(t: torch.Tensor, threshold: float, inclusive: bool) -> np.ndarray:
    t = t.cpu()
    a = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    with np.errstate(all="ignore"):  # NaN elements; a threshold beyond the dtype's range
        return a >= threshold if inclusive else a > threshold


def check_masks(tensors: list[torch.Tensor], threshold: float, inclusive: bool, layout: str,
                backend: str = "cpp") -> None:
    got = ops.hard_mask(tensors, threshold, inclusive=inclusive, layout=layout, backend=backend)
    for i, (t, m) in enumerate(zip(tensors, got, strict=True)):
        assert m.device == t.device, i
        m = m.cpu()
        want = numpy_mask(t, threshold, inclusive)
        if layout == "bits":
            assert m.dtype == torch.int8 and m.shape == ((t.numel() + 7) // 8,), i
            np.testing.assert_array_equal(m.view(torch.uint8).numpy(), np.packbits(want.reshape(-1), bitorder="little"),
                                          err_msg=str(i))
        else:
            assert m.dtype == torch.bool and m.shape == t.shape, i
            np.testing.assert_array_equal(m.numpy(), want, err_msg=str(i))


def test_half_threshold_rounds_once():
    """numpy rounds a Python-float threshold straight to float16; via float32 it would tie to the even neighbour."""
    a, b = 1.0, 1.0 + 2.0**-10  # adjacent float16 values; 1.0 has the even mantissa
    threshold = 1.0 + 2.0**-11 + 2.0**-40  # just above their midpoint: float32 cannot tell it from the midpoint
    t = torch.tensor([a, b], dtype=torch.float16)
    for inclusive in (False, True):
        for layout in LAYOUTS:
            check_masks([t], threshold, inclusive, layout)
    assert numpy_mask(t, threshold, True).tolist() == [False, True]


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


def test_hard_mask_odd_sizes_bits():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=g) for n in (1, 7, 8, 9, 255, 256, 257, 4097, 70_001)]
    for layout in LAYOUTS:
        check_masks(tensors, 0.1, False, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_backend_matches_numpy(backend, layout, dtype):
    """Each backend of the op table that runs here, on its device: NaN elements and thresholds, ±0, ±inf, odd sizes
    around the packed byte boundaries, a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([math.nan, 1.0, -0.0, 0.0, -math.nan, math.inf, -math.inf, 2.0, 0.5, math.nan])
    device = backend_device(backend)
    tensors = [special, torch.randn(4097, generator=g), torch.randn(3, 7, 3, generator=g), torch.tensor(0.25),
               torch.randn(9, generator=g), torch.empty(0, 2)]
    tensors = [t.to(dtype).to(device) for t in tensors]
    for threshold in (0.0, -0.0, 0.25, 1.5, math.inf, -math.inf, math.nan):
        for inclusive in (False, True):
            check_masks(tensors, threshold, inclusive, layout, backend)


# fastmask/ops/reference.py::hard_mask compares with torch's `t > threshold`, which rounds a Python-float threshold
# to the tensor's half dtype through float32; numpy (and the C++ kernel) rounds it to float16 once, and compares
# bfloat16 data as their float32 upcast with the threshold in float32.
REFERENCE_ROUNDS_TWICE = pytest.mark.xfail(strict=True, reason="fastmask/ops/reference.py: hard_mask rounds the "
                                           "threshold to float16 / bfloat16 through float32 (torch's comparison), "
                                           "not as numpy does")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "dtype"), [
    pytest.param(b, d, marks=REFERENCE_ROUNDS_TWICE) if b == "reference" and d.itemsize == 2 else (b, d)
    for b in BACKENDS for d in DTYPES])
def test_threshold_between_two_values_on_every_backend(backend, dtype, layout):
    """1 + 2^-11 + 2^-40: just above the midpoint of float16's 1 and 1 + 2^-10, which numpy rounds it to (float32
    cannot tell it from the midpoint, which ties to 1); above bfloat16's 1 in float32, which numpy compares in."""
    values = torch.tensor([1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-7, 2.0, 0.5], dtype=dtype, device=backend_device(backend))
    for inclusive in (False, True):
        check_masks([values], 1.0 + 2.0**-11 + 2.0**-40, inclusive, layout, backend)


def test_reference_and_cpp_masks_agree_for_float32():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.rand(s, generator=g) for s in ((33, 7), (1,), (4097,))]
    alpha = ops.percentile(tensors, 50.0, backend="cpp")
    for layout in LAYOUTS:
        for got, want in zip(ops.hard_mask(tensors, alpha, layout=layout, backend="cpp"),
                             reference.hard_mask(tensors, alpha, False, layout), strict=True):
            assert torch.equal(got, want)


# --- errors -----------------------------------------------------------------------------------------------------------


# "uint8" (0/1 bytes, which the masked optimizers would read as M = 1/255) and "packed" (now "bits") are gone.
@pytest.mark.parametrize("layout", ["uint8", "packed"])
def test_hard_mask_bad_layout(layout):
    with pytest.raises(ValueError, match="layout must be 'bool' or 'bits'"):
        torch.ops.fastmask.hard_mask([torch.ones(3)], 0.5, False, layout)


@pytest.mark.parametrize("layout", ["uint8", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_layout_on_every_backend(backend, layout):
    with pytest.raises(ValueError, match="layout must be"):
        ops.hard_mask([torch.ones(3, device=backend_device(backend))], 0.5, layout=layout, backend=backend)


# --- torch.library.opcheck -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, dtype, layout):
    """Schema, autograd registration, the fake (fastmask/ops/fakes.py) against the kernel, AOT dispatch: odd shapes,
    an empty, a 0-d, a channels-last and a transposed tensor."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in ((17, 3), (5,), (0,), ())]
    tensors += [torch.randn(2, 3, 4, 5, generator=g).to(dtype).to(memory_format=torch.channels_last),
                torch.randn(5, 3, generator=g).to(dtype).t()]
    tensors = [t.to(device) for t in tensors]
    torch.library.opcheck(torch.ops.fastmask.hard_mask.default, (tensors, 0.25, True, layout))
