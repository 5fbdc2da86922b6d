"""soft_mask (SWiFT Eq. 9, docs/algorithm.md §4) on every backend, against a numpy transcription of the formula and the
reference.

Oracle, per tensor, in float32 numpy: Norm(x) = (x − min) / ((max − min) + eps), or x when max == min;
R = Norm(I_b) / (Norm(I_l) + eps); M = tanh(R) with tanh taken in float64 and rounded. R must match bit for bit on
every backend (same float32 operations in the same order). M is compared within 3 ulp: torch.tanh is within 1 ulp,
the fused kernels' float32 tanh within 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import op_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastmask import ops
from fastmask.ops import reference

SOFT_MASK = op_backends("soft_mask")
IN_PLACE = op_backends("soft_mask_")
BOTH = tuple(b for b in SOFT_MASK if b in IN_PLACE)  # for the tests that run both ops
EPS = np.float32(reference.NORM_EPS)
TANH_RTOL = 3 * 2.0**-23
SIZES = {"1": [(1,)], "33": [(33,)], "4097": [(4097,)], "5x123x123": [(5, 123, 123)]}
SIZES["161-set"] = [s for i in range(53) for s in ((4 + i % 5, 3 + i % 4, 3, 3), (4 + i % 5,), (4 + i % 5,))] + [
    (1, 9),
    (1,),
]


def _norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return x
    return ((x - lo) / ((hi - lo) + EPS)).astype(np.float32)


def numpy_mask(ib: torch.Tensor, il: torch.Tensor, apply_tanh: bool = True) -> np.ndarray:
    r = (_norm(ib.float().numpy()) / (_norm(il.float().numpy()) + EPS)).astype(np.float32)
    return np.tanh(r.astype(np.float64)).astype(np.float32) if apply_tanh else r


def _importances(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Squared-gradient-like: non-negative, heavy-tailed, with exact zeros (Norm = 0 there).
    ib = [torch.randn(s, generator=gen).square() * (torch.rand(s, generator=gen) > 0.05) for s in shapes]
    il = [torch.randn(s, generator=gen).square() * 1e-3 for s in shapes]
    return ib, il


def _check(got: list[torch.Tensor], ib, il, apply_tanh=True):
    assert len(got) == len(ib)
    for i, (m, b, l) in enumerate(zip(got, ib, il, strict=True)):
        assert m.dtype == torch.float32 and m.shape == b.shape and m.is_contiguous(), f"mask {i}"
        want = numpy_mask(b, l, apply_tanh)
        if apply_tanh:
            np.testing.assert_allclose(m.numpy(), want, rtol=TANH_RTOL, atol=0, err_msg=f"mask {i}")
        else:
            np.testing.assert_array_equal(m.numpy(), want, err_msg=f"ratio {i}")


@pytest.mark.parametrize("backend", SOFT_MASK)
@pytest.mark.parametrize("apply_tanh", [True, False], ids=["tanh", "ratio"])
@pytest.mark.parametrize("case", list(SIZES))
def test_equals_numpy_and_reference(backend, apply_tanh, case):
    ib, il = _importances(SIZES[case])
    got = ops.soft_mask(ib, il, apply_tanh=apply_tanh, backend=backend)
    _check(got, ib, il, apply_tanh)
    ref = reference.soft_mask(ib, il, apply_tanh=apply_tanh)
    for m, r in zip(got, ref, strict=True):
        torch.testing.assert_close(m, r, rtol=TANH_RTOL if apply_tanh else 0, atol=0)


@pytest.mark.parametrize("backend", SOFT_MASK)
def test_constant_tensor_uses_raw_values(backend):
    """max == min: Norm(x) = x (no normalisation). I_b ≡ 0.3, I_l = [0, 1, 3]: Norm(I_l) = [0, 1/3, 1] (+eps in the
    denominator), so R = 0.3 / ([0, 1/3, 1] + 1e-10) and M = tanh(R)."""
    ib = [torch.full((3,), 0.3)]
    il = [torch.tensor([0.0, 1.0, 3.0])]
    m = ops.soft_mask(ib, il, backend=backend)[0].double()
    nl = np.array([0.0, 1.0, 3.0]) / (3.0 + 1e-10)
    want = np.tanh(0.3 / (nl + 1e-10))
    np.testing.assert_allclose(m.numpy(), want, rtol=1e-6)
    assert m[0] == 1.0  # tanh(3e9)


@pytest.mark.parametrize("backend", SOFT_MASK)
def test_zero_importances(backend):
    """I_b ≡ 0 → M ≡ 0; I_b ≡ I_l ≡ 0 → M ≡ 0 (0 / eps)."""
    z = torch.zeros(4097)
    assert torch.equal(ops.soft_mask([z], [torch.rand(4097) + 1], backend=backend)[0], z)
    assert torch.equal(ops.soft_mask([z], [z.clone()], backend=backend)[0], z)


@pytest.mark.parametrize("backend", SOFT_MASK)
def test_loss_importance_at_its_minimum_gives_one_and_bias_at_its_minimum_gives_zero(backend):
    """Spec §4: where Norm(I_l) = 0 and Norm(I_b) > 0, M ≈ 1; where Norm(I_b) = 0, M = 0."""
    gen = torch.Generator().manual_seed(3)
    ib = torch.rand(33, generator=gen) + 0.5
    il = torch.rand(33, generator=gen) + 0.5
    ib[4] = 0.1  # the minimum of I_b
    il[7] = 0.1  # the minimum of I_l
    m = ops.soft_mask([ib], [il], backend=backend)[0]
    assert m[4] == 0.0
    assert m[7] == 1.0  # tanh(Norm(I_b) / 1e-10) rounds to 1
    assert ((m >= 0) & (m <= 1)).all()


@pytest.mark.parametrize("backend", SOFT_MASK)
def test_nan_and_empty_and_other_dtypes(backend):
    ib, il = _importances([(4097,), (0,), (2, 3)])
    ib[0][100] = float("nan")
    il[2] = il[2].double()  # read as float32, like the reference's x.float()
    got = ops.soft_mask(ib, il, backend=backend)
    assert torch.isnan(got[0]).all()  # torch's min / max propagate NaN, so the whole tensor is NaN
    assert got[1].shape == (0,) and got[1].dtype == torch.float32
    np.testing.assert_allclose(got[2].numpy(), numpy_mask(ib[2], il[2]), rtol=TANH_RTOL, atol=0)


@pytest.mark.parametrize("backend", SOFT_MASK)
def test_shape_mismatch_names_the_tensor(backend):
    fn = ops.implementation("soft_mask", backend)
    with pytest.raises((RuntimeError, ValueError), match=r"shapes? differ|differ in shape"):
        fn([torch.rand(3), torch.rand(4)], [torch.rand(3), torch.rand(5)], 1e-10, True)
    if backend != "reference":
        with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[1\].*imp_loss\[1\]"):
            fn([torch.rand(3), torch.rand(4)], [torch.rand(3), torch.rand(5)], 1e-10, True)
        with pytest.raises((RuntimeError, ValueError), match="list lengths differ"):
            fn([torch.rand(3)], [], 1e-10, True)


def test_cpp_schema_matches_its_mutations():
    import fastmask._C  # noqa: F401

    ib, il = _importances([(3,), (2, 5)])
    torch.library.opcheck(torch.ops.fastmask.soft_mask.default, (ib, il, 1e-10, True), test_utils="test_schema")
    torch.library.opcheck(torch.ops.fastmask.soft_mask_.default, (ib, il, 1e-10, True), test_utils="test_schema")
    # with bounds: every opcheck test, the fake kernel's included
    for apply_tanh in (True, False):
        args = (ib, il, 1e-10, apply_tanh, own_bounds(ib, il))
        torch.library.opcheck(torch.ops.fastmask.soft_mask.default, args)
        torch.library.opcheck(torch.ops.fastmask.soft_mask_.default, ([b.clone() for b in ib], *args[1:]))


def test_fake_checks_the_bounds_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastmask._C  # noqa: F401

    with FakeTensorMode():
        ib, il = [torch.empty(3), torch.empty(2, 5)], [torch.empty(3), torch.empty(2, 5)]
        masks = torch.ops.fastmask.soft_mask(ib, il, 1e-10, True, torch.empty(4, 2))
        assert [m.shape for m in masks] == [(3,), (2, 5)]
        for op in (torch.ops.fastmask.soft_mask, torch.ops.fastmask.soft_mask_):
            with pytest.raises(ValueError, match=r"bounds .*shape \[4, 2\]"):
                op(ib, il, 1e-10, True, torch.empty(4, 3))
            with pytest.raises(ValueError, match=r"bounds .*float32"):
                op(ib, il, 1e-10, True, torch.empty(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("apply_tanh", [True, False], ids=["tanh", "ratio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype, apply_tanh):
    """torch.library.opcheck's default checks (schema, autograd registration, the fake in fastmask/ops/fakes.py,
    AOT dispatch) for both ops: importances of each dtype (soft_mask_ writes float32 imp_bias, reads any imp_loss),
    odd sizes, an empty and a 0-d tensor, a channels-last one, a constant one (max == min)."""
    shapes = [(3,), (2, 5), (1,), (0,), (), (2, 3, 3, 3)]
    ib, il = _importances(shapes)
    ib[-1] = ib[-1].contiguous(memory_format=torch.channels_last)
    ib[1] = torch.full((2, 5), 0.25)
    imp_bias, imp_loss = [b.to(dtype) for b in ib], [loss.to(dtype) for loss in il]
    torch.library.opcheck(torch.ops.fastmask.soft_mask.default, (imp_bias, imp_loss, 1e-10, apply_tanh))
    torch.library.opcheck(torch.ops.fastmask.soft_mask_.default, (ib, imp_loss, 1e-10, apply_tanh))


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("apply_tanh", [True, False], ids=["tanh", "ratio"])
@pytest.mark.parametrize("case", ["1", "4097", "5x123x123", "161-set"])
def test_in_place_writes_the_same_masks_into_imp_bias(backend, apply_tanh, case):
    ib, il = _importances(SIZES[case])
    out = [b.clone() for b in ib]
    assert ops.soft_mask_(out, il, apply_tanh=apply_tanh, backend=backend) is None
    _check(out, ib, il, apply_tanh)
    for got, new in zip(out, ops.soft_mask(ib, il, apply_tanh=apply_tanh, backend=backend), strict=True):
        assert torch.equal(got, new)  # the same kernel either way


@pytest.mark.parametrize("backend", IN_PLACE)
def test_in_place_keeps_imp_bias_layout_and_reads_any_imp_loss(backend):
    """A channels-last I_b (as zeros_like gives for a channels-last conv weight) keeps its layout; I_l may be
    float64 or laid out differently, and is read as float32 in I_b's element order."""
    ib, il = _importances([(6, 5, 3, 3), (4097,)])
    out = [ib[0].to(memory_format=torch.channels_last), ib[1].clone()]
    loss = [il[0], il[1].double()]
    ops.soft_mask_(out, loss, backend=backend)
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    for m, b, l in zip(out, ib, il, strict=True):
        np.testing.assert_allclose(m.contiguous().numpy(), numpy_mask(b, l), rtol=TANH_RTOL, atol=0)


