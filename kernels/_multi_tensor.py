"""Host-side plumbing shared by the multi-tensor Triton optimizer kernels (masked_adam, masked_sgd).

One launch covers a whole group of same-device, same-dtype tensors. The launch carries:

- an int64 *address table* ``ptrs[T, R]``: the ``data_ptr()`` of each tensor's R buffers (param, grad, state, mask);
  the kernel loads an address and casts it to a typed pointer (``.to(tl.pointer_type(...))``). This works on the
  GPU and, as checked, in the Triton interpreter too (it reads raw host addresses), so one scheme serves both;
- ``numels[T]`` and per-tensor scalars (e.g. Adam's bias corrections) in float64 tables;
- a *block table*: for every BLOCK-sized piece of every tensor, its tensor index and start offset. A program
  handles ROWS blocks at once as a [ROWS, BLOCK] tile (each row its own tensor), so the grid is
  ceil(blocks / ROWS). On the GPU ROWS is 1; under the interpreter, whose cost is per operation rather than per
  element, ROWS = 16 makes a step over 161 small tensors take 11 program instances instead of 161.

A mask's dtype is a compile-time constant of the kernel (MASK_KIND), so a group whose masks have several dtypes is
launched once per mask dtype; tensors without a mask join any launch with a zero address (a run-time flag in the
kernel). In practice a group has one mask dtype and therefore one launch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# MASK_KIND constexpr values.
MASK_NONE, MASK_FLOAT, MASK_UINT8, MASK_BOOL = 0, 1, 2, 3
MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool)
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
    torch.uint8: tl.uint8,
    torch.bool: tl.uint8,  # bool masks are read as their bytes
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile() -> tuple[int, int]:
    """(ROWS, BLOCK) of a program's tile."""
    return (16, 1024) if interpreting() else (1, 1024)


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def opmath(dtype: torch.dtype):
    """The compute dtype: float64 for float64 storage, else float32 (as torch's fused optimizers)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def mask_kind(mask: Tensor | None) -> int:
    if mask is None:
        return MASK_NONE
    if mask.dtype == torch.bool:
        return MASK_BOOL
    if mask.dtype == torch.uint8:
        return MASK_UINT8
    return MASK_FLOAT


def dense(t: Tensor) -> bool:
    """True if ``t``'s elements fill its memory span without gaps or overlaps (contiguous in some dim order), so it
    can be walked by one flat index alongside buffers with the same strides."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def check_group(op: str, params: Sequence[Tensor], buffers: dict[str, Sequence[Tensor]],
                masks: Sequence[Tensor | None]) -> None:
    """Every tensor of the group on one device with one dtype; buffer i and mask i shaped and laid out like
    params[i]. Errors name the list and the index at fault."""
    lengths = {"params": len(params), **{k: len(v) for k, v in buffers.items()}, "masks": len(masks)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: list lengths differ: {lengths}")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{op}: params[0] has dtype {dtype}; supported: float32, float64, float16, bfloat16")
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            raise ValueError(
                f"{op}: params[{i}] is {p.dtype} on {p.device} but params[0] is {dtype} on {device}; "
                "one launch takes tensors of one device and dtype (fastmask.ops groups them)"
            )
        if not dense(p):
            raise ValueError(f"{op}: params[{i}] is not contiguous (strides {p.stride()}); pass a contiguous tensor")
        named = [(f"{name}[{i}]", lst[i]) for name, lst in buffers.items()]
        if masks[i] is not None:
            named.append((f"masks[{i}]", masks[i]))
        for name, t in named:
            if t.device != device:
                raise ValueError(f"{op}: {name} is on {t.device} but params[{i}] is on {device}")
            if name.startswith("masks"):
                if t.dtype not in MASK_DTYPES:
                    raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16, "
                                    "uint8 (m/255) or bool")
            elif t.dtype != dtype:
                raise ValueError(f"{op}: {name} has dtype {t.dtype} but params[{i}] has dtype {dtype}")
            if t.shape != p.shape:
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but params[{i}] has shape {tuple(p.shape)}")
            if t.stride() != p.stride():
                raise ValueError(f"{op}: {name} has strides {t.stride()} but params[{i}] has strides {p.stride()}; "
                                 "give every buffer the parameter's memory layout")


