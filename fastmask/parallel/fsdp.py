"""FSDP2-sharded SWiFT / BMFT: importances, masks and masked steps on each rank's parameter shards.

Fine-tuning and importance. With torch.distributed.fsdp.fully_shard every parameter is a DTensor whose rank-local shard
is a plain tensor, and backward() leaves each rank the reduce-scattered shard of the gradient (autograd.grad cannot be
used: the forward runs on the gathered, unsharded parameters, not on the DTensors). FSDP averages over the ranks where
the global batch's loss of fastmask needs the sum of the ranks' shares (:mod:`fastmask.parallel.ddp`), so the loss is
scaled by the world size (exact for power-of-two worlds); the FSDP mesh is therefore one dimension over the whole
process group (no HSDP). The masked optimizers then run on the local shards, which are views of the DTensors' storage:
the fused kernels see plain tensors, and the update lands in the sharded parameters.

Masks. When parameters are sharded, each rank holds only a piece of every importance tensor. SWiFT's Norm needs
each tensor's min and max, which are global: every rank packs its local minima of all tensors (I_b's and I_l's) into one
float32 vector and its maxima into another, and one all-reduce each (MIN, MAX) gives every rank every tensor's
global bounds. The element-wise rest of the formula is local: the op :func:`fastmask.ops.soft_mask` given those
bounds (``bounds=``), the same kernels as for whole tensors. NaN is carried as a flag in the MAX vector (a
reduction's treatment of NaN depends on the backend; torch's min() / max() return NaN, and so must this).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fastmask import ops
from fastmask.ops.reference import NORM_EPS
from fastmask.parallel.ddp import all_reduce, all_reduce_grads, is_active


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
    device = local(tensors[0]).device if tensors else torch.device("cpu")
    # The collective runs on the tensors' device (NCCL needs CUDA tensors); the bounds come back to the host once.
    lo = all_reduce(lo.to(device), dist.ReduceOp.MIN, group).cpu()
    hi_and_nan = all_reduce(hi_and_nan.to(device), dist.ReduceOp.MAX, group).cpu()
    hi, nan = hi_and_nan[:n], hi_and_nan[n:] > 0
    return lo.masked_fill(nan, math.nan), hi.masked_fill(nan, math.nan)


def soft_mask_bounds(imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor],
                     group: dist.ProcessGroup | None = None) -> Tensor:
    """The ``bounds`` of :func:`fastmask.ops.soft_mask` for this rank's pieces of the importances: a float32 [4, n]
    tensor, rows min I_b, max I_b, min I_l, max I_l of each whole tensor over all ranks (:func:`global_min_max`: two
    all-reduces for all tensors together). ``imp_bias[i]`` and ``imp_loss[i]`` are pieces of the same parameter
    (same shape; DTensors count by their local shards, and a piece may be empty); every rank must call it with its
    pieces of the same tensors, in the same order."""
    if len(imp_bias) != len(imp_loss):
        raise ValueError(f"sharded_soft_mask: {len(imp_bias)} I_b tensors but {len(imp_loss)} I_l tensors")
    local_b, local_l = [local(t) for t in imp_bias], [local(t) for t in imp_loss]
    for i, (b, loss) in enumerate(zip(local_b, local_l, strict=True)):
        if b.shape != loss.shape:
            raise ValueError(f"sharded_soft_mask: tensor {i} has I_b shard shape {tuple(b.shape)} but I_l shard "
                             f"shape {tuple(loss.shape)}")
    n = len(local_b)
    lo, hi = global_min_max([*local_b, *local_l], group)
    return torch.stack([lo[:n], hi[:n], lo[n:], hi[n:]])  # rows lo_b, hi_b, lo_l, hi_l, as the op takes them


def sharded_soft_mask(
    imp_bias: Sequence[Tensor],
    imp_loss: Sequence[Tensor],
    eps: float = NORM_EPS,
    apply_tanh: bool = True,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """SWiFT's soft mask M = tanh(Norm(I_b) / (Norm(I_l) + eps)) ([PS] Eq. 9, docs/algorithm.md §4) of the LOCAL shards
    of the importances, with each tensor's min and max taken over all ranks; with ``apply_tanh=False`` BMFT's ratio
    R = Norm(I_b) / (Norm(I_l) + eps) ([PB] Eq. 3).

    The pieces as :func:`soft_mask_bounds` takes them. Concatenating the ranks' results in shard order gives
    :func:`fastmask.masking.masks.importance_ratio` of the full tensors bit for bit (R), and
    :func:`fastmask.masking.masks.swift_mask` to the rounding of tanh (M). float32, plain tensors of the local
    shapes. The arithmetic is the op :func:`fastmask.ops.soft_mask` given the global bounds.
    """
    bounds = soft_mask_bounds(imp_bias, imp_loss, group)
    return ops.soft_mask([local(t) for t in imp_bias], [local(t) for t in imp_loss], eps=eps, apply_tanh=apply_tanh,
                         bounds=bounds)


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
    all_reduce(t, dist.ReduceOp.SUM, group)
    return t[:, 0].tolist(), [int(n) for n in t[:, 1].tolist()]
