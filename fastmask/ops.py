"""fastmask's per-parameter ops, public and functional.

Each op groups its tensors by (device, dtype), asks fastmask/backend.py which implementation runs that group, and
makes one call per group: the fused backends then cover the group in one launch (Triton) or one parallel region
(C++). Each call sits in an NVTX / profiler range named ``fastmask.<op>``.

The implementations share one signature per op: ``fastmask.reference.<op>``, ``torch.ops.fastmask.<op>`` (C++ /
CUDA) and ``fastmask.kernels.<module>.<op>`` (Triton).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastmask import backend as _backend
from fastmask import reference
from fastmask.profiling import phase

# The Triton module that holds each op's launcher (kernels/<module>.py).
_TRITON_MODULES = {
    "fisher_accumulate_": "fisher",
    "soft_mask": "soft_mask",
    "soft_mask_": "soft_mask",
    "masked_adam_": "masked_adam",
    "masked_sgd_": "masked_sgd",
}


def implementation(op: str, name: str) -> Callable:
    """The callable of backend ``name`` for ``op``."""
    if name == "reference":
        return getattr(reference, op)
    if name in ("cpp", "cuda"):
        return getattr(torch.ops.fastmask, op)
    module = importlib.import_module(f"fastmask.kernels.{_TRITON_MODULES[op]}")
    return getattr(module, op)


def _groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def _pick(seq: Sequence, idx: list[int]) -> list:
    return [seq[i] for i in idx]


def fisher_accumulate_(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    grad_bias: Sequence[Tensor],
    grad_loss: Sequence[Tensor],
    *,
    backend: str | None = None,
) -> None:
    """I_b += g_b², I_l += g_l² for every tensor, in one pass over both (SWiFT Eqs. 7-8; spec §3).

    Importances are float32; gradients may be any float dtype and are grouped by their (device, dtype).
    """
    if not (len(imp_bias) == len(imp_loss) == len(grad_bias) == len(grad_loss)):
        raise ValueError(
            f"fisher_accumulate_: list lengths differ: imp_bias {len(imp_bias)}, imp_loss {len(imp_loss)}, "
            f"grad_bias {len(grad_bias)}, grad_loss {len(grad_loss)}"
        )
    with phase("fastmask.fisher_accumulate"):
        for (device, _), idx in _groups(grad_bias).items():
            fn = implementation("fisher_accumulate_", _backend.resolve("fisher_accumulate_", device, backend))
            fn(_pick(imp_bias, idx), _pick(imp_loss, idx), _pick(grad_bias, idx), _pick(grad_loss, idx))


def soft_mask(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    *,
    eps: float = reference.NORM_EPS,
    apply_tanh: bool = True,
    backend: str | None = None,
) -> list[Tensor]:
    """Per-tensor M = tanh(Norm(I_b) / (Norm(I_l) + eps)) (SWiFT Eq. 9), or the raw ratio with apply_tanh=False
    (BMFT's score). Norm is min-max per tensor with the max == min guard (spec §4). Returns float32 masks."""
    out: list[Tensor | None] = [None] * len(imp_bias)
    with phase("fastmask.soft_mask"):
        for (device, _), idx in _groups(imp_bias).items():
            fn = implementation("soft_mask", _backend.resolve("soft_mask", device, backend))
            for i, m in zip(idx, fn(_pick(imp_bias, idx), _pick(imp_loss, idx), eps, apply_tanh), strict=True):
                out[i] = m
    return out  # type: ignore[return-value]


def soft_mask_(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    *,
    eps: float = reference.NORM_EPS,
    apply_tanh: bool = True,
    backend: str | None = None,
) -> None:
    """:func:`soft_mask` written into ``imp_bias`` (dense float32 tensors, one per parameter, sharing no memory with
    each other or with ``imp_loss``) instead of new tensors: the mask set then costs no memory beyond the two
    importances, and no first-touch page faults."""
    if len(imp_bias) != len(imp_loss):
        raise ValueError(f"soft_mask_: list lengths differ: imp_bias {len(imp_bias)}, imp_loss {len(imp_loss)}")
    with phase("fastmask.soft_mask"):
        for (device, _), idx in _groups(imp_bias).items():
            fn = implementation("soft_mask_", _backend.resolve("soft_mask_", device, backend))
            fn(_pick(imp_bias, idx), _pick(imp_loss, idx), eps, apply_tanh)


def _scalar(x: float | Tensor, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


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
    decoupled_weight_decay: bool = False,
    mask_mode: str = "grad",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One masked Adam / AdamW step over all tensors (formula in ``fastmask.reference.masked_adam_``).

    Increments ``state_steps`` first and, when ``found_inf`` is set, takes the increment back on the skipped step,
    as torch's fused Adam does. ``max_exp_avg_sqs`` may be empty unless ``amsgrad``.
    """
    mask_update = _mask_update(mask_mode)
    if not amsgrad:
        max_exp_avg_sqs = [torch.empty(0)] * len(params)
    hyper = dict(
        lr=_scalar(lr, "lr"), beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, mask_update=mask_update,
    )
    with phase("fastmask.masked_adam"):
        torch._foreach_add_(list(state_steps), 1)
        for (device, _), idx in _groups(params).items():
            fn = implementation("masked_adam_", _backend.resolve("masked_adam_", device, backend))
            inf = _on(found_inf, device)
            fn(
                _pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                _pick(max_exp_avg_sqs, idx), _pick(state_steps, idx), _pick(masks, idx), **hyper,
                grad_scale=_on(grad_scale, device), found_inf=inf,
            )
        if found_inf is not None:
            for s in state_steps:
                s.sub_(found_inf.to(s.device, s.dtype))


def masked_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    masks: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    mask_mode: str = "grad",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> list[Tensor | None]:
    """One masked SGD step over all tensors (formula in ``fastmask.reference.masked_sgd_``).

    ``momentum_buffers[i]`` is None for a tensor whose buffer does not exist yet (its first step): a buffer is
    allocated and returned in its place, like torch.optim.SGD's ``momentum_buffer`` state. With momentum == 0 the
    list is returned unchanged.
    """
    mask_update = _mask_update(mask_mode)
    hyper = dict(
        lr=_scalar(lr, "lr"), weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        maximize=maximize, mask_update=mask_update,
    )
    buffers = list(momentum_buffers)
    with phase("fastmask.masked_sgd"):
        for (device, _), idx in _groups(params).items():
            fn = implementation("masked_sgd_", _backend.resolve("masked_sgd_", device, backend))
            scale, inf = _on(grad_scale, device), _on(found_inf, device)
            if momentum == 0:
                fn(_pick(params, idx), _pick(grads, idx), [], _pick(masks, idx), **hyper, first_step=False,
                   grad_scale=scale, found_inf=inf)
                continue
            # torch.optim.SGD's first step initialises the buffer to d_p; a group may mix new and old buffers.
            new = [i for i in idx if buffers[i] is None]
            for first, sub in ((True, new), (False, [i for i in idx if buffers[i] is not None])):
                if not sub:
                    continue
                if first:
                    if found_inf is not None and bool(found_inf.item() != 0):
                        continue  # a skipped first step creates no buffer, as in torch
                    for i in sub:
                        buffers[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                fn(_pick(params, sub), _pick(grads, sub), _pick(buffers, sub), _pick(masks, sub), **hyper,
                   first_step=first, grad_scale=scale, found_inf=inf)
    return buffers


def percentile(tensors: Sequence[Tensor], q: float, method: str = "linear", *, backend: str | None = None) -> float:
    """The q-th percentile of the elements of all ``tensors`` together, exactly as ``np.percentile`` over their
    concatenation (BMFT's global threshold α, spec §4), without making that concatenated copy."""
    if not tensors:
        raise ValueError("percentile: no tensors given")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"percentile: tensors must share one device, got {sorted(map(str, devices))}")
    with phase("fastmask.percentile"):
        fn = implementation("percentile", _backend.resolve("percentile", devices.pop(), backend))
        return float(fn(list(tensors), float(q), method))


def hard_mask(
    tensors: Sequence[Tensor],
    threshold: float,
    *,
    inclusive: bool = False,
    layout: str = "bool",
    backend: str | None = None,
) -> list[Tensor]:
    """M = 1[x > threshold] per tensor (``inclusive``: >=), BMFT Eq. 4; layout "bool", "uint8" or "packed"."""
    out: list[Tensor | None] = [None] * len(tensors)
    with phase("fastmask.hard_mask"):
        for (device, _), idx in _groups(tensors).items():
            fn = implementation("hard_mask", _backend.resolve("hard_mask", device, backend))
            for i, m in zip(idx, fn(_pick(tensors, idx), float(threshold), inclusive, layout), strict=True):
                out[i] = m
    return out  # type: ignore[return-value]


def _register_percentile_fakes() -> None:
    """Output metadata of the percentile ops for FakeTensor tracing (torch.compile, torch.library.opcheck)."""

    @torch.library.register_fake("fastmask::percentile")
    def _(tensors: list[Tensor], q: float, method: str = "linear") -> Tensor:
        return tensors[0].new_empty((), dtype=torch.float64)

    @torch.library.register_fake("fastmask::radix_histogram")
    def _(tensors: list[Tensor], prefixes: list[int], prefix_bits: int, digit_bits: int) -> Tensor:
        return tensors[0].new_empty((len(prefixes), 1 << digit_bits), dtype=torch.int64)

    @torch.library.register_fake("fastmask::hard_mask")
    def _(tensors: list[Tensor], threshold: float, inclusive: bool = False, layout: str = "bool") -> list[Tensor]:
        if layout == "packed":
            return [t.new_empty(((t.numel() + 7) // 8,), dtype=torch.uint8) for t in tensors]
        return [t.new_empty(t.shape, dtype=torch.bool if layout == "bool" else torch.uint8) for t in tensors]


if _backend._extension_error() is None:  # the ops exist once fastmask._C is loaded
    _register_percentile_fakes()


MASK_MODES = ("grad", "update")


def _mask_update(mask_mode: str) -> bool:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    return mask_mode == "update"
