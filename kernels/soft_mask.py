"""SWiFT's soft mask in Triton (SWiFT Eq. 9, docs/algorithm.md §4), two launches for the whole tensor list:

1. ``_minmax_kernel``: each program reduces one block of one tensor to the min and max of both importances and
   folds them into the tensor's slot of a float32 [4, T] buffer with atomic min / max (a NaN sets a per-tensor
   flag instead, since atomics order NaN arbitrarily; torch's min / max propagate it).
2. ``_write_kernel``: each program reads its tensor's bounds and writes, for one block,

       Norm(x) = (x − lo) / ((hi − lo) + eps), or x itself when hi == lo,
       R = Norm(I_b) / (Norm(I_l) + eps),   M = tanh(R) (``apply_tanh``) or R,

   in float32 and in the reference's order (subtract, add eps, IEEE-rounded division ``tl.div_rn``: a plain ``/``
   is approximate on NVIDIA GPUs), so R matches ``fastmask.ops.reference.soft_mask`` bit for bit.

Given ``bounds`` (float32 [4, T], rows lo_b, hi_b, lo_l, hi_l: the min / max of the whole tensors the given ones are
pieces of), the first launch is skipped: the buffer is the given bounds, and a tensor's NaN flag is set when one of
its bounds is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from fastmask.util.profiling import phase

from .multi_tensor import block_lanes, block_size, describe, interpreting, launch_table, same_dense_layout


@triton.jit
def tanh_f32(x, INTERPRET: tl.constexpr):
    """tanh in float32: libdevice's on a GPU. The interpreter has neither ``tl.tanh`` nor libdevice, so there it is
    an odd polynomial below |x| = 0.625 (Cephes' tanhf) and 1 − 2 / (e^{2|x|} + 1) above, within 2 ulp; unlike
    2·sigmoid(2x) − 1 it keeps full relative accuracy for small masks."""
    if INTERPRET:
        a = tl.abs(x)
        s = tl.minimum(a, 0.625)  # the polynomial's own range: no overflow where its result is not used
        z = s * s
        p = z * -5.70498872745e-3 + 2.06390887954e-2
        p = p * z - 5.37397155531e-2
        p = p * z + 1.33314422036e-1
        p = p * z - 3.33332819422e-1
        small = p * z * s + s
        large = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(a, 10.0)) + 1.0)
        t = tl.where(a < 0.625, small, large)
        t = tl.where(x < 0, -t, t)
        return tl.where(x != x, x, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def _minmax_kernel(ib_ptrs, il_ptrs, numels, block_tensor, block_start, bounds, nan_flags, n_tensors,
                   BLOCK: tl.constexpr):
    t, offs, mask = block_lanes(block_tensor, block_start, numels, BLOCK)
    ib = tl.load(ib_ptrs + t).to(tl.pointer_type(tl.float32))
    il = tl.load(il_ptrs + t).to(tl.pointer_type(tl.float32))
    b = tl.load(ib + offs, mask=mask, other=float("nan"))
    l = tl.load(il + offs, mask=mask, other=float("nan"))
    inf = float("inf")
    tl.atomic_min(bounds + t, tl.min(tl.where(mask & (b == b), b, inf), axis=0))
    tl.atomic_max(bounds + n_tensors + t, tl.max(tl.where(mask & (b == b), b, -inf), axis=0))
    tl.atomic_min(bounds + 2 * n_tensors + t, tl.min(tl.where(mask & (l == l), l, inf), axis=0))
    tl.atomic_max(bounds + 3 * n_tensors + t, tl.max(tl.where(mask & (l == l), l, -inf), axis=0))
    nans = tl.sum((mask & ((b != b) | (l != l))).to(tl.int32), axis=0)
    tl.atomic_or(nan_flags + t, (nans > 0).to(tl.int32))


@triton.jit
def _norm(x, lo, hi, eps):
    """Min-max normalisation with the max == min guard (the raw x), in the reference's arithmetic order."""
    same = hi == lo
    lo_or_0 = tl.where(same, 0.0, lo)
    den = tl.where(same, 1.0, (hi - lo) + eps)
    return tl.div_rn(x - lo_or_0, den)  # IEEE division: a plain / is approximate (2 ulp) on NVIDIA GPUs


@triton.jit
def _write_kernel(ib_ptrs, il_ptrs, out_ptrs, numels, block_tensor, block_start, bounds, nan_flags, n_tensors, eps,
                  APPLY_TANH: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = block_lanes(block_tensor, block_start, numels, BLOCK)
    ib = tl.load(ib_ptrs + t).to(tl.pointer_type(tl.float32))
    il = tl.load(il_ptrs + t).to(tl.pointer_type(tl.float32))
    out = tl.load(out_ptrs + t).to(tl.pointer_type(tl.float32))
    b = tl.load(ib + offs, mask=mask, other=0.0)
    l = tl.load(il + offs, mask=mask, other=0.0)
    nb = _norm(b, tl.load(bounds + t), tl.load(bounds + n_tensors + t), eps)
    nl = _norm(l, tl.load(bounds + 2 * n_tensors + t), tl.load(bounds + 3 * n_tensors + t), eps)
    r = tl.div_rn(nb, nl + eps)
    if APPLY_TANH:
        r = tanh_f32(r, INTERPRET)
    r = tl.where(tl.load(nan_flags + t) != 0, float("nan"), r)  # torch's min / max propagate NaN
    tl.store(out + offs, r, mask=mask)


def _check_pairs(op: str, imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor]) -> None:
    if len(imp_bias) != len(imp_loss):
        raise ValueError(f"{op}: list lengths differ: imp_bias {len(imp_bias)}, imp_loss {len(imp_loss)}")
    device = imp_bias[0].device if imp_bias else None
    for i, (b, l) in enumerate(zip(imp_bias, imp_loss, strict=True)):
        where = f"imp_bias[{i}] ({describe(b)}) and imp_loss[{i}] ({describe(l)})"
        if b.device != device or l.device != device:
            raise ValueError(f"{op} (triton): {where} must be on {device}")
        if b.shape != l.shape:
            raise ValueError(f"{op}: importance shapes differ: {where}")
        if not (b.is_floating_point() and l.is_floating_point()):
            raise ValueError(f"{op}: {where} must be floating point")


def _check_bounds(op: str, bounds: Tensor | None, n: int) -> None:
    if bounds is not None and (bounds.dtype != torch.float32 or tuple(bounds.shape) != (4, n)):
        raise ValueError(f"{op}: bounds (shape {list(bounds.shape)}, dtype {bounds.dtype}) must be a float32 tensor "
                         f"of shape [4, {n}]: rows lo_b, hi_b, lo_l, hi_l, one column per tensor")


def _launch(ib: list[Tensor], il: list[Tensor], out: list[Tensor], eps: float, apply_tanh: bool,
            given: Tensor | None) -> None:
    """The two launches over contiguous float32 ``ib``, ``il``; masks written to ``out`` (which may be ``ib``: each
    element is loaded before it is stored, and the bounds are complete before the first store). ``given``: the
    checked [4, n] bounds, which replace the first launch."""
    device = ib[0].device
    block = block_size()
    table = launch_table([ib, il, out], block, device)
    if table.n_blocks == 0:
        return
    n = len(ib)
    ib_ptrs, il_ptrs, out_ptrs = table.columns
    grid = (table.n_blocks,)
    if given is not None:
        bounds = given.to(device).contiguous().reshape(-1)  # only read: the write kernel never stores to it
        nan_flags = bounds.isnan().reshape(4, n).any(dim=0).to(torch.int32)
    else:
        inf = float("inf")
        bounds = torch.tensor([inf, -inf, inf, -inf], dtype=torch.float32, device=device).repeat_interleave(n)
        nan_flags = torch.zeros(n, dtype=torch.int32, device=device)
        with phase("fastmask.triton.soft_mask.minmax"):
            _minmax_kernel[grid](ib_ptrs, il_ptrs, table.numels, table.block_tensor, table.block_start, bounds,
                                 nan_flags, n, BLOCK=block, enable_fp_fusion=False)
    with phase("fastmask.triton.soft_mask.write"):
        _write_kernel[grid](ib_ptrs, il_ptrs, out_ptrs, table.numels, table.block_tensor, table.block_start, bounds,
                            nan_flags, n, eps, APPLY_TANH=apply_tanh, INTERPRET=interpreting(), BLOCK=block,
                            enable_fp_fusion=False)


def soft_mask(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], eps: float = 1e-10, apply_tanh: bool = True,
    bounds: Tensor | None = None,
) -> list[Tensor]:
    """Per-tensor M = tanh(Norm(I_b) / (Norm(I_l) + eps)), or the raw ratio, in two Triton launches (one with
    ``bounds``; same contract as ``fastmask.ops.reference.soft_mask``). Returns float32 masks of the importances'
    shapes, contiguous."""
    _check_pairs("soft_mask", imp_bias, imp_loss)
    _check_bounds("soft_mask", bounds, len(imp_bias))
    # Importances are float32 accumulators; anything else is read through a contiguous float32 copy, which is what
    # the reference's x.float() computes on too.
    ib = [b.to(torch.float32).contiguous() for b in imp_bias]
    il = [l.to(torch.float32).contiguous() for l in imp_loss]
    out = [torch.empty(b.shape, dtype=torch.float32, device=b.device) for b in ib]
    if ib:
        _launch(ib, il, out, eps, apply_tanh, bounds)
    return out


