"""The global percentile of tensors sharded across ranks (BMFT's threshold α, docs/algorithm.md §4, under DDP /
FSDP): the same radix selection as the local op (:mod:`fastmask.ops.radix`), with every pass's histogram summed
over the ranks by ``all_reduce`` before the bins are chosen. Each rank counts its own shard with the
``radix_histogram`` kernel; traffic is one histogram per pass (one or two rows of 2^16 int64 counts), whatever the
number of elements; no rank gathers data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastmask import ops
from fastmask.ops import radix
from fastmask.parallel.ddp import all_reduce, is_active


def percentile(
    tensors: Sequence[Tensor], q: float, method: str = "linear", group: dist.ProcessGroup | None = None
) -> float:
    """The q-th percentile of every element of ``tensors`` on every rank of ``group`` taken together, equal to
    ``np.percentile`` over the concatenation of all ranks' tensors (same methods and dtype semantics as
    :func:`fastmask.ops.percentile`). Without an initialised process group it is the local percentile.

    Every rank of ``group`` must call it with the same ``q`` and ``method`` and tensors of one dtype (a rank may hold
    only empty tensors, but at least one tensor, to carry the dtype). NaN on any rank raises on every rank, naming
    the ranks and, on the rank that holds it, the tensor.
    """
    if not tensors:
        raise ValueError("percentile: every rank needs at least one tensor (an empty one is fine) to carry the dtype")
    tensors = list(tensors)
    dtype = radix.check_arguments(tensors, q, method)
    device = tensors[0].device
    active = is_active(group)
    codes = list(radix.DTYPES)
    meta = torch.tensor([sum(t.numel() for t in tensors), codes.index(dtype), -codes.index(dtype)], device=device)
    n = int(all_reduce(meta[:1].clone(), dist.ReduceOp.SUM, group).item())
    spread = all_reduce(meta[1:].clone(), dist.ReduceOp.MAX, group)
    if spread[0].item() != -spread[1].item():
        raise TypeError(f"percentile: the ranks hold different dtypes (this rank: {dtype})")
    if n == 0:
        raise ValueError("percentile: the tensors hold no elements on any rank")

    def histogram(prefixes: list[int], prefix_bits: int, digit_bits: int) -> np.ndarray:
        local_error = None
        try:
            h = ops.radix_histogram(tensors, prefixes, prefix_bits, digit_bits).to(device)
        except ValueError as exc:  # NaN, found in the first pass: the other ranks must not wait for this one
            if prefix_bits > 0:
                raise
            local_error = exc
            h = torch.zeros(len(prefixes), 1 << digit_bits, dtype=torch.int64, device=device)
        if prefix_bits == 0:
            world = dist.get_world_size(group) if active else 1
            failed = torch.zeros(world, dtype=torch.int64, device=device)
            failed[dist.get_rank(group) if active else 0] = local_error is not None
            bad = torch.nonzero(all_reduce(failed, dist.ReduceOp.SUM, group)).flatten().tolist()
            if bad:
                here = f"; here: {local_error}" if local_error else ""
                raise ValueError(f"percentile: NaN on rank(s) {bad}{here}")
        return all_reduce(h, dist.ReduceOp.SUM, group).cpu().numpy()

    digit_bits = radix.DIGIT_BITS.get(device.type, 16)
    return radix.percentile_of(n, q, method, dtype, histogram, digit_bits)
