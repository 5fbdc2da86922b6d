"""fisher_accumulate_ on the CPU: I_b += g_b², I_l += g_l² over a ResNet-50-shaped tensor set.

Case ``accumulate``: the 161 tensors of ResNet-50 with a 1-logit head (23.5M elements; ``--quick``: channels / 2,
5.9M), float32 importances and gradients. Providers, side by side in one run:

- ``reference`` = ``fastmask.ops.reference.fisher_accumulate_`` (the papers' per-tensor ``imp += grad.square()``);
- ``peer`` = ``torch._foreach_addcmul_`` on both lists (the best torch alternative: one multi-tensor kernel per
  list, no temporaries);
- ``fastmask`` = ``fastmask.ops.fisher_accumulate_`` with the C++ backend;
- ``roofline`` = the bytes the op moves over the in-place bandwidth measured in the same run, interleaved with the
  providers: ``a.add_(b)`` on two float32 tensors of 64M elements (32M with ``--quick``; far above the caches) moves
  12 bytes per element, the best repetition gives the bandwidth. The op reads and writes both importances and reads
  both gradients: 24 B per element (also the compulsory traffic: ``compulsory_bytes_per_element``,
  ``of_compulsory``).

After timing (every provider ran the same number of accumulations from the same start) the results are checked:
fastmask bit-identical to the reference (g² and the sum rounded separately), the peer within 4e-6 (torch's addcmul
fuses them, one rounding per step). Every time is the best of the repetitions.

    python bench/bench_fisher_accumulate.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch

from fastmask import ops
from fastmask.ops import reference

PROBE_ELEMENTS = 64 << 20  # 2 x 256 MB: far above the last-level cache (32 MB on the machines this was tuned on)
BYTES_PER_ELEMENT = 24


def bench(args: argparse.Namespace) -> list[dict]:
    shapes = harness.resnet50_shapes(width=32 if args.quick else 64)
    n, gen = harness.described("ResNet-50 shapes, float32", shapes), torch.Generator().manual_seed(0)
    grads_b = [torch.randn(s, generator=gen) for s in shapes]
    grads_l = [torch.randn(s, generator=gen) for s in shapes]
    start = (harness.importance_like(shapes, gen), harness.importance_like(shapes, gen))
    state = {p: tuple([t.clone() for t in ts] for ts in start) for p in ("reference", "peer", "fastmask")}
    probe = harness.Bandwidth(PROBE_ELEMENTS // 2 if args.quick else PROBE_ELEMENTS, ("add_",))
    samples = harness.interleave({
        "reference": lambda: reference.fisher_accumulate_(*state["reference"], grads_b, grads_l),
        "peer": lambda: torch._foreach_addcmul_(
            state["peer"][0] + state["peer"][1], grads_b + grads_l, grads_b + grads_l
        ),
        "fastmask": lambda: ops.fisher_accumulate_(*state["fastmask"], grads_b, grads_l, backend="cpp"),
    }, args.reps, probe=probe)
    for p, rtol in (("peer", 4e-6), ("fastmask", 0.0)):
        for a, b in zip(state[p][0] + state[p][1], state["reference"][0] + state["reference"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    roof = probe.row("accumulate", BYTES_PER_ELEMENT * n, elements=n, bytes_per_element=BYTES_PER_ELEMENT,
                     compulsory_bytes_per_element=BYTES_PER_ELEMENT)
    roof["compulsory_ms"] = roof["ms"]
    rows = harness.timing_rows("accumulate", samples, elements=n)
    for r in rows:
        r["of_compulsory"] = roof["compulsory_ms"] / r["ms"]
    print(f"accumulate: {probe.gbps:.1f} GB/s in-place add; roofline {BYTES_PER_ELEMENT} B/element")
    return [*rows, roof]


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(15, 5)))
