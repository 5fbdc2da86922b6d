"""MaskedAdam, MaskedAdamW and MaskedSGD driven by torch's own optimizer test database
(torch.testing._internal.common_optimizers.optim_db), against torch.optim on the same inputs, on every backend.

- Inputs: every ``optim_inputs_func(device="cpu", dtype)`` entry of Adam, AdamW and SGD (5, 5 and 9), in float32,
  float64 and bfloat16, without a mask and with an all-ones mask ("grad" mode: M ⊙ g = g, so the step must be
  torch's), a few steps on a small parameter set with gradients from a fixed generator; the parameters and every
  state tensor are compared. bfloat16's oracle is torch on float32 copies rounded to bfloat16 after every step (the
  arithmetic of our kernels and of torch's fused optimizers; tests/test_optim.py says why not torch on bf16).
- The same inputs with each implementation flag torch sets for CPU (fused, differentiable: 10, 10 and 18): fused
  against torch's fused optimizer; differentiable=True is refused as documented, naming the option.
- Error inputs: every ``optim_error_inputs_func(device="cpu", dtype)`` entry (12, 12 and 7) must raise (or warn)
  torch's exception type with torch's message, checked against torch's regex and against torch's own message.

Nothing is skipped here: what torch runs only on other devices its functions leave out for device="cpu" already
(for Adam and AdamW, 5 capturable inputs and 2 error inputs of fused CUDA kernels each; no foreach variants, torch
having no foreach kernels for CPU). The Triton interpreter runs the same inputs with fewer steps (it is slow per
launch, not per element).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from conftest import op_backends
from test_optim import (
    FP32_TOL,
    HALF_TOL,
    assert_matches_half_shadow,
    assert_matches_torch,
    clone_params,
    half_shadow,
    half_shadow_steps,
)
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD

OURS = {torch.optim.Adam: MaskedAdam, torch.optim.AdamW: MaskedAdamW, torch.optim.SGD: MaskedSGD}
INFOS = [info for info in optim_db if info.optim_cls in OURS]
BACKENDS = tuple(b for b in op_backends("masked_adam_") if b in op_backends("masked_sgd_"))

# A weight, a bias and a one-element tensor (a vector width's remainder on every backend).
SHAPES = [(3, 5), (5,), (1,)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
TOLS = {torch.float32: FP32_TOL, torch.float64: dict(rtol=1e-12, atol=1e-14), **HALF_TOL}


def steps(backend: str) -> int:
    return 2 if backend == "triton" else 4


def db_inputs():
    for info in INFOS:
        for dtype_id, dtype in DTYPES.items():
            for oi in info.optim_inputs_func(device="cpu", dtype=dtype):
                assert oi.params is None  # the database leaves the parameters to the test
                yield pytest.param(info.optim_cls, oi.kwargs, dtype, id=f"{info.name}-{oi.desc}-{dtype_id}")


def db_flagged_inputs():
    """torch's inputs with one implementation flag set (fused or differentiable; foreach has no CPU kernels, so
    torch adds no foreach variant for device="cpu"), as torch's own test_optim builds them."""
    for info in INFOS:
        for oi in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info):
            flags = [flag for flag in ("foreach", "fused", "differentiable") if oi.kwargs.get(flag)]
            if flags:
                yield pytest.param(info.optim_cls, oi.kwargs, id=f"{info.name}-{oi.desc}")


def db_error_inputs():
    for info in INFOS:
        for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            yield pytest.param(info.optim_cls, ei, id=f"{info.name}-{ei.optimizer_error_input.desc}")


def grads_for(params, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(n)]


def params_at_start(dtype):
    """The parameters every run starts from: made once for our optimizer and again for torch's."""
    gen = torch.Generator().manual_seed(0)
    return clone_params([torch.randn(s, generator=gen).to(dtype) for s in SHAPES])


@pytest.mark.parametrize("mask", ["none", "ones"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls, kwargs, dtype", list(db_inputs()))
def test_torch_db_input_matches_torch(torch_cls, kwargs, dtype, backend, mask):
    check_against_torch(torch_cls, kwargs, dtype, backend, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls, kwargs", list(db_flagged_inputs()))
def test_torch_db_input_with_an_implementation_flag(torch_cls, kwargs, backend):
    """torch's inputs with the implementation flags it supports on CPU (fused, differentiable): fused=True takes
    torch's fused optimizer as the oracle (``step`` a float32 tensor); differentiable=True is refused, as
    documented (docs/optim.md), with the error naming the option."""
    if kwargs.get("differentiable"):
        with pytest.raises(ValueError, match=r"does not support differentiable=True \(param_groups\[0\]\)"):
            OURS[torch_cls](params_at_start(torch.float32), **copy.deepcopy(kwargs), backend=backend)
    else:
        check_against_torch(torch_cls, kwargs, torch.float32, backend, "none")


def check_against_torch(torch_cls, kwargs, dtype, backend, mask):
    """A few steps of our optimizer and of torch's on the same parameters and gradients; every tensor compared."""
    params = params_at_start(dtype)
    masks = None if mask == "none" else [torch.ones(s) for s in SHAPES]
    ours = OURS[torch_cls](params, **copy.deepcopy(kwargs), masks=masks, backend=backend)
    grads = grads_for(params, steps(backend))
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        ours.step()
    if dtype == torch.bfloat16:
        shadow, theirs, dtypes = half_shadow(torch_cls, copy.deepcopy(kwargs), params_at_start(dtype))
        half_shadow_steps(theirs, shadow, dtypes, grads)
        assert_matches_half_shadow(ours, params, theirs, shadow, TOLS[dtype])
        return
    ref_params = params_at_start(dtype)
    theirs = torch_cls(ref_params, **copy.deepcopy(kwargs))
    for step_grads in grads:
        for p, g in zip(ref_params, step_grads, strict=True):
            p.grad = g.clone()
        theirs.step()
    assert_matches_torch(ours, theirs, TOLS[dtype], f"{torch_cls.__name__} {kwargs}")


def raised_or_warned(fn, error_input):
    """What torch's optimizer does on the error input: the exception it raises, or the warning it gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the oracle's own exception, whatever it is
            return exc
    return next(w.message for w in caught if isinstance(w.message, error_input.error_type))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls, error_input", list(db_error_inputs()))
def test_torch_db_error_input_raises_torchs_error(torch_cls, error_input, backend):
    oi = error_input.optimizer_error_input

    def construct(cls, **extra):
        return cls(oi.params, **copy.deepcopy(oi.kwargs), **extra)

    if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
        def attempt(cls, **extra):
            opt = construct(cls, **extra)
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.ones_like(p)
            opt.step()
    else:
        attempt = construct
    expected = raised_or_warned(lambda: attempt(torch_cls), error_input)
    assert isinstance(expected, error_input.error_type) and re.search(error_input.error_regex, str(expected))
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex) as caught:
            attempt(OURS[torch_cls], backend=backend)
        assert str(expected) in [str(w.message) for w in caught]
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex) as info:
            attempt(OURS[torch_cls], backend=backend)
        assert str(info.value) == str(expected)
