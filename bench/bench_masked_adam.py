"""One masked Adam step on the CPU: fastmask's fused kernel against torch's best alternative, a per-parameter loop,
and the memory-bandwidth roofline measured in the same run (issue 3).

Cases (float32; sizes as ``harness.shapes_of``):
- ``adam-23m``: the 161 parameter tensors of a ResNet-50 backbone (torchvision's layout: conv1, bn1, Bottleneck
  layers [3, 4, 6, 3], 23,508,032 parameters) plus a binary head Linear(2048, 1): 23,510,081 elements.
- ``adam-300m``: four tensors of 75M elements (300M).
``--quick`` scales both down (ResNet-50 channels / 4: 1.5M elements; 4 x 2M), for CI: a smoke test of the script
whose buffers largely fit in the caches, so its figures say nothing about the targets.

Providers, each timing one step after the gradients were restored (untimed) from a saved copy:
- ``fastmask``: ``fastmask.ops.masked_adam_`` on the C++ backend, float32 soft masks, grad mode.
- ``peer``: ``torch._foreach_mul_(grads, masks)`` + ``torch.optim.Adam(fused=True).step()`` (``variant``).
- ``reference``: ``p.grad.mul_(mask)`` per parameter + ``torch.optim.Adam(foreach=False)``.
- ``roofline``: the bytes a one-pass step must move, divided by the in-place bandwidth: 32 bytes per element (read
  p, g, m, v, mask; write p, m, v, each 4 bytes; the written lines were just read, so no extra read-for-ownership).
  Bandwidth: the best of ``a.add_(b)`` (12 bytes per element), ``a.mul_(s)`` (8) and ``a.addcmul_(b, c)`` (16) over
  float32 buffers as large as the case, timed in the same run: interleaved with the providers' steps when memory
  allows (as for the 23m case), else before and after them.

lr 1e-4, betas (0.9, 0.999), eps 1e-8 (SWiFT's CXR step). Times are the best of ``--reps`` steps (on a shared
machine the least disturbed one, as timeit does); the median is reported too. Targets (issue 3): fastmask >= 0.90x
the roofline, >= 1.15x faster than peer, >= 3x faster than reference. Byte bounds: the peer moves 40 bytes per element
(``_foreach_mul_``: read g, M, write g: 12; the fused step: read p, g, m, v, write p, m, v: 28), the reference 84
(12 for the mask, then torch's single-tensor step: lerp_ 12, mul_ + addcmul_ 20, sqrt / div / add_ into two
temporaries 24, addcdiv_ 16), so at equal bandwidth fastmask can be at most 1.25x / 2.62x faster.

    python bench/bench_masked_adam.py [--quick] [--json PATH] [--reps R] [--cases adam-23m,adam-300m] [--threads T]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import harness
import torch

from fastmask import ops

ADAM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
BYTES_PER_ELEMENT = 32
OTHER_BYTES_PER_ELEMENT = {"peer": 40, "reference": 84}


def providers(case: harness.StepCase) -> dict[str, Callable[[], Callable[[], None]]]:
    """Factories: each builds a provider's optimizer state and returns its step function."""
    params, grads, masks = case.params, case.grads, case.masks

    def fastmask() -> Callable[[], None]:
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        b1, b2 = ADAM["betas"]
        return lambda: ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, masks, lr=ADAM["lr"],
                                        beta1=b1, beta2=b2, weight_decay=ADAM["weight_decay"], eps=ADAM["eps"],
                                        amsgrad=False, maximize=False, backend="cpp")

    return {
        "fastmask": fastmask,
        "peer:fused": lambda: harness.masked_torch_step(torch.optim.Adam(params, **ADAM, fused=True), params, masks,
                                                        per_parameter=False),
        "reference": lambda: harness.masked_torch_step(torch.optim.Adam(params, **ADAM, foreach=False), params, masks,
                                                       per_parameter=True),
    }


if __name__ == "__main__":
    sys.exit(harness.main(
        __doc__, lambda args: harness.step_bench(args, providers, BYTES_PER_ELEMENT), reps=(10, 3),
        options=lambda ap: ap.add_argument("--cases", default="adam-23m,adam-300m"), columns=harness.STEP_COLUMNS,
        notes=lambda rows, _: harness.step_summary(rows, BYTES_PER_ELEMENT, OTHER_BYTES_PER_ELEMENT)))