def split_by_mask_dtype(masks: Sequence[Tensor | None]) -> list[tuple[int, list[int]]]:
    """(MASK_KIND, indices) per launch: one launch per mask dtype, unmasked tensors with the first."""
    by_dtype: dict[torch.dtype | None, list[int]] = {}
    for i, m in enumerate(masks):
        by_dtype.setdefault(None if m is None else m.dtype, []).append(i)
    unmasked = by_dtype.pop(None, [])
    if not by_dtype:
        return [(MASK_NONE, unmasked)]
    launches = []
    for n, (dtype, idx) in enumerate(by_dtype.items()):
        kind = mask_kind(torch.empty(0, dtype=dtype))
        launches.append((kind, sorted(idx + unmasked) if n == 0 else idx))
    return launches


def address_table(columns: Sequence[Sequence[Tensor | None]], device: torch.device) -> Tensor:
    """int64 [T, len(columns)]: data_ptr of each tensor, 0 for a missing one."""
    rows = [[0 if t is None else t.data_ptr() for t in row] for row in zip(*columns, strict=True)]
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def block_table(numels: Sequence[int], block: int, rows: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(tensor index int32, start offset int64) of every block of every tensor, padded to a multiple of ``rows``
    with empty blocks (start beyond any tensor), and the number of programs."""
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    total = int(counts.sum())
    programs = -(-total // rows)
    tensor = torch.zeros(programs * rows, dtype=torch.int32)
    start = torch.full((programs * rows,), 1 << 62, dtype=torch.int64)
    tensor[:total] = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    start[:total] = (torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, counts)) * block
    return tensor.to(device, non_blocking=True), start.to(device, non_blocking=True), programs


def scalar_pointer(op: str, name: str, t: Tensor | None, device: torch.device) -> Tensor:
    """A one-element float32 tensor on ``device`` for an optional scalar (grad_scale / found_inf); read by the
    kernel, so a device-resident value never has to be synchronised to the host."""
    if t is None:
        return torch.zeros(1, dtype=torch.float32, device=device)
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must have one element, got shape {tuple(t.shape)}")
    return t.reshape(1).to(device=device, dtype=torch.float32)


@triton.jit
def div_ieee(a, b, FP64: tl.constexpr):
    """a / b correctly rounded (Triton's float32 ``/`` may be approximate on the GPU; float64's is exact)."""
    if FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt_ieee(x, FP64: tl.constexpr):
    """√x correctly rounded (``tl.sqrt`` on float32 is approximate on the GPU)."""
    if FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def load_mask(addr, offs, n, MASK_KIND: tl.constexpr, MASK_TL: tl.constexpr):
    """The float32 mask value of fastmask.reference.mask_as_float at ``offs``: float masks as they are, uint8 as
    m / 255, bool as 0 / 1. A tensor without a mask (address 0) reads 1 everywhere."""
    lim = tl.where(addr != 0, n, 0)
    if MASK_KIND == 1:
        m = tl.load(addr.to(tl.pointer_type(MASK_TL)) + offs, mask=offs < lim, other=1.0).to(tl.float32)
    elif MASK_KIND == 2:
        raw = tl.load(addr.to(tl.pointer_type(tl.uint8)) + offs, mask=offs < lim, other=255)
        m = tl.div_rn(raw.to(tl.float32), 255.0)
    else:
        raw = tl.load(addr.to(tl.pointer_type(tl.uint8)) + offs, mask=offs < lim, other=1)
        m = tl.where(raw != 0, 1.0, 0.0)
    return m


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Opmath ``x`` rounded to the storage dtype, to nearest even (as torch). bfloat16 is rounded by hand, as
    c10::BFloat16 does (NaN → 0x7FC0): the Triton interpreter's float32 → bfloat16 cast truncates."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
