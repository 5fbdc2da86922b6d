"""Pure-PyTorch reference of every per-parameter op in fastmask.

This module is two things at once: the fallback backend (it runs anywhere torch runs) and the oracle every fused
kernel is tested against. It is written for clarity, one tensor at a time, in float32 "opmath" for half-precision
inputs (as torch's fused optimizers do), and rounds results back to the storage dtype.

Every function here has the same signature as the fused op of the same name (``torch.ops.fastmask.<name>`` and
``fastmask.kernels.<stem>.<name>``; the op table :mod:`fastmask.ops.table` lists them), so :mod:`fastmask.ops` can
swap them freely. Where the papers' code computes an op, the reference computes it the same way (the percentile
concatenates and calls ``np.percentile``; the optimizer steps go tensor by tensor), so it is also what the benchmarks
call the ``reference`` provider.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastmask.ops.radix import check_arguments, describe, key_bits

NORM_EPS = 1e-10
HARD_MASK_LAYOUTS = ("bool", "bits")  # hard_mask's outputs: a bool mask, or packed bits (int8; see hard_mask)


def fisher_accumulate_(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], grad_bias: Sequence[Tensor], grad_loss: Sequence[Tensor]
) -> None:
    """Diagonal Fisher accumulation, in place: I_b += g_b², I_l += g_l² (SWiFT Eqs. 7-8, docs/algorithm.md §3).

    The importances are float32 accumulators; gradients of any float dtype are squared in float32.
    """
    for ib, il, gb, gl in zip(imp_bias, imp_loss, grad_bias, grad_loss, strict=True):
        ib.add_(gb.float().square())
        il.add_(gl.float().square())


def minmax_normalize(x: Tensor, eps: float = NORM_EPS, bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-tensor min-max normalisation with SWiFT's guard (docs/algorithm.md §4).

    Norm(x) = (x − min x) / (max x − min x + eps); if max x == min x the raw x is returned, as the reference does.
    ``bounds`` = (min, max) of the whole tensor when ``x`` is only a piece of it (a shard on one rank).
    """
    x = x.float()
    if bounds is None:
        if x.numel() == 0:
            return x
        bounds = x.min(), x.max()
    lo, hi = bounds
    if bool(hi == lo):
        return x
    return (x - lo) / ((hi - lo) + eps)


def check_bounds(op: str, bounds: Tensor | None, n: int) -> None:
    """Raise (one line, naming ``bounds``) unless ``bounds`` is None or a float32 tensor of shape [4, n]."""
    if bounds is not None and (bounds.dtype != torch.float32 or tuple(bounds.shape) != (4, n)):
        raise ValueError(f"{op}: bounds (shape {list(bounds.shape)}, dtype {bounds.dtype}) must be a float32 tensor "
                         f"of shape [4, {n}]: rows lo_b, hi_b, lo_l, hi_l, one column per tensor")


def soft_mask(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], eps: float = NORM_EPS, apply_tanh: bool = True,
    bounds: Tensor | None = None,
) -> list[Tensor]:
    """SWiFT soft mask per tensor (SWiFT Eq. 9, docs/algorithm.md §4): M = tanh(Norm(I_b) / (Norm(I_l) + eps)).

    With ``apply_tanh=False`` it returns the raw ratio R = Norm(I_b) / (Norm(I_l) + eps), BMFT's score (BMFT Eq. 3)
    that the global percentile thresholds. Masks are float32.

    ``bounds``: a float32 [4, n] tensor whose column i is (min I_b, max I_b, min I_l, max I_l) of the whole tensors
    that ``imp_bias[i]`` and ``imp_loss[i]`` are pieces of (a shard on one rank, fastmask.parallel.fsdp); Norm then
    uses those instead of each piece's own min / max. A NaN in them makes that mask NaN. None: each tensor's own.
    """
    check_bounds("soft_mask", bounds, len(imp_bias))
    out = []
    for i, (ib, il) in enumerate(zip(imp_bias, imp_loss, strict=True)):
        if ib.shape != il.shape:
            raise ValueError(f"soft_mask: importance shapes differ: {tuple(ib.shape)} vs {tuple(il.shape)}")
        bounds_b = bounds_l = None
        if bounds is not None:
            bounds_b, bounds_l = (bounds[0, i], bounds[1, i]), (bounds[2, i], bounds[3, i])
        r = minmax_normalize(ib, eps, bounds_b) / (minmax_normalize(il, eps, bounds_l) + eps)
        out.append(torch.tanh(r) if apply_tanh else r)
    return out


