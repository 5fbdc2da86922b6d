"""One Triton launch over a whole list of tensors: the device table that drives it.

A multi-tensor kernel gets, instead of one pointer per tensor, a table in device memory: per tensor its data
pointers (``data_ptr()`` as int64, cast back to typed pointers inside the kernel with
``tl.load(table + t).to(tl.pointer_type(...))``) and its element count; per program the tensor it works on and the
element offset of its block. The grid has one program per block of every tensor, so a list of 161 small tensors and
a list of one huge tensor are both one launch with balanced programs.

The Triton interpreter (``TRITON_INTERPRET=1``) dereferences such integer addresses in host memory, so the same
launcher runs under the interpreter on CPU tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

# torch dtype -> the Triton element type a kernel casts a table pointer to.
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter; it has no libdevice and is slow per program instance."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size() -> int:
    """Elements per program: 1024 on a GPU; 4096 in the interpreter, where each program instance costs ~1 ms."""
    return 4096 if interpreting() else 1024


@dataclass
class LaunchTable:
    """Views into one int64 device tensor: ``columns[k][t]`` is column k of tensor t (pointers, sizes);
    ``block_tensor[p]`` and ``block_start[p]`` are program p's tensor and first element."""

    columns: list[Tensor]
    numels: Tensor
    block_tensor: Tensor
    block_start: Tensor
    n_blocks: int


def launch_table(pointer_columns: Sequence[Sequence[Tensor]], block: int, device: torch.device) -> LaunchTable:
    """The table for tensors whose data pointers are ``pointer_columns[k][t]`` (all columns of one length, the
    tensors of one row having equal numel). Built on the host and copied to ``device`` in one transfer."""
    first = pointer_columns[0]
    numels = torch.tensor([t.numel() for t in first], dtype=torch.int64)
    blocks = (numels + block - 1) // block
    n_tensors, n_blocks = len(first), int(blocks.sum())
    block_tensor = torch.repeat_interleave(torch.arange(n_tensors), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks  # index of each tensor's first block
    block_start = (torch.arange(n_blocks) - first_block[block_tensor]) * block
    pointers = torch.tensor([[t.data_ptr() for t in col] for col in pointer_columns], dtype=torch.int64)
    flat = torch.cat([pointers.reshape(-1), numels, block_tensor, block_start]).to(device, non_blocking=True)
    k = len(pointer_columns)
    cols = [flat[i * n_tensors : (i + 1) * n_tensors] for i in range(k)]
    rest = flat[k * n_tensors :]
    return LaunchTable(
        columns=cols,
        numels=rest[:n_tensors],
        block_tensor=rest[n_tensors : n_tensors + n_blocks],
        block_start=rest[n_tensors + n_blocks :],
        n_blocks=n_blocks,
    )


def _dense(t: Tensor) -> bool:
    """No gaps and no overlaps: sorted by stride, each dimension's stride is the product of the sizes inside it."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_dense_layout(a: Tensor, b: Tensor) -> bool:
    """a and b (same shape) are dense and store their elements in the same order, so one flat index walks both."""
    if not (_dense(a) and _dense(b)):
        return False
    return all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride(), strict=True))


def describe(t: Tensor) -> str:
    """shape, strides, dtype and device of ``t``, for error messages that name the tensor at fault."""
    return f"shape {tuple(t.shape)}, strides {t.stride()}, dtype {t.dtype}, device {t.device}"
