"""fisher_accumulate_ (I_b += g_b², I_l += g_l², SWiFT Eqs. 7-8) on every backend, against numpy and the reference.

The numpy oracle squares the float32-widened gradient and adds it, each step rounded to float32, which is the
formula of docs/algorithm.md §3 in float32 arithmetic; every backend must reproduce it bit for bit (the fused kernels
do not contract g² + I into one fused multiply-add).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import op_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmask import ops
from fastmask.ops import reference

BACKENDS = op_backends("fisher_accumulate_")
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = {"1": [(1,)], "33": [(33,)], "4097": [(4097,)], "5x123x123": [(5, 123, 123)]}
# 161 tensors like a ResNet's: 53 (conv kernel, BN weight, BN bias) triples of varying width, a head and its bias.
SET_161 = [s for i in range(53) for s in ((4 + i % 5, 3 + i % 4, 3, 3), (4 + i % 5,), (4 + i % 5,))] + [(1, 9), (1,)]
SHAPES["161-set"] = SET_161


def _numpy_step(imp: np.ndarray, grad: torch.Tensor) -> np.ndarray:
    g = grad.float().numpy()  # exact widening (bf16 has no numpy dtype)
    return (imp + (g * g).astype(np.float32)).astype(np.float32)


def _make(shapes, dtype, seed=0, layout=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)

    def t(s, scale=1.0, dt=torch.float32):
        x = (torch.randn(s, generator=gen) * scale).to(dt)
        return x.contiguous(memory_format=layout) if len(s) == 4 else x

    ib = [t(s).abs() for s in shapes]
    il = [t(s, 3.0).abs() for s in shapes]
    gb = [t(s, 2.0, dtype) for s in shapes]
    gl = [t(s, 0.5, dtype) for s in shapes]
    return ib, il, gb, gl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_equals_numpy_and_reference(backend, dtype, case):
    shapes = SHAPES[case]
    ib, il, gb, gl = _make(shapes, dtype)
    want_b = [t.numpy().copy() for t in ib]
    want_l = [t.numpy().copy() for t in il]
    ref_b, ref_l = [t.clone() for t in ib], [t.clone() for t in il]
    for step in range(3):  # accumulation over batches
        if step:
            gb = [g * (step + 1) for g in gb]
        want_b = [_numpy_step(w, g) for w, g in zip(want_b, gb, strict=True)]
        want_l = [_numpy_step(w, g) for w, g in zip(want_l, gl, strict=True)]
        ops.fisher_accumulate_(ib, il, gb, gl, backend=backend)
        reference.fisher_accumulate_(ref_b, ref_l, gb, gl)
    for i, (got, want, ref) in enumerate(zip(ib + il, want_b + want_l, ref_b + ref_l, strict=True)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"tensor {i}")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_layouts_through_ops(backend):
    """ops groups the tensors by gradient dtype; channels-last pairs and empty tensors are handled."""
    shapes = [(3, 4, 5, 5), (0,), (7,), (2, 3, 1, 1)]
    ib, il, gb, gl = _make(shapes, torch.float32, layout=torch.channels_last)
    gb[1], gl[1] = gb[1].half(), gl[1].half()
    gb[2], gl[2] = gb[2].bfloat16(), gl[2].bfloat16()
    want = [_numpy_step(t.numpy(), g) for t, g in zip(ib + il, gb + gl, strict=True)]
    ops.fisher_accumulate_(ib, il, gb, gl, backend=backend)
    for i, (got, w) in enumerate(zip(ib + il, want, strict=True)):
        np.testing.assert_array_equal(got.numpy(), w, err_msg=f"tensor {i}")
    assert ib[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_leaves_importance_unchanged(backend):
    ib, il, gb, gl = _make([(4097,)], torch.float32)
    before = ib[0].clone()
    ops.fisher_accumulate_(ib, il, [torch.zeros_like(gb[0])], gl, backend=backend)
    assert torch.equal(ib[0], before)


FUSED = [b for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", FUSED)
def test_bad_inputs_name_the_tensor(backend):
    fn = ops.implementation("fisher_accumulate_", backend)
    ib, il, gb, gl = _make([(3,), (4, 5)], torch.float32)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_loss\[1\].*float32"):
        fn(ib, [il[0], il[1].double()], gb, gl)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[1\].*grad_bias\[1\].*shape"):
        fn(ib, il, [gb[0], gb[1].t().contiguous()], gl)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[1\].*grad_bias\[1\].*layout"):
        fn(ib, il, [gb[0], torch.randn(5, 4).t()], gl)
    with pytest.raises((RuntimeError, ValueError), match=r"grad_loss\[0\].*float32, float16, bfloat16 or float64"):
        fn(ib, il, gb, [gl[0].int(), gl[1]])
    with pytest.raises((RuntimeError, ValueError), match="list lengths differ"):
        fn(ib, il, gb, gl[:1])


def test_ops_checks_list_lengths():
    ib, il, gb, gl = _make([(3,)], torch.float32)
    with pytest.raises(ValueError, match="imp_bias 1, imp_loss 1, grad_bias 1, grad_loss 0"):
        ops.fisher_accumulate_(ib, il, gb, [])


def test_cpp_schema_matches_its_mutations():
    """torch.library.opcheck: fisher_accumulate_ mutates exactly the importances its schema marks (a!) and (b!)."""
    import fastmask._C  # noqa: F401

    ib, il, gb, gl = _make([(3,), (2, 5)], torch.float32)
    torch.library.opcheck(torch.ops.fastmask.fisher_accumulate_.default, (ib, il, gb, gl), test_utils="test_schema")


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_opcheck(dtype):
    """torch.library.opcheck's default checks (schema, autograd registration, the fake in fastmask/ops/fakes.py,
    AOT dispatch) with gradients of each dtype: odd sizes, an empty and a 0-d tensor, a channels-last pair."""
    ib, il, gb, gl = _make([(3,), (2, 5), (1,), (0,), (), (2, 3, 3, 3)], dtype, layout=torch.channels_last)
    assert ib[-1].is_contiguous(memory_format=torch.channels_last) and not ib[-1].is_contiguous()
    torch.library.opcheck(torch.ops.fastmask.fisher_accumulate_.default, (ib, il, gb, gl))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    dtype=st.sampled_from(GRAD_DTYPES[:3]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(BACKENDS),
)
def test_property_random_lists(sizes, dtype, scale, seed, backend):
    ib, il, gb, gl = _make([(n,) for n in sizes], dtype, seed)
    gb = [(g.float() * scale).to(dtype) for g in gb]
    want = [_numpy_step(t.numpy(), g) for t, g in zip(ib + il, gb + gl, strict=True)]
    ops.fisher_accumulate_(ib, il, gb, gl, backend=backend)
    for got, w in zip(ib + il, want, strict=True):
        np.testing.assert_array_equal(got.numpy(), w)