def soft_mask_(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], eps: float = NORM_EPS, apply_tanh: bool = True,
    bounds: Tensor | None = None,
) -> None:
    """:func:`soft_mask` written into ``imp_bias`` (float32 tensors) instead of new tensors: the importances are
    usually dropped once the mask is built, so this saves a parameter-sized buffer. Every mask is computed from the
    inputs as they were before any write."""
    for i, b in enumerate(imp_bias):
        if b.dtype != torch.float32:
            raise ValueError(f"soft_mask_: imp_bias[{i}] has dtype {b.dtype}; it must be float32 to hold its mask")
    check_bounds("soft_mask_", bounds, len(imp_bias))
    for b, m in zip(imp_bias, soft_mask(imp_bias, imp_loss, eps, apply_tanh, bounds), strict=True):
        b.copy_(m)


def _numpy_view(t: Tensor) -> np.ndarray:
    """The array numpy would see for ``t``: bf16 has no numpy dtype and is widened (exactly) to float32."""
    t = t.detach().cpu().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def percentile(tensors: Sequence[Tensor], q: float, method: str = "linear") -> Tensor:
    """The q-th percentile of all elements of ``tensors`` together, as ``np.percentile`` gives it (docs/algorithm.md
    §4, BMFT).

    This is the papers' way: concatenate every tensor into one host copy and call ``np.percentile``. Returns a 0-d
    float64 tensor. NaN anywhere raises, naming the tensor.
    """
    check_arguments(tensors, q, method)
    arrays = [_numpy_view(t) for t in tensors]
    for i, a in enumerate(arrays):
        if np.isnan(a).any():
            raise ValueError(f"percentile: tensor {i} (shape {tuple(tensors[i].shape)}) contains NaN")
    flat = np.concatenate(arrays) if arrays else np.empty(0)
    if flat.size == 0:
        raise ValueError("percentile: no elements")
    return torch.tensor(float(np.percentile(flat, q, method=method)), dtype=torch.float64)


def _order_keys(t: Tensor) -> np.ndarray:
    """The order keys of ``t``'s elements (csrc/order_keys.h): bits | sign bit for a clear sign bit, ~bits
    otherwise, so that x < y implies key(x) < key(y) for non-NaN values (-0.0 just below +0.0); as uint64."""
    width = key_bits(t.dtype)
    as_int = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    bits = t.detach().cpu().contiguous().reshape(-1).view(as_int).numpy().view(f"u{width // 8}").astype(np.uint64)
    sign = np.uint64(1 << (width - 1))
    full = np.uint64((1 << width) - 1)
    return np.where(bits & sign, ~bits & full, bits | sign)


def radix_histogram(tensors: Sequence[Tensor], prefixes: Sequence[int], prefix_bits: int,
                    digit_bits: int) -> Tensor:
    """One pass of the percentile's radix selection (:mod:`fastmask.ops.radix`): int64 counts of shape
    [len(prefixes), 2^digit_bits], row p binning the elements whose top ``prefix_bits`` order-key bits equal
    ``prefixes[p]`` by their next ``digit_bits`` bits. The first pass (``prefix_bits == 0``) reads every element and
    raises on NaN, naming the tensor. Keys as in csrc/order_keys.h; counts on the CPU."""
    op = "fastmask.radix_histogram"
    if not tensors:
        raise ValueError(f"{op}: expected at least one tensor, got an empty list")
    check_arguments(tensors, 50.0, "linear")
    width = key_bits(tensors[0].dtype)
    if not 1 <= digit_bits <= 16:
        raise ValueError(f"{op}: digit_bits must be in [1, 16], got {digit_bits}")
    if not (prefix_bits >= 0 and prefix_bits + digit_bits <= width):
        raise ValueError(f"{op}: prefix_bits + digit_bits must be <= {width} (the key width of this dtype), got "
                         f"{prefix_bits} + {digit_bits}")
    if len(prefixes) not in (1, 2):
        raise ValueError(f"{op}: expected 1 or 2 prefixes, got {len(prefixes)}")
    if prefix_bits == 0 and len(prefixes) != 1:
        raise ValueError(f"{op}: with prefix_bits=0 there is one histogram; pass prefixes=[0]")
    for p in prefixes:
        if not 0 <= p < (1 << prefix_bits):
            raise ValueError(f"{op}: prefix {p} does not fit in prefix_bits={prefix_bits}")
    if prefix_bits == 0:
        for i, t in enumerate(tensors):
            if torch.isnan(t).any():
                raise ValueError(f"{op}: {describe(i, t)} contains NaN; np.percentile would return nan and every "
                                 "hard mask would be empty. Replace the NaNs (e.g. torch.nan_to_num) or find where "
                                 "they come from.")
    keys = np.concatenate([_order_keys(t) for t in tensors])
    digit = (keys >> np.uint64(width - prefix_bits - digit_bits)) & np.uint64((1 << digit_bits) - 1)
    top = keys >> np.uint64(width - prefix_bits) if prefix_bits else np.zeros_like(keys)
    out = np.stack([np.bincount(digit[top == np.uint64(p)].astype(np.int64), minlength=1 << digit_bits)
                    for p in prefixes])
    return torch.from_numpy(out.astype(np.int64))


