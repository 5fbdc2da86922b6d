"""Tests of fastmask.optim against torch.optim, the independent oracle.

Every test that steps an optimizer runs on each backend of its op (conftest.op_backends). Oracles:
- no mask, or an all-ones mask: torch.optim.Adam / AdamW / SGD with the same arguments (fp32: rounding tolerance);
- mask_mode="grad": torch.optim on gradients multiplied by the mask beforehand (the papers' g ← M ⊙ g), and the
  reference functional fastmask.ops.reference.masked_adam_ / masked_sgd_ driven by hand;
- mask_mode="update": a torch.optim step followed by θ ← θ_old + M ⊙ (θ_torch − θ_old), state kept where M = 0;
- bf16 / fp16 parameters: torch.optim on float32 copies whose parameters and state are rounded to the storage dtype
  after every step. That is the arithmetic our kernels (and torch's fused optimizers) do: fp32 math on half storage.
  torch's non-fused optimizers on half tensors compute in half precision, a different and less exact algorithm, so
  they are not the oracle; torch's fused CPU SGD on half tensors does not update the vectorised part of a tensor in
  torch 2.13 (see test_torch_fused_sgd_half_is_broken_on_cpu), so it is not the oracle either. torch's fused Adam
  on the same half dtype is a second oracle for MaskedAdam.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import op_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from fastmask import ops
from fastmask.ops import reference
from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD

# MaskedAdam / MaskedAdamW step with masked_adam_, MaskedSGD with masked_sgd_. The tests over CONFIGS mix the two,
# so they run on the backends both ops have (test_optimizer_ops_share_their_backends keeps that the same set).
ADAM_BACKENDS = op_backends("masked_adam_")
SGD_BACKENDS = op_backends("masked_sgd_")
BACKENDS = tuple(b for b in ADAM_BACKENDS if b in SGD_BACKENDS)

# name: (our class, torch's class, keyword arguments)
CONFIGS = {
    "adam": (MaskedAdam, torch.optim.Adam, dict(lr=1e-2)),
    "adam-amsgrad-wd-maximize": (
        MaskedAdam, torch.optim.Adam,
        dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    ),
    "adamw": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "sgd": (MaskedSGD, torch.optim.SGD, dict(lr=1e-2)),
    "sgd-momentum-dampening-wd": (
        MaskedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=5e-4),
    ),
    "sgd-nesterov-wd-maximize": (
        MaskedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    ),
}

# A ResNet-like mixture of conv kernels, BN vectors, linear weights and 1-element biases.
SET_161 = [
    [(4 * (1 + i % 3), 4, 3, 3), (16 + i % 7,), (3 + i % 5, 11), (1,)][i % 4] for i in range(161)
]
CASES = {
    "1": [(1,)],
    "33": [(33,)],
    "4097": [(4097,)],
    "5x123x123": [(5, 123, 123)],
    "161-tensors": SET_161,
}
# A few tensors of different sizes, one of them smaller than any vector width.
MIXED = [(4097,), (6, 5, 3), (1,)]
STEPS = 20  # every backend, the Triton interpreter included, runs every case for 20 steps
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
# Half storage: 2 ulps (bf16: 8 mantissa bits, fp16: 11), absolute floor for values near 0.
HALF_TOL = {torch.bfloat16: dict(rtol=2**-7, atol=2**-7), torch.float16: dict(rtol=2**-10, atol=2**-10)}


# ---- helpers ---------------------------------------------------------------------------------------------------


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def make_grads(shapes, steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def mask_values(m):
    """The mask's value in float32, by the documented storage convention (uint8: m / 255)."""
    return m.float() / 255.0 if m.dtype == torch.uint8 else m.float()


def ones_mask(shape, kind):
    return {
        "float32": lambda: torch.ones(shape),
        "bfloat16": lambda: torch.ones(shape, dtype=torch.bfloat16),
        "float16": lambda: torch.ones(shape, dtype=torch.float16),
        "bool": lambda: torch.ones(shape, dtype=torch.bool),
        "uint8": lambda: torch.full(shape, 255, dtype=torch.uint8),
    }[kind]()


def soft_mask(shape, kind, seed):
    """A mask with exact zeros on about a third of the entries and, unless bool, values spread over (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    zero = torch.rand(shape, generator=g) < 0.35
    if kind == "bool":
        return ~zero
    if kind == "uint8":
        return torch.where(zero, 0, (u * 254).round() + 1).to(torch.uint8)
    return torch.where(zero, 0.0, u.clamp_min(1e-3)).to(getattr(torch, kind))


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def assert_matches_torch(ours, torch_opt, tol, what=""):
    """Every state buffer and the parameters: same keys, dtype, device, shape; values within ``tol``; `step` exact."""
    so, st_ = ours.state_dict(), torch_opt.state_dict()
    assert so["param_groups"] == st_["param_groups"]
    assert so["state"].keys() == st_["state"].keys()
    for i, state in st_["state"].items():
        assert so["state"][i].keys() == state.keys(), (what, i)
        for key, expected in state.items():
            got = so["state"][i][key]
            assert (got.dtype, got.device, got.shape) == (expected.dtype, expected.device, expected.shape), (i, key)
            if key == "step":
                assert torch.equal(got, expected), (what, i, key)
            else:
                torch.testing.assert_close(got, expected, **tol, msg=lambda m, i=i, key=key: f"{what} {i} {key}: {m}")
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    torch_params = [p for g in torch_opt.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(ours_params, torch_params, strict=True)):
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m, i=i: f"{what} param {i}: {m}")


def torch_step_masked_grad(opt, params, grads, masks):
    """Oracle for mask_mode="grad": torch's step on M ⊙ g."""
    for p, g, m in zip(params, grads, masks, strict=True):
        p.grad = g.clone() if m is None else g * mask_values(m)
    opt.step()


@torch.no_grad()
def torch_step_masked_update(opt, params, grads, masks):
    """Oracle for mask_mode="update": torch's step Δθ, then θ ← θ_old + M ⊙ Δθ; where M = 0 parameter and state
    keep their old values (a state buffer that did not exist yet counts as 0)."""
    old = [(p.clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items() if k != "step"}) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, m, (p0, s0) in zip(params, masks, old, strict=True):
        if m is None:
            continue
        mv = mask_values(m)
        keep = mv == 0
        p.copy_(torch.where(keep, p0, p0 + mv * (p - p0)))
        for key, v in opt.state.get(p, {}).items():
            if key != "step":
                v.copy_(torch.where(keep, s0.get(key, torch.zeros_like(v)), v))


def run_masked_against_torch(backend, config, shapes, masks, mask_mode, torch_step):
    """``STEPS`` steps of our optimizer for ``config`` with ``masks`` in ``mask_mode`` against torch's,
    stepped by the oracle ``torch_step(opt, params, grads, masks)``; the parameters must agree at float32 tolerance."""
    ours_cls, torch_cls, kw = CONFIGS[config]
    params = make_params(shapes)
    ref_params = clone_params(params)
    ours = ours_cls(params, **kw, masks=masks, mask_mode=mask_mode, backend=backend)
    theirs = torch_cls(ref_params, **kw)
    for step_grads in make_grads(shapes, STEPS):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        ours.step()
        torch_step(theirs, ref_params, step_grads, masks)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


def test_optimizer_ops_share_their_backends():
    """Were one optimizer op given a backend the other lacks, the tests over all CONFIGS would leave it untested:
    parametrise them per config (ADAM_BACKENDS / SGD_BACKENDS) before changing this."""
    assert ADAM_BACKENDS == SGD_BACKENDS


# ---- equality with torch.optim ----------------------------------------------------------------------------------


def equality_matrix():
    for backend in BACKENDS:
        for config in CONFIGS:
            for case in CASES:
                for mask in (None, "float32", "bool"):
                    yield pytest.param(backend, config, case, mask, id=f"{backend}-{config}-{case}-{mask}")