@pytest.mark.parametrize("backend", IN_PLACE)
def test_in_place_with_imp_loss_being_imp_bias(backend):
    """imp_loss[i] may be imp_bias[i] itself: every element is read before it is written."""
    ib, _ = _importances([(4097,)])
    want = numpy_mask(ib[0], ib[0], apply_tanh=False)
    out = ib[0].clone()
    ops.soft_mask_([out], [out], apply_tanh=False, backend=backend)
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("backend", IN_PLACE)
def test_in_place_rejects_what_cannot_hold_a_mask(backend):
    fn = ops.implementation("soft_mask_", backend)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[1\].*float32"):
        fn([torch.rand(3), torch.rand(4, dtype=torch.float64)], [torch.rand(3), torch.rand(4)], 1e-10, True)
    if backend == "reference":
        return
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[0\].*float32"):
        fn([torch.rand(4, 4)[:, :2]], [torch.rand(4, 2)], 1e-10, True)  # a strided view: not dense
    with pytest.raises((RuntimeError, ValueError), match="list lengths differ"):
        fn([torch.rand(3)], [], 1e-10, True)
    storage = torch.rand(10)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[0\] and imp_loss\[1\] share memory"):
        fn([storage[:5], torch.rand(5)], [torch.rand(5), storage[3:8]], 1e-10, True)
    with pytest.raises((RuntimeError, ValueError), match=r"imp_bias\[0\] and imp_bias\[1\] share memory"):
        fn([storage[:5], storage[4:9]], [torch.rand(5), torch.rand(5)], 1e-10, True)


