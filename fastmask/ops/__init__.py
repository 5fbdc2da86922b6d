"""fastmask's per-parameter ops, public and functional: the layer every other part of fastmask computes with.

Each op groups its tensors by (device, dtype), asks :func:`fastmask.ops.backend.resolve` which implementation runs
that group, and makes one call per group: the fused backends then cover the group in one launch (Triton) or one
parallel region (C++). The optimizer steps take any tensor torch's optimizers take: what the fused kernels cannot
walk (other memory layouts) is routed in one place, :func:`_by_layout`; complex tensors are stepped as their float
views and sparse SGD gradients by torch's own SGD. Each call sits in an NVTX / profiler range named ``fastmask.<stem>``.

The implementations share one signature per op: :mod:`fastmask.ops.reference` (the oracle),
``torch.ops.fastmask.<name>`` (C++ / CUDA) and ``fastmask.kernels.<stem>.<name>`` (Triton); which backend has
which op, and the files of each, is the op table :mod:`fastmask.ops.table`. This package imports only the
kernels, the extension and :mod:`fastmask.util`.

One module over 400 lines on purpose: the public signature of every op, each a short dispatcher, plus the one
layout router of the optimizer steps; splitting them would give each op two homes.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from fastmask.ops import backend as _backend
from fastmask.ops import fakes, radix, reference
from fastmask.ops.table import op as _op
from fastmask.util.layout import dense
from fastmask.util.profiling import phase

MASK_MODES = ("grad", "update")


def implementation(op: str, name: str) -> Callable:
    """The callable of backend ``name`` for ``op`` (a backend the op table lists for it)."""
    entry = _op(op)
    if name not in entry.backends:
        raise ValueError(f"backend {name!r} has no {op} kernel (the op table lists {list(entry.backends)})")
    if name == "reference":
        return getattr(reference, op)
    if entry.uses is not None:  # a composed op runs its building block's kernels
        kernel = implementation(entry.uses, name)
        return lambda *args: getattr(radix, op)(*args, kernel)
    if name in ("cpp", "cuda"):
        return getattr(torch.ops.fastmask, op)
    return getattr(importlib.import_module(f"fastmask.kernels.{entry.stem}"), op)


def _resolved(op: str, device: torch.device, backend: str | None) -> Callable:
    name = _backend.resolve(op, device, backend)
    if name == "triton" and torch.compiler.is_compiling() and hasattr(torch.ops, fakes.TRITON_NAMESPACE):
        # Dynamo cannot trace a launch through pointer tables: the compiled graph calls the launcher as an opaque
        # op with the op's schema and fake (fastmask/ops/fakes.py), at run time on the real tensors.
        return getattr(getattr(torch.ops, fakes.TRITON_NAMESPACE), op)
    return implementation(op, name)


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
    """I_b += g_b², I_l += g_l² for every tensor, in one pass over both (SWiFT Eqs. 7-8; docs/algorithm.md §3).

    Importances are float32; gradients may be any float dtype and are grouped by their (device, dtype).
    """
    if not (len(imp_bias) == len(imp_loss) == len(grad_bias) == len(grad_loss)):
        raise ValueError(
            f"fisher_accumulate_: list lengths differ: imp_bias {len(imp_bias)}, imp_loss {len(imp_loss)}, "
            f"grad_bias {len(grad_bias)}, grad_loss {len(grad_loss)}"
        )
    with phase(_op("fisher_accumulate_").profile_range):
        for (device, _), idx in _groups(grad_bias).items():
            fn = _resolved("fisher_accumulate_", device, backend)
            fn(_pick(imp_bias, idx), _pick(imp_loss, idx), _pick(grad_bias, idx), _pick(grad_loss, idx))


def _bounds_of(bounds: Tensor | None, idx: list[int], n: int, device: torch.device) -> Tensor | None:
    """The columns ``idx`` of ``bounds`` (shape [4, n]) on ``device``; all of it when ``idx`` is every column."""
    if bounds is None:
        return None
    part = bounds if idx == list(range(n)) else bounds[:, idx]
    return part.to(device, non_blocking=True)


def soft_mask(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    *,
    eps: float = reference.NORM_EPS,
    apply_tanh: bool = True,
    bounds: Tensor | None = None,
    backend: str | None = None,
) -> list[Tensor]:
    """Per-tensor M = tanh(Norm(I_b) / (Norm(I_l) + eps)) (SWiFT Eq. 9), or the raw ratio with apply_tanh=False (BMFT's
    score). Norm is min-max per tensor with the max == min guard (docs/algorithm.md §4). Returns float32 masks.

    ``bounds``: float32 [4, n] (n = len(imp_bias)), rows min I_b, max I_b, min I_l, max I_l: column i holds the bounds
    of the whole tensors that ``imp_bias[i]`` and ``imp_loss[i]`` are pieces of (FSDP shards,
    :func:`fastmask.parallel.fsdp.sharded_soft_mask`), used instead of the pieces' own. A NaN in a column makes that
    mask NaN, as a NaN in the data does without bounds."""
    reference.check_bounds("soft_mask", bounds, len(imp_bias))
    out: list[Tensor | None] = [None] * len(imp_bias)
    with phase(_op("soft_mask").profile_range):
        for (device, _), idx in _groups(imp_bias).items():
            fn = _resolved("soft_mask", device, backend)
            group_bounds = _bounds_of(bounds, idx, len(imp_bias), device)
            masks = fn(_pick(imp_bias, idx), _pick(imp_loss, idx), eps, apply_tanh, group_bounds)
            for i, m in zip(idx, masks, strict=True):
                out[i] = m
    return out  # type: ignore[return-value]


def soft_mask_(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    *,
    eps: float = reference.NORM_EPS,
    apply_tanh: bool = True,
    bounds: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """:func:`soft_mask` written into ``imp_bias`` (dense float32 tensors, one per parameter, sharing no memory with
    each other or with ``imp_loss``) instead of new tensors: the mask set then costs no memory beyond the two
    importances, and no first-touch page faults. ``bounds`` as in :func:`soft_mask`."""
    if len(imp_bias) != len(imp_loss):
        raise ValueError(f"soft_mask_: list lengths differ: imp_bias {len(imp_bias)}, imp_loss {len(imp_loss)}")
    reference.check_bounds("soft_mask_", bounds, len(imp_bias))
    with phase(_op("soft_mask_").profile_range):
        for (device, _), idx in _groups(imp_bias).items():
            fn = _resolved("soft_mask_", device, backend)
            fn(_pick(imp_bias, idx), _pick(imp_loss, idx), eps, apply_tanh,
               _bounds_of(bounds, idx, len(imp_bias), device))


def _scalar(x: float | Tensor, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _lr(lr: float | Tensor, fn: Callable) -> float | Tensor:
    """``lr`` as implementation ``fn`` takes it. A tensor on a device (capturable with a scheduler's tensor lr) stays
    a float64 tensor there for the Python implementations (reference, Triton), which use it without reading it on
    the host; the C++ ops' schema (and so a compiled graph) takes a float, and a CPU tensor is read as one."""
    on_device = isinstance(lr, Tensor) and lr.numel() == 1 and lr.device.type != "cpu"
    if on_device and not isinstance(fn, torch._ops.OpOverloadPacket):
        return lr.reshape(()).to(torch.float64)
    return _scalar(lr, "lr")


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def _real(t: Tensor | None) -> Tensor | None:
    """A complex tensor as its float view [..., 2] (real, imaginary), which is what torch's Adam steps for a complex
    parameter (and SGD's update is linear, so the same): the kernels then see an ordinary float tensor. Others as
    they are."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def _real_mask(mask: Tensor | None, param: Tensor) -> Tensor | None:
    """The mask of a complex parameter scales its real and imaginary parts alike: M broadcast (stride 0) over the
    last dim of the parameter's float view. That layout is not the parameter's, so :func:`_by_layout` sends the
    tensor to the reference implementation, which broadcasts exactly."""
    if mask is None or not param.is_complex():
        return mask
    return mask.unsqueeze(-1).expand(*mask.shape, 2)


def _by_layout(
    op: str,
    device: torch.device,
    backend: str | None,
    idx: list[int],
    params: Sequence[Tensor],
    grads: list[Tensor],
    buffers: Sequence[Sequence[Tensor]],
    masks: Sequence[Tensor | None],
) -> list[tuple[Callable, list[int]]]:
    """(implementation, indices) for the tensors ``idx`` of one (device, dtype) group: the one place that routes
    layouts, so that every layout torch accepts is stepped exactly.

    The fused kernels (C++ and Triton) walk a parameter, its gradient, state ``buffers`` and mask by one flat index,
    so they need a dense parameter (no gaps, no overlaps: :func:`fastmask.util.layout.dense`) and every other tensor
    in the parameter's strides. Otherwise:

    - a gradient in another layout (transposed, a stride-0 expansion, a slice) is copied into the parameter's
      layout, in place in ``grads``: the step only reads the gradient, so the copy is exact;
    - a non-dense parameter (a strided view of a bigger tensor), or a state buffer or mask not laid out like it
      (a complex parameter's broadcast mask, :func:`_real_mask`), runs the reference implementation, whose
      whole-tensor torch ops take any layout.
    """
    name = _backend.resolve(op, device, backend)
    fn = _resolved(op, device, backend)  # under torch.compile, Triton's launcher as an opaque op
    if name == "reference":
        return [(fn, idx)]
    # The common case, every tensor contiguous and laid out like its parameter, is decided by comparing whole lists
    # of strides: the step runs this for every tensor of the model.
    group_params, group_masks = _pick(params, idx), _pick(masks, idx)
    strides = list(map(Tensor.stride, group_params))
    if (
        all(map(Tensor.is_contiguous, group_params))
        and all(list(map(Tensor.stride, _pick(t, idx))) == strides for t in (grads, *buffers))
        and all(m is None or m.stride() == st for m, st in zip(group_masks, strides, strict=True))
    ):
        return [(fn, idx)]
    fused: list[int] = []
    other: list[int] = []
    for i in idx:
        p, grad = params[i], grads[i]
        state = [b[i] for b in buffers]
        if not all(t.shape == p.shape and t.device == p.device and t.dtype == p.dtype for t in (grad, *state)) or (
            masks[i] is not None and (masks[i].shape != p.shape or masks[i].device != p.device)
        ):
            fused.append(i)  # not a layout matter: the fused kernel's checks name the tensor at fault
        elif not dense(p) or any(t.stride() != p.stride() for t in (*state, masks[i]) if t is not None):
            other.append(i)
        else:
            if grad.stride() != p.stride():
                grads[i] = torch.empty_like(p).copy_(grad)
            fused.append(i)
    runs = ((fn, fused), (implementation(op, "reference"), other))
    return [(fn, sub) for fn, sub in runs if sub]


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
    """One masked Adam / AdamW step over all tensors (formula in :func:`fastmask.ops.reference.masked_adam_`).

    Increments ``state_steps`` first and, when ``found_inf`` is set, takes the increment back on the skipped step,
    as torch's fused Adam does. ``max_exp_avg_sqs`` may be empty unless ``amsgrad``. Tensors may have any layout
    (:func:`_by_layout`); complex ones are stepped as their float views, as torch does, a real mask scaling real and
    imaginary parts alike.
    """
    mask_update = _mask_update(mask_mode)
    hyper = dict(
        beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, mask_update=mask_update,
    )
    if any(p.is_complex() for p in params):
        masks = [_real_mask(m, p) for m, p in zip(masks, params, strict=True)]
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
            [_real(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        )
    grads = list(grads)  # _by_layout may replace a gradient by a copy in the parameter's layout
    if not amsgrad:
        max_exp_avg_sqs = [torch.empty(0)] * len(params)
    state = [exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if amsgrad else [])]
    with phase(_op("masked_adam_").profile_range):
        torch._foreach_add_(list(state_steps), 1)
        for (device, _), idx in _groups(params).items():
            scale, inf = _on(grad_scale, device), _on(found_inf, device)
            for fn, sub in _by_layout("masked_adam_", device, backend, idx, params, grads, state, masks):
                fn(
                    _pick(params, sub), _pick(grads, sub), _pick(exp_avgs, sub), _pick(exp_avg_sqs, sub),
                    _pick(max_exp_avg_sqs, sub), _pick(state_steps, sub), _pick(masks, sub), lr=_lr(lr, fn),
                    **hyper, grad_scale=scale, found_inf=inf,
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
    """One masked SGD step over all tensors (formula in :func:`fastmask.ops.reference.masked_sgd_`).

    ``momentum_buffers[i]`` is None for a tensor whose buffer does not exist yet (its first step): a buffer is
    allocated and returned in its place, like torch.optim.SGD's ``momentum_buffer`` state. With momentum == 0 the
    list is returned unchanged. Tensors may have any layout (:func:`_by_layout`); complex ones are stepped as their
    float views, a real mask scaling real and imaginary parts alike; sparse gradients take torch's own SGD
    (:func:`_sparse_sgd_`).
    """
    mask_update = _mask_update(mask_mode)
    hyper = dict(
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
    )
    buffers = list(momentum_buffers)
    with phase(_op("masked_sgd_").profile_range):
        sparse = [i for i, g in enumerate(grads) if g.is_sparse]
        if sparse:
            # torch's own sparse step (never capturable) reads lr on the host.
            _sparse_sgd_(sparse, params, grads, buffers, masks, lr=_scalar(lr, "lr"), **hyper, mask_update=mask_update,
                         grad_scale=grad_scale, found_inf=found_inf)
        # torch.optim.SGD's first step initialises the buffer to d_p; a group may mix new and old buffers. A first
        # step that GradScaler skips creates no buffer, as in torch.
        new = {i for i, b in enumerate(buffers) if momentum != 0 and b is None and not grads[i].is_sparse}
        skip_new = bool(new) and found_inf is not None and bool(found_inf.item() != 0)
        for i in new:
            if not skip_new:
                buffers[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
        step = {i for i, g in enumerate(grads) if not g.is_sparse and not (skip_new and i in new)}
        real_masks, real_params, real_grads, real_buffers = masks, params, list(grads), buffers
        if any(p.is_complex() for p in params):
            real_masks = [_real_mask(m, p) for m, p in zip(masks, params, strict=True)]
            real_params, real_grads, real_buffers = ([_real(t) for t in ts] for ts in (params, grads, buffers))
        for (device, _), idx in _groups(real_params).items():
            idx = [i for i in idx if i in step]
            scale, inf = _on(grad_scale, device), _on(found_inf, device)
            state = [real_buffers] if momentum != 0 else []
            for fn, sub in _by_layout("masked_sgd_", device, backend, idx, real_params, real_grads, state, real_masks):
                for first in (True, False) if momentum != 0 else (False,):
                    part = [i for i in sub if (i in new) == first]
                    if part:
                        fn(_pick(real_params, part), _pick(real_grads, part),
                           _pick(real_buffers, part) if momentum != 0 else [], _pick(real_masks, part),
                           lr=_lr(lr, fn), **hyper, mask_update=mask_update, first_step=first, grad_scale=scale,
                           found_inf=inf)
    return buffers


def _sparse_sgd_(
    idx: list[int],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: list[Tensor | None],
    masks: Sequence[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    mask_update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """The tensors ``idx``, whose gradients are sparse (e.g. embedding rows), stepped by torch.optim.SGD's own
    single-tensor algorithm, so that they move exactly as with torch (the fused kernels walk dense memory only);
    their momentum buffers are written into ``buffers``. Under GradScaler the step is skipped when ``found_inf`` is
    set and the gradient is multiplied by 1/scale, as the scaler unscales a sparse gradient for torch.optim.SGD.

    A mask enters in "grad" mode exactly, as M ⊙ g on the gradient's stored values (its implicit zeros stay zero).
    "update" mode is refused: it keeps masked-out entries of the dense step and the buffer, which torch's sparse
    algorithm (a sparse buffer) has no place for.
    """
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    sparse_grads = []
    for i in idx:
        g = grads[i]
        if grad_scale is not None:
            g = g * grad_scale.double().reciprocal().float().to(g.device)
        if masks[i] is not None:
            if mask_update:
                raise ValueError(f"masked_sgd_: grads[{i}] is sparse, and a mask (masks[{i}]) applies to a sparse "
                                 "gradient only in mask_mode='grad'")
            g = g.coalesce()
            g = g * reference.mask_as_float(masks[i]).to(g.device, g.dtype).sparse_mask(g)
        sparse_grads.append(g)
    # With momentum == 0 ``buffers`` is empty, as torch.optim.SGD gathers it, and no buffer is made.
    sub_buffers = _pick(buffers, idx) if momentum != 0 else [None] * len(idx)
    torch_sgd(
        _pick(params, idx), sparse_grads, sub_buffers, has_sparse_grad=True, foreach=False, fused=False, lr=lr,
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
    )
    if momentum != 0:
        for i, buf in zip(idx, sub_buffers, strict=True):
            buffers[i] = buf


def radix_histogram(tensors: Sequence[Tensor], prefixes: Sequence[int], prefix_bits: int, digit_bits: int, *,
                    backend: str | None = None) -> Tensor:
    """One pass of the percentile's radix selection (:mod:`fastmask.ops.radix`): int64 counts [len(prefixes),
    2^digit_bits] of the elements whose top ``prefix_bits`` order-key bits equal ``prefixes[p]``, binned by their next
    ``digit_bits`` bits (formula in :func:`fastmask.ops.reference.radix_histogram`)."""
    device = _one_device(tensors, "radix_histogram")
    with phase(_op("radix_histogram").profile_range):
        return _resolved("radix_histogram", device, backend)(list(tensors), list(prefixes), prefix_bits, digit_bits)


def percentile(tensors: Sequence[Tensor], q: float, method: str = "linear", *, backend: str | None = None) -> float:
    """The q-th percentile of the elements of all ``tensors`` together, exactly as ``np.percentile`` over their
    concatenation (BMFT's global threshold α, docs/algorithm.md §4), without making that concatenated copy: radix
    selection (:mod:`fastmask.ops.radix`), one ``radix_histogram`` pass per 16 key bits. The reference backend is
    the papers' way, ``np.percentile`` over the concatenation."""
    device = _one_device(tensors, "percentile")
    with phase(_op("percentile").profile_range):
        return float(_resolved("percentile", device, backend)(list(tensors), float(q), method))


def hard_mask(
    tensors: Sequence[Tensor],
    threshold: float,
    *,
    inclusive: bool = False,
    layout: str = "bool",
    backend: str | None = None,
) -> list[Tensor]:
    """M = 1[x > threshold] per tensor (``inclusive``: >=), BMFT Eq. 4. ``layout``: "bool" (the tensor's shape, the
    hard mask the masked optimizers take) or "bits" (packed, a flat int8 tensor of ceil(n / 8) bytes; see
    :func:`fastmask.ops.reference.hard_mask`)."""
    out: list[Tensor | None] = [None] * len(tensors)
    with phase(_op("hard_mask").profile_range):
        for (device, _), idx in _groups(tensors).items():
            fn = _resolved("hard_mask", device, backend)
            for i, m in zip(idx, fn(_pick(tensors, idx), float(threshold), inclusive, layout), strict=True):
                out[i] = m
    return out  # type: ignore[return-value]


def _one_device(tensors: Sequence[Tensor], op: str) -> torch.device:
    if not tensors:
        raise ValueError(f"{op}: no tensors given")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors must share one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _mask_update(mask_mode: str) -> bool:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    return mask_mode == "update"


fakes.register(lambda op: implementation(op, "triton"))
