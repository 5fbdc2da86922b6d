"""One Triton launch over a whole list of tensors: the host tables that drive it and the device helpers its kernels
share.

A multi-tensor kernel gets, instead of one pointer per tensor, tables in device memory: per tensor its data
pointers (``data_ptr()`` as int64, cast back to typed pointers inside the kernel with
``tl.load(table + t).to(tl.pointer_type(...))``) and its element count; per block of every tensor the tensor it
belongs to and the element offset it starts at. A list of 161 small tensors and a list of one huge tensor are
both one launch with balanced programs. The Triton interpreter (``TRITON_INTERPRET=1``) dereferences such integer
addresses in host memory, so the same launchers run under the interpreter on CPU tensors.

Two table layouts serve two kinds of kernel:

- :func:`launch_table` (fisher_accumulate, soft_mask): one program per block, pointers stored column by column, all in
  one
  host-to-device transfer;
- :func:`address_table` and :func:`block_table` (the optimizer steps, launched by :func:`launch_optimizer`): an
  address table ``ptrs[T, R]`` of each tensor's R buffers (param, grad, state, mask; 0 for a missing one), and a
  block table in which a program handles ROWS blocks at once as a [ROWS, BLOCK] tile (each row its own tensor),
  so the grid is ceil(blocks / ROWS). On the GPU ROWS is 1; under the interpreter, whose cost is per operation
  rather than per element, ROWS = 16 makes a step over 161 small tensors take 11 program instances instead of 161.

A mask's dtype is a compile-time constant of the optimizer kernels (MASK_KIND), so a group whose masks have several
dtypes is launched once per mask dtype; tensors without a mask join any launch with a zero address (a run-time flag
in the kernel). In practice a group has one mask dtype and therefore one launch.

Tables are cached (:func:`cached`): an optimizer step's tables (:func:`plan_optimizer`) and a launch table are built,
checked and copied to the device once for a given list of tensors, and again only when a tensor's storage
(``data_ptr``), element count or mask (its storage or dtype) changes, i.e. when the key, those values, changes.
A steady-state step then makes no host-to-device copy of tables, so it can be captured in a CUDA graph, and its host
work is the key's lookup instead of the tables' construction (``bench/bench_step_host.py``). What a key does not see
is an in-place change of a tensor's metadata that keeps its pointer and element count (``t_()``, ``as_strided_()``
on a parameter); the optimizers never make one.

One module over 400 lines on purpose: the host tables, their cache and the device helpers are one contract
between the launchers and the kernels, and change together.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmask.util.layout import dense

# torch dtype -> the Triton element type a kernel casts a table pointer to (the float dtypes kernels compute on).
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
# Masks may also be bytes: uint8 (m / 255) and bool, read as their bytes.
_TL_MASK_DTYPES = {**TL_DTYPES, torch.uint8: tl.uint8, torch.bool: tl.uint8}

# MASK_KIND constexpr values.
MASK_NONE, MASK_FLOAT, MASK_UINT8, MASK_BOOL = 0, 1, 2, 3
MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool)
PARAM_DTYPES = tuple(TL_DTYPES)

# Tables kept for the most recently used keys: a few per optimizer param group and (device, dtype) group, plus the
# launch tables of the importance ops; far more than a training run uses at once.
TABLE_CACHE_SIZE = 64
_tables: OrderedDict[Hashable, object] = OrderedDict()
T = TypeVar("T")


def cached(key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, made once per ``key`` and kept while the key is among the TABLE_CACHE_SIZE most recently used."""
    if key in _tables:
        _tables.move_to_end(key)
        return _tables[key]  # type: ignore[return-value]
    value = _tables[key] = build()
    if len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return value


def clear_tables() -> None:
    """Forget every cached table (the next launch of every list of tensors builds and copies its tables again)."""
    _tables.clear()


def pointers(tensors: Sequence[Tensor | None]) -> tuple[int, ...]:
    """data_ptr of each tensor, 0 for a missing one: what a table holds of it, and so part of the table's key."""
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter; it has no libdevice and is slow per program instance."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size() -> int:
    """Elements per program of a :func:`launch_table` kernel: 1024 on a GPU; 4096 in the interpreter, where each
    program instance costs ~1 ms."""
    return 4096 if interpreting() else 1024