def test_cpp_large_tensor_set_spans_threads_and_cache_batches():
    """Enough elements to use every thread, several cache batches, one tensor larger than a batch, and masks large
    enough for the huge-page allocation path."""
    ib, il = _importances([(1_700_000,), (33,), (600_000,), (900_001,), (5,)])
    _check(ops.soft_mask(ib, il, backend="cpp"), ib, il)
    _check(ops.soft_mask(ib, il, apply_tanh=False, backend="cpp"), ib, il, apply_tanh=False)


# Importance values: exact zeros, ordinary magnitudes, and tiny ones next to the eps of the formula.
importance_values = st.one_of(st.just(0.0), st.floats(0, 1e6, width=32), st.floats(2.0**-100, 2.0**-66, width=32),
                              st.floats(2.0**-149, 2.0**-126, width=32))  # subnormals (dead parameters' g²)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=17)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 4), backend=st.sampled_from(BOTH), apply_tanh=st.booleans(),
       in_place=st.booleans())
def test_property_random_importances(data, n, backend, apply_tanh, in_place):
    ib, il = [], []
    for _ in range(n):
        shape = data.draw(shapes)
        b = data.draw(hnp.arrays(np.float32, shape, elements=importance_values))
        l = data.draw(hnp.arrays(np.float32, shape, elements=importance_values))
        ib.append(torch.from_numpy(b))
        il.append(torch.from_numpy(l))
    if in_place:
        out = [b.clone() for b in ib]
        ops.soft_mask_(out, il, apply_tanh=apply_tanh, backend=backend)
    else:
        out = ops.soft_mask(ib, il, apply_tanh=apply_tanh, backend=backend)
    _check(out, ib, il, apply_tanh)


