"""The host work of one Triton optimizer step (issue 14): everything a step does on the CPU around its kernel, over
the 161 parameter tensors of a ResNet-50, before and after the launch tables were cached.

Measured: ``fastmask.ops.masked_adam_`` / ``masked_sgd_`` with ``backend="triton"`` on CPU tensors, float32 soft
masks, with the Triton kernel replaced by a no-op (so neither the interpreter's nor a GPU's kernel time counts, nor
Triton's own launcher). What remains is the Python step: the step counters' increment, grouping and backend choice,
the group's checks and launch tables (pointer, block and numel tables built on the host and copied to the device),
the bias corrections and hyperparameters. The tile is the GPU's (one block per program), so the tables are the ones a
GPU step uses; the tensors are allocated and never touched (the kernel never runs), so the full set costs no memory.

Cases: ``adam-resnet50`` (masked_adam_; ``step`` on the host, as torch.optim keeps it) and ``sgd-resnet50``
(masked_sgd_, momentum 0.9, running buffers), both over ``harness.resnet50_shapes()``: torchvision's ResNet-50 layout
with one logit, 161 tensors, 23,510,081 elements (``--quick``: fewer repetitions, same set).

Providers:
- ``reference``: the step as before caching (main): every table built, checked and copied again at every step (the
  cache is cleared before each step, untimed).
- ``fastmask``: tables cached by their key (pointers, element counts, mask dtypes): a steady-state step looks them up
  and copies nothing to the device but its per-step values (the bias corrections of a host-resident ``step``).

Each figure is the best of ``--reps`` steps (µs in the ``us`` column).

    python bench/bench_step_host.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" take CPU tensors; no kernel runs here

import harness  # noqa: E402
import torch  # noqa: E402

from fastmask import ops  # noqa: E402
from fastmask.kernels import masked_adam, masked_sgd  # noqa: E402
from fastmask.kernels import multi_tensor as mt  # noqa: E402


class NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` evaluates its arguments and
    returns."""

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: None


def steps(shapes: list[tuple[int, ...]]) -> dict[str, callable]:
    """The two cases' step functions over untouched tensors of ``shapes``."""
    empty = lambda: [torch.empty(s) for s in shapes]  # noqa: E731
    params, grads, masks = empty(), empty(), empty()
    exp_avgs, exp_avg_sqs, buffers = empty(), empty(), empty()
    counters = [torch.tensor(0.0) for _ in shapes]
    return {
        "adam-resnet50": lambda: ops.masked_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], counters, masks, lr=1e-4, beta1=0.9, beta2=0.999,
            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, backend="triton"),
        "sgd-resnet50": lambda: ops.masked_sgd_(
            params, grads, buffers, masks, lr=1e-2, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
            maximize=False, backend="triton"),
    }


def bench(args: argparse.Namespace) -> list[dict]:
    shapes = harness.resnet50_shapes()
    harness.described("ResNet-50 (torchvision layout, one logit)", shapes)
    masked_adam._masked_adam_kernel = masked_sgd._masked_sgd_kernel = NoLaunch()
    mt.tile = lambda: (1, 1024)  # the GPU's tile, so the tables are a GPU step's
    rows = []
    for case, step in steps(shapes).items():
        samples = harness.interleave({"reference": step, "fastmask": step}, args.reps,
                                     before={"reference": mt.clear_tables})
        rows += harness.timing_rows(case, samples, tensors=len(shapes))
    for r in rows:
        r["us"] = 1e3 * r["ms"]
    return rows


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(300, 60), columns=[("us", "us", ".0f")]))
