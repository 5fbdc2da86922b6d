"""Data-parallel SWiFT / BMFT (DDP semantics with the global batch's loss) and the process-group basics.

SWiFT's and BMFT's losses are not sums over samples: the bias function compares group means and the WBCE weights
come from the batch's class balance, so the mean of per-rank losses is not the loss of the global batch, and
averaging per-rank gradients (plain DDP) would not reproduce the single-process run. Instead every rank gathers
the logits, labels and attributes of the global batch (detached, except its own slice, which stays in its graph),
computes the global batch's loss, and back-propagates through its own samples only: the sum over ranks of these
gradients is exactly ∂L_global/∂θ (the chain rule split over samples). One all-reduce of the gradients per
backward, the traffic DDP would have, plus B·W logits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_active(group: dist.ProcessGroup | None = None) -> bool:
    """True inside an initialised process group of more than one rank (torchrun, or init_process_group by hand)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None = None) -> Tensor:
    """``t`` reduced over the ranks in place with ``op`` (and returned); unchanged without an active group."""
    if is_active(group):
        dist.all_reduce(t, op=op, group=group)
    return t


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
