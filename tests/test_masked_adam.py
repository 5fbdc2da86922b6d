"""fastmask.ops.masked_adam_ on every backend (reference, C++ on CPU, Triton under the interpreter).

Oracles: torch.optim.Adam / AdamW (independent, no mask and all-ones masks), the pure-PyTorch reference (for the
fused backends), and the defining invariants of the mask modes (entries with M == 0 keep every bit in "update" mode;
an all-ones mask in "grad" mode is no mask at all).
"""

from __future__ import annotations

import pytest
import torch
from conftest import op_backends
from hypothesis import HealthCheck, given, settings
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
    make_masks,
    many_shapes,
    masked_out,
    ones_mask,
    randn,
    reference_params,
)

from fastmask import ops

BACKENDS = op_backends("masked_adam_")
FUSED = fused("masked_adam_")
# Hyperparameter variants: Adam, Adam with every option, AdamW.
VARIANTS = {
    "adam": dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False),
    "amsgrad-l2-maximize": dict(lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1, eps=1e-6, amsgrad=True,
                                maximize=True, decoupled_weight_decay=False),
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8, amsgrad=False, maximize=False,
                  decoupled_weight_decay=True),
}


class State:
    """Parameters and Adam state of a list of tensors, for one backend."""

    def __init__(self, shapes, dtype, seed=0, warm=False):
        gen = torch.Generator().manual_seed(seed)
        self.params = randn(shapes, dtype, gen)
        if warm:  # non-zero moments, so that leaving them untouched is a real property
            self.exp_avgs = randn(shapes, dtype, gen, 0.1)
            self.exp_avg_sqs = [t.abs() for t in randn(shapes, dtype, gen, 0.01)]
        else:
            self.exp_avgs = [torch.zeros(s, dtype=dtype) for s in shapes]
            self.exp_avg_sqs = [torch.zeros(s, dtype=dtype) for s in shapes]
        self.max_exp_avg_sqs = [t.clone() for t in self.exp_avg_sqs]
        self.steps = [torch.tensor(0.0) for _ in shapes]

    def clone(self):
        other = object.__new__(State)
        for k, v in vars(self).items():
            setattr(other, k, [t.clone() for t in v])
        return other

    def buffers(self, amsgrad):
        out = {"param": self.params, "exp_avg": self.exp_avgs, "exp_avg_sq": self.exp_avg_sqs, "step": self.steps}
        if amsgrad:
            out["max_exp_avg_sq"] = self.max_exp_avg_sqs
        return out

    def step(self, grads, masks, backend, mask_mode="grad", **hyper):
        ops.masked_adam_(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps, masks,
            mask_mode=mask_mode, backend=backend, **hyper,
        )


def run_against_reference(backend, shapes, dtype, masks, mask_mode, hyper):
    ours, ref = State(shapes, dtype), State(shapes, dtype)
    for k, grads in enumerate(grad_sequence(shapes, dtype)):
        ours.step(grads, masks, backend, mask_mode, **hyper)
        ref.step(grads, masks, "reference", mask_mode, **hyper)
        for name, bufs in ours.buffers(hyper["amsgrad"]).items():
            assert_state_close(bufs, ref.buffers(hyper["amsgrad"])[name], name, step=k + 1)


# ---- against the reference ---------------------------------------------------------------------------------------

# (dtype, mask kind, mask mode, variant): every mask kind in both modes (see reference_params).
REFERENCE_CASES = (
    [(torch.float32, kind, mode, "amsgrad-l2-maximize") for kind in MASK_KINDS for mode in MODES]
    + [(torch.float32, "mixed", mode, variant) for variant in ("adam", "adamw") for mode in MODES]
    + [(dtype, "mixed", mode, "amsgrad-l2-maximize") for dtype in (torch.bfloat16, torch.float16, torch.float64)
       for mode in MODES]
)


