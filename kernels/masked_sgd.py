"""Masked SGD step (Triton), one launch per group of same-device, same-dtype tensors.

Same signature and semantics as ``fastmask.ops.reference.masked_sgd_`` (the oracle) and the C++ kernel
``torch.ops.fastmask.masked_sgd_``: torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize) with the
mask M of the SWiFT / BMFT step (docs/algorithm.md §5, §8.10):

    g ← g / grad_scale, −g if maximize;  "grad" mode: g ← M·g
    d = g + λθ;  b ← d on the first step, else b ← μ·b + (1 − τ)·d;  d ← d + μ·b (Nesterov) or b
    θ ← θ − lr·d
    "update" mode: θ ← θ − lr·M·d and b is written only where M ≠ 0 (0 on a first step), so weight decay and
    momentum no longer move masked-out entries, which keep every bit.

The launch plumbing (address and block tables, mask kinds) is ``fastmask.kernels.multi_tensor``; arithmetic follows
torch.optim.SGD's single-tensor step with multiply-adds fused where torch's CPU kernels fuse them (add(alpha=)), so
results match the C++ kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt

# MOMENTUM constexpr: no momentum buffer, a first step (buffer ← d), a running buffer.
_NO_MOMENTUM, _FIRST_STEP, _RUNNING = 0, 1, 2


@triton.jit
def _masked_sgd_kernel(
    ptrs_ptr, numels_ptr, hyper_ptr, block_tensor_ptr, block_start_ptr, grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, MASK_KIND: tl.constexpr, MASK_TL: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, L2: tl.constexpr,
    MASK_UPDATE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, n, lane = mt.tile_lanes(block_tensor_ptr, block_start_ptr, numels_ptr, found_inf_ptr, HAS_FOUND_INF,
                                     ROWS, BLOCK)
    row = ptrs_ptr + t * 4
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))

    lr = tl.load(hyper_ptr + 0).to(ACC)
    wd = tl.load(hyper_ptr + 1).to(ACC)
    momentum = tl.load(hyper_ptr + 2).to(ACC)
    one_minus_dampening = tl.load(hyper_ptr + 3).to(ACC)

    p_raw = tl.load(p_ptr + offs, mask=lane)
    theta = p_raw.to(ACC)
    d = tl.load(g_ptr + offs, mask=lane).to(ACC)
    if HAS_SCALE:
        d = mt.div_ieee(d, tl.load(grad_scale_ptr).to(ACC), FP64)
    if MAXIMIZE:
        d = -d
    keep = offs < 0  # all False
    if MASK_KIND != 0:
        mask_addr = tl.load(row + 3)
        has_mask = mask_addr != 0
        mval = mt.load_mask(mask_addr, offs, n, MASK_KIND, MASK_TL)
        if MASK_UPDATE:
            keep = has_mask & (mval == 0.0)
        else:
            d = d * mval.to(ACC)
    if L2:
        d = tl.fma(theta, wd, d)  # grad.add(param, alpha=λ)
    if MOMENTUM != 0:
        b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
        if MOMENTUM == 1:
            b = d  # torch.clone(grad); masked-out buffers of an update-mode first step start at 0
            zero = mt.to_storage(tl.zeros_like(d), DTYPE)
            tl.store(b_ptr + offs, tl.where(keep, zero, mt.to_storage(b, DTYPE)), mask=lane)
        else:
            b_raw = tl.load(b_ptr + offs, mask=lane)
            b = tl.fma(d, one_minus_dampening, b_raw.to(ACC) * momentum)  # buf.mul_(μ).add_(d, alpha=1 − τ)
            tl.store(b_ptr + offs, tl.where(keep, b_raw, mt.to_storage(b, DTYPE)), mask=lane)
        if NESTEROV:
            d = tl.fma(b, momentum, d)  # grad.add(buf, alpha=μ)
        else:
            d = b
    p_new = tl.fma(d, -lr, theta)  # param.add_(grad, alpha=−lr)
    if MASK_KIND != 0 and MASK_UPDATE:
        p_new = tl.where(has_mask, theta - lr * (mval.to(ACC) * d), p_new)
    tl.store(p_ptr + offs, tl.where(keep, p_raw, mt.to_storage(p_new, DTYPE)), mask=lane)


def masked_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    mask_update: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One masked SGD step over a group of same-device, same-dtype tensors, in place (formula above).
    ``momentum_buffers`` is empty when momentum == 0; ``first_step`` says the buffers are uninitialised. ``lr`` may
    be a one-element tensor on the device, used there (capturable)."""
    op = "masked_sgd_"
    columns = {"params": params, "grads": grads, "momentum_buffers": momentum_buffers if momentum != 0 else None}
    launches = mt.plan_optimizer(op, columns, masks)
    if not params:
        return
    device = params[0].device
    hyper = mt.device_constants([0.0 if isinstance(lr, Tensor) else lr, weight_decay, momentum, 1.0 - dampening],
                                device)
    if isinstance(lr, Tensor):  # spliced in on the device, not cached
        hyper = torch.cat([lr.reshape(1).to(device, torch.float64), hyper[1:]])
    mode = _NO_MOMENTUM if momentum == 0 else _FIRST_STEP if first_step else _RUNNING
    mt.launch_optimizer(
        _masked_sgd_kernel, op, launches, params, [], hyper, grad_scale, found_inf, MOMENTUM=mode,
        NESTEROV=nesterov, MAXIMIZE=maximize, L2=weight_decay != 0, MASK_UPDATE=mask_update,
    )
