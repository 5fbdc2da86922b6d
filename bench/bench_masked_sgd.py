"""One masked SGD-with-momentum step on the CPU: fastmask's fused kernel against torch's best alternative, a
per-parameter loop, and the memory-bandwidth roofline measured in the same run (issue 3).

Cases (float32; sizes as ``harness.shapes_of``, the same sets as bench_masked_adam.py):
- ``sgd-23m``: the 161 tensors of a ResNet-50 backbone plus a binary head Linear(2048, 1): 23,510,081 elements.
- ``sgd-300m``: four tensors of 75M elements (300M).
``--quick``: ResNet-50 channels / 4 (1.5M elements) and 4 x 2M, a smoke test whose figures say nothing about targets.

Providers, each timing one step after the gradients were restored (untimed) from a saved copy:
- ``fastmask``: ``fastmask.ops.masked_sgd_`` on the C++ backend, float32 soft masks, grad mode.
- ``peer``: ``torch._foreach_mul_(grads, masks)`` + the faster of ``torch.optim.SGD(fused=True)`` and
  ``SGD(foreach=True)`` (both measured; the ``variant`` field says which won).
- ``reference``: ``p.grad.mul_(mask)`` per parameter + ``torch.optim.SGD(foreach=False)``.
- ``roofline``: 24 bytes per element (read p, g, buf, mask; write p, buf) over the best in-place bandwidth of
  ``a.add_(b)``, ``a.mul_(s)`` and ``a.addcmul_(b, c)`` on buffers as large as the case, timed in the same run
  (interleaved with the steps when memory allows, else before and after them).

lr 1e-4, momentum 0.9, weight decay 5e-4 (the skin / BMFT step). Times: the best of ``--reps`` steps, the median
too. Targets (issue 3): >= 0.90x the roofline, >= 1.15x faster than peer, >= 3x faster than reference. Byte bounds:
the peer moves 32 bytes per element (mask 12, the fused step 20: read p, g, buf, write p, buf), the reference 56
(mask 12; weight decay grad.add(param) into a temporary 12, buf.mul_ + add_ 20, param.add_ 12): at equal bandwidth
fastmask can be at most 1.33x / 2.33x faster.

    python bench/bench_masked_sgd.py [--quick] [--json PATH] [--reps R] [--cases sgd-23m,sgd-300m] [--threads T]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import harness
import torch
from torch import Tensor

from fastmask import ops

SGD = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)
BYTES_PER_ELEMENT = 24
OTHER_BYTES_PER_ELEMENT = {"peer": 32, "reference": 56}


def providers(case: harness.StepCase) -> dict[str, Callable[[], Callable[[], None]]]:
    """Factories: each builds a provider's optimizer state and returns its step function."""
    params, grads, masks = case.params, case.grads, case.masks

    def fastmask() -> Callable[[], None]:
        buffers: list[Tensor | None] = [None] * len(params)

        def step() -> None:
            buffers[:] = ops.masked_sgd_(params, grads, buffers, masks, lr=SGD["lr"], momentum=SGD["momentum"],
                                         weight_decay=SGD["weight_decay"], dampening=0.0, nesterov=False,
                                         maximize=False, backend="cpp")
        return step

    def torch_sgd(per_parameter: bool, **kind: bool) -> Callable[[], None]:
        return harness.masked_torch_step(torch.optim.SGD(params, **SGD, **kind), params, masks,
                                         per_parameter=per_parameter)

    return {
        "fastmask": fastmask,
        "peer:fused": lambda: torch_sgd(False, fused=True),
        "peer:foreach": lambda: torch_sgd(False, foreach=True),
        "reference": lambda: torch_sgd(True, foreach=False),
    }


if __name__ == "__main__":
    sys.exit(harness.main(
        __doc__, lambda args: harness.step_bench(args, providers, BYTES_PER_ELEMENT), reps=(10, 3),
        options=lambda ap: ap.add_argument("--cases", default="sgd-23m,sgd-300m"), columns=harness.STEP_COLUMNS,
        notes=lambda rows, _: harness.step_summary(rows, BYTES_PER_ELEMENT, OTHER_BYTES_PER_ELEMENT)))
