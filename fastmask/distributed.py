"""The global percentile of tensors sharded across ranks (BMFT's threshold α, spec §4, under DDP / FSDP).

Every rank runs the same radix passes as the local op (``torch.ops.fastmask.percentile``) over its own shard with
``torch.ops.fastmask.radix_histogram``, and the per-pass histograms are summed with ``all_reduce``: each rank then
knows the global counts, refines the same key prefix and ends with the same order statistics. Traffic is one
histogram per pass (2^16 int64 counts, one or two rows), whatever the number of elements; no rank gathers data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastmask.ops import implementation
from fastmask.profiling import phase
from fastmask.reference import NORM_EPS, PERCENTILE_METHODS, minmax_normalize

DIGIT_BITS = 16
# numpy's view of each dtype: bf16 through its exact float32 upcast, like fastmask.reference.
_NUMPY_DTYPE = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32,
                torch.float64: np.float64}
_BITS_DTYPE = {16: np.uint16, 32: np.uint32, 64: np.uint64}


def _plan(n: int, q: float, method: str) -> tuple[int, int, float, bool]:
    """(lo, hi, gamma, interpolate): np.percentile is lerp(sorted[lo], sorted[hi], gamma), or sorted[lo] when not
    interpolating; numpy's float64 formulas (numpy/lib/_function_base_impl.py, _quantile and _QuantileMethods)."""
    v = (n - 1) * (q / 100.0)
    if method == "lower":
        return min(n - 1, math.floor(v)), min(n - 1, math.floor(v)), 0.0, False
    if method == "higher":
        return min(n - 1, math.ceil(v)), min(n - 1, math.ceil(v)), 0.0, False
    if method == "nearest":  # np.around rounds half to even, as round() does
        return min(n - 1, round(v)), min(n - 1, round(v)), 0.0, False
    if method == "midpoint":
        v = 0.5 * (math.floor(v) + math.ceil(v))
    above = v >= n - 1  # numpy then takes the maximum twice, with gamma = v - (-1)
    previous = -1 if above else math.floor(v)
    gamma = v - previous
    if method == "midpoint":
        gamma = 0.0 if v % 1 == 0 else 0.5
    lo = n - 1 if above else previous
    return lo, (n - 1 if above else lo + 1), gamma, True


def _value(key: int, dtype: torch.dtype) -> np.floating:
    """The value whose order key (csrc/percentile_keys.h) is ``key``, as numpy's scalar type for ``dtype``."""
    width = torch.finfo(dtype).bits
    sign = 1 << (width - 1)
    bits = key ^ sign if key & sign else ~key & ((1 << width) - 1)
    if dtype == torch.bfloat16:
        return np.array(bits << 16, np.uint32).view(np.float32)[()]
    return np.array(bits, _BITS_DTYPE[width]).view(_NUMPY_DTYPE[dtype])[()]


def _lerp(a: np.floating, b: np.floating, gamma: float) -> float:
    """numpy's _lerp with numpy's own scalar arithmetic: a Python-float gamma takes the array's precision (NEP 50)."""
    with np.errstate(all="ignore"):  # inf - inf is NaN in numpy too
        diff = b - a
        return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None, active: bool) -> Tensor:
    if active:
        dist.all_reduce(t, op=op, group=group)
    return t