def hard_mask(
    tensors: Sequence[Tensor], threshold: float, inclusive: bool = False, layout: str = "bool"
) -> list[Tensor]:
    """BMFT hard mask (BMFT Eq. 4, docs/algorithm.md §4): M = 1[x > threshold] (``inclusive``: x >= threshold).

    ``layout``: "bool", the tensor's shape (the hard mask the masked optimizers take); or "bits", one bit per element
    packed into a flat int8 tensor of ceil(n / 8) bytes, bit i of byte j being element 8j + i of the flattened
    tensor (``np.packbits(bitorder="little")`` of the bool mask, an eighth of its bytes, for storing masks). The
    bytes are int8 because uint8 means a quantised soft mask (M = value / 255) to the optimizers, which refuse int8;
    ``m.view(torch.uint8)`` gives numpy's bytes.
    """
    if layout not in HARD_MASK_LAYOUTS:
        raise ValueError(f"hard_mask: layout must be one of {HARD_MASK_LAYOUTS}, got {layout!r}")
    out = []
    for t in tensors:
        m = t >= threshold if inclusive else t > threshold
        if layout == "bits":
            bits = np.packbits(m.cpu().reshape(-1).numpy(), bitorder="little")
            m = torch.from_numpy(bits).view(torch.int8).to(t.device)
        out.append(m)
    return out


def mask_as_float(mask: Tensor | None) -> Tensor | None:
    """A mask of any supported storage as float32 values in [0, 1]: float32 / bf16 / fp16 as is, uint8 as m / 255
    (quantised soft mask), bool as 0 / 1 (hard mask)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.float()
    if mask.dtype == torch.uint8:
        return mask.float() / 255.0
    if mask.is_floating_point():
        return mask.float()
    raise TypeError(f"mask dtype {mask.dtype} is not supported (float32, bfloat16, float16, uint8 or bool)")


def _opmath(t: Tensor) -> Tensor:
    """``t`` in the dtype the optimizer steps compute in: float64 for float64 storage, else float32 (as torch)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _unscaled_grad(grad: Tensor, grad_scale: Tensor | None, maximize: bool) -> Tensor:
    g = _opmath(grad)
    if grad_scale is not None:
        g = g / grad_scale.float()
    return -g if maximize else g


def _on_host(t: Tensor) -> bool:
    """True when reading ``t``'s value in Python costs no device synchronisation and no graph break: a CPU tensor
    outside torch.compile. Otherwise the steps keep such values as tensors (torch.optim's capturable path)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _skip_step(found_inf: Tensor | None) -> bool | Tensor:
    """Whether GradScaler's ``found_inf`` skips the step: a bool, or a bool tensor when it is not read on the host."""
    if found_inf is None:
        return False
    if _on_host(found_inf):
        return bool(found_inf.item() != 0)
    return found_inf.reshape(()) != 0


