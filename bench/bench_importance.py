"""The whole Fisher-importance pass on the CPU (not an op: the pass that calls ``fisher_accumulate_`` per batch).

Case ``importance-resnet18``: the importance pass over a ResNet-18-sized CNN (64 px, batch 32, 4 batches, one logit;
``--quick``: width 32, 2 batches of 16). ``reference`` = ``fisher_importance_two_pass`` (docs/algorithm.md §3: one
forward + backward per objective per batch), ``fastmask`` = ``fisher_importance`` (one forward and two backward passes
per batch, fused accumulation). Both importances are checked equal (rtol 1e-5) before timing; the providers are
interleaved, each figure the best of the repetitions.

    python bench/bench_importance.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch

from fastmask.masking.importance import fisher_importance, fisher_importance_two_pass


def bench(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = harness.resnet18(width=32 if args.quick else 64)
    n_batches, batch, px = (2, 16, 64) if args.quick else (4, 32, 64)
    loader = [
        (torch.randn(batch, 3, px, px, generator=gen), (torch.rand(batch, generator=gen) > 0.5).float(),
         (torch.rand(batch, generator=gen) > 0.5).long())
        for _ in range(n_batches)
    ]
    fm_b, fm_l, _ = fisher_importance(model, loader)
    ref_b, ref_l, _ = fisher_importance_two_pass(model, loader)
    for name in fm_b:
        torch.testing.assert_close(fm_b[name], ref_b[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(fm_l[name], ref_l[name], rtol=1e-5, atol=0)
    samples = harness.interleave({
        "reference": lambda: fisher_importance_two_pass(model, loader),
        "fastmask": lambda: fisher_importance(model, loader),
    }, args.reps)
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-18 layout, {params / 1e6:.1f}M parameters; {n_batches} batches of {batch} at {px} px")
    return harness.timing_rows("importance-resnet18", samples, batches=n_batches, batch=batch, pixels=px,
                               parameters=params)


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(5, 3)))