def percentile(
    tensors: Sequence[Tensor], q: float, method: str = "linear", group: dist.ProcessGroup | None = None
) -> float:
    """The q-th percentile of every element of ``tensors`` on every rank of ``group`` taken together, equal to
    ``np.percentile`` over the concatenation of all ranks' tensors (same methods and dtype semantics as
    ``fastmask.ops.percentile``). Without an initialised process group it is the local percentile.

    Every rank of ``group`` must call it with the same ``q`` and ``method`` and tensors of one dtype (a rank may hold
    only empty tensors, but at least one tensor, to carry the dtype). NaN on any rank raises on every rank, naming
    the ranks and, on the rank that holds it, the tensor.
    """
    if method not in PERCENTILE_METHODS:
        raise ValueError(f"percentile: method must be one of {PERCENTILE_METHODS}, got {method!r}")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    if not tensors:
        raise ValueError("percentile: every rank needs at least one tensor (an empty one is fine) to carry the dtype")
    tensors = list(tensors)
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in _NUMPY_DTYPE:
        raise TypeError(f"percentile: tensors[0] has dtype {dtype}; expected float16, bfloat16, float32 or float64")
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    histogram = implementation("radix_histogram", "cpp")  # torch.ops.fastmask.*: the dispatcher picks CPU / CUDA

    codes = list(_NUMPY_DTYPE)
    meta = torch.tensor([sum(t.numel() for t in tensors), codes.index(dtype), -codes.index(dtype)], device=device)
    n = int(_all_reduce(meta[:1].clone(), dist.ReduceOp.SUM, group, active).item())
    spread = _all_reduce(meta[1:].clone(), dist.ReduceOp.MAX, group, active)
    if spread[0].item() != -spread[1].item():
        raise TypeError(f"percentile: the ranks hold different dtypes (this rank: {dtype})")
    if n == 0:
        raise ValueError("percentile: the tensors hold no elements on any rank")
    lo, hi, gamma, interpolate = _plan(n, q, method)

    ranks, prefix, prefix_bits = [lo, hi], [0, 0], 0
    width = torch.finfo(dtype).bits
    while prefix_bits < width:
        digit = min(DIGIT_BITS, width - prefix_bits)
        rows = sorted(set(prefix))
        local_error = None
        try:
            h = histogram(tensors, rows, prefix_bits, digit)
        except ValueError as exc:  # NaN, found in the first pass: the other ranks must not wait for this one
            if prefix_bits > 0:
                raise
            local_error, h = exc, torch.zeros(len(rows), 1 << digit, dtype=torch.int64, device=device)
        if prefix_bits == 0:
            rank = dist.get_rank(group) if active else 0
            world = dist.get_world_size(group) if active else 1
            failed = torch.zeros(world, dtype=torch.int64, device=device)
            failed[rank] = local_error is not None
            bad = torch.nonzero(_all_reduce(failed, dist.ReduceOp.SUM, group, active)).flatten().tolist()
            if bad:
                here = f"; here: {local_error}" if local_error else ""
                raise ValueError(f"percentile: NaN on rank(s) {bad}{here}")
        counts = _all_reduce(h, dist.ReduceOp.SUM, group, active).cpu().numpy()
        for t in range(2):
            row = counts[rows.index(prefix[t])]
            before = np.cumsum(row)  # elements below the end of each bin
            b = int(np.searchsorted(before, ranks[t], side="right"))
            if b == len(row):
                raise RuntimeError("percentile: the ranks disagree on q or method, or the data changed between passes")
            ranks[t] -= int(before[b - 1]) if b > 0 else 0
            prefix[t] = (prefix[t] << digit) | b
        prefix_bits += digit

    a = _value(prefix[0], dtype)
    return _lerp(a, _value(prefix[1], dtype), gamma) if interpolate else float(a)


# ---- data-parallel fine-tuning and importance (DDP semantics with the global batch's loss) -------------------------
#
# SWiFT's and BMFT's losses are not sums over samples: the bias function compares group means and the WBCE weights
# come from the batch's class balance, so the mean of per-rank losses is not the loss of the global batch, and
# averaging per-rank gradients (plain DDP) would not reproduce the single-process run. Instead every rank gathers
# the logits, labels and attributes of the global batch (detached, except its own slice, which stays in its graph),
# computes the global batch's loss, and back-propagates through its own samples only: the sum over ranks of these
# gradients is exactly ∂L_global/∂θ (the chain rule split over samples). One all-reduce of the gradients per
# backward, the traffic DDP would have, plus B·W logits.