def _kept(mask: Tensor | None, mask_update: bool, skip: bool | Tensor) -> Tensor | None:
    """Where parameter and state keep their values: M == 0 in "update" mode, everywhere on a skipped step whose
    found_inf stayed a tensor; None if nowhere."""
    keep = mask == 0 if mask is not None and mask_update else None
    if isinstance(skip, Tensor):
        keep = skip if keep is None else keep | skip
    return keep


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
    """Masked Adam / AdamW step, in place (torch.optim.Adam's algorithm; docs/algorithm.md §5, §8.9).

    With t the (already incremented) step, g the gradient (divided by ``grad_scale``, negated if ``maximize``):

        mask_update=False ("grad" mode, the papers'): g ← M ⊙ g, then the plain Adam step:
            θ ← θ(1 − lr·λ) if decoupled else g ← g + λθ
            m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;  v̂max ← max(v̂max, v) if amsgrad
            θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)
        mask_update=True ("update" mode): the unmasked step is computed, then only entries with M ≠ 0 take it,
            θ ← θ + M ⊙ Δθ (Δθ includes decoupled decay) and m, v, v̂max are written only where M ≠ 0,
            so an entry with M = 0 keeps its parameter and state bit for bit.

    A ``found_inf`` that is non-zero skips the whole step (the caller restores the step counters), as torch's fused
    Adam does with GradScaler. Steps and found_inf on a device (capturable, fused) or under torch.compile are used
    as tensors, as torch's capturable Adam uses them: no host synchronisation; so is a float64 tensor ``lr``.
    """
    skip = _skip_step(found_inf)
    if skip is True:
        return
    for i, p in enumerate(params):
        step = float(state_steps[i].item()) if _on_host(state_steps[i]) else state_steps[i].double()
        mask = mask_as_float(masks[i])
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        if mask is not None and not mask_update:
            g = g * mask
        theta = _opmath(p)
        decayed = theta
        if weight_decay != 0:
            if decoupled_weight_decay:
                decayed = theta * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * theta
        m = _opmath(exp_avgs[i]).lerp(g, 1 - beta1)
        v = _opmath(exp_avg_sqs[i]) * beta2 + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            vmax = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            denom = vmax.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        new_theta = decayed - (lr / bias_correction1) * m / denom
        if mask is not None and mask_update:
            new_theta = theta + mask * (new_theta - theta)
        keep = _kept(mask, mask_update, skip)
        if keep is not None:
            new_theta = torch.where(keep, theta, new_theta)
            m = torch.where(keep, _opmath(exp_avgs[i]), m)
            v = torch.where(keep, _opmath(exp_avg_sqs[i]), v)
            if amsgrad:
                vmax = torch.where(keep, _opmath(max_exp_avg_sqs[i]), vmax)
        p.copy_(new_theta)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if amsgrad:
            max_exp_avg_sqs[i].copy_(vmax)


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
    """Masked SGD step, in place (torch.optim.SGD's algorithm; docs/algorithm.md §5, §8.10).

        mask_update=False ("grad" mode, the papers'): g ← M ⊙ g, then
            d = g + λθ;  b ← d on the first step, else b ← μ b + (1 − τ) d;  d ← d + μ b if nesterov else b
            θ ← θ − lr · d
        mask_update=True ("update" mode): θ ← θ − lr · M ⊙ d and b is written only where M ≠ 0 (0 on a first step),
            so weight decay and momentum no longer move masked-out entries.

    ``momentum_buffers`` is empty when momentum == 0. ``first_step`` says the buffers are uninitialised. found_inf
    on a device or under torch.compile is used as a tensor, as in :func:`masked_adam_`.
    """
    skip = _skip_step(found_inf)
    if skip is True:
        return
    for i, p in enumerate(params):
        mask = mask_as_float(masks[i])
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        if mask is not None and not mask_update:
            g = g * mask
        theta = _opmath(p)
        keep = _kept(mask, mask_update, skip)
        d = g + weight_decay * theta if weight_decay != 0 else g
        if momentum != 0:
            old = _opmath(momentum_buffers[i])
            buf = d.clone() if first_step else old * momentum + (1 - dampening) * d
            if keep is not None:
                buf = torch.where(keep, torch.zeros_like(buf) if first_step else old, buf)
            momentum_buffers[i].copy_(buf)
            d = d + momentum * buf if nesterov else buf
        if mask is not None and mask_update:
            new_theta = theta - lr * (mask * d)
        else:
            new_theta = theta - lr * d
        if keep is not None:
            new_theta = torch.where(keep, theta, new_theta)
        p.copy_(new_theta)