@pytest.mark.parametrize("backend, config, case, mask", list(equality_matrix()))
def test_matches_torch_without_mask_and_with_ones_mask(backend, config, case, mask):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = CASES[case]
    params = make_params(shapes)
    ref_params = clone_params(params)
    masks = None if mask is None else [ones_mask(s, mask) for s in shapes]
    ours = ours_cls(params, **kw, masks=masks, backend=backend)
    theirs = torch_cls(ref_params, **kw)
    grads = make_grads(shapes, STEPS)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


@pytest.mark.parametrize("mask", ["uint8", "bfloat16", "float16", "float32-update", "bool-update"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ones_mask_of_every_dtype_and_mode_matches_torch(backend, config, mask):
    ours_cls, torch_cls, kw = CONFIGS[config]
    kind, _, mode = mask.partition("-")
    shapes = MIXED
    params = make_params(shapes)
    ref_params = clone_params(params)
    ours = ours_cls(params, **kw, masks=[ones_mask(s, kind) for s in shapes], mask_mode=mode or "grad",
                    backend=backend)
    theirs = torch_cls(ref_params, **kw)
    grads = make_grads(shapes, STEPS)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


def half_shadow(torch_cls, kw, params):
    """torch_cls over float32 copies of ``params``; half_shadow_steps rounds parameters and state to the
    parameters' storage dtypes after every step (fp32 arithmetic on half storage)."""
    dtypes = [p.dtype for p in params]
    shadow = clone_params(params, torch.float32)
    return shadow, torch_cls(shadow, **kw), dtypes


def half_shadow_steps(opt, shadow, dtypes, grads):
    for step_grads in grads:
        for q, g in zip(shadow, step_grads, strict=True):
            q.grad = g.float()
        opt.step()
        with torch.no_grad():
            for q, dt in zip(shadow, dtypes, strict=True):
                q.copy_(q.to(dt))
                for key, v in opt.state[q].items():
                    if key != "step":
                        v.copy_(v.to(dt))


def assert_matches_half_shadow(ours, params, opt, shadow, tol):
    """Parameters and every state buffer of ``ours`` (over ``params``) against the float32 shadow run ``opt`` over
    ``shadow`` (half_shadow_steps): same keys, storage dtypes kept, values within ``tol``, `step` exact."""
    for i, (p, q) in enumerate(zip(params, shadow, strict=True)):
        torch.testing.assert_close(p.detach().float(), q.detach(), **tol)
        assert ours.state[p].keys() == opt.state[q].keys()
        for key, v in opt.state[q].items():
            got = ours.state[p][key]
            if key == "step":
                assert torch.equal(got, v)
            else:
                assert got.dtype == p.dtype
                torch.testing.assert_close(got.float(), v, **tol, msg=lambda m, i=i, key=key: f"{i} {key}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_matches_torch_in_fp32_on_half_storage(backend, config, dtype):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = [(4097,), (33,), (5, 7, 3), (1,)]
    # A float32 tensor in the same param group: grouping by dtype must keep it in full precision.
    params = make_params(shapes[:-1], dtype) + make_params(shapes[-1:], torch.float32)
    grads = [[g.to(p.dtype) for g, p in zip(step, params, strict=True)]
             for step in make_grads(shapes, STEPS)]
    ours = ours_cls(params, **kw, backend=backend)
    shadow, opt, dtypes = half_shadow(torch_cls, kw, params)
    run(ours, params, grads)
    half_shadow_steps(opt, shadow, dtypes, grads)
    assert [p.dtype for p in params] == [dtype] * 3 + [torch.float32]
    assert_matches_half_shadow(ours, params, opt, shadow, HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", ["adam-amsgrad-wd-maximize", "adamw"])
@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_half_precision_adam_matches_torch_fused_adam(backend, config, dtype):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = [(4097,), (5, 7, 3)]
    params = make_params(shapes, dtype)
    ref_params = clone_params(params)
    grads = make_grads(shapes, STEPS, dtype)
    ours = ours_cls(params, **kw, fused=True, backend=backend)
    theirs = torch_cls(ref_params, **kw, fused=True)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    assert_matches_torch(ours, theirs, HALF_TOL[dtype], config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_torch_in_float64(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    params = make_params(MIXED, torch.float64)
    ref_params = clone_params(params)
    grads = make_grads(MIXED, STEPS, torch.float64)
    ours = ours_cls(params, **kw, masks=[ones_mask(s, "float32") for s in MIXED], backend=backend)
    theirs = torch_cls(ref_params, **kw)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    assert_matches_torch(ours, theirs, dict(rtol=1e-12, atol=1e-14), config)


def test_torch_fused_sgd_half_is_broken_on_cpu():
    """Why the half-precision SGD oracle is not torch's fused SGD: in torch 2.13 on CPU it leaves the vectorised
    part of a bf16 tensor unchanged (plain SGD, lr 1, g = index: θ should be −index everywhere)."""
    p = torch.zeros(40, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.arange(40, dtype=torch.bfloat16)
    torch.optim.SGD([p], lr=1.0, fused=True).step()
    fixed = torch.equal(p.detach(), -torch.arange(40, dtype=torch.bfloat16))
    if fixed:
        pytest.fail("torch's fused CPU SGD on bf16 is correct now: it can become the half-precision SGD oracle")


# ---- state_dict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_in_the_middle_of_the_run(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = [(33,), (4, 5, 3), (1,)]
    grads = make_grads(shapes, STEPS)
    masks = [soft_mask(s, "float32", i) for i, s in enumerate(shapes)]

    params = make_params(shapes)
    straight = ours_cls(params, **kw, masks=masks, backend=backend)
    run(straight, params, grads)

    resumed_params = make_params(shapes)
    first = ours_cls(resumed_params, **kw, masks=masks, backend=backend)
    run(first, resumed_params, grads[: STEPS // 2])
    saved = copy.deepcopy(first.state_dict())
    saved_masks = copy.deepcopy(first.mask_state_dict())
    del first
    second = ours_cls(resumed_params, **kw, backend=backend)
    second.load_state_dict(saved)
    second.load_mask_state_dict(saved_masks)
    run(second, resumed_params, grads[STEPS // 2 :])
    # Same backend, same inputs: the resumed run is the uninterrupted one, bit for bit.
    assert_matches_torch(second, straight, dict(rtol=0, atol=0), config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_is_torchs_both_ways(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = [(33,), (4, 5, 3)]
    grads = make_grads(shapes, STEPS)
    half = STEPS // 2
    torch_params = make_params(shapes)
    torch_all = torch_cls(torch_params, **kw)
    run(torch_all, torch_params, grads)

    # ours for the first half, then torch.optim for the second
    p1 = make_params(shapes)
    ours = ours_cls(p1, **kw, backend=backend)
    run(ours, p1, grads[:half])
    theirs = torch_cls(p1, **kw)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    run(theirs, p1, grads[half:])
    assert_matches_torch(theirs, torch_all, FP32_TOL, config)

    # torch.optim for the first half, then ours for the second
    p2 = make_params(shapes)
    theirs = torch_cls(p2, **kw)
    run(theirs, p2, grads[:half])
    ours = ours_cls(p2, **kw, backend=backend)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    run(ours, p2, grads[half:])
    assert_matches_torch(ours, torch_all, FP32_TOL, config)


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("config", CONFIGS)
def test_state_tensors_are_created_as_torch_creates_them(config, fused):
    ours_cls, torch_cls, kw = CONFIGS[config]
    params = make_params([(3, 2)])
    ref_params = clone_params(params)
    ours = ours_cls(params, **kw, fused=fused, backend="reference")
    theirs = torch_cls(ref_params, **kw, fused=fused)
    run(ours, params, make_grads([(3, 2)], 1))
    run(theirs, ref_params, make_grads([(3, 2)], 1))
    assert_matches_torch(ours, theirs, FP32_TOL, config)
    assert ours.defaults == theirs.defaults
    assert isinstance(ours, torch_cls)


# ---- masks at work -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "float32", "uint8", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_mode_keeps_masked_out_entries_bit_for_bit(backend, config, kind):
    ours_cls, _, kw = CONFIGS[config]
    shapes = [(4097,), (6, 5, 3)]
    params = make_params(shapes)
    opt = ours_cls(params, **kw, mask_mode="update", backend=backend)
    grads = make_grads(shapes, STEPS + 3)
    run(opt, params, grads[:3])  # non-zero state before the masks arrive
    masks = [soft_mask(s, kind, seed=i) for i, s in enumerate(shapes)]
    opt.set_masks(masks)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    run(opt, params, grads[3:])
    for p, m, (p0, s0) in zip(params, masks, before, strict=True):
        out = mask_values(m) == 0
        assert out.any() and (~out).any()
        assert torch.equal(p.detach()[out], p0[out])
        assert not torch.equal(p.detach()[~out], p0[~out])
        for key, v in opt.state[p].items():
            if key == "step":
                assert v.item() == s0[key].item() + STEPS
            else:
                assert torch.equal(v[out], s0[key][out]), key


@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_update_mode_on_a_first_sgd_step_creates_zero_momentum_where_masked(backend):
    params = make_params([(50,)])
    mask = soft_mask((50,), "bool", 0)
    opt = MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=0.1, masks=[mask], mask_mode="update", backend=backend)
    p0 = params[0].detach().clone()
    run(opt, params, make_grads([(50,)], 1))
    assert torch.equal(params[0].detach()[~mask], p0[~mask])
    assert torch.equal(opt.state[params[0]]["momentum_buffer"][~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_grad_mode_lets_sgd_weight_decay_and_momentum_move_masked_out_entries(backend):
    """Spec §8.10: with g ← M ⊙ g, weight decay still moves a masked-out weight: θ ← θ(1 − lr·λ) per step."""
    params = make_params([(20,)])
    mask = torch.zeros(20, dtype=torch.bool)
    opt = MaskedSGD(params, lr=0.1, weight_decay=0.5, masks=[mask], backend=backend)
    p0 = params[0].detach().clone()
    run(opt, params, make_grads([(20,)], 3))
    torch.testing.assert_close(params[0].detach(), p0 * 0.95**3, **FP32_TOL)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_mode_soft_mask_matches_torch_step_scaled_by_the_mask(backend, config):
    shapes = [(4097,), (6, 5, 3), (1,)]
    masks = [soft_mask(s, "float32", seed=i) for i, s in enumerate(shapes)]
    masks[-1] = None  # a parameter without a mask in the same group takes torch's step
    run_masked_against_torch(backend, config, shapes, masks, "update", torch_step_masked_update)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "uint8", "bool"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mode_matches_torch_on_masked_gradients(backend, config, kind):
    shapes = [(4097,), (6, 5, 3), (1,)]
    masks = [soft_mask(s, kind, seed=i) for i, s in enumerate(shapes)]
    run_masked_against_torch(backend, config, shapes, masks, "grad", torch_step_masked_grad)


@pytest.mark.parametrize("config", ["adam-amsgrad-wd-maximize", "adamw", "sgd-momentum-dampening-wd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mode_soft_mask_equals_the_reference_functional(backend, config):
    ours_cls, _, kw = CONFIGS[config]
    shapes = [(4097,), (6, 5, 3)]
    masks = [soft_mask(s, "float32", seed=i) for i, s in enumerate(shapes)]
    params = make_params(shapes)
    ref_params = [p.detach().clone() for p in params]
    opt = ours_cls(params, **kw, masks=masks, backend=backend)
    zeros = [torch.zeros_like(p) for p in ref_params]
    exp_avgs, exp_avg_sqs, max_sqs = (copy.deepcopy(zeros) for _ in range(3))
    steps = [torch.tensor(0.0) for _ in ref_params]
    buffers = copy.deepcopy(zeros)
    for t, step_grads in enumerate(make_grads(shapes, STEPS)):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        if ours_cls is MaskedSGD:
            reference.masked_sgd_(
                ref_params, step_grads, buffers, masks, lr=kw["lr"], weight_decay=kw["weight_decay"],
                momentum=kw["momentum"], dampening=kw["dampening"], nesterov=False, maximize=False,
                first_step=t == 0, mask_update=False,
            )
        else:
            for s in steps:
                s += 1
            beta1, beta2 = kw.get("betas", (0.9, 0.999))
            reference.masked_adam_(
                ref_params, step_grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masks, lr=kw["lr"], beta1=beta1,
                beta2=beta2, weight_decay=kw.get("weight_decay", 0.01 if ours_cls is MaskedAdamW else 0.0),
                eps=kw.get("eps", 1e-8), amsgrad=kw.get("amsgrad", False), maximize=kw.get("maximize", False),
                decoupled_weight_decay=ours_cls is MaskedAdamW, mask_update=False,
            )
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        torch.testing.assert_close(p.detach(), q, **FP32_TOL)
        if ours_cls is MaskedSGD:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buffers[i], **FP32_TOL)
        else:
            torch.testing.assert_close(opt.state[p]["exp_avg"], exp_avgs[i], **FP32_TOL)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], exp_avg_sqs[i], **FP32_TOL)
            assert opt.state[p]["step"].item() == steps[i].item() == STEPS


@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_adam_grad_mode_cancels_a_constant_mask(backend):
    """Spec §8.9: Adam's m/√v is invariant to g → c·g, so a constant mask c changes the step only through eps."""
    shapes = [(257,)]
    grads = make_grads(shapes, STEPS)
    full, half = make_params(shapes), make_params(shapes)
    run(MaskedAdam(full, lr=1e-2, eps=1e-12, backend=backend), full, grads)
    run(MaskedAdam(half, lr=1e-2, eps=1e-12, masks=[torch.full((257,), 0.5)], backend=backend), half, grads)
    torch.testing.assert_close(half[0], full[0], **FP32_TOL)
    sgd_full, sgd_half = make_params(shapes), make_params(shapes)
    run(MaskedSGD(sgd_full, lr=1e-2, backend=backend), sgd_full, grads)
    run(MaskedSGD(sgd_half, lr=1e-2, masks=[torch.full((257,), 0.5)], backend=backend), sgd_half, grads)
    assert not torch.allclose(sgd_half[0], sgd_full[0], **FP32_TOL)  # SGD does respect the mask


# ---- schedulers, tensor lr, closures, GradScaler -----------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_lr_scheduler_matches_torch(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = [(33,), (4, 5)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    ours = ours_cls(params, **kw, backend=backend)
    theirs = torch_cls(ref_params, **kw)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=5, gamma=0.5)
    with warnings.catch_warnings():
        # torch warns when scheduler.step() is not preceded by a recognised optimizer.step()
        warnings.simplefilter("error")
        for step_grads in make_grads(shapes, STEPS):
            run(ours, params, [step_grads])
            run(theirs, ref_params, [step_grads])
            sched_ours.step()
            sched_theirs.step()
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[0]["lr"] == kw["lr"] * 0.5 ** (STEPS // 5)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


@pytest.mark.parametrize("config", ["adam", "adamw", "sgd-momentum-dampening-wd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_matches_torch(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    kw = dict(kw, lr=torch.tensor(kw["lr"]))
    shapes = [(33,)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    ours = ours_cls(params, **kw, backend=backend)
    theirs = torch_cls(ref_params, **kw)
    grads = make_grads(shapes, STEPS)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


@pytest.mark.parametrize("config", ["adam-amsgrad-wd-maximize", "sgd-nesterov-wd-maximize"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_matches_torch(backend, config):
    ours_cls, torch_cls, kw = CONFIGS[config]
    g = torch.Generator().manual_seed(3)
    target, weight = torch.randn(40, generator=g), torch.rand(40, generator=g)

    def closure_for(opt, p, calls):
        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = (weight * (p - target) ** 2).sum()
            loss.backward()
            return loss

        return closure

    (p,), (q,) = make_params([(40,)]), make_params([(40,)])
    ours, theirs = ours_cls([p], **kw, backend=backend), torch_cls([q], **kw)
    ours_calls, torch_calls = [], []
    for _ in range(STEPS):
        loss_ours = ours.step(closure_for(ours, p, ours_calls))
        loss_theirs = theirs.step(closure_for(theirs, q, torch_calls))
        torch.testing.assert_close(loss_ours, loss_theirs, **FP32_TOL)
    assert ours_calls == torch_calls == [True] * STEPS
    assert_matches_torch(ours, theirs, FP32_TOL, config)


def scaler_run(opt_factory, inf_steps, steps=12, unscale_first=False):
    """A GradScaler loop on CPU with float32 parameters; at ``inf_steps`` one gradient entry is inf."""
    shapes = [(33,), (4, 5)]
    params = make_params(shapes)
    opt = opt_factory(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    g = torch.Generator().manual_seed(5)
    scales, unchanged = [], []
    for t in range(steps):
        opt.zero_grad()
        weights = [torch.randn(s, generator=g) for s in shapes]
        if t in inf_steps:
            weights[0][3] = float("inf")
        loss = sum((p * w).sum() for p, w in zip(params, weights, strict=True))
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in params]
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)  # a no-op clip: the usual reason to unscale first
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        unchanged.append(all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)))
    return params, opt, scales, unchanged


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-path", "unscaled-first"])
@pytest.mark.parametrize("config", ["adam", "adam-amsgrad-wd-maximize", "adamw"])
@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_grad_scaler_adam_matches_torch(backend, config, unscale_first):
    ours_cls, torch_cls, kw = CONFIGS[config]
    inf_steps = (0, 5)
    ours = scaler_run(lambda ps: ours_cls(ps, **kw, backend=backend), inf_steps, unscale_first=unscale_first)
    fused = scaler_run(lambda ps: torch_cls(ps, **kw, fused=True), inf_steps, unscale_first=unscale_first)
    plain = scaler_run(lambda ps: torch_cls(ps, **kw), inf_steps, unscale_first=unscale_first)
    assert ours[2] == fused[2] == plain[2]  # the scaler saw the same infs
    assert [ours[3][t] for t in inf_steps] == [True, True]  # skipped steps leave the parameters alone
    assert not any(ours[3][t] for t in range(12) if t not in inf_steps)
    # torch's fused Adam (the contract GradScaler has with fused optimizers): same params and state, `step`
    # counts included, except that fused keeps `step` on the parameter's device as float32.
    for p, q in zip(ours[0], fused[0], strict=True):
        torch.testing.assert_close(p, q, **FP32_TOL)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[1].state[p][key], fused[1].state[q][key], **FP32_TOL)
        assert ours[1].state[p]["step"].item() == fused[1].state[q]["step"].item() == 12 - len(inf_steps)
    # torch's non-fused Adam under the scaler (unscale, then skip the whole step): same params and state.
    for p, q in zip(ours[0], plain[0], strict=True):
        torch.testing.assert_close(p, q, **FP32_TOL)
        torch.testing.assert_close(ours[1].state[p]["exp_avg_sq"], plain[1].state[q]["exp_avg_sq"], **FP32_TOL)
        assert ours[1].state[p]["step"].item() == plain[1].state[q]["step"].item()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-path", "unscaled-first"])
@pytest.mark.parametrize("config", ["sgd", "sgd-momentum-dampening-wd", "sgd-nesterov-wd-maximize"])
@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_grad_scaler_sgd_matches_torch(backend, config, unscale_first):
    ours_cls, torch_cls, kw = CONFIGS[config]
    inf_steps = (0, 5)  # a skipped first step must not create the momentum buffer
    ours = scaler_run(lambda ps: ours_cls(ps, **kw, backend=backend), inf_steps, unscale_first=unscale_first)
    plain = scaler_run(lambda ps: torch_cls(ps, **kw), inf_steps, unscale_first=unscale_first)
    assert ours[2] == plain[2]
    assert [ours[3][t] for t in inf_steps] == [True, True]
    for p, q in zip(ours[0], plain[0], strict=True):
        torch.testing.assert_close(p, q, **FP32_TOL)
        if kw.get("momentum", 0):
            torch.testing.assert_close(ours[1].state[p]["momentum_buffer"], plain[1].state[q]["momentum_buffer"],
                                       **FP32_TOL)
    if not unscale_first:
        # torch's fused SGD under the scaler, with the inf only after the first step (its skipped first step leaves
        # an uninitialised buffer).
        ours = scaler_run(lambda ps: ours_cls(ps, **kw, backend=backend), (5,))
        fused = scaler_run(lambda ps: torch_cls(ps, **kw, fused=True), (5,))
        assert ours[2] == fused[2]
        for p, q in zip(ours[0], fused[0], strict=True):
            torch.testing.assert_close(p, q, **FP32_TOL)


# ---- any layout, sparse gradients, complex parameters -----------------------------------------------------------


def strided_param(seed: int = 0) -> torch.nn.Parameter:
    """A (3, 4) parameter made of every other column of a (3, 8) tensor: not dense, so no fused kernel walks it."""
    big = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(big[:, ::2])


def dense_param(seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)))


def transposed_param(seed: int = 0) -> torch.nn.Parameter:
    """A (3, 4) parameter stored column by column: dense, so fused, but its contiguous gradient is not laid out
    like it."""
    return torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)).t())


# name: (the (3, 4) parameter, its gradient drawn from a generator), in layouts torch accepts
LAYOUTS = {
    "grad-transposed": (dense_param, lambda gen: torch.randn(4, 3, generator=gen).t()),
    "grad-expanded": (dense_param, lambda gen: torch.randn(1, 4, generator=gen).expand(3, 4)),
    "param-transposed": (transposed_param, lambda gen: torch.randn(3, 4, generator=gen)),
    "param-strided": (strided_param, lambda gen: torch.randn(3, 4, generator=gen)),
    "param-strided-grad-transposed": (strided_param, lambda gen: torch.randn(4, 3, generator=gen).t()),
}
MASKED_STEPS = {None: torch_step_masked_grad, "grad": torch_step_masked_grad, "update": torch_step_masked_update}


@pytest.mark.parametrize("mask_mode", MASKED_STEPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ["adam-amsgrad-wd-maximize", "adamw", "sgd-momentum-dampening-wd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_layout_torch_accepts_is_stepped_as_torch_steps_it(backend, config, layout, mask_mode):
    """Gradients whose strides are not the parameter's and non-dense parameters (fastmask.ops._by_layout), beside a
    dense parameter in the same group, with and without masks (which take the parameter's layout in set_masks)."""
    ours_cls, torch_cls, kw = CONFIGS[config]
    make_param, make_grad = LAYOUTS[layout]
    params, ref_params = ([make_param(), torch.nn.Parameter(torch.randn(5))] for _ in range(2))
    with torch.no_grad():
        ref_params[1].copy_(params[1])
    strides = [p.stride() for p in params]
    masks = None if mask_mode is None else [soft_mask((3, 4), "float32", seed=2), soft_mask((5,), "bool", seed=3)]
    ours = ours_cls(params, **kw, masks=masks, mask_mode=mask_mode or "grad", backend=backend)
    theirs = torch_cls(ref_params, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [make_grad(gen), torch.randn(5, generator=gen)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # as it is: its layout is the case under test
        ours.step()
        MASKED_STEPS[mask_mode](theirs, ref_params, grads, masks or [None, None])
    assert [p.stride() for p in params] == strides
    assert_matches_torch(ours, theirs, FP32_TOL, layout)


@pytest.mark.parametrize("mask", [None, "ones", "grad", "update"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_parameters_step_as_torch_steps_them(backend, config, mask):
    """Complex parameters beside a real one: torch.optim steps their float views (real, imaginary). A real mask
    scales both parts: the oracle is torch on M ⊙ g ("grad") or torch's step scaled by M ("update")."""
    ours_cls, torch_cls, kw = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2,)]
    params = [torch.randn(s, generator=gen, dtype=dt).requires_grad_()
              for s, dt in zip(shapes, (torch.complex64, torch.complex64, torch.float32), strict=True)]
    ref_params = clone_params(params)
    if mask is None:
        masks = None
    elif mask == "ones":
        masks = [ones_mask(s, "float32") for s in shapes]
    else:
        masks = [soft_mask(shapes[0], "float32", seed=1), soft_mask(shapes[1], "uint8", seed=2), None]
    ours = ours_cls(params, **kw, masks=masks, mask_mode="update" if mask == "update" else "grad", backend=backend)
    theirs = torch_cls(ref_params, **kw)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        ours.step()
        MASKED_STEPS["update" if mask == "update" else "grad"](theirs, ref_params, grads, masks or [None] * 3)
    assert_matches_torch(ours, theirs, FP32_TOL, config)


def sparse_grad(gen: torch.Generator) -> Tensor:
    """An uncoalesced sparse gradient of a (4, 2) parameter (row 0 twice, as an embedding's gradient can be)."""
    return torch.sparse_coo_tensor([[0, 2, 0]], torch.randn(3, 2, generator=gen), (4, 2), check_invariants=True)


SPARSE_SGD = {
    "plain": dict(lr=0.1),
    "momentum-dampening": dict(lr=0.1, momentum=0.9, dampening=0.5),
    "nesterov-maximize": dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
}


def sparse_sgd_run(opt, params, masks=None, steps=3):
    """``steps`` steps of ``opt`` over [a dense (3,) parameter, a (4, 2) parameter with sparse gradients]; with
    ``masks``, the sparse gradient is replaced by the dense M ⊙ g (torch's oracle for "grad" mode)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        params[0].grad = torch.randn(3, generator=gen)
        g = sparse_grad(gen)
        params[1].grad = g if masks is None else g.to_dense() * mask_values(masks[1])
        opt.step()


@pytest.mark.parametrize("config", SPARSE_SGD)
@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_sparse_gradients_step_as_torch_sgd_steps_them(backend, config):
    kw = SPARSE_SGD[config]
    params, ref_params = ([torch.zeros(3, requires_grad=True), torch.ones(4, 2, requires_grad=True)]
                          for _ in range(2))
    ours, theirs = MaskedSGD(params, **kw, backend=backend), torch.optim.SGD(ref_params, **kw)
    sparse_sgd_run(ours, params)
    sparse_sgd_run(theirs, ref_params)
    assert_matches_torch(ours, theirs, FP32_TOL, config)
    if "momentum" in kw:
        assert ours.state[params[1]]["momentum_buffer"].is_sparse


@pytest.mark.parametrize("config", SPARSE_SGD)
@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_a_mask_scales_a_sparse_gradient_in_grad_mode(backend, config):
    """M ⊙ g on the sparse gradient's values, then torch's sparse SGD: equal to torch's SGD on the dense M ⊙ g."""
    kw = SPARSE_SGD[config]
    params, ref_params = ([torch.zeros(3, requires_grad=True), torch.ones(4, 2, requires_grad=True)]
                          for _ in range(2))
    masks = [None, soft_mask((4, 2), "float32", seed=4)]
    ours = MaskedSGD(params, **kw, masks=masks, backend=backend)
    theirs = torch.optim.SGD(ref_params, **kw)
    sparse_sgd_run(ours, params)
    sparse_sgd_run(theirs, ref_params, masks)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **FP32_TOL)
        if "momentum" in kw:
            torch.testing.assert_close(ours.state[p]["momentum_buffer"].to_dense(), theirs.state[q]["momentum_buffer"],
                                       **FP32_TOL)


@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_grad_scaler_with_sparse_gradients_matches_torch_sgd(backend):
    """An embedding with sparse gradients under GradScaler (an inf at step 2): the scaler hands MaskedSGD its scale
    and found_inf; the step is torch.optim.SGD's on the gradient the scaler would have unscaled."""
    def loop(opt_cls, **kw):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(6, 3, sparse=True)
        opt = opt_cls(emb.parameters(), lr=0.1, momentum=0.9, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
        for t in range(5):
            opt.zero_grad()
            loss = (emb(torch.tensor([t % 6, 2, 2])) * torch.arange(3.0)).sum() * (float("inf") if t == 2 else 1)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return emb.weight, opt.state[emb.weight]["momentum_buffer"], scaler.get_scale()

    ours, theirs = loop(MaskedSGD, backend=backend), loop(torch.optim.SGD)
    assert ours[2] == theirs[2]
    torch.testing.assert_close(ours[0], theirs[0], **FP32_TOL)
    torch.testing.assert_close(ours[1], theirs[1], **FP32_TOL)


def test_sparse_gradient_errors_are_torchs_or_name_the_parameter():
    def param_with_sparse_grad():
        p = torch.zeros(4, 2, requires_grad=True)
        p.grad = sparse_grad(torch.Generator().manual_seed(0))
        return p

    # Adam has no sparse algorithm, nor has fused SGD, and SGD's weight decay cannot add a sparse gradient to the
    # parameter: torch's own errors.
    for ours, theirs, kw in [(MaskedAdam, torch.optim.Adam, {}), (MaskedSGD, torch.optim.SGD, dict(weight_decay=0.1)),
                             (MaskedSGD, torch.optim.SGD, dict(fused=True))]:
        expected = raised(lambda theirs=theirs, kw=kw: theirs([param_with_sparse_grad()], **kw).step())
        with pytest.raises(type(expected), match=re.escape(str(expected))):
            ours([param_with_sparse_grad()], **kw, backend="reference").step()
    p = param_with_sparse_grad()
    opt = MaskedSGD([torch.zeros(1, requires_grad=True), p], masks={p: torch.ones(4, 2)}, mask_mode="update")
    with pytest.raises(ValueError, match=r"MaskedSGD: parameter param_groups\[0\]\['params'\]\[1\] has a sparse "
                                         r"gradient and a mask; a mask applies to a sparse gradient only in "
                                         r"mask_mode='grad'"):
        opt.step()


# ---- construction, options and errors ----------------------------------------------------------------------------


def raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (any torch error is the expected value)
        return exc
    raise AssertionError("torch accepted the arguments")


P = [torch.zeros(3, requires_grad=True)]
BAD_ARGS = [
    (MaskedAdam, torch.optim.Adam, (P,), dict(lr=-1.0)),
    (MaskedAdam, torch.optim.Adam, (P,), dict(eps=-1.0)),
    (MaskedAdam, torch.optim.Adam, (P,), dict(betas=(1.0, 0.9))),
    (MaskedAdam, torch.optim.Adam, (P,), dict(betas=(0.9, -0.1))),
    (MaskedAdam, torch.optim.Adam, (P,), dict(weight_decay=-1.0)),
    (MaskedAdam, torch.optim.Adam, (P,), dict(betas=(0.9, torch.tensor(0.99)))),
    (MaskedAdam, torch.optim.Adam, (P,), dict(lr=torch.tensor([1e-3, 1e-3]))),
    (MaskedAdam, torch.optim.Adam, (P,), dict(lr=torch.tensor(1e-3), foreach=True)),
    (MaskedAdam, torch.optim.Adam, (P,), dict(fused=True, differentiable=True)),
    (MaskedAdam, torch.optim.Adam, (P,), dict(fused=True, foreach=True)),
    (MaskedAdam, torch.optim.Adam, (P, -1.0), {}),
    (MaskedAdam, torch.optim.Adam, ([],), {}),
    (MaskedAdam, torch.optim.Adam, (P[0],), {}),
    (MaskedAdam, torch.optim.Adam, ([{"params": set(P)}],), {}),
    (MaskedAdamW, torch.optim.AdamW, (P,), dict(lr=-1.0)),
    (MaskedAdamW, torch.optim.AdamW, (P,), dict(weight_decay=-1e-2)),
    (MaskedAdamW, torch.optim.AdamW, (P,), dict(betas=(0.9, 1.0))),
    (MaskedAdamW, torch.optim.AdamW, (P, 1e-3, (0.9, 0.999), -1e-8), {}),
    (MaskedSGD, torch.optim.SGD, (P,), dict(lr=-1.0)),
    (MaskedSGD, torch.optim.SGD, (P,), dict(momentum=-0.5)),
    (MaskedSGD, torch.optim.SGD, (P,), dict(weight_decay=-1.0)),
    (MaskedSGD, torch.optim.SGD, (P,), dict(nesterov=True)),
    (MaskedSGD, torch.optim.SGD, (P,), dict(momentum=0.9, dampening=0.1, nesterov=True)),
    (MaskedSGD, torch.optim.SGD, (P,), dict(lr=torch.tensor([0.1, 0.2]))),
    (MaskedSGD, torch.optim.SGD, (P,), dict(fused=True, foreach=True)),
    (MaskedSGD, torch.optim.SGD, ([{"params": P}, {"params": P}],), {}),
]


@pytest.mark.parametrize("ours, theirs, args, kwargs", BAD_ARGS)
def test_constructor_errors_equal_torchs(ours, theirs, args, kwargs):
    expected = raised(lambda: theirs(*args, **kwargs))
    with pytest.raises(type(expected)) as info:
        ours(*args, **kwargs)
    assert str(info.value) == str(expected)


@pytest.mark.parametrize(
    "ours, theirs, args, kwargs",
    [
        (MaskedAdam, torch.optim.Adam, (), {}),
        (MaskedAdam, torch.optim.Adam, (0.1, (0.5, 0.6), 1e-4, 0.3, True), dict(maximize=True, foreach=False)),
        (MaskedAdam, torch.optim.Adam, (), dict(decoupled_weight_decay=True, fused=True)),
        (MaskedAdamW, torch.optim.AdamW, (), {}),
        (MaskedAdamW, torch.optim.AdamW, (0.1, (0.5, 0.6), 1e-4, 0.3, True), dict(maximize=True)),
        (MaskedSGD, torch.optim.SGD, (), {}),
        (MaskedSGD, torch.optim.SGD, (0.1, 0.9, 0.0, 1e-4, True), dict(maximize=True)),
    ],
)
def test_defaults_and_param_groups_equal_torchs(ours, theirs, args, kwargs):
    a = ours([torch.zeros(2, requires_grad=True)], *args, **kwargs)
    b = theirs([torch.zeros(2, requires_grad=True)], *args, **kwargs)
    assert a.defaults == b.defaults
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]


@pytest.mark.parametrize("cls", [MaskedAdam, MaskedAdamW, MaskedSGD])
def test_unsupported_options_raise_naming_the_option(cls):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"does not support differentiable=True \(param_groups\[0\]\)"):
        cls(p, differentiable=True)
    with pytest.raises(ValueError, match=r"does not support differentiable=True \(param_groups\[1\]\)"):
        cls([{"params": p}, {"params": [torch.zeros(1, requires_grad=True)], "differentiable": True}])
    with pytest.raises(ValueError, match=r"mask_mode must be one of \('grad', 'update'\), got 'both'"):
        cls(p, mask_mode="both")
    with pytest.raises(ValueError, match=r"backend must be None or one of"):
        cls(p, backend="gpu")

    opt = cls(p, backend="reference")
    with pytest.raises(ValueError, match=r"differentiable=True \(param_groups\[1\]\)"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "differentiable": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


def test_a_loaded_state_dict_with_differentiable_is_rejected_at_step():
    p = torch.zeros(3, requires_grad=True)
    opt = MaskedSGD([p], backend="reference")
    state = torch.optim.SGD([torch.zeros(3, requires_grad=True)], differentiable=True).state_dict()
    opt.load_state_dict(state)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"^MaskedSGD does not support differentiable=True \(param_groups\[0\]\)$"):
        opt.step()
    assert torch.equal(p, torch.zeros(3))


ADAMS = [(MaskedAdam, torch.optim.Adam), (MaskedAdamW, torch.optim.AdamW)]


@pytest.mark.parametrize("loaded", [False, True], ids=["argument", "loaded-state-dict"])
@pytest.mark.parametrize("ours_cls, torch_cls", ADAMS)
@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_capturable_on_cpu_raises_torchs_error_at_step(backend, ours_cls, torch_cls, loaded):
    """capturable=True is accepted, and on CPU parameters the step raises what torch.optim's raises (its device
    check), before any tensor changes; from a loaded state dict too."""

    def make(cls, **kw):
        p = torch.zeros(3, requires_grad=True)
        if loaded:
            opt = cls([p], **kw)
            opt.load_state_dict(torch_cls([torch.zeros(3, requires_grad=True)], capturable=True).state_dict())
        else:
            opt = cls([p], capturable=True, **kw)
        p.grad = torch.ones(3)
        return p, opt

    expected = raised(lambda: make(torch_cls)[1].step())
    p, opt = make(ours_cls, backend=backend)
    assert opt.param_groups[0]["capturable"]
    with pytest.raises(type(expected)) as info:
        opt.step()
    assert str(info.value) == str(expected)
    assert torch.equal(p, torch.zeros(3))


@pytest.mark.parametrize("when", ["at-construction", "before-first-step", "after-two-steps"])
@pytest.mark.parametrize("config", ["adam", "adam-amsgrad-wd-maximize", "adamw"])
@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_capturable_steps_as_torchs_on_a_capture_device(backend, config, when, monkeypatch):
    """capturable=True where torch allows it, simulated by letting torch.optim's device check accept CPU tensors (no
    GPU here): ours and torch's capturable Adam take the same steps, `step` kept on the parameter's device as
    torch keeps it. "before-first-step" is what Dynamo does to a group whose parameters are all on the GPU when it
    compiles the step; "after-two-steps" sets it on a group whose `step` is already on the host."""
    for module in ("torch.optim.optimizer", "torch.optim.adam"):  # adam.py holds its own reference to it
        monkeypatch.setattr(sys.modules[module], "_get_capturable_supported_devices",
                            lambda supports_xla=True: ["cuda", "cpu"])
    ours_cls, torch_cls, kw = CONFIGS[config]
    shapes = MIXED
    params = make_params(shapes)
    grads = make_grads(shapes, 5)
    flag = dict(capturable=True) if when == "at-construction" else {}
    ours = ours_cls(clone_params(params), **kw, **flag, backend=backend)
    theirs = torch_cls(clone_params(params), **kw, **flag)
    for t, step_grads in enumerate(grads):
        if (when, t) in (("before-first-step", 0), ("after-two-steps", 2)):
            ours.param_groups[0]["capturable"] = theirs.param_groups[0]["capturable"] = True
        for opt in (ours, theirs):
            for p, g in zip(opt.param_groups[0]["params"], step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
    assert_matches_torch(ours, theirs, FP32_TOL, f"{config} {when}")


@pytest.mark.parametrize("cls", [MaskedAdam, MaskedSGD])
def test_fused_on_an_unsupported_device_raises_torchs_error(cls):
    p = torch.zeros(3, device="meta", requires_grad=True)
    p.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params"):
        cls([p], fused=True, backend="reference").step()


def test_an_unavailable_backend_raises_at_step():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run masked_adam_"):
        MaskedAdam([p], backend="cuda").step()


def test_environment_variable_chooses_the_backend_and_the_argument_overrides_it(monkeypatch):
    monkeypatch.setenv("FASTMASK_BACKEND", "cuda")
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"FASTMASK_BACKEND='cuda' cannot run masked_sgd_"):
        MaskedSGD([p], lr=0.1).step()
    MaskedSGD([p], lr=0.1, backend="reference").step()
    assert torch.equal(p.detach(), torch.full((3,), -0.1))


def test_optim_imports_only_the_op_layer():
    """fastmask.optim must stay usable without the rest of fastmask (the layers, docs/architecture.md): importing it
    loads only the optimizers, the ops and the utilities."""
    code = "import sys, fastmask.optim; print(' '.join(m for m in sys.modules if m.startswith('fastmask')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    allowed = {"fastmask", "fastmask._C", "fastmask.optim", "fastmask.ops", "fastmask.util"}
    outside = {m for m in loaded if m not in allowed and not m.startswith(("fastmask.optim.", "fastmask.ops.",
                                                                             "fastmask.util."))}
    assert "fastmask.optim" in loaded and not outside, outside


# ---- masks: setting, validation, accessors, persistence ----------------------------------------------------------


def named_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_named_parameters_as_in_torch_and_masks_by_name():
    model = named_model()
    opt = MaskedSGD(model.named_parameters(), lr=0.1, masks={"2.weight": torch.zeros(2, 4)}, backend="reference")
    theirs = torch.optim.SGD(named_model().named_parameters(), lr=0.1)
    assert opt.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    masks = opt.masks()
    assert list(masks) == [model[2].weight] and torch.equal(masks[model[2].weight], torch.zeros(2, 4))
    before = model[2].weight.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert torch.equal(model[2].weight.detach(), before)
    assert not torch.equal(model[0].weight.detach(), named_model()[0].weight.detach())


def test_mask_errors_name_the_parameter():
    model = named_model()
    opt = MaskedAdam(model.named_parameters(), backend="reference")
    with pytest.raises(ValueError, match=r"mask for parameter '2\.weight' \(param_groups\[0\]\['params'\]\[2\]\) "
                                         r"has shape \(4, 2\), the parameter has \(2, 4\)"):
        opt.set_masks({"2.weight": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"mask for parameter '0\.bias' .* has dtype torch\.float64"):
        opt.set_masks({model[0].bias: torch.ones(4, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"mask for parameter '0\.bias' .* must be a Tensor, got list"):
        opt.set_masks([None, [1, 1, 1, 1], None, None])
    with pytest.raises(KeyError, match=r"no parameter named '1\.weight'"):
        opt.set_masks({"1.weight": torch.ones(1)})
    with pytest.raises(KeyError, match=r"tensor of shape \(7,\)\) is not a parameter"):
        opt.set_masks({torch.zeros(7): torch.ones(7)})
    with pytest.raises(ValueError, match=r"got 3 masks for 4 parameters"):
        opt.set_masks([None, None, None])
    with pytest.raises(ValueError, match=r"parameter '0\.bias' .* is given twice"):
        opt.set_masks({"0.bias": torch.ones(4), model[0].bias: torch.ones(4)})
    with pytest.raises(TypeError, match=r"got a single Tensor"):
        opt.set_masks(torch.ones(3))
    assert opt.masks() == {}  # a failed set_masks leaves the masks as they were

    unnamed = MaskedSGD([torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)], backend="reference")
    with pytest.raises(ValueError, match=r"mask for parameter param_groups\[0\]\['params'\]\[1\] has shape \(2,\)"):
        unnamed.set_masks([None, torch.ones(2)])
    with pytest.raises(KeyError, match=r"built without parameter names"):
        unnamed.set_masks({"weight": torch.ones(2)})


# A float mask is M itself: NaN, or a value outside [0, 1], is refused at set_masks (a half mask as stored: bf16 1.5).
OUTSIDE = r"has values outside \[0, 1\] "
BAD_VALUES = {
    "nan-float32": (torch.tensor([0.5, math.nan, 0.0, 1.0]), r"contains NaN"),
    "negative-float32": (torch.tensor([0.5, -0.1, 0.0, 1.0]), OUTSIDE + r"\(min -0\.1, max 1\)"),
    "above-one-float32": (torch.tensor([0.5, 1.5, 0.0, 1.0]), OUTSIDE + r"\(min 0, max 1\.5\)"),
    "above-one-bfloat16": (torch.tensor([0.5, 1.5, 0.0, 1.0], dtype=torch.bfloat16), OUTSIDE + r"\(min 0, max 1\.5\)"),
    "negative-float16": (torch.tensor([0.5, -0.25, 0.0, 1.0], dtype=torch.float16), OUTSIDE + r"\(min -0\.25, max 1\)"),
    "nan-bfloat16": (torch.tensor([math.nan, 2.0, -1.0, 0.5], dtype=torch.bfloat16), r"contains NaN"),
    "meta": (torch.ones(4, device="meta"), r"cannot be copied from meta to the parameter's device cpu: Cannot copy "
                                           r"out of meta tensor"),
}


def good_masks(params):
    """A valid mask of each kind for a 4-parameter optimizer (the bad mask goes to parameter 1)."""
    return [torch.rand(params[0].shape), torch.ones(params[1].shape, dtype=torch.bool),
            torch.full(params[2].shape, 128, dtype=torch.uint8), torch.ones(params[3].shape, dtype=torch.bfloat16)]


def assert_masks_unchanged(opt, before):
    after = opt.masks()
    assert list(after) == list(before) and all(after[p] is before[p] for p in before)


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_mask_is_refused_naming_the_parameter_and_leaves_the_masks_as_they_were(case):
    """By name (built from named_parameters) and by index; by set_masks and by load_mask_state_dict; the masks
    given before the bad one are not kept (set_masks replaces all or nothing), nor is the saved mask_mode."""
    bad, message = BAD_VALUES[case]
    model = named_model()
    named = MaskedAdam(model.named_parameters(), backend="reference")
    unnamed = MaskedSGD([p.detach().clone().requires_grad_() for p in model.parameters()], backend="reference")
    for opt, who in ((named, r"parameter '0\.bias' \(param_groups\[0\]\['params'\]\[1\]\)"),
                     (unnamed, r"parameter param_groups\[0\]\['params'\]\[1\]")):
        params = opt.param_groups[0]["params"]
        opt.set_masks(good_masks(params))
        before = opt.masks()
        expected = rf"^mask for {who} {message}"
        given = good_masks(params)
        given[1] = bad
        with pytest.raises(ValueError, match=expected) as info:
            opt.set_masks(given)
        assert "\n" not in str(info.value)
        assert_masks_unchanged(opt, before)
        saved = {"mask_mode": "update", "masks": {0: torch.rand(params[0].shape), 1: bad}}
        with pytest.raises(ValueError, match=expected):
            opt.load_mask_state_dict(saved)
        assert_masks_unchanged(opt, before)
        assert opt.mask_mode == "grad"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_masks_at_the_ends_of_the_range_are_accepted(dtype):
    p = torch.zeros(5, requires_grad=True)
    mask = torch.tensor([0.0, -0.0, 1.0, 0.5, 1.0], dtype=dtype)
    opt = MaskedSGD([p, torch.zeros(0, requires_grad=True)], lr=0.1, masks=[mask, torch.empty(0, dtype=dtype)],
                    backend="reference")
    assert torch.equal(opt.masks()[p], mask)


def test_a_meta_mask_is_kept_for_a_meta_parameter():
    """A meta mask has no values to copy or check, and needs none when its parameter is on meta too."""
    p = torch.zeros(3, device="meta", requires_grad=True)
    mask = torch.ones(3, device="meta")
    stored = MaskedSGD([p], lr=0.1, masks=[mask], backend="reference").masks()[p]
    assert stored.is_meta and stored.shape == mask.shape and stored.dtype == mask.dtype


def test_set_masks_is_all_or_nothing_for_every_error():
    """Errors found before the values are read (an unknown name, a wrong shape after good masks) keep the old masks."""
    model = named_model()
    opt = MaskedAdam(model.named_parameters(), backend="reference")
    opt.set_masks({"0.weight": torch.rand(4, 3)})
    before = opt.masks()
    for masks, error in (({"0.weight": torch.zeros(4, 3), "2.weight": torch.ones(4, 2)}, ValueError),
                         ({"0.weight": torch.zeros(4, 3), "9.weight": torch.ones(1)}, KeyError)):
        with pytest.raises(error):
            opt.set_masks(masks)
        assert_masks_unchanged(opt, before)


@pytest.mark.parametrize("shape", [(1,), (4, 2)])
def test_packed_hard_mask_bits_are_refused_naming_the_parameter(shape):
    """ops.hard_mask(layout="bits") packs 8 elements per int8 byte; even where its shape equals the parameter's (a
    1-element tensor: one byte), the optimizer refuses it by dtype instead of reading a byte as a mask value."""
    scores = torch.rand(shape)
    (bits,) = ops.hard_mask([scores], 0.5, layout="bits")
    param = torch.zeros(bits.shape, requires_grad=True)
    opt = MaskedSGD([param], lr=0.1, backend="reference")
    with pytest.raises(ValueError, match=r"^mask for parameter param_groups\[0\]\['params'\]\[0\] has dtype "
                                         r"torch\.int8 \(packed bits of ops\.hard_mask\(layout='bits'\)\? "
                                         r"use 'bool'\)"):
        opt.set_masks([bits])
    assert opt.masks() == {}


@pytest.mark.parametrize("mask_mode", ["grad", "update"])
@pytest.mark.parametrize("config", ["adam-amsgrad-wd-maximize", "adamw", "sgd-momentum-dampening-wd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_hard_masks_from_the_op_step_as_their_float_0_1_masks(backend, config, mask_mode):
    """BMFT's masks, ops.hard_mask(layout="bool"), on each backend: bit for bit the step of the same masks as float32
    0 / 1 on that backend, and that step within rounding of the reference backend's."""
    ours_cls, _, kw = CONFIGS[config]
    shapes = [(257,), (6, 5, 3), (1,)]
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(s, generator=g) for s in shapes]
    hard = ops.hard_mask(scores, ops.percentile(scores, 50.0))
    assert all(m.dtype == torch.bool and m.shape == s.shape for m, s in zip(hard, scores, strict=True))
    as_float = [m.float() for m in hard]
    runs = {}
    for name, masks, on in (("bool", hard, backend), ("float", as_float, backend),
                            ("reference", as_float, "reference")):
        params = make_params(shapes)
        runs[name] = ours_cls(params, **kw, masks=masks, mask_mode=mask_mode, backend=on)
        run(runs[name], params, make_grads(shapes, 3))
    assert_matches_torch(runs["bool"], runs["float"], dict(rtol=0, atol=0), "bool vs float 0/1")
    assert_matches_torch(runs["bool"], runs["reference"], FP32_TOL, "bool vs the reference")


def test_masks_list_spans_param_groups_and_takes_the_parameters_layout():
    conv = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.zeros(4, requires_grad=True)
    mask = torch.rand(4, 3, 2, 2)
    bias_mask = torch.ones(4, dtype=torch.bool)
    opt = MaskedSGD([{"params": [bias]}, {"params": [conv], "lr": 0.5}], lr=0.1, masks=[bias_mask, mask],
                    backend="reference")
    stored = opt.masks()
    assert stored[bias] is bias_mask or stored[bias].data_ptr() == bias_mask.data_ptr()  # no copy when it fits
    assert stored[conv].stride() == conv.stride() and torch.equal(stored[conv], mask)
    opt.set_masks({conv: mask.to(torch.uint8)})
    assert list(opt.masks()) == [conv]
    opt.set_masks(None)
    assert opt.masks() == {}


@pytest.mark.parametrize("backend", ADAM_BACKENDS)
def test_masks_survive_deepcopy_and_pickle(backend):
    params = make_params([(33,), (5,)])
    masks = [soft_mask((33,), "float32", 0), None]
    opt = MaskedAdam(params, lr=0.1, masks=masks, mask_mode="update", backend=backend)
    grads = make_grads([(33,), (5,)], 4)
    run(opt, params, grads[:2])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        cparams = clone.param_groups[0]["params"]
        assert clone.mask_mode == "update" and clone.backend == backend
        assert list(clone.masks()) == [cparams[0]] and torch.equal(clone.masks()[cparams[0]], masks[0])
        run(clone, cparams, grads[2:])
        assert clone.state[cparams[0]]["step"].item() == 4
    run(opt, params, grads[2:])
    torch.testing.assert_close(cparams[0], params[0], rtol=0, atol=0)


def test_mask_state_dict_round_trip_and_errors():
    params = make_params([(3,), (2, 2), (4,)])
    masks = {params[0]: torch.tensor([1.0, 0.0, 0.5]), params[2]: torch.tensor([True, False, True, True])}
    opt = MaskedSGD(params, masks=masks, mask_mode="update", backend="reference")
    saved = opt.mask_state_dict()
    assert saved["mask_mode"] == "update" and sorted(saved["masks"]) == [0, 2]
    assert "masks" not in str(opt.state_dict())  # masks stay out of torch's state_dict
    other = MaskedSGD(clone_params(params), backend="reference")
    other.load_mask_state_dict(saved)
    assert other.mask_mode == "update"
    got = other.mask_state_dict()["masks"]
    assert sorted(got) == [0, 2] and all(torch.equal(got[i], saved["masks"][i]) for i in got)
    with pytest.raises(KeyError, match=r"index 3 is not a parameter index \(0\.\.2\)"):
        other.load_mask_state_dict({"mask_mode": "grad", "masks": {3: torch.ones(1)}})
    with pytest.raises(ValueError, match=r"mask for parameter param_groups\[0\]\['params'\]\[1\] has shape \(3,\)"):
        other.load_mask_state_dict({"mask_mode": "grad", "masks": {1: torch.ones(3)}})
    with pytest.raises(KeyError, match=r"lacks \['mask_mode'\]"):
        other.load_mask_state_dict({"masks": {}})


# ---- properties ----------------------------------------------------------------------------------------------------

VALUES = st.floats(-100, 100, width=32, allow_subnormal=False)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_masked_steps_match_their_torch_oracles(backend, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 19), min_size=1, max_size=3), label="shape"))
    config = data.draw(st.sampled_from(sorted(CONFIGS)), label="config")
    mode = data.draw(st.sampled_from(["grad", "update"]), label="mode")
    kind = data.draw(st.sampled_from(["float32", "bool", "uint8"]), label="mask dtype")
    steps = data.draw(st.integers(1, 4), label="steps")
    ours_cls, torch_cls, kw = CONFIGS[config]
    theta = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=VALUES), label="theta"))
    grads = [[torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=VALUES), label="grad"))]
             for _ in range(steps)]
    mask = soft_mask(shape, kind, seed=data.draw(st.integers(0, 2**16), label="mask seed"))
    p, q = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    ours = ours_cls([p], **kw, masks=[mask], mask_mode=mode, backend=backend)
    theirs = torch_cls([q], **kw)
    oracle = torch_step_masked_update if mode == "update" else torch_step_masked_grad
    for step_grads in grads:
        p.grad = step_grads[0].clone()
        ours.step()
        oracle(theirs, [q], step_grads, [mask])
    tol = dict(rtol=1e-5, atol=1e-5 * (1 + float(theta.abs().max())))
    assert_matches_torch(ours, theirs, tol, config)
    if mode == "update":
        out = mask_values(mask) == 0
        assert torch.equal(p.detach()[out], theta[out])