def tile() -> tuple[int, int]:
    """(ROWS, BLOCK) of an optimizer kernel's tile."""
    return (16, 1024) if interpreting() else (1, 1024)


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a parameter or mask dtype."""
    return _TL_MASK_DTYPES[dtype]


def opmath(dtype: torch.dtype):
    """The compute dtype: float64 for float64 storage, else float32 (as torch's fused optimizers)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def mask_kind(mask: Tensor | None) -> int:
    """The MASK_KIND constexpr of ``mask``'s dtype."""
    if mask is None:
        return MASK_NONE
    if mask.dtype == torch.bool:
        return MASK_BOOL
    if mask.dtype == torch.uint8:
        return MASK_UINT8
    return MASK_FLOAT


def same_dense_layout(a: Tensor, b: Tensor) -> bool:
    """a and b (same shape) are dense and store their elements in the same order, so one flat index walks both."""
    if not (dense(a) and dense(b)):
        return False
    return all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride(), strict=True))


def describe(t: Tensor) -> str:
    """shape, strides, dtype and device of ``t``, for error messages that name the tensor at fault."""
    return f"shape {tuple(t.shape)}, strides {t.stride()}, dtype {t.dtype}, device {t.device}"


def _blocks(numels: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(tensor index, first element), both int64, of every ``block``-sized piece of every tensor, in tensor order."""
    counts = (numels + block - 1) // block
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts  # index of each tensor's first block
    return tensor, (torch.arange(len(tensor)) - first[tensor]) * block


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
    tensors of one row having equal numel). Built on the host and copied to ``device`` in one transfer, once per
    (pointers, numels, block, device): :func:`cached`."""
    key = ("launch_table", device, block, tuple(t.numel() for t in pointer_columns[0]),
           *(pointers(col) for col in pointer_columns))
    return cached(key, lambda: _launch_table(pointer_columns, block, device))


def _launch_table(pointer_columns: Sequence[Sequence[Tensor]], block: int, device: torch.device) -> LaunchTable:
    first = pointer_columns[0]
    numels = torch.tensor([t.numel() for t in first], dtype=torch.int64)
    block_tensor, block_start = _blocks(numels, block)
    n_tensors, n_blocks = len(first), len(block_tensor)
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
    block_tensor, block_start = _blocks(torch.tensor(list(numels), dtype=torch.int64), block)
    total = len(block_tensor)
    programs = -(-total // rows)
    tensor = torch.zeros(programs * rows, dtype=torch.int32)
    start = torch.full((programs * rows,), 1 << 62, dtype=torch.int64)
    tensor[:total] = block_tensor
    start[:total] = block_start
    return tensor.to(device, non_blocking=True), start.to(device, non_blocking=True), programs


def scalar_pointer(op: str, name: str, t: Tensor | None, device: torch.device) -> Tensor:
    """A one-element float32 tensor on ``device`` for an optional scalar (grad_scale / found_inf); read by the
    kernel, so a device-resident value never has to be synchronised to the host. A missing one is a cached zero."""
    if t is None:
        return cached(("zero", device), lambda: torch.zeros(1, dtype=torch.float32, device=device))
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must have one element, got shape {tuple(t.shape)}")
    return t.reshape(1).to(device=device, dtype=torch.float32)


def device_constants(values: Sequence[float], device: torch.device) -> Tensor:
    """float64 ``values`` on ``device``, copied there once per distinct values (a kernel's hyperparameters)."""
    key = ("constants", device, tuple(values))
    return cached(key, lambda: torch.tensor(list(values), dtype=torch.float64).to(device, non_blocking=True))


@dataclass(frozen=True)
class Launch:
    """One launch of an optimizer kernel, its tables on the device: MASK_KIND and mask dtype, the address table
    ``ptrs`` [T, R], ``numels`` [T], the block table (``block_tensor``, ``block_start``) and its number of
    ``programs``, and ``index``, the launch's rows of the group (None: all of them, in order)."""

    kind: int
    mask_dtype: torch.dtype
    ptrs: Tensor
    numels: Tensor
    block_tensor: Tensor
    block_start: Tensor
    programs: int
    index: Tensor | None


def plan_optimizer(op: str, columns: dict[str, Sequence[Tensor] | None],
                   masks: Sequence[Tensor | None]) -> list[Launch]:
    """The launches of an optimizer step over the group whose address-table columns are ``columns`` (``"params"``
    first; None for a buffer list the step does not use, whose column is 0) and ``masks`` (the last column), one per
    mask dtype (:func:`split_by_mask_dtype`), without empty ones.

    Checked (:func:`check_group`) and built once per key (:func:`cached`): the op, the device, the tile, every
    tensor's pointer, the parameters' element counts and the masks' dtypes."""
    params = columns["params"]
    if not params:
        check_group(op, params, {k: v for k, v in columns.items() if k != "params" and v is not None}, masks)
        return []
    rows, block = tile()
    device = params[0].device
    key = (op, device, rows, block, tuple(p.numel() for p in params), tuple(m is None or m.dtype for m in masks),
           *(None if col is None else pointers(col) for col in columns.values()), pointers(masks))

    def build() -> list[Launch]:
        check_group(op, params, {k: v for k, v in columns.items() if k != "params" and v is not None}, masks)
        launches = []
        for kind, idx in split_by_mask_dtype(masks):
            sub_masks = [masks[i] for i in idx]
            ptrs = address_table(
                [*([None] * len(idx) if col is None else [col[i] for i in idx] for col in columns.values()),
                 sub_masks], device)
            numels = [params[i].numel() for i in idx]
            block_tensor, block_start, programs = block_table(numels, block, rows, device)
            if programs == 0:
                continue
            mask_dtype = next((m.dtype for m in sub_masks if m is not None), torch.float32)
            index = None if idx == list(range(len(params))) else torch.tensor(idx).to(device, non_blocking=True)
            launches.append(Launch(kind, mask_dtype, ptrs, torch.tensor(numels).to(device, non_blocking=True),
                                   block_tensor, block_start, programs, index))
        return launches

    return cached(key, build)


def launch_optimizer(
    kernel,
    op: str,
    launches: Sequence[Launch],
    params: Sequence[Tensor],
    per_tensor: Sequence[Tensor],
    hyper: Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    **constexprs,
) -> None:
    """Launch an optimizer-step ``kernel`` once per planned launch (:func:`plan_optimizer`) of the group ``params``.

    The kernel's arguments are, in order: the address table, the numels, each ``per_tensor[k]`` (per-tensor rows, of
    the launch's tensors), ``hyper``, the block table (tensor, start), the grad_scale and found_inf pointers
    (:func:`scalar_pointer`); then the constexprs DTYPE, ACC, FP64, MASK_KIND, MASK_TL, HAS_SCALE, HAS_FOUND_INF,
    ROWS, BLOCK and the kernel's own ``constexprs``.
    """
    device, dtype = params[0].device, params[0].dtype
    scale = scalar_pointer(op, "grad_scale", grad_scale, device)
    inf = scalar_pointer(op, "found_inf", found_inf, device)
    rows, block = tile()
    for launch in launches:
        rows_of = (t if launch.index is None else t.index_select(0, launch.index) for t in per_tensor)
        kernel[(launch.programs,)](
            launch.ptrs, launch.numels, *rows_of, hyper, launch.block_tensor, launch.block_start, scale, inf,
            DTYPE=tl_dtype(dtype), ACC=opmath(dtype), FP64=dtype == torch.float64, MASK_KIND=launch.kind,
            MASK_TL=tl_dtype(launch.mask_dtype), HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ROWS=rows, BLOCK=block, num_warps=4, enable_fp_fusion=False, **constexprs,
        )


@triton.jit
def block_lanes(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """(t, offs, lane) of this program's block of a :class:`LaunchTable` launch: the tensor index, the element
    offsets and the lanes inside the tensor."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(numels + t)


@triton.jit
def tile_lanes(block_tensor_ptr, block_start_ptr, numels_ptr, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(t, offs, n, lane) of this program's [ROWS, BLOCK] tile, one block of one tensor per row: the tensor index
    [ROWS, 1], the element offsets, the tensor's numel (0 when ``found_inf`` is set: every lane off) and the lanes
    inside it."""
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    t = tl.load(block_tensor_ptr + blocks).to(tl.int64)
    offs = tl.load(block_start_ptr + blocks) + tl.arange(0, BLOCK)[None, :]
    n = tl.load(numels_ptr + t)
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    return t, offs, n, offs < n


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
    """The float32 mask value of fastmask.ops.reference.mask_as_float at ``offs``: float masks as they are, uint8 as
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