@pytest.mark.parametrize(
    ("backend", "dtype", "mask_kind", "mask_mode", "variant"),
    reference_params("masked_adam_", REFERENCE_CASES),
)
def test_matches_reference_for_20_steps(backend, dtype, mask_kind, mask_mode, variant):
    run_against_reference(backend, SIZES, dtype, make_masks(SIZES, mask_kind), mask_mode, VARIANTS[variant])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_mode", MODES)
def test_161_tensors_match_reference(backend, mask_mode):
    shapes = many_shapes()
    assert len(shapes) == 161
    run_against_reference(backend, shapes, torch.float32, make_masks(shapes, "mixed"), mask_mode, VARIANTS["adamw"])


# ---- against torch.optim -----------------------------------------------------------------------------------------

def torch_optimizer(params, hyper, **kwargs):
    cls = torch.optim.AdamW if hyper["decoupled_weight_decay"] else torch.optim.Adam
    return cls(
        params, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
        weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"], **kwargs,
    )


def run_against_torch(backend, dtype, masks, mask_mode, hyper, **torch_kwargs):
    ours = State(SIZES, dtype)
    leaves = [p.clone().requires_grad_(True) for p in ours.params]
    opt = torch_optimizer(leaves, hyper, **torch_kwargs)
    for k, grads in enumerate(grad_sequence(SIZES, dtype)):
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.clone()
        opt.step()
        ours.step(grads, masks, backend, mask_mode, **hyper)
        state = [opt.state[leaf] for leaf in leaves]
        expected = {"param": [leaf.detach() for leaf in leaves], "exp_avg": [s["exp_avg"] for s in state],
                    "exp_avg_sq": [s["exp_avg_sq"] for s in state], "step": [s["step"] for s in state]}
        if hyper["amsgrad"]:
            expected["max_exp_avg_sq"] = [s["max_exp_avg_sq"] for s in state]
        for name, bufs in ours.buffers(hyper["amsgrad"]).items():
            assert_state_close(bufs, expected[name], name, step=k + 1)


# No mask, and all-ones masks of each storage kind in both modes: all must take torch's step.
UNMASKED = [("adam", "none", "grad"), ("adam", "bool", "grad"), ("amsgrad-l2-maximize", "float32", "update"),
            ("amsgrad-l2-maximize", "uint8", "update"), ("adamw", "none", "grad"), ("adamw", "bfloat16", "update")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("variant", "mask_kind", "mask_mode"), UNMASKED)
