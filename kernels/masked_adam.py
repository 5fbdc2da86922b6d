"""Masked Adam / AdamW step (Triton), one launch per group of same-device, same-dtype tensors.

Same signature and semantics as ``fastmask.ops.reference.masked_adam_`` (the oracle) and the C++ kernel
``torch.ops.fastmask.masked_adam_``: torch.optim.Adam's algorithm (Kingma & Ba, Alg. 1; AdamW's decoupled decay,
Loshchilov & Hutter, Alg. 2) with the mask M of the SWiFT / BMFT step (docs/algorithm.md §5, §8.9):

    g ← g / grad_scale, −g if maximize;  "grad" mode: g ← M·g
    g ← g + λθ (L2)  or  θ' = θ(1 − lr·λ) (decoupled)
    m ← m + (1 − β1)(g − m);  v ← v·β2 + ((1 − β2)·g)·g;  v̂ = max(v̂, v) if amsgrad
    θ_new = θ' − (lr / (1 − β1^t)) · m / (√v̂ / √(1 − β2^t) + eps)
    "update" mode: θ ← θ + M·(θ_new − θ) and m, v, v̂ are written only where M ≠ 0 (M == 0 keeps every bit).

Every program handles a [ROWS, BLOCK] tile, one block of one tensor per row, found through the block and address
tables of ``fastmask.kernels.multi_tensor``. Arithmetic is float32 opmath (float64 for float64 tensors) with IEEE
division and square root and FP contraction disabled, multiply-adds fused only where torch's CPU kernels fuse them,
so results match the C++ kernel. A non-zero ``found_inf`` (read on the device) turns every lane off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt


@triton.jit
def _masked_adam_kernel(
    ptrs_ptr, numels_ptr, coefs_ptr, hyper_ptr, block_tensor_ptr, block_start_ptr, grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, MASK_KIND: tl.constexpr, MASK_TL: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, L2: tl.constexpr, DECOUPLED: tl.constexpr,
    MASK_UPDATE: tl.constexpr, LERP_SMALL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, n, lane = mt.tile_lanes(block_tensor_ptr, block_start_ptr, numels_ptr, found_inf_ptr, HAS_FOUND_INF,
                                     ROWS, BLOCK)
    row = ptrs_ptr + t * 6
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))

    # Python scalars become opmath scalars, as when torch applies them to an opmath tensor.
    beta2 = tl.load(hyper_ptr + 0).to(ACC)
    one_minus_beta2 = tl.load(hyper_ptr + 1).to(ACC)
    eps = tl.load(hyper_ptr + 2).to(ACC)
    wd = tl.load(hyper_ptr + 3).to(ACC)
    decay_factor = tl.load(hyper_ptr + 4).to(ACC)
    lerp_coeff = tl.load(hyper_ptr + 5).to(ACC)
    neg_step_size = -(tl.load(coefs_ptr + 2 * t).to(ACC))
    bc2_sqrt = tl.load(coefs_ptr + 2 * t + 1).to(ACC)

    p_raw = tl.load(p_ptr + offs, mask=lane)
    m_raw = tl.load(m_ptr + offs, mask=lane)
    v_raw = tl.load(v_ptr + offs, mask=lane)
    theta = p_raw.to(ACC)
    grad = tl.load(g_ptr + offs, mask=lane).to(ACC)
    if HAS_SCALE:
        grad = mt.div_ieee(grad, tl.load(grad_scale_ptr).to(ACC), FP64)
    if MAXIMIZE:
        grad = -grad
    if MASK_KIND != 0:
        mask_addr = tl.load(row + 5)
        mval = mt.load_mask(mask_addr, offs, n, MASK_KIND, MASK_TL)
        if not MASK_UPDATE:
            grad = grad * mval.to(ACC)
    if L2:
        grad = tl.fma(theta, wd, grad)  # grad.add(param, alpha=λ)
    decayed = theta
    if DECOUPLED:
        decayed = theta * decay_factor  # param.mul_(1 − lr·λ)
    m_old = m_raw.to(ACC)
    v_old = v_raw.to(ACC)
    if LERP_SMALL:  # torch's lerp: fma(w, g − m, m) for |w| < 0.5, else fma(w − 1, g − m, g)
        m_new = tl.fma(lerp_coeff, grad - m_old, m_old)
    else:
        m_new = tl.fma(lerp_coeff, grad - m_old, grad)
    v_new = tl.fma(one_minus_beta2 * grad, grad, v_old * beta2)  # v.mul_(β2).addcmul_(g, g, value=1 − β2)
    v_hat = v_new
    if AMSGRAD:
        vmax_ptr = tl.load(row + 4).to(tl.pointer_type(DTYPE))
        vmax_raw = tl.load(vmax_ptr + offs, mask=lane)
        vmax_old = vmax_raw.to(ACC)
        v_hat = tl.where((vmax_old != vmax_old) | (vmax_old > v_new), vmax_old, v_new)  # NaN-propagating max
    denom = mt.div_ieee(mt.sqrt_ieee(v_hat, FP64), bc2_sqrt, FP64) + eps
    p_new = decayed + mt.div_ieee(neg_step_size * m_new, denom, FP64)  # param.addcdiv_(m, denom, value=−lr/bc1)

    if MASK_KIND != 0 and MASK_UPDATE:
        has_mask = mask_addr != 0
        keep = has_mask & (mval == 0.0)
        p_out = tl.where(has_mask, theta + mval.to(ACC) * (p_new - theta), p_new)
        tl.store(p_ptr + offs, tl.where(keep, p_raw, mt.to_storage(p_out, DTYPE)), mask=lane)
        tl.store(m_ptr + offs, tl.where(keep, m_raw, mt.to_storage(m_new, DTYPE)), mask=lane)
        tl.store(v_ptr + offs, tl.where(keep, v_raw, mt.to_storage(v_new, DTYPE)), mask=lane)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, tl.where(keep, vmax_raw, mt.to_storage(v_hat, DTYPE)), mask=lane)
    else:
        tl.store(p_ptr + offs, mt.to_storage(p_new, DTYPE), mask=lane)
        tl.store(m_ptr + offs, mt.to_storage(m_new, DTYPE), mask=lane)
        tl.store(v_ptr + offs, mt.to_storage(v_new, DTYPE), mask=lane)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, mt.to_storage(v_hat, DTYPE), mask=lane)


def _bias_corrections(state_steps: Sequence[Tensor], lr: float | Tensor, beta1: float, beta2: float,
                      device: torch.device) -> Tensor:
    """float64 [T, 2]: lr / (1 − β1^t) and (1 − β2^t)^0.5 per tensor, from the (already incremented) steps.

    Host-resident steps (torch.optim's default) with a float lr are read and computed with Python floats exactly as
    torch.optim.Adam does; device-resident steps or a tensor lr (capturable) are computed on the device, without a
    synchronisation.
    """
    for i, s in enumerate(state_steps):
        if s.numel() != 1:
            raise ValueError(f"masked_adam_: state_steps[{i}] must have one element, got shape {tuple(s.shape)}")
    if not isinstance(lr, Tensor) and all(s.device.type == "cpu" for s in state_steps):
        steps = [float(s) for s in state_steps]
        rows = [(lr / (1 - beta1**s), (1 - beta2**s) ** 0.5) for s in steps]
        return torch.tensor(rows, dtype=torch.float64).to(device, non_blocking=True)
    steps = torch.stack([s.reshape(()).to(device) for s in state_steps]).to(torch.float64)
    return torch.stack([lr / (1 - torch.pow(beta1, steps)), (1 - torch.pow(beta2, steps)).pow(0.5)], dim=1)


def masked_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    mask_update: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One masked Adam / AdamW step over a group of same-device, same-dtype tensors, in place (formula above).
    ``lr`` may be a one-element tensor on the device, used there (capturable)."""
    op = "masked_adam_"
    columns = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
               "max_exp_avg_sqs": max_exp_avg_sqs if amsgrad else None}
    launches = mt.plan_optimizer(op, columns, masks)
    if len(state_steps) != len(params):
        raise ValueError(f"{op}: list lengths differ: params {len(params)}, state_steps {len(state_steps)}")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if isinstance(lr, Tensor):
        lr = lr.reshape(()).to(device, torch.float64)
    coefs = _bias_corrections(state_steps, lr, beta1, beta2, device)
    # torch's lerp(m, g, w) with w = 1 − β1 rounded to opmath: fma(w, g − m, m) if |w| < 0.5, else
    # fma(w − 1, g − m, g) with w − 1 computed in opmath.
    w = torch.tensor(1.0 - beta1, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    lerp_small = bool(w.abs() < 0.5)
    lerp_coeff = float(w if lerp_small else w - 1)
    # Rounded to opmath in the kernel, as torch rounds a Python scalar operand.
    decay_factor = 1.0 - lr * weight_decay  # a device tensor when lr is one: spliced in, not cached
    constants = [beta2, 1.0 - beta2, eps, weight_decay, 0.0 if isinstance(lr, Tensor) else decay_factor, lerp_coeff]
    hyper = mt.device_constants(constants, device)
    if isinstance(decay_factor, Tensor):
        hyper = torch.cat([hyper[:4], decay_factor.reshape(1), hyper[5:]])
    mt.launch_optimizer(
        _masked_adam_kernel, op, launches, params, [coefs], hyper, grad_scale, found_inf, AMSGRAD=amsgrad,
        MAXIMIZE=maximize, L2=weight_decay != 0 and not decoupled_weight_decay,
        DECOUPLED=weight_decay != 0 and decoupled_weight_decay, MASK_UPDATE=mask_update, LERP_SMALL=lerp_small,
    )
