"""hard_mask on the CPU: BMFT's hard mask M = 1[R > alpha] per tensor (BMFT Eq. 4), as bools or packed bits.

Cases ``<size>-<layout>``, float32 scores R = 7 u^3 (u ~ U[0, 1)) thresholded at alpha = 7/8, their median (half
of every mask set):

- sizes: ``23m``, the 161 tensors of ResNet-50 with a 1-logit head (23,510,081 elements; ``--quick``: channels / 4,
  1.5M), and ``300m``, four tensors of 75M elements (``--quick``: 4 x 2M);
- layouts: ``bool`` (one byte per element, the tensor's shape) and ``bits`` (packed bits: flat int8, ceil(n / 8)
  bytes per tensor, bit i of byte j = element 8j + i, as ``np.packbits(bitorder="little")``).

Providers, side by side in one run, all checked equal to the reference before timing:

- ``reference`` = ``fastmask.ops.reference.hard_mask``: the papers' way, ``t > alpha`` per tensor (bits: then
  ``np.packbits`` per tensor);
- ``peer`` = the faster of two torch alternatives, both measured (the ``variant`` field says which won; torch has no
  ``_foreach_gt``): ``cat``, one ``torch.cat`` of the flattened tensors, one compare, and views of the result per
  tensor (bits: per-tensor compare and pack, below); ``out``, one output buffer and ``torch.gt(t, alpha, out=...)``
  into its per-tensor views (bits: views at byte-aligned offsets, zero padding, then one pack of the whole
  buffer). Bits are packed with torch integer ops: each 8 bool bytes read as one int64, multiplied by
  0x0102040810204080 so that byte i's bit lands on bit 56 + i, shifted down by 56;
- ``fastmask`` = ``fastmask.ops.hard_mask`` with the C++ backend (one parallel region over every tensor);
- ``roofline`` = the bytes the op must move over the in-place bandwidth measured in the same run: read 4 B and
  write 1 B per element (bool) or 1/8 B (bits); the bandwidth is the best of ``a.add_(b)``, ``a.mul_(s)`` and
  ``a.addcmul_(b, c)`` over float32 buffers of 64M elements (32M with ``--quick``), far above the caches,
  interleaved with the providers.

Every provider returns new tensors, so each call also pays for fresh output pages; ``output_alloc_ms`` (every row)
is that cost alone (empty + fill of the output shapes), measured in the same run. Times: the best of the
repetitions, providers interleaved.

    python bench/bench_hard_mask.py [--quick] [--json PATH] [--reps R] [--cases 23m-bool,...] [--threads T]
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch
from torch import Tensor

from fastmask import ops
from fastmask.ops import reference

ALPHA = 7 / 8  # the median of 7 u^3
PROBE_ELEMENTS = 64 << 20
BYTES_PER_ELEMENT = {"bool": 4 + 1, "bits": 4 + 1 / 8}
PACK = 0x0102040810204080  # byte i (0 or 1) of an int64 times this: bit 56 + i, no carries between them
CASES = "23m-bool,23m-bits,300m-bool,300m-bits"


def pack_bits(m: Tensor) -> Tensor:
    """np.packbits(m, bitorder="little") of a flat bool tensor whose length is a multiple of 8, in torch ops, as int8
    (hard_mask's "bits" layout)."""
    eight = m.view(torch.uint8).view(-1, 8).view(torch.int64).reshape(-1)
    return ((eight * PACK) >> 56).bitwise_and_(0xFF).to(torch.uint8).view(torch.int8)


def padded(n: int) -> int:
    return (n + 7) // 8 * 8


def peer_cat(tensors: list[Tensor], layout: str) -> list[Tensor]:
    if layout == "bits":  # per tensor: the pack needs each tensor's bits to start at a byte
        out = []
        for t in tensors:
            m = (t > ALPHA).reshape(-1)
            pad = padded(m.numel()) - m.numel()
            out.append(pack_bits(torch.cat([m, m.new_zeros(pad)]) if pad else m))
        return out
    flat = torch.cat([t.reshape(-1) for t in tensors]) > ALPHA
    return [m.view(t.shape) for m, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def peer_out(tensors: list[Tensor], layout: str) -> list[Tensor]:
    sizes = [padded(t.numel()) if layout == "bits" else t.numel() for t in tensors]
    buf = torch.empty(sum(sizes), dtype=torch.bool)
    for t, view in zip(tensors, buf.split(sizes), strict=True):
        torch.gt(t, ALPHA, out=view[: t.numel()].view(t.shape))
        view[t.numel():] = False
    if layout == "bool":
        return [v.view(t.shape) for v, t in zip(buf.split(sizes), tensors, strict=True)]
    return list(pack_bits(buf).split([s // 8 for s in sizes]))


def run_case(name: str, tensors: list[Tensor], reps: int, probe: harness.Bandwidth) -> list[dict]:
    layout = name.split("-")[1]
    n = sum(t.numel() for t in tensors)
    providers = {
        "reference": lambda: reference.hard_mask(tensors, ALPHA, layout=layout),
        "peer:cat": lambda: peer_cat(tensors, layout),
        "peer:out": lambda: peer_out(tensors, layout),
        "fastmask": lambda: ops.hard_mask(tensors, ALPHA, layout=layout, backend="cpp"),
        # Not a provider: fresh output tensors of the masks' shapes alone (allocation, faults, zeroed pages).
        "output_alloc": lambda: [torch.empty(m.shape, dtype=m.dtype).fill_(0) for m in want],
    }
    want = reference.hard_mask(tensors, ALPHA, layout=layout)
    for p in ("peer:cat", "peer:out", "fastmask"):
        got = providers[p]()
        if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
            raise AssertionError(f"{name}: {p} differs from the reference")
    samples = harness.interleave(providers, reps, probe=probe)
    alloc = harness.best_ms(samples.pop("output_alloc"))
    variant = harness.fastest(samples, "peer")
    rows = harness.timing_rows(name, samples, elements=n, tensors=len(tensors), layout=layout)
    rows.append(probe.row(name, BYTES_PER_ELEMENT[layout] * n, elements=n, tensors=len(tensors), layout=layout,
                          bytes_per_element=BYTES_PER_ELEMENT[layout]))
    for r in rows:
        r["output_alloc_ms"] = alloc
        if r["provider"] == "peer":
            r["variant"] = variant
    probe.reset()  # each case's roofline from its own samples
    return rows


def bench(args: argparse.Namespace) -> list[dict]:
    probe = harness.Bandwidth(PROBE_ELEMENTS // 2 if args.quick else PROBE_ELEMENTS)
    rows, tensors, size = [], [], None
    for name in args.cases.split(","):
        if name.split("-")[0] != size:
            size = name.split("-")[0]
            shapes = harness.shapes_of(size, args.quick)
            tensors = harness.score_like(shapes, torch.Generator().manual_seed(0))
            harness.described(f"{size}, float32", shapes)
        rows += run_case(name, tensors, args.reps, probe)
    return rows


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(15, 5), columns=[("peer variant", "variant", "")],
                          options=lambda ap: ap.add_argument("--cases", default=CASES)))
