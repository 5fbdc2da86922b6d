"""fastmask.ops.masked_sgd_ on every backend (reference, C++ on CPU, Triton under the interpreter).

Oracles: torch.optim.SGD (independent, no mask and all-ones masks), the pure-PyTorch reference (for the fused
backends), and the defining invariants of the mask modes: in "update" mode entries with M == 0 keep every bit —
weight decay and momentum no longer leak through the mask (docs/algorithm.md §8.10) — while in "grad" mode they still
move.
"""

from __future__ import annotations

import pytest
import torch
from conftest import op_backends
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from optim_cases import (
    MASK_KINDS,
    MODES,
    SHAPES_ST,
    SIZES,
    SMALL,
    assert_state_close,
    fused,
    grad_sequence,
    largest_abs,
    make_masks,
    many_shapes,
    masked_out,
    ones_mask,
    randn,
    reference_params,
)

from fastmask import ops

BACKENDS = op_backends("masked_sgd_")
FUSED = fused("masked_sgd_")
VARIANTS = {
    "momentum": dict(lr=1e-2, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    "dampening-wd-maximize": dict(lr=1e-2, weight_decay=5e-4, momentum=0.9, dampening=0.1, nesterov=False,
                                  maximize=True),
    "nesterov-wd": dict(lr=1e-2, weight_decay=1e-2, momentum=0.8, dampening=0.0, nesterov=True, maximize=False),
    "plain-wd": dict(lr=1e-2, weight_decay=1e-2, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
}


class State:
    """Parameters and momentum buffers (None until the first step creates them, as in torch.optim.SGD)."""

    def __init__(self, shapes, dtype, seed=0):
        self.params = randn(shapes, dtype, torch.Generator().manual_seed(seed))
        self.buffers = [None] * len(shapes)

    def clone(self):
        other = object.__new__(State)
        other.params = [p.clone() for p in self.params]
        other.buffers = [None if b is None else b.clone() for b in self.buffers]
        return other

    def step(self, grads, masks, backend, mask_mode="grad", **hyper):
        self.buffers = ops.masked_sgd_(self.params, grads, self.buffers, masks, mask_mode=mask_mode, backend=backend,
                                       **hyper)


def assert_states_close(ours, expected, step=None, param_scales=None):
    assert_state_close(ours.params, expected.params, "param", step, param_scales)
    if expected.buffers[0] is not None:
        assert_state_close(ours.buffers, expected.buffers, "momentum_buffer", step)
    else:
        assert all(b is None for b in ours.buffers)


def run_against_reference(backend, shapes, dtype, masks, mask_mode, hyper):
    ours, ref = State(shapes, dtype), State(shapes, dtype)
    for k, grads in enumerate(grad_sequence(shapes, dtype)):
        ours.step(grads, masks, backend, mask_mode, **hyper)
        ref.step(grads, masks, "reference", mask_mode, **hyper)
        assert_states_close(ours, ref, step=k + 1)


# ---- against the reference ---------------------------------------------------------------------------------------

# (dtype, mask kind, mask mode, variant): every mask kind in both modes (see reference_params).
REFERENCE_CASES = (
    [(torch.float32, kind, mode, "dampening-wd-maximize") for kind in MASK_KINDS for mode in MODES]
    + [(torch.float32, "mixed", mode, variant) for variant in ("momentum", "nesterov-wd", "plain-wd") for mode in MODES]
    + [(dtype, "mixed", mode, "nesterov-wd") for dtype in (torch.bfloat16, torch.float16, torch.float64)
       for mode in MODES]
)


@pytest.mark.parametrize(
    ("backend", "dtype", "mask_kind", "mask_mode", "variant"),
    reference_params("masked_sgd_", REFERENCE_CASES),
)
def test_matches_reference_for_20_steps(backend, dtype, mask_kind, mask_mode, variant):
    run_against_reference(backend, SIZES, dtype, make_masks(SIZES, mask_kind), mask_mode, VARIANTS[variant])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_mode", MODES)
def test_161_tensors_match_reference(backend, mask_mode):
    shapes = many_shapes()
    assert len(shapes) == 161
    masks = make_masks(shapes, "mixed")
    run_against_reference(backend, shapes, torch.float32, masks, mask_mode, VARIANTS["dampening-wd-maximize"])


# ---- against torch.optim -----------------------------------------------------------------------------------------

def run_against_torch(backend, dtype, masks, mask_mode, hyper, **torch_kwargs):
    ours = State(SIZES, dtype)
    leaves = [p.clone().requires_grad_(True) for p in ours.params]
    opt = torch.optim.SGD(leaves, **hyper, **torch_kwargs)
    for k, grads in enumerate(grad_sequence(SIZES, dtype)):
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.clone()
        opt.step()
        ours.step(grads, masks, backend, mask_mode, **hyper)
        expected = State.__new__(State)
        expected.params = [leaf.detach() for leaf in leaves]
        expected.buffers = [opt.state[leaf].get("momentum_buffer") for leaf in leaves]
        assert_states_close(ours, expected, step=k + 1)


# No mask, and all-ones masks of each storage kind in both modes: all must take torch's step.
UNMASKED = [("momentum", "none", "grad"), ("momentum", "bool", "grad"), ("dampening-wd-maximize", "float32", "update"),
            ("dampening-wd-maximize", "uint8", "grad"), ("nesterov-wd", "none", "grad"),
            ("nesterov-wd", "bfloat16", "update"), ("plain-wd", "float32", "grad")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("variant", "mask_kind", "mask_mode"), UNMASKED)
def test_float32_matches_torch_optim(backend, variant, mask_kind, mask_mode):
    masks = [None if mask_kind == "none" else ones_mask(s, mask_kind) for s in SIZES]
    run_against_torch(backend, torch.float32, masks, mask_mode, VARIANTS[variant], foreach=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_torch_sgd_in_float32(backend, dtype):
    """The oracle is torch.optim.SGD run in float32 on the upcast parameters and buffers, rounded back to the storage
    dtype after every step: the float32-opmath semantics of torch's fused optimizers. (torch 2.13's fused CPU SGD
    itself leaves bfloat16 / float16 parameters unchanged, so it cannot serve.)"""
    hyper = VARIANTS["dampening-wd-maximize"]
    ours = State(SIZES, dtype)
    expected = ours.clone()
    for k, grads in enumerate(grad_sequence(SIZES, dtype)):
        ours.step(grads, [None] * len(SIZES), backend, "grad", **hyper)
        leaves = [p.float().requires_grad_(True) for p in expected.params]
        opt = torch.optim.SGD(leaves, **hyper, foreach=False)
        for leaf, g, buf in zip(leaves, grads, expected.buffers, strict=True):
            leaf.grad = g.float()
            if buf is not None:
                opt.state[leaf]["momentum_buffer"] = buf.float()
        opt.step()
        expected.params = [leaf.detach().to(dtype) for leaf in leaves]
        expected.buffers = [opt.state[leaf]["momentum_buffer"].to(dtype) for leaf in leaves]
        assert_states_close(ours, expected, step=k + 1)


# ---- mask-mode semantics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["float32", "bfloat16", "uint8", "bool"])
def test_update_mode_leaves_masked_out_entries_bit_identical(backend, dtype, mask_kind):
    masks = make_masks(SMALL, mask_kind, seed=3)
    state = State(SMALL, dtype)
    before = state.clone()
    for k, grads in enumerate(grad_sequence(SMALL, dtype)):
        state.step(grads, masks, backend, "update", **VARIANTS["dampening-wd-maximize"])
        for i, (new, old, buf, mask) in enumerate(zip(state.params, before.params, state.buffers, masks, strict=True)):
            out = masked_out(mask)
            assert torch.equal(new[out], old[out]), f"param[{i}] moved where the mask is 0 (step {k + 1})"
            # Never-updated buffers stay at the 0 of the first step.
            assert torch.equal(buf[out], torch.zeros_like(buf[out])), f"momentum_buffer[{i}] (step {k + 1})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mode_lets_weight_decay_and_momentum_move_masked_out_entries(backend):
    # The papers' behaviour (docs/algorithm.md §8.10): g ← M·g, so a zero gradient still takes weight decay and
    # momentum.
    masks = [torch.zeros(s, dtype=torch.bool) for s in SMALL]
    state = State(SMALL, torch.float32)
    before = state.clone()
    hyper = VARIANTS["dampening-wd-maximize"]
    grads = grad_sequence(SMALL, torch.float32, steps=1)
    state.step(grads[0], masks, backend, "grad", **hyper)
    for new, old, buf in zip(state.params, before.params, state.buffers, strict=True):
        # d = λθ; b = d; θ ← θ − lr·d: derived by hand from torch.optim.SGD's update.
        d = hyper["weight_decay"] * old
        torch.testing.assert_close(buf, d, rtol=1e-6, atol=0)
        torch.testing.assert_close(new, old - hyper["lr"] * d, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["float32", "bool", "uint8"])
def test_all_ones_mask_in_grad_mode_is_no_mask(backend, mask_kind):
    hyper = VARIANTS["nesterov-wd"]
    masked, plain = State(SMALL, torch.float32), State(SMALL, torch.float32)
    for grads in grad_sequence(SMALL, torch.float32, steps=3):
        masked.step(grads, [ones_mask(s, mask_kind) for s in SMALL], backend, "grad", **hyper)
        plain.step(grads, [None] * len(SMALL), backend, "grad", **hyper)
    for a, b in zip(masked.params + masked.buffers, plain.params + plain.buffers, strict=True):
        assert torch.equal(a, b)


# ---- GradScaler --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_the_step(backend):
    hyper = VARIANTS["dampening-wd-maximize"]
    masks = make_masks(SMALL, "mixed")
    state = State(SMALL, torch.float32)
    grads = grad_sequence(SMALL, torch.float32, steps=1)[0]
    state.step(grads, masks, backend, **hyper, found_inf=torch.tensor(1.0))
    assert all(b is None for b in state.buffers), "a skipped first step creates no momentum buffer"
    state.step(grads, masks, backend, **hyper)
    before = state.clone()
    state.step(grads, masks, backend, **hyper, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for a, b in zip(state.params + state.buffers, before.params + before.buffers, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_mode", MODES)
def test_grad_scale_unscales_the_gradients(backend, mask_mode):
    # Scaling by a power of two is exact, so scaled gradients with grad_scale must give the very same step.
    hyper = VARIANTS["dampening-wd-maximize"]
    masks = make_masks(SMALL, "mixed")
    scaled, plain = State(SMALL, torch.float32), State(SMALL, torch.float32)
    for grads in grad_sequence(SMALL, torch.float32, steps=3):
        scaled.step([g * 1024 for g in grads], masks, backend, mask_mode, **hyper, grad_scale=torch.tensor(1024.0),
                    found_inf=torch.tensor(0.0))
        plain.step(grads, masks, backend, mask_mode, **hyper)
    for a, b in zip(scaled.params + scaled.buffers, plain.params + plain.buffers, strict=True):
        assert torch.equal(a, b)


# ---- torch.library.opcheck ---------------------------------------------------------------------------------------

# Odd sizes, a 0-d and an empty tensor, a channels-last kernel.
OPCHECK_SHAPES = [(3, 5), (7,), (1,), (), (0,), (2, 3, 3, 3)]
SCALERS = {"none": {}, "scale": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0)),
           "skip": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))}


@pytest.mark.parametrize("scaler", list(SCALERS))
@pytest.mark.parametrize("step", ["first", "later", "no-momentum"])
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck(dtype, mask_kind, step, scaler):
    """torch.library.opcheck's default checks (schema: exactly params and momentum_buffers mutated; autograd
    registration; the fake in fastmask/ops/fakes.py; AOT dispatch) on a first step (uninitialised buffers), a later
    one, and momentum 0 with the empty buffer list ops passes then; without masks and with one of every kind; with
    GradScaler's grad_scale / found_inf, both a taken and a skipped step."""
    gen = torch.Generator().manual_seed(5)
    params = randn(OPCHECK_SHAPES, dtype, gen)
    params[-1] = params[-1].contiguous(memory_format=torch.channels_last)
    masks = make_masks(OPCHECK_SHAPES, mask_kind)
    if masks[-1] is not None:
        masks[-1] = masks[-1].contiguous(memory_format=torch.channels_last)
    grads = [torch.randn_like(p) for p in params]
    hyper = dict(VARIANTS["nesterov-wd"], first_step=step == "first", mask_update=mask_kind == "mixed")
    if step == "no-momentum":
        buffers, hyper["momentum"] = [], 0.0
    elif step == "first":
        buffers = [torch.empty_like(p) for p in params]
    else:
        buffers = [torch.randn_like(p) * 0.1 for p in params]
    torch.library.opcheck(
        torch.ops.fastmask.masked_sgd_.default,
        (params, grads, buffers, masks),
        dict(hyper, **SCALERS[scaler]),
    )


# ---- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
def test_errors_name_the_tensor_at_fault(backend):
    shapes = [(3, 4), (5,)]
    state = State(shapes, torch.float32)
    grads = [torch.zeros(3, 4), torch.zeros(5)]
    hyper = VARIANTS["momentum"]
    with pytest.raises((RuntimeError, ValueError), match=r"grads\[1\] has shape"):
        state.step([grads[0], torch.zeros(6)], [None, None], backend, **hyper)
    with pytest.raises((RuntimeError, TypeError), match=r"masks\[0\] has dtype"):
        state.step(grads, [torch.ones(3, 4, dtype=torch.int64), None], backend, **hyper)
    state.step(grads, [None, None], backend, **hyper)
    state.buffers[1] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match=r"momentum_buffers\[1\] has dtype"):
        state.step(grads, [None, None], backend, **hyper)