def test_float32_matches_torch_optim(backend, variant, mask_kind, mask_mode):
    masks = [None if mask_kind == "none" else ones_mask(s, mask_kind) for s in SIZES]
    run_against_torch(backend, torch.float32, masks, mask_mode, VARIANTS[variant], foreach=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_torch_fused_adam(backend, dtype):
    # torch.optim's fused CPU Adam computes in float32 and rounds to the storage dtype, as fastmask does.
    run_against_torch(backend, dtype, [None] * len(SIZES), "grad", VARIANTS["amsgrad-l2-maximize"], fused=True)


# ---- mask-mode invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["float32", "bfloat16", "uint8", "bool"])
def test_update_mode_leaves_masked_out_entries_bit_identical(backend, dtype, mask_kind):
    hyper = VARIANTS["amsgrad-l2-maximize"]
    masks = make_masks(SMALL, mask_kind, seed=3)
    assert all(masked_out(m).any() and not masked_out(m).all() for m in masks[1:])
    state = State(SMALL, dtype, warm=True)
    before = state.clone()
    for grads in grad_sequence(SMALL, dtype):
        state.step(grads, masks, backend, "update", **hyper)
    for name, bufs in state.buffers(amsgrad=True).items():
        if name == "step":
            continue
        for i, (new, old, mask) in enumerate(zip(bufs, before.buffers(amsgrad=True)[name], masks, strict=True)):
            out = masked_out(mask)
            assert torch.equal(new[out], old[out]), f"{name}[{i}] moved where the mask is 0"
            if (~out).sum() > 1:
                assert not torch.equal(new[~out], old[~out]), f"{name}[{i}] did not move where the mask is not 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["float32", "bool", "uint8"])
def test_all_ones_mask_in_grad_mode_is_no_mask(backend, mask_kind):
    hyper = VARIANTS["amsgrad-l2-maximize"]
    masked, plain = State(SMALL, torch.float32), State(SMALL, torch.float32)
    for grads in grad_sequence(SMALL, torch.float32, steps=3):
        masked.step(grads, [ones_mask(s, mask_kind) for s in SMALL], backend, "grad", **hyper)
        plain.step(grads, [None] * len(SMALL), backend, "grad", **hyper)
    for name, bufs in masked.buffers(amsgrad=True).items():
        for a, b in zip(bufs, plain.buffers(amsgrad=True)[name], strict=True):
            assert torch.equal(a, b), name


# ---- GradScaler --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_the_step_and_keeps_the_step_count(backend):
    hyper = VARIANTS["amsgrad-l2-maximize"]
    masks = make_masks(SMALL, "mixed")
    state = State(SMALL, torch.float32, warm=True)
    grads = grad_sequence(SMALL, torch.float32, steps=1)[0]
    state.step(grads, masks, backend, **hyper)
    before = state.clone()
    state.step(grads, masks, backend, **hyper, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for name, bufs in state.buffers(amsgrad=True).items():
        for a, b in zip(bufs, before.buffers(amsgrad=True)[name], strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_mode", MODES)
def test_grad_scale_unscales_the_gradients(backend, mask_mode):
    # Scaling by a power of two is exact, so scaled gradients with grad_scale must give the very same step.
    hyper = VARIANTS["amsgrad-l2-maximize"]
    masks = make_masks(SMALL, "mixed")
    scaled, plain = State(SMALL, torch.float32), State(SMALL, torch.float32)
    for grads in grad_sequence(SMALL, torch.float32, steps=3):
        scaled.step([g * 1024 for g in grads], masks, backend, mask_mode, **hyper, grad_scale=torch.tensor(1024.0),
                    found_inf=torch.tensor(0.0))
        plain.step(grads, masks, backend, mask_mode, **hyper)
    for name, bufs in scaled.buffers(amsgrad=True).items():
        for a, b in zip(bufs, plain.buffers(amsgrad=True)[name], strict=True):
            assert torch.equal(a, b), name


# ---- torch.library.opcheck ---------------------------------------------------------------------------------------

# Odd sizes, a 0-d and an empty tensor, a channels-last kernel.
OPCHECK_SHAPES = [(3, 5), (7,), (1,), (), (0,), (2, 3, 3, 3)]
SCALERS = {"none": {}, "scale": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0)),
           "skip": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))}


@pytest.mark.parametrize("scaler", list(SCALERS))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck(dtype, mask_kind, amsgrad, scaler):
    """torch.library.opcheck's default checks (schema: exactly params, exp_avgs, exp_avg_sqs and max_exp_avg_sqs
    mutated; autograd registration; the fake in fastmask/ops/fakes.py; AOT dispatch) on a warm state, without masks
    and with one of every kind, with and without amsgrad (then max_exp_avg_sqs is empty, as ops passes it: a list
    of empty tensors, or no list), with GradScaler's grad_scale / found_inf, both a taken and a skipped step."""
    state = State(OPCHECK_SHAPES, dtype, warm=True)
    masks = make_masks(OPCHECK_SHAPES, mask_kind)
    for tensors in (state.params, state.exp_avgs, state.exp_avg_sqs, state.max_exp_avg_sqs, masks):
        if tensors[-1] is not None:
            tensors[-1] = tensors[-1].contiguous(memory_format=torch.channels_last)
    grads = [torch.randn_like(p) for p in state.params]
    steps = [s + 3 for s in state.steps]  # already incremented, as ops passes them
    hyper = dict(VARIANTS["amsgrad-l2-maximize"], amsgrad=amsgrad, mask_update=mask_kind == "mixed")
    empties = [[torch.empty(0)] * len(OPCHECK_SHAPES), []]
    for max_exp_avg_sqs in [state.max_exp_avg_sqs] if amsgrad else empties:
        torch.library.opcheck(
            torch.ops.fastmask.masked_adam_.default,
            (state.params, grads, state.exp_avgs, state.exp_avg_sqs, max_exp_avg_sqs, steps, masks),
            dict(hyper, **SCALERS[scaler]),
        )