def is_active(group: dist.ProcessGroup | None = None) -> bool:
    """True inside an initialised process group of more than one rank (torchrun, or init_process_group by hand)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def global_batch(
    z: Tensor, y: Tensor, a: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's (z, y, a): every rank's slices concatenated in rank order, equal on every rank.

    Only this rank's slice of z keeps its autograd history, so ``loss(global_batch(...)).backward()`` gives this
    rank's share of the global batch's gradient; :func:`all_reduce_grads` sums the shares. Ranks may hold slices of
    different lengths (a short last batch). Without an active group the inputs are returned as they are.
    """
    if not is_active(group):
        return z, y, a
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([z.shape[0]], dtype=torch.int64, device=z.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)

    def gather(t: Tensor) -> list[Tensor]:
        padded = t.detach().new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return [p[:n] for p, n in zip(parts, lengths, strict=True)]

    zs = gather(z)
    zs[rank] = z  # this rank's slice stays in the graph
    return torch.cat(zs), torch.cat(gather(y)), torch.cat(gather(a))


def all_reduce_grads(grads: Sequence[Tensor | None], group: dist.ProcessGroup | None = None) -> None:
    """Sum ``grads`` over the ranks, in place, with one all-reduce per dtype (a flat buffer); None entries (frozen or
    unused parameters, the same on every rank) are skipped. No-op without an active group."""
    if not is_active(group):
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_counts(values: Sequence[float], device: torch.device | str = "cpu",
                      group: dist.ProcessGroup | None = None) -> list[float]:
    """The sums over the ranks of a few float64 counters (predictions, labels, samples); unchanged without a group."""
    if not is_active(group):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def init_from_env() -> bool:
    """Join the job that torchrun describes in the environment (WORLD_SIZE > 1, with RANK, MASTER_ADDR and
    MASTER_PORT), over NCCL when CUDA is available and gloo otherwise, unless a process group already exists.
    True when this process is then one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return is_active()


def is_writer(group: dist.ProcessGroup | None = None) -> bool:
    """True on the rank that writes a run's files: rank 0, or the only process."""
    return not is_active(group) or dist.get_rank(group) == 0


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def broadcast_buffers(module: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does with broadcast_buffers=True:
    each rank's BN layers see only its own samples in train mode, so their running statistics drift apart while the
    summed gradients keep the parameters equal. One broadcast per dtype; no-op without an active group."""
    if not is_active(group):
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


# ---- masks of sharded parameters (FSDP / FSDP2, or any flat sharding) ---------------------------------------------
#
# When parameters are sharded, each rank holds only a piece of every importance tensor. SWiFT's Norm needs each
# tensor's min and max, which are global: every rank packs its local minima of all tensors (I_b's and I_l's) into one
# float32 vector and its maxima into another, and one all-reduce each (MIN, MAX) gives every rank every tensor's
# global bounds. The element-wise rest of the formula is local. NaN is carried as a flag in the MAX vector (a
# reduction's treatment of NaN depends on the backend; torch's min() / max() return NaN, and so must this).


def _is_dtensor(t: Tensor) -> bool:
    if not dist.is_available():  # builds without torch.distributed have no DTensor
        return False
    from torch.distributed.tensor import DTensor  # imported here: only sharded models need it

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's piece of ``t``: the local shard of a DTensor (FSDP2 parameters and their gradients), else ``t``.
    The shard is a view of the DTensor's storage taken outside autograd, so an optimizer can update it in place."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def is_sharded(params: torch.nn.Module | Iterable[Tensor]) -> bool:
    """True when a model's parameters (or the given ones) are DTensors (``torch.distributed.fsdp.fully_shard``)."""
    return any(_is_dtensor(p) for p in (params.parameters() if isinstance(params, torch.nn.Module) else params))


def global_min_max(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Per-tensor (min, max) over every rank's shard of each tensor, as two float32 vectors of ``len(tensors)``,
    equal on every rank: ``torch.min(cat of the shards of tensor i)`` and the same for max, NaN included (a NaN in
    any shard makes both NaN). A shard may be empty (it contributes nothing); a tensor empty on every rank gets
    (+inf, -inf). Values are compared in float32, the dtype Norm computes in (exact for bf16 / fp16, and rounding to
    float32 is monotone, so the float32 of the min is the min of the float32 values).

    Every rank must pass the same number of tensors in the same order (the pieces of the same parameters). Two
    collectives in all, whatever the number of tensors. Without an active group these are the local bounds.
    """
    n = len(tensors)
    lo = torch.full((n,), math.inf, dtype=torch.float32)
    hi_and_nan = torch.full((2 * n,), -math.inf, dtype=torch.float32)  # maxima, then 1.0 where a shard has NaN
    hi_and_nan[n:] = 0.0
    for i, t in enumerate(tensors):
        x = local(t).detach()
        if x.numel():
            x_lo, x_hi = torch.aminmax(x.float())  # aminmax propagates NaN like min() / max()
            lo[i], hi_and_nan[i] = x_lo, x_hi
            hi_and_nan[n + i] = float(bool(torch.isnan(x_lo)))
    active = is_active(group)
    device = local(tensors[0]).device if tensors else torch.device("cpu")
    # The collective runs on the tensors' device (NCCL needs CUDA tensors); the bounds come back to the host once.
    lo = _all_reduce(lo.to(device), dist.ReduceOp.MIN, group, active).cpu()
    hi_and_nan = _all_reduce(hi_and_nan.to(device), dist.ReduceOp.MAX, group, active).cpu()
    hi, nan = hi_and_nan[:n], hi_and_nan[n:] > 0
    return lo.masked_fill(nan, math.nan), hi.masked_fill(nan, math.nan)


def sharded_soft_mask(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    eps: float = NORM_EPS,
    apply_tanh: bool = True,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """SWiFT's soft mask M = tanh(Norm(I_b) / (Norm(I_l) + eps)) ([PS] Eq. 9, spec §4) of the LOCAL shards of the
    importances, with each tensor's min and max taken over all ranks (:func:`global_min_max`); with
    ``apply_tanh=False`` BMFT's ratio R = Norm(I_b) / (Norm(I_l) + eps) ([PB] Eq. 3).

    ``imp_bias[i]`` and ``imp_loss[i]`` are this rank's pieces of the same parameter (same shape; DTensors are
    reduced to their local shards, flat 1-D pieces or FSDP's row shards are all fine, and a piece may be empty).
    Concatenating the ranks' results in shard order gives :func:`fastmask.masks.importance_ratio` of the full
    tensors bit for bit (R), and :func:`fastmask.masks.soft_mask` to the rounding of tanh (M). float32, plain
    tensors of the local shapes. Every rank must call it with its pieces of the same tensors, in the same order.
    """
    if len(imp_bias) != len(imp_loss):
        raise ValueError(f"sharded_soft_mask: {len(imp_bias)} I_b tensors but {len(imp_loss)} I_l tensors")
    local_b, local_l = [local(t) for t in imp_bias], [local(t) for t in imp_loss]
    for i, (b, loss) in enumerate(zip(local_b, local_l, strict=True)):
        if b.shape != loss.shape:
            raise ValueError(f"sharded_soft_mask: tensor {i} has I_b shard shape {tuple(b.shape)} but I_l shard "
                             f"shape {tuple(loss.shape)}")
    with phase("fastmask.soft_mask"):
        lo, hi = global_min_max([*local_b, *local_l], group)
        n, out = len(local_b), []
        for i, (b, loss) in enumerate(zip(local_b, local_l, strict=True)):
            r = (minmax_normalize(b, eps, (lo[i], hi[i]))
                 / (minmax_normalize(loss, eps, (lo[n + i], hi[n + i])) + eps))
            out.append(torch.tanh(r) if apply_tanh else r)
    return out


# ---- fine-tuning and importance of FSDP2-sharded models --------------------------------------------------------
#
# With torch.distributed.fsdp.fully_shard every parameter is a DTensor whose rank-local shard is a plain tensor, and
# backward() leaves each rank the reduce-scattered shard of the gradient (autograd.grad cannot be used: the forward
# runs on the gathered, unsharded parameters, not on the DTensors). FSDP averages over the ranks where the global-
# batch loss of fastmask needs the sum of the ranks' shares (see above), so the loss is scaled by the world size
# (exact for power-of-two worlds); the FSDP mesh is therefore one dimension over the whole process group (no HSDP).
# The masked optimizers then run on the local shards, which are views of the DTensors' storage: the fused kernels
# see plain tensors, and the update lands in the sharded parameters.

_SHARD_OF = "_fastmask_sharded_parameter"  # attribute of a local-shard view: the DTensor parameter it belongs to


def _world(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_active(group) else 1


def shard_views(named: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs with every DTensor parameter replaced by its local shard (a view sharing its
    storage), for an optimizer over this rank's shards; :func:`backward` then hands each view its gradient shard.
    Other parameters are returned as they are."""
    out = []
    for name, p in named:
        if _is_dtensor(p):
            view = local(p)
            setattr(view, _SHARD_OF, p)
            p = view
        out.append((name, p))
    return out


def _check_all_sharded(n_sharded: int, n: int) -> None:
    # A plain parameter next to DTensors would get only this rank's share of its gradient (FSDP reduces its own).
    if n_sharded != n:
        raise ValueError(f"{n - n_sharded} of the {n} parameters are not sharded: fully_shard the model's root "
                         "module too, so that FSDP owns every parameter")


def backward(loss: Tensor, params: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Back-propagate this rank's share of the global batch's ``loss`` and leave on each of ``params`` the gradient
    of the global batch, summed over the ranks, so that every rank takes the same step.

    Plain parameters (one process, or DDP-style replicas): ``loss.backward()`` and one all-reduce of the gradients
    (:func:`all_reduce_grads`). Local shards from :func:`shard_views` (FSDP2): ``(world · loss).backward()``, whose
    reduce-scatter averages the shares into each rank's gradient shard, which is moved to the shard's view.
    """
    views = [p for p in params if hasattr(p, _SHARD_OF)]
    if not views:
        loss.backward()
        all_reduce_grads([p.grad for p in params], group)
        return
    _check_all_sharded(len(views), len(params))
    for view in views:  # a gradient left on a DTensor (by the caller) would be accumulated into
        getattr(view, _SHARD_OF).grad = None
    (loss * _world(group)).backward()
    for view in views:
        owner = getattr(view, _SHARD_OF)
        view.grad = None if owner.grad is None else local(owner.grad)
        owner.grad = None  # FSDP would otherwise accumulate the next step's gradient into it


def sharded_grads(objective: Tensor, params: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """This rank's shards of ∂objective/∂θ for FSDP2 (DTensor) ``params``, summed over the ranks like
    :func:`backward`; ``objective`` is this rank's share of the global batch's objective (after the forward).
    Unused parameters get zeros. The parameters' ``.grad`` is left empty."""
    _check_all_sharded(sum(_is_dtensor(p) for p in params), len(params))
    for p in params:
        p.grad = None
    (objective * _world(group)).backward()
    grads = [torch.zeros_like(local(p)) if p.grad is None else local(p.grad) for p in params]
    for p in params:
        p.grad = None
    return grads


def shard_sums(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> tuple[list[float], list[int]]:
    """(sum, number of elements) of each tensor over every rank's shard, with one float64 all-reduce: the means of
    sharded masks (SWiFT's head re-initialisation threshold). The local sums and sizes without an active group."""
    t = torch.tensor([[float(x.double().sum()), x.numel()] for x in tensors], dtype=torch.float64).reshape(-1, 2)
    _all_reduce(t, dist.ReduceOp.SUM, group, is_active(group))
    return t[:, 0].tolist(), [int(n) for n in t[:, 1].tolist()]
