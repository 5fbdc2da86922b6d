"""radix_histogram on the CPU: the first pass of the percentile's radix selection, one histogram of the top 16
order-key bits of every element (prefixes [0], prefix_bits 0, digit_bits 16: 65,536 bins).

Case ``first-pass-25m``: the ResNet-50 parameter shapes with torchvision's 1000-class head (161 tensors, 25,557,032
float32 elements, 102 MB), values R = 7 u^3 as in bench_percentile.py; ``--quick``: channels / 2 (6.9M elements)
and fewer repetitions. Providers, side by side in one run, all checked
equal to the reference before timing:

- ``reference`` = ``fastmask.ops.reference.radix_histogram``: numpy over the concatenated order keys (uint64), one
  ``np.bincount`` of the digit;
- ``peer`` = ``torch.bincount`` of the top 16 key bits computed with torch ops on the int32 view of the floats
  (key = bits ^ (sign ? 0xFFFFFFFF : 0x80000000), the order-preserving key of csrc/percentile_keys.h), the faster of
  ``cat`` (one torch.cat of the keys' digits, one bincount) and ``per-tensor`` (a bincount per tensor, summed),
  both measured (the ``variant`` field);
- ``fastmask`` = ``fastmask.ops.radix_histogram`` with the C++ backend (per-thread 2^16 bins, one parallel region);
- ``roofline`` = 4 B read per element over the read bandwidth measured in the same run (``torch.sum`` over a 256 MB
  float32 buffer, beyond the caches, interleaved with the providers; the best sample).

Times: the best of the repetitions, providers interleaved.

    python bench/bench_radix_histogram.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch
from torch import Tensor

from fastmask import ops
from fastmask.ops import reference

DIGIT_BITS = 16
PROBE_BYTES = 256 * 2**20
BYTES_PER_ELEMENT = 4


def top_digit(t: Tensor) -> Tensor:
    """The top 16 bits of float32 ``t``'s order keys, as int32 in [0, 65535]."""
    bits = t.reshape(-1).view(torch.int32)
    key = bits ^ ((bits >> 31) | torch.iinfo(torch.int32).min)  # negative: ~bits; else bits with the sign bit set
    return (key >> 16) & 0xFFFF


def peer_cat(tensors: list[Tensor]) -> Tensor:
    return torch.bincount(torch.cat([top_digit(t) for t in tensors]), minlength=1 << DIGIT_BITS)


def peer_per_tensor(tensors: list[Tensor]) -> Tensor:
    counts = torch.zeros(1 << DIGIT_BITS, dtype=torch.int64)
    for t in tensors:
        counts += torch.bincount(top_digit(t), minlength=1 << DIGIT_BITS)
    return counts


def bench(args: argparse.Namespace) -> list[dict]:
    shapes = harness.resnet50_shapes(width=32 if args.quick else 64, head_outputs=1000)
    tensors = harness.score_like(shapes, torch.Generator().manual_seed(0))
    n = harness.described(f"ResNet-50 shapes, float32; one first-pass histogram of {1 << DIGIT_BITS} bins", shapes)
    providers = {
        "reference": lambda: reference.radix_histogram(tensors, [0], 0, DIGIT_BITS),
        "peer:cat": lambda: peer_cat(tensors),
        "peer:per-tensor": lambda: peer_per_tensor(tensors),
        "fastmask": lambda: ops.radix_histogram(tensors, [0], 0, DIGIT_BITS, backend="cpp"),
    }
    want = providers["reference"]().reshape(-1)
    assert int(want.sum()) == n
    for p in ("peer:cat", "peer:per-tensor", "fastmask"):
        got = providers[p]().reshape(-1)
        if not torch.equal(got, want):
            raise AssertionError(f"{p}: histogram differs from the reference in {int((got != want).sum())} bins")
    probe = harness.Bandwidth(PROBE_BYTES // 4, ("sum",))
    samples = harness.interleave(providers, args.reps, probe=probe)
    variant = harness.fastest(samples, "peer")
    rows = harness.timing_rows("first-pass-25m", samples, elements=n, tensors=len(shapes))
    rows.append(probe.row("first-pass-25m", BYTES_PER_ELEMENT * n, elements=n, tensors=len(shapes),
                          bytes_per_element=BYTES_PER_ELEMENT))
    next(r for r in rows if r["provider"] == "peer")["variant"] = variant
    return rows


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(10, 3), columns=[("peer variant", "variant", "")]))