def test_a_mask_on_a_sparse_gradient_is_refused_in_update_mode_naming_the_index():
    p = torch.zeros(4, 2)
    g = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(ValueError, match=r"masked_sgd_: grads\[1\] is sparse, and a mask \(masks\[1\]\) applies to a "
                                         r"sparse gradient only in mask_mode='grad'"):
        ops.masked_sgd_([torch.zeros(3), p], [torch.ones(3), g], [], [None, torch.ones(4, 2)], lr=0.1,
                        weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                        mask_mode="update", backend="reference")
    assert torch.equal(p, torch.zeros(4, 2))


# ---- properties --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=SHAPES_ST,
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
    variant=st.sampled_from(list(VARIANTS)),
    mask_kind=st.sampled_from(MASK_KINDS),
    mask_mode=st.sampled_from(["grad", "update"]),
)
# Found by hypothesis: θ − lr·d cancels to 0.458 from terms ~1e3 (Triton 1.6e-5 off the reference, under an ulp of
# the terms); failed while the tolerance followed the result instead of the terms.
@example(shapes=[(5,), (1,), (2, 4), (6, 7)], seed=1848, magnitude=1e4, variant="nesterov-wd", mask_kind="bfloat16",
         mask_mode="grad")
def test_property(backend, shapes, seed, magnitude, variant, mask_kind, mask_mode):
    """Any shapes and gradient magnitudes: finite results; M == 0 parameters untouched in update mode; the fused
    backends agree with the reference."""
    hyper = VARIANTS[variant]
    masks = make_masks(shapes, mask_kind, seed)
    ours = State(shapes, torch.float32, seed)
    ref, before = ours.clone(), ours.clone()
    # θ ← θ − lr·d sums terms far larger than θ at magnitude 1e4: the tolerance follows the largest term.
    terms = [largest_abs(p) for p in ref.params]
    for grads in grad_sequence(shapes, torch.float32, steps=3, seed=seed):
        grads = [g * magnitude for g in grads]
        previous = [p.clone() for p in ref.params]
        ours.step(grads, masks, backend, mask_mode, **hyper)
        ref.step(grads, masks, "reference", mask_mode, **hyper)
        terms = [max(t, largest_abs(old), largest_abs(new - old))
                 for t, old, new in zip(terms, previous, ref.params, strict=True)]
    assert all(torch.isfinite(t).all() for t in ours.params + [b for b in ours.buffers if b is not None])
    if backend != "reference":
        assert_states_close(ours, ref, param_scales=terms)
    if mask_mode == "update":
        for new, old, mask in zip(ours.params, before.params, masks, strict=True):
            if mask is not None:
                assert torch.equal(new[masked_out(mask)], old[masked_out(mask)])