# --- bounds: masks of pieces of tensors (shards), with the whole tensors' min / max ----------------------------------


def own_bounds(ib, il) -> torch.Tensor:
    """float32 [4, n]: each tensor's own (min I_b, max I_b, min I_l, max I_l); (inf, -inf) for an empty one."""
    def lo_hi(t):
        t = t.float()
        return (t.min(), t.max()) if t.numel() else (torch.tensor(np.inf), torch.tensor(-np.inf))

    cols = [(*lo_hi(b), *lo_hi(l)) for b, l in zip(ib, il, strict=True)]
    return torch.tensor([[float(v) for v in c] for c in cols], dtype=torch.float32).T.contiguous()


PIECES = 3


def pieces_of(t: torch.Tensor, i: int) -> list[torch.Tensor]:
    """``t`` cut into PIECES pieces, as ranks would hold it: FSDP's row shards (whole rows, trailing dims kept) for
    every third tensor of 2+ dims, else flat pieces of uneven length; the middle piece of every other tensor is
    empty."""
    if t.dim() >= 2 and i % 3 == 0:
        rows = t.shape[0]
        cuts = [0, rows // 3, rows // 3 if i % 2 else (2 * rows) // 3, rows]
        return [t[cuts[k]:cuts[k + 1]].clone() for k in range(PIECES)]
    flat, n = t.reshape(-1), t.numel()
    cuts = [0, (2 * n) // 5, (2 * n) // 5 if i % 2 else (3 * n) // 4 + 1, n]
    cuts = [min(c, n) for c in cuts]
    return [flat[cuts[k]:cuts[k + 1]].clone() for k in range(PIECES)]


def _bounds_cases():
    """Importance sets for the bounds tests: the size sets, plus tensors whose pieces are constant where the whole
    tensor is not (the guard must look at the whole tensor's bounds) and whole tensors that are constant (the
    guard applies: Norm is the raw value)."""
    cases = {name: _importances(SIZES[name]) for name in ("4097", "5x123x123", "161-set")}
    ib, il = _importances([(40,), (6, 4), (7,), (1,), (12, 3)], seed=5)
    ib[0][:20] = 1.0  # the first piece of I_b is constant, the tensor is not
    ib[0][30] = 4.0
    il[0][16:40] = 0.5  # I_l: the second and third pieces are constant
    ib[1].fill_(0.25)  # I_b constant: Norm(I_b) = I_b
    ib[2].fill_(3.0)
    il[2].fill_(0.5)  # both constant: R = raw I_b / (raw I_l + eps)
    ib[4] = ib[4].double()  # another dtype: the dispatch splits the list into two groups
    cases["guard-and-dtypes"] = ib, il
    return cases


BOUNDS_CASES = _bounds_cases()


@pytest.mark.parametrize("backend", SOFT_MASK)
@pytest.mark.parametrize("apply_tanh", [True, False], ids=["tanh", "ratio"])
@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in_place"])
@pytest.mark.parametrize("case", list(BOUNDS_CASES))
def test_pieces_with_the_whole_tensors_bounds_give_the_whole_tensors_masks(backend, apply_tanh, in_place, case):
    """Every piece's mask, computed with the bounds of the whole tensor, is that piece of the whole tensor's mask:
    R bit for bit against the reference, M within tanh's rounding of it and bit for bit against the backend's own
    whole-tensor M (the same element-wise kernel)."""
    ib, il = BOUNDS_CASES[case]
    if in_place:
        ib = [b.float() for b in ib]
    bounds = own_bounds(ib, il)
    pieces_b = [pieces_of(b, i) for i, b in enumerate(ib)]
    pieces_l = [pieces_of(l, i) for i, l in enumerate(il)]
    got = [[] for _ in ib]  # got[i]: tensor i's pieces' masks, in piece order
    for k in range(PIECES):
        mine_b, mine_l = [p[k] for p in pieces_b], [p[k] for p in pieces_l]
        if in_place:
            ops.soft_mask_(mine_b, mine_l, apply_tanh=apply_tanh, bounds=bounds, backend=backend)
            masks = mine_b
        else:
            masks = ops.soft_mask(mine_b, mine_l, apply_tanh=apply_tanh, bounds=bounds, backend=backend)
        for i, m in enumerate(masks):
            assert m.dtype == torch.float32 and m.shape == pieces_b[i][k].shape, f"tensor {i} piece {k}"
            got[i].append(m.reshape(-1))
    want_ref = reference.soft_mask(ib, il, apply_tanh=apply_tanh)
    want_own = ops.soft_mask(ib, il, apply_tanh=apply_tanh, backend=backend)
    for i, (parts, ref, own) in enumerate(zip(got, want_ref, want_own, strict=True)):
        joined = torch.cat(parts).reshape(ib[i].shape)
        assert torch.equal(joined, own), f"tensor {i}: pieces differ from the whole tensor's mask"
        if apply_tanh:
            torch.testing.assert_close(joined, ref, rtol=TANH_RTOL, atol=0, msg=lambda m, i=i: f"tensor {i}: {m}")
        else:
            np.testing.assert_array_equal(joined.numpy(), ref.numpy(), err_msg=f"ratio of tensor {i}")


@pytest.mark.parametrize("backend", SOFT_MASK)
@pytest.mark.parametrize("apply_tanh", [True, False], ids=["tanh", "ratio"])
@pytest.mark.parametrize("case", ["1", "4097", "161-set"])
def test_own_bounds_reproduce_the_masks_without_bounds(backend, apply_tanh, case):
    """bounds = each tensor's own min / max is what the op computes without bounds: the same masks, bit for bit
    (an empty tensor's bounds are (inf, -inf), and its mask is empty)."""
    ib, il = _importances([*SIZES[case], (0,)])
    bounds = own_bounds(ib, il)
    without = ops.soft_mask(ib, il, apply_tanh=apply_tanh, backend=backend)
    with_bounds = ops.soft_mask(ib, il, apply_tanh=apply_tanh, bounds=bounds, backend=backend)
    out = [b.clone() for b in ib]
    ops.soft_mask_(out, il, apply_tanh=apply_tanh, bounds=bounds, backend=backend)
    for i, (a, b, c) in enumerate(zip(without, with_bounds, out, strict=True)):
        assert torch.equal(a, b) and torch.equal(a, c), f"mask {i}"


@pytest.mark.parametrize("backend", SOFT_MASK)
@pytest.mark.parametrize("row", range(4), ids=["lo_b", "hi_b", "lo_l", "hi_l"])
def test_nan_in_a_tensors_bounds_makes_its_mask_nan(backend, row):
    """As a NaN in the data does without bounds (torch's min / max propagate it); the other tensors are unaffected."""
    ib, il = _importances([(4097,), (2, 3)])
    bounds = own_bounds(ib, il)
    bounds[row, 0] = float("nan")
    clean = ops.soft_mask(ib, il, backend=backend)[1]
    got = ops.soft_mask(ib, il, bounds=bounds, backend=backend)
    assert torch.isnan(got[0]).all() and torch.equal(got[1], clean)
    out = [b.clone() for b in ib]
    ops.soft_mask_(out, il, apply_tanh=False, bounds=bounds, backend=backend)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()


BAD_BOUNDS = {
    "3 rows": lambda n: torch.zeros(3, n),
    "n + 1 columns": lambda n: torch.zeros(4, n + 1),
    "transposed": lambda n: torch.zeros(n, 4),
    "flat": lambda n: torch.zeros(4 * n),
    "float64": lambda n: torch.zeros(4, n, dtype=torch.float64),
    "bfloat16": lambda n: torch.zeros(4, n, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("backend", SOFT_MASK)
@pytest.mark.parametrize("op", ["soft_mask", "soft_mask_"])
@pytest.mark.parametrize("bad", list(BAD_BOUNDS))
def test_bad_bounds_raise_one_line_naming_bounds(backend, op, bad):
    ib, il = _importances([(3,), (2, 5)])
    bounds = BAD_BOUNDS[bad](len(ib))
    for call in (lambda: ops.implementation(op, backend)(ib, il, 1e-10, True, bounds),
                 lambda: getattr(ops, op)(ib, il, bounds=bounds, backend=backend)):
        with pytest.raises((RuntimeError, ValueError), match=r"bounds .*float32 tensor of shape \[4, 2\]") as info:
            call()
        assert "\n" not in str(info.value)
    assert torch.equal(ib[0], _importances([(3,), (2, 5)])[0][0])  # nothing was written

