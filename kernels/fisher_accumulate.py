"""Fused diagonal-Fisher accumulation in Triton: I_b += g_b², I_l += g_l² (SWiFT Eqs. 7-8, docs/algorithm.md §3).

One launch per call covers every tensor of the list (see :mod:`fastmask.kernels.multi_tensor`): each program
takes one block of one tensor and updates both importances from both gradients in a single pass over the four
streams. Gradients of any float dtype are squared in float32, as ``fastmask.ops.reference.fisher_accumulate_`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmask.util.profiling import phase

from .multi_tensor import TL_DTYPES, block_lanes, block_size, describe, launch_table, same_dense_layout


@triton.jit
def _fisher_accumulate_kernel(
    ib_ptrs, il_ptrs, gb_ptrs, gl_ptrs, numels, block_tensor, block_start,
    GB_DTYPE: tl.constexpr, GL_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_lanes(block_tensor, block_start, numels, BLOCK)
    ib = tl.load(ib_ptrs + t).to(tl.pointer_type(tl.float32))
    il = tl.load(il_ptrs + t).to(tl.pointer_type(tl.float32))
    gb = tl.load(gb_ptrs + t).to(tl.pointer_type(GB_DTYPE))
    gl = tl.load(gl_ptrs + t).to(tl.pointer_type(GL_DTYPE))
    b = tl.load(gb + offs, mask=mask).to(tl.float32)
    l = tl.load(gl + offs, mask=mask).to(tl.float32)
    tl.store(ib + offs, tl.load(ib + offs, mask=mask) + b * b, mask=mask)
    tl.store(il + offs, tl.load(il + offs, mask=mask) + l * l, mask=mask)


def _check(imp: Sequence[Tensor], grad: Sequence[Tensor], imp_name: str, grad_name: str, device) -> None:
    dtype = grad[0].dtype
    for i, (a, g) in enumerate(zip(imp, grad, strict=True)):
        where = f"{imp_name}[{i}] ({describe(a)}) and {grad_name}[{i}] ({describe(g)})"
        if a.device != device or g.device != device:
            raise ValueError(f"fisher_accumulate_ (triton): {where} must be on {device}")
        if a.dtype != torch.float32:
            raise ValueError(f"fisher_accumulate_: {imp_name}[{i}] must be a float32 accumulator, got {describe(a)}")
        if g.dtype != dtype or g.dtype not in TL_DTYPES:
            raise ValueError(
                f"fisher_accumulate_ (triton): {grad_name}[{i}] must be float32, float16, bfloat16 or float64 and of "
                f"one dtype with {grad_name}[0] ({dtype}), got {describe(g)}"
            )
        if a.shape != g.shape:
            raise ValueError(f"fisher_accumulate_: {where} differ in shape")
        if not same_dense_layout(a, g):
            raise ValueError(f"fisher_accumulate_: {where} must share one dense memory layout (e.g. both contiguous)")


def fisher_accumulate_(
    imp_bias: Sequence[Tensor], imp_loss: Sequence[Tensor], grad_bias: Sequence[Tensor], grad_loss: Sequence[Tensor]
) -> None:
    """I_b += g_b², I_l += g_l² over every tensor, in place, in one Triton launch (same contract as
    ``fastmask.ops.reference.fisher_accumulate_``; the gradients of each list share one dtype)."""
    n = len(imp_bias)
    if not (len(imp_loss) == len(grad_bias) == len(grad_loss) == n):
        raise ValueError(
            f"fisher_accumulate_: list lengths differ: imp_bias {n}, imp_loss {len(imp_loss)}, "
            f"grad_bias {len(grad_bias)}, grad_loss {len(grad_loss)}"
        )
    if n == 0:
        return
    device = grad_bias[0].device
    _check(imp_bias, grad_bias, "imp_bias", "grad_bias", device)
    _check(imp_loss, grad_loss, "imp_loss", "grad_loss", device)
    for i, (a, b) in enumerate(zip(imp_bias, imp_loss, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"fisher_accumulate_: imp_bias[{i}] ({describe(a)}) and imp_loss[{i}] ({describe(b)}) "
                             "differ in shape")
    block = block_size()
    table = launch_table([imp_bias, imp_loss, grad_bias, grad_loss], block, device)
    if table.n_blocks == 0:
        return
    with phase("fastmask.triton.fisher_accumulate"):
        _fisher_accumulate_kernel[(table.n_blocks,)](
            *table.columns, table.numels, table.block_tensor, table.block_start,
            GB_DTYPE=TL_DTYPES[grad_bias[0].dtype], GL_DTYPE=TL_DTYPES[grad_loss[0].dtype], BLOCK=block,
            enable_fp_fusion=False,  # round g² and the sum separately, as the reference does
        )
