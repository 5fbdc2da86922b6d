"""soft_mask / soft_mask_ on the CPU: M = tanh(Norm(I_b) / (Norm(I_l) + eps)) per tensor over a ResNet-50 set.

Case ``soft-mask``: the 161 tensors of ResNet-50 with a 1-logit head (23.5M elements; ``--quick``: channels / 2,
5.9M), float32 importances. Providers, side by side in one run:

- ``reference`` = ``fastmask.ops.reference.soft_mask`` (per-tensor min / max / arithmetic / tanh, new tensors);
- ``peer`` = a vectorised torch version (one ``torch.aminmax`` per importance, then ``torch._foreach_*``
  arithmetic over all tensors and ``torch._foreach_tanh_``);
- ``fastmask`` = ``fastmask.ops.soft_mask_`` with the C++ backend: the mask written over I_b, as the pipeline builds
  it (I_b restored, untimed, before each run). The JSON's ``new_tensors_ms`` is ``fastmask.ops.soft_mask`` (a new
  mask set) in the same run, and ``in_cache_ms`` the same in-place kernel on one cache-resident tensor of 1M
  elements, its rate scaled to the whole set: what its arithmetic alone costs (three IEEE divisions per element
  keep R bit-identical to the reference, plus tanh), a floor that memory bandwidth does not move;
- ``roofline`` = the bytes moved over the in-place bandwidth measured in the same run (``a.add_(b)`` on two float32
  tensors of 64M elements, 32M with ``--quick``; 12 bytes per element): the op reads both importances twice (min /
  max, then the mask: the min and max must be known before the first mask element can be written) and writes the
  mask, 20 B per element. fastmask re-reads cache-sized batches from the cache, so its DRAM traffic is closer to the
  compulsory 12 B (each importance read once, the mask written once): ``compulsory_bytes_per_element``,
  ``of_compulsory``.

The reference and the peer return new tensors, so they also pay for fresh output memory (page faults and the kernel
zeroing the pages); ``output_alloc_ms`` is that cost alone (empty + fill of the mask shapes), measured in the same
run. Every output is checked against the reference (rtol 3e-7: tanh within 2 ulp of torch.tanh) before timing;
every time is the best of the repetitions, providers interleaved.

    python bench/bench_soft_mask.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch
from torch import Tensor

from fastmask import ops
from fastmask.ops import reference

EPS = reference.NORM_EPS
PROBE_ELEMENTS = 64 << 20  # 2 x 256 MB: far above the last-level cache (32 MB on the machines this was tuned on)
BYTES_PER_ELEMENT, COMPULSORY_BYTES_PER_ELEMENT = 20, 12
IN_CACHE_ELEMENTS = 1 << 20  # 2 x 4 MB of importances: within the two cores' L2 + L3 here


def peer_soft_mask(imp_bias: list[Tensor], imp_loss: list[Tensor], eps: float = EPS) -> list[Tensor]:
    """The soft mask with vectorised torch: aminmax per importance, then multi-tensor (_foreach) arithmetic."""

    def norm(xs: list[Tensor]) -> list[Tensor]:
        lo, hi = torch.stack([torch.stack(torch.aminmax(x)) for x in xs]).unbind(1)
        const = hi == lo  # the max == min guard: Norm(x) = x, i.e. subtract 0 and divide by 1
        den = torch.where(const, 1.0, (hi - lo) + eps)  # float32 arithmetic, as the reference's
        return torch._foreach_div(torch._foreach_sub(xs, torch.where(const, 0.0, lo).tolist()), den.tolist())

    ratio = torch._foreach_div(norm(imp_bias), torch._foreach_add(norm(imp_loss), eps))
    torch._foreach_tanh_(ratio)
    return ratio


def bench(args: argparse.Namespace) -> list[dict]:
    shapes = harness.resnet50_shapes(width=32 if args.quick else 64)
    n, gen = harness.described("ResNet-50 shapes, float32", shapes), torch.Generator().manual_seed(0)
    ib, il = harness.importance_like(shapes, gen), harness.importance_like(shapes, gen)
    work = [b.clone() for b in ib]  # fastmask's I_b, restored (untimed) before each in-place build
    # The arithmetic alone: the same kernel on one cache-resident tensor of the set's first IN_CACHE_ELEMENTS
    # values, its rate scaled to the whole set.
    small_ib = [torch.cat([b.reshape(-1) for b in ib])[:IN_CACHE_ELEMENTS]]
    small_il = [torch.cat([b.reshape(-1) for b in il])[:IN_CACHE_ELEMENTS]]
    small_work = [small_ib[0].clone()]

    def fastmask() -> list[Tensor]:
        ops.soft_mask_(work, il, backend="cpp")
        return work

    providers = {
        "reference": lambda: reference.soft_mask(ib, il),
        "peer": lambda: peer_soft_mask(ib, il),
        "fastmask": fastmask,
        # Not providers: fastmask's soft_mask into new tensors, what fresh output tensors of the masks' shapes cost
        # alone (allocation, faults, zeroed pages), and the in-place kernel on cache-resident data.
        "new_tensors": lambda: ops.soft_mask(ib, il, backend="cpp"),
        "output_alloc": lambda: [torch.empty(s).fill_(0.0) for s in shapes],
        "in_cache": lambda: ops.soft_mask_(small_work, small_il, backend="cpp"),
    }
    restore = {"fastmask": lambda: torch._foreach_copy_(work, ib),
               "in_cache": lambda: torch._foreach_copy_(small_work, small_ib)}
    want = reference.soft_mask(ib, il)
    for p in ("peer", "fastmask", "new_tensors"):
        restore["fastmask"]()
        for got, ref in zip(providers[p](), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=3e-7, atol=0)  # tanh within 2 ulp of torch.tanh
    probe = harness.Bandwidth(PROBE_ELEMENTS // 2 if args.quick else PROBE_ELEMENTS, ("add_",))
    samples = harness.interleave(providers, args.reps, before=restore, probe=probe)
    alloc, new_tensors = harness.best_ms(samples.pop("output_alloc")), harness.best_ms(samples.pop("new_tensors"))
    in_cache = harness.best_ms(samples.pop("in_cache")) * n / small_ib[0].numel()
    roof = probe.row("soft-mask", BYTES_PER_ELEMENT * n, elements=n, bytes_per_element=BYTES_PER_ELEMENT,
                     compulsory_bytes_per_element=COMPULSORY_BYTES_PER_ELEMENT)
    roof["compulsory_ms"] = roof["ms"] * COMPULSORY_BYTES_PER_ELEMENT / BYTES_PER_ELEMENT
    rows = harness.timing_rows("soft-mask", samples, elements=n)
    for r in rows:
        r["of_compulsory"] = roof["compulsory_ms"] / r["ms"]
        if r["provider"] == "fastmask":
            r.update(new_tensors_ms=new_tensors, in_cache_ms=in_cache)
    rows.append(roof)
    for r in rows:
        r["output_alloc_ms"] = alloc
    print(f"soft-mask: {probe.gbps:.1f} GB/s in-place add; roofline {BYTES_PER_ELEMENT} B/element (compulsory "
          f"{COMPULSORY_BYTES_PER_ELEMENT} B: {roof['compulsory_ms']:.2f} ms); fresh output memory alone "
          f"{alloc:.2f} ms; fastmask's arithmetic alone (in-cache rate x elements) {in_cache:.2f} ms; into new "
          f"tensors {new_tensors:.2f} ms")
    return rows


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(15, 5)))