# ---- errors ------------------------------------------------------------------------------------------------------

def _call(backend, state, grads, masks):
    state.step(grads, masks, backend, **VARIANTS["adam"])


@pytest.mark.parametrize("backend", FUSED)
def test_errors_name_the_tensor_at_fault(backend):
    shapes = [(3, 4), (5,)]
    state = State(shapes, torch.float32)
    grads = [torch.zeros(3, 4), torch.zeros(5)]
    with pytest.raises((RuntimeError, ValueError), match=r"grads\[1\] has shape"):
        _call(backend, state, [grads[0], torch.zeros(6)], [None, None])
    with pytest.raises((RuntimeError, ValueError), match=r"masks\[0\] has shape"):
        _call(backend, state, grads, [torch.ones(4, 3), None])
    with pytest.raises((RuntimeError, TypeError), match=r"masks\[1\] has dtype"):
        _call(backend, state, grads, [None, torch.ones(5, dtype=torch.int32)])


@pytest.mark.parametrize("backend", FUSED)
def test_a_buffer_in_another_layout_is_stepped_as_the_reference_steps_it(backend):
    """A state buffer whose strides are not its parameter's is no error (fastmask.ops routes it to the reference
    implementation); the rest of the group stays fused."""
    shapes = [(3, 4), (5,)]
    ours, ref = State(shapes, torch.float32, warm=True), State(shapes, torch.float32, warm=True)
    ours.exp_avgs[0] = ours.exp_avgs[0].t().contiguous().t()
    masks = [torch.rand(3, 4).t().contiguous().t(), None]
    for grads in grad_sequence(shapes, torch.float32, steps=3):
        ours.step(grads, masks, backend, **VARIANTS["amsgrad-l2-maximize"])
        ref.step(grads, masks, "reference", **VARIANTS["amsgrad-l2-maximize"])
    assert ours.exp_avgs[0].stride() == (1, 3)
    for name, bufs in ours.buffers(True).items():
        assert_state_close(bufs, ref.buffers(True)[name], name)


# ---- properties --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=SHAPES_ST,
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
    beta1=st.sampled_from([0.0, 0.3, 0.9]),
    beta2=st.sampled_from([0.9, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    mask_kind=st.sampled_from(MASK_KINDS),
    mask_mode=st.sampled_from(["grad", "update"]),
)
def test_property(backend, shapes, seed, magnitude, beta1, beta2, weight_decay, flags, mask_kind, mask_mode):
    """Any shapes and gradient magnitudes: finite results; M == 0 entries untouched in update mode; the fused
    backends agree with the reference (beta1 <= 0.5 takes torch's other lerp formula)."""
    amsgrad, maximize, decoupled = flags
    hyper = dict(lr=1e-3, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled)
    masks = make_masks(shapes, mask_kind, seed)
    ours = State(shapes, torch.float32, seed, warm=True)
    ref, before = ours.clone(), ours.clone()
    for grads in grad_sequence(shapes, torch.float32, steps=3, seed=seed):
        grads = [g * magnitude for g in grads]
        ours.step(grads, masks, backend, mask_mode, **hyper)
        ref.step(grads, masks, "reference", mask_mode, **hyper)
    for name, bufs in ours.buffers(amsgrad).items():
        assert all(torch.isfinite(b).all() for b in bufs), name
        if backend != "reference":
            assert_state_close(bufs, ref.buffers(amsgrad)[name], name)
        if mask_mode == "update" and name != "step":
            for new, old, mask in zip(bufs, before.buffers(amsgrad)[name], masks, strict=True):
                if mask is not None:
                    assert torch.equal(new[masked_out(mask)], old[masked_out(mask)]), name