def soft_mask_(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], eps: float = 1e-10, apply_tanh: bool = True,
    bounds: Tensor | None = None,
) -> None:
    """:func:`soft_mask` written into ``imp_bias`` (dense float32 tensors sharing no memory with each other or
    with ``imp_loss``), as ``fastmask.ops.reference.soft_mask_``."""
    _check_pairs("soft_mask_", imp_bias, imp_loss)
    _check_bounds("soft_mask_", bounds, len(imp_bias))
    il = []
    for i, (b, l) in enumerate(zip(imp_bias, imp_loss, strict=True)):
        if b.dtype != torch.float32 or not same_dense_layout(b, b):  # only a dense tensor matches its own layout
            raise ValueError(f"soft_mask_: imp_bias[{i}] ({describe(b)}) must be a dense float32 tensor to hold its "
                             "mask in place")
        # The kernels walk both by one flat index: I_l in I_b's layout (a channels-last I_b stays channels-last).
        l32 = l.to(torch.float32)
        il.append(l32 if same_dense_layout(b, l32) else torch.empty_like(b).copy_(l32))
    _check_no_shared_memory(list(imp_bias), il)
    if imp_bias:
        _launch(list(imp_bias), il, list(imp_bias), eps, apply_tanh, bounds)


def _check_no_shared_memory(ib: list[Tensor], il: list[Tensor]) -> None:
    """No written tensor (ib[i]) may share memory with another tensor of either list, except il[i] being ib[i]."""
    ranges = []
    for i, (b, l) in enumerate(zip(ib, il, strict=True)):
        if b.numel() == 0:
            continue
        span = (b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
        ranges.append((*span, f"imp_bias[{i}]", True))
        lspan = (l.data_ptr(), l.data_ptr() + l.numel() * l.element_size())
        if lspan != span:
            ranges.append((*lspan, f"imp_loss[{i}]", False))
    ranges.sort()
    widest = None
    for r in ranges:
        if widest is not None and r[0] < widest[1] and (r[3] or widest[3]):
            raise ValueError(f"soft_mask_: {widest[2]} and {r[2]} share memory; the mask is written into imp_bias, "
                             "so give each importance its own tensor")
        if widest is None or r[1] > widest[1]:
            widest = r
