"""Shared cases for the masked-optimizer op tests (tests/test_masked_adam.py, tests/test_masked_sgd.py): tensor
shapes, masks of every supported kind, per-dtype tolerances and a state comparison."""

from __future__ import annotations

import torch
from conftest import op_backends
from hypothesis import strategies as st
from torch import Tensor

from fastmask.ops.reference import mask_as_float

STEPS = 20

# The sizes, 1, 33, 4097 and 5x123x123 elements, plus a small 2-D tensor so that "mixed" masks give one
# tensor of every mask kind; all in one multi-tensor call.
SIZES = [(1,), (33,), (4097,), (5, 123, 123), (3, 17)]
# Smaller sets for the invariant tests (the Triton interpreter is slow).
SMALL = [(1,), (33,), (4097,), (3, 17)]
MODES = ("grad", "update")
# Any list of 1 to 4 small shapes of 1 to 3 dimensions, for the property tests.
SHAPES_ST = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


def many_shapes() -> list[tuple[int, ...]]:
    """161 tensors, as many as a ResNet-50 backbone plus a head (53 convs, 106 BN vectors, 2 head tensors), scaled
    down so the Triton interpreter stays quick: a conv and its two BN vectors per group of three."""
    shapes: list[tuple[int, ...]] = []
    for i in range(53):
        c_out, c_in, k = 4 + (i * 7) % 29, 2 + (i * 5) % 17, (1, 3, 7)[i % 3]
        shapes += [(c_out, c_in, k, k), (c_out,), (c_out,)]
    return shapes + [(1, 64), (1,)]


MASK_KINDS = ("float32", "bfloat16", "uint8", "bool", "none", "mixed")
_CYCLE = ("float32", "bfloat16", "uint8", "bool", "none")


def make_mask(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> Tensor | None:
    """A mask with about 30% exact zeros (the entries "update" mode must leave untouched)."""
    if kind == "none":
        return None
    zero = torch.rand(shape, generator=gen) < 0.3
    if kind == "bool":
        return ~zero
    if kind == "uint8":
        return torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8).masked_fill(zero, 0)
    soft = torch.rand(shape, generator=gen).masked_fill(zero, 0.0)
    return soft.to(getattr(torch, kind))


def make_masks(shapes: list[tuple[int, ...]], kind: str, seed: int = 0) -> list[Tensor | None]:
    """Masks of one kind for every shape; "mixed" cycles through all kinds, None included."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [_CYCLE[i % len(_CYCLE)] for i in range(len(shapes))] if kind == "mixed" else [kind] * len(shapes)
    return [make_mask(s, k, gen) for s, k in zip(shapes, kinds, strict=True)]


def ones_mask(shape: tuple[int, ...], kind: str) -> Tensor:
    """An all-ones mask (M = 1 everywhere) stored as ``kind``."""
    if kind == "bool":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "uint8":
        return torch.full(shape, 255, dtype=torch.uint8)
    return torch.ones(shape, dtype=getattr(torch, kind))


def masked_out(mask: Tensor | None) -> Tensor | None:
    """The entries with M == 0."""
    return None if mask is None else mask_as_float(mask) == 0


def randn(shapes: list[tuple[int, ...]], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> list[Tensor]:
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def grad_sequence(shapes: list[tuple[int, ...]], dtype: torch.dtype, steps: int = STEPS,
                  seed: int = 1) -> list[list[Tensor]]:
    """``steps`` lists of standard-normal gradients, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return [randn(shapes, dtype, gen) for _ in range(steps)]


def fused(op: str) -> tuple[str, ...]:
    """The backends of ``op`` that run here (conftest.op_backends) but the reference: those tested against it."""
    return tuple(b for b in op_backends(op) if b != "reference")


def reference_params(op: str, cases: list[tuple]) -> list[tuple]:
    """(backend, *case) for every fused backend of ``op``: every case on C++ (and CUDA), only the "mixed"-mask cases
    (case[1]) on Triton (the interpreter is slow here); "mixed" puts one tensor of every mask kind in one call, so it
    covers them all."""
    return [(b, *case) for b in fused(op) for case in cases if b != "triton" or case[1] == "mixed"]


# Tolerances per storage dtype, relative to each buffer's largest magnitude. float32: fused kernels and the reference
# differ by an ulp here and there (MKL's √ vs IEEE √, fused vs unfused multiply-adds), which 20 steps carry along.
# float16 / bfloat16: one such difference can flip a rounding of the stored value, i.e. one ulp of the dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}


def largest_abs(t: Tensor) -> float:
    """The largest |entry| of ``t`` (0 for an empty tensor)."""
    return float(t.detach().abs().max().double()) if t.numel() else 0.0


def assert_state_close(actual: list[Tensor], expected: list[Tensor], what: str, step: int | None = None,
                       scales: list[float] | None = None) -> None:
    """Every tensor of ``actual`` close to ``expected`` at the tolerance of its dtype, atol scaled by the largest
    expected magnitude, or by ``scales[i]`` where given: the magnitude of the terms a result was summed from, when
    they cancel (θ − lr·d with both large leaves a small θ whose rounding error is an ulp of the terms)."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype}{tuple(a.shape)} vs {e.dtype}"
        tol = TOL[e.dtype]
        scale = max(largest_abs(e), scales[i] if scales is not None else 0.0)
        torch.testing.assert_close(
            a, e, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30),
            msg=lambda m, i=i: f"{what}[{i}] at step {step}: {m}",
        )
