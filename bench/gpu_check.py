"""The GPU check: one command that, on the day a CUDA machine is lent, says whether every kernel of fastmask is right
there and how fast it is, in one JSON and one table. Without a GPU it runs the same checks on the CPU backends (the
C++ extension, and the Triton kernels in the interpreter) so that CI keeps it working.

    python bench/gpu_check.py [--quick] [--json PATH] [--checks build,ops,optim,graph,distributed,speed]
                              [--ops OP,...] [--reps R] [--no-build]

What runs where (printed first; a figure is always labelled with the device that produced it, so a CPU figure is
never a GPU one):

- device: ``cuda`` when ``torch.cuda.is_available()``, backends ``cuda`` and ``triton``; else ``cpu``, backends
  ``cpp`` and ``triton`` (``TRITON_INTERPRET=1``, set here before any kernel is imported). ``reference``
  (:mod:`fastmask.ops.reference`) is the oracle on both. Which op has which backend is the op table,
  :mod:`fastmask.ops.table`; a backend the table lists that cannot run (an unbuilt extension) fails, it is not
  dropped.
- ``build``: on CUDA, when ``fastmask._C`` lacks the CUDA kernels (:func:`fastmask.ops.backend.unavailable_reason`),
  ``FASTMASK_BUILD_CUDA=1 python setup.py build_ext --inplace`` and the check starts again in a fresh process (a
  loaded extension cannot be reloaded); ``--no-build`` reports the missing kernels as a failure instead. On the
  CPU: whether ``fastmask._C`` loads.
- ``ops``: every op of the table on every backend of the device against the reference on the same seeded inputs
  (:func:`run_op`), with a tolerance per op and dtype (:data:`TOLERANCE`): five odd-sized tensors (1, 33, 4097,
  3x17, 5x123x123) on every backend, and the 161 tensors of a ResNet-50 (23.5M elements, ``--quick`` on the CPU:
  channels / 4, 1.5M) on every backend but the interpreter.
- ``optim``: MaskedAdam, MaskedAdamW and MaskedSGD on every backend, without and with a soft mask ("grad" mode),
  three steps, every parameter and state buffer against ``torch.optim`` (``foreach=False``, on gradients times the
  mask) and against torch's ``fused=True`` optimizer (which exists for CPU and CUDA tensors).
- ``graph``: a MaskedAdam step with ``capturable=True`` captured in a CUDA graph, replayed, against eager steps.
  A MaskedAdam that refuses ``capturable=True`` is a failure that quotes its error. Without CUDA: a counted skip.
- ``distributed``: two processes (NCCL on two GPUs; gloo on the CPU): the distributed percentile of each rank's half
  of a tensor set against ``np.percentile`` of the whole, and a masked Adam step on gradients summed by
  :func:`fastmask.parallel.ddp.all_reduce_grads` against a one-process reference step. One GPU: a counted skip.
- ``speed``: every op stem of the table (the op its bench script times) on the benches' 23m case (``--quick``: the 1.5M
  set) on every backend of the device and the reference, providers interleaved rep by rep
  (:func:`harness.interleave`), with the bytes per element each bench script counts and a memory-bandwidth roofline
  measured in the same run (:class:`harness.Bandwidth`): on CUDA a device-to-device copy of 2 x 1 GiB, on the CPU the
  best of the benches' in-place probes, one bandwidth for every op (bench_radix_histogram.py and bench_percentile.py
  divide by a read probe's instead, so their CPU fractions are higher than these). Rows follow the bench convention;
  ``of_roofline`` = roofline time / time.
  The Triton interpreter is not timed (a CPU emulation). The bench scripts themselves are CPU benches
  (tests/test_bench.py runs them).

Exit status: 0 when no check failed, 1 when one did, 2 for bad arguments. The JSON: ``{"rows": [speed rows],
"checks": [{"name", "device", "backend", "result": "pass" | "fail" | "skip", "max_error", "tolerance", "figure",
"detail"}], "device": {...}, "meta": {...}, "seconds"}``.

Budget (one H100, under 5 minutes; chosen, not measured — no GPU has run this yet): the largest set is 23.5M
elements, about 0.1 GB per fp32 buffer, so every GPU kernel call is well under 10 ms at HBM speed; the correctness
checks make about a hundred fused calls on it and the speed section 4-6 timed calls per provider. The time is then
the host's: the reference's numpy parts (percentile, radix histograms and packed-bit masks of 23.5M values, about a
second per call on one core: some 40 calls), Triton's first compilation of each kernel (seconds each), the two
processes' start-up, and the CUDA build when it is needed (minutes, once). Measured on this project's 2-core CPU
machine while other jobs kept its load average near 10: ``--quick`` 43 s (13 s of CPU time), without it 3.6 minutes
(80 s of CPU time; the 23.5M-element reference steps and the torch.optim oracles are most of it).

One file of ~700 lines on purpose: it is one command whose six sections share the device discovery, the check
records and the table, and the person running it on a borrowed GPU should have one file to read and copy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any @triton.jit runs: Triton reads it then (as tests/conftest.py does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_fisher_accumulate  # noqa: E402  (the byte counts of each op: one owner, its bench script)
import bench_hard_mask  # noqa: E402
import bench_masked_adam  # noqa: E402
import bench_masked_sgd  # noqa: E402
import bench_radix_histogram  # noqa: E402
import bench_soft_mask  # noqa: E402
import harness  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import Tensor  # noqa: E402

from fastmask import ops  # noqa: E402
from fastmask.ops import backend as ops_backend  # noqa: E402
from fastmask.ops import radix  # noqa: E402
from fastmask.ops.reference import HARD_MASK_LAYOUTS  # noqa: E402
from fastmask.ops.table import OPS  # noqa: E402
from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD  # noqa: E402
from fastmask.parallel import ddp  # noqa: E402
from fastmask.parallel import percentile as parallel_percentile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("build", "ops", "optim", "graph", "distributed", "speed")
#: The fused backends checked per device type; the reference is the oracle everywhere.
DEVICE_BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpp", "triton")}
#: Set in the environment of the process that starts again after building the CUDA extension: its build seconds.
REBUILT_ENV = "FASTMASK_GPU_CHECK_BUILT"
#: The issue's odd sizes (a 1-element tensor, sizes around vector widths, a 3-D one): every backend runs them.
SMALL: list[harness.Shape] = [(1,), (33,), (4097,), (3, 17), (5, 123, 123)]
STEPS = 3
#: Ops not timed by the speed check: one op per bench script, the one it times (bench_soft_mask.py: ``soft_mask_``).
UNTIMED = ("soft_mask",)

# (rtol, atol as a fraction of each expected tensor's largest magnitude) per op and dtype (of the parameters, the
# gradients of fisher_accumulate_, the data of the radix ops; importances are float32); (0, 0) is equality. An op the
# table gains without an entry here is checked in float32 for equality, and fails in run_op until it has inputs.
_EXACT = {torch.float32: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)}
_STEP = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 8e-3)}  # fused vs unfused multiply-adds, √; bf16 2 ulp
TOLERANCE: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "fisher_accumulate_": {torch.float32: (2.0**-23, 0.0), torch.bfloat16: (2.0**-23, 0.0)},  # a GPU may fuse g·g + I
    "soft_mask": {torch.float32: (3 * 2.0**-23, 0.0)},  # tanh within 3 ulp (the interpreter's is 2σ(2x) − 1)
    "soft_mask_": {torch.float32: (3 * 2.0**-23, 0.0)},
    "masked_adam_": _STEP,
    "masked_sgd_": _STEP,
    "radix_histogram": _EXACT,  # counts
    "hard_mask": {torch.float32: (0.0, 0.0)},  # the reference rounds half thresholds differently (test_hard_mask.py)
    "percentile": _EXACT,  # np.percentile's value exactly
}
OPTIMIZERS = {  # name: (fastmask's class, torch's class, arguments)
    "MaskedAdam": (MaskedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "MaskedAdamW": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "MaskedSGD": (MaskedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=5e-4, nesterov=True)),
}


@dataclass
class Check:
    """One line of the table: ``result`` is "pass", "fail" or "skip"; ``detail`` says why for a skip or a failure."""

    name: str
    device: str
    backend: str
    result: str
    max_error: float | None = None
    tolerance: str | None = None
    figure: str | None = None
    detail: str = ""
    seconds: float | None = None


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------------------------------- comparison


def compare(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float, atol: float) -> tuple[bool, float, str]:
    """Whether every tensor of ``got`` equals its ``want`` within rtol and atol x the tensor's largest |value| (NaN
    where NaN; (0, 0): equal); the largest absolute difference; the first mismatch, in words."""
    if len(got) != len(want):
        return False, math.inf, f"{len(got)} results, the reference gives {len(want)}"
    worst, first = 0.0, ""
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        a, e = a.detach().cpu(), e.detach().cpu()
        if (a.dtype, a.shape) != (e.dtype, e.shape):
            return False, math.inf, f"result {i}: {a.dtype}{list(a.shape)}, the reference {e.dtype}{list(e.shape)}"
        if not a.is_floating_point():
            bad = int((a != e).sum())
            worst = max(worst, float((a.long() - e.long()).abs().max()) if a.numel() else 0.0)
        else:
            a64, e64 = a.double(), e.double()
            scale = float(e64.nan_to_num(0.0, 0.0, 0.0).abs().max()) if e.numel() else 0.0
            close = torch.isclose(a64, e64, rtol=rtol, atol=atol * scale, equal_nan=True)
            bad = int((~close).sum())
            diff = (a64 - e64).abs().nan_to_num(0.0, 0.0, 0.0)
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        if bad and not first:
            first = f"result {i} ({list(a.shape)}): {bad} of {a.numel()} elements differ"
    return not first, worst, first


def verdict(name: str, device: torch.device, backend: str, run: Callable[[], tuple[list[Tensor], list[Tensor]]],
            rtol: float, atol: float, detail: str = "") -> Check:
    """Run ``run`` (-> results, expected) and judge it; an exception is a failure that quotes it."""
    tol = "equal" if rtol == atol == 0 else f"rtol {rtol:.2g}, atol {atol:.2g}·max|ref|"
    t0 = time.perf_counter()
    try:
        ok, worst, why = compare(*run(), rtol, atol)
    except Exception as exc:  # noqa: BLE001  (any error of the code under test is a failed check, not a crash)
        return Check(name, device.type, backend, "fail", tolerance=tol, detail=one_line(exc),
                     seconds=time.perf_counter() - t0)
    return Check(name, device.type, backend, "pass" if ok else "fail", worst, tol, detail=why or detail,
                 seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------- ops


def _randn(shapes: Sequence[harness.Shape], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def soft_masks(shapes: Sequence[harness.Shape], gen: torch.Generator) -> list[Tensor]:
    """float32 soft masks in [0, 1) with about 30 % exact zeros (the entries "update" mode must leave alone)."""
    return [torch.rand(s, generator=gen).masked_fill_(torch.rand(s, generator=gen) < 0.3, 0.0) for s in shapes]


def run_op(name: str, backend: str, shapes: Sequence[harness.Shape], dtype: torch.dtype,
           device: torch.device) -> list[Tensor]:
    """Op ``name`` through :mod:`fastmask.ops` with ``backend=backend`` on seeded inputs (the same for every backend)
    on ``device``; what it produced (in-place ops: every tensor they write)."""
    gen = torch.Generator().manual_seed(0)

    def on(ts: list[Tensor]) -> list[Tensor]:
        return [t.to(device) for t in ts]

    if name == "fisher_accumulate_":
        ib, il = on(harness.importance_like(shapes, gen)), on(harness.importance_like(shapes, gen))
        ops.fisher_accumulate_(ib, il, on(_randn(shapes, gen, dtype)), on(_randn(shapes, gen, dtype)), backend=backend)
        return ib + il
    if name in ("soft_mask", "soft_mask_"):
        ib, il = on(harness.importance_like(shapes, gen)), on(harness.importance_like(shapes, gen))
        if name == "soft_mask":
            return ops.soft_mask(ib, il, backend=backend)
        ops.soft_mask_(ib, il, backend=backend)
        return ib
    if name == "masked_adam_":
        params, masks = on(_randn(shapes, gen, dtype)), on(soft_masks(shapes, gen))
        m, v, v_max = ([torch.zeros_like(p) for p in params] for _ in range(3))
        steps = [torch.tensor(0.0) for _ in params]
        for _ in range(STEPS):
            ops.masked_adam_(params, on(_randn(shapes, gen, dtype)), m, v, v_max, steps, masks, lr=1e-2, beta1=0.9,
                             beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False,
                             decoupled_weight_decay=True, mask_mode="update", backend=backend)
        return params + m + v + v_max
    if name == "masked_sgd_":
        params, masks = on(_randn(shapes, gen, dtype)), on(soft_masks(shapes, gen))
        buffers: list[Tensor | None] = [None] * len(params)
        for _ in range(STEPS):
            buffers = ops.masked_sgd_(params, on(_randn(shapes, gen, dtype)), buffers, masks, lr=1e-2,
                                      weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False,
                                      mask_mode="update", backend=backend)
        return params + [b for b in buffers if b is not None]
    scores = on(harness.score_like(shapes, gen, dtype))
    if name == "radix_histogram":
        digit = radix.DIGIT_BITS[device.type]
        first = ops.radix_histogram(scores, [0], 0, digit, backend=backend).cpu()
        if radix.key_bits(dtype) < 2 * digit:
            return [first]
        top = first[0].topk(2).indices.tolist()  # the two fullest bins, as a selection's second pass would take
        return [first, ops.radix_histogram(scores, sorted(top), digit, digit, backend=backend).cpu()]
    if name == "hard_mask":
        return [m.cpu() for layout in HARD_MASK_LAYOUTS
                for m in ops.hard_mask(scores, bench_hard_mask.ALPHA, layout=layout, backend=backend)]
    if name == "percentile":
        return [torch.tensor(ops.percentile(scores, q, method, backend=backend), dtype=torch.float64)
                for q in (0.0, 12.5, 50.0, 99.0) for method in ("linear", "nearest")]
    raise ValueError(f"gpu_check has no inputs for op {name!r}; add them to run_op")


@dataclass(frozen=True)
class Plan:
    """Where the checks run: the device, its fused backends, and the tensor sets (the big one: not interpreted)."""

    device: torch.device
    backends: tuple[str, ...]
    big: list[harness.Shape]
    quick: bool
    ops: tuple[str, ...] = tuple(OPS)

    @staticmethod
    def interpreted(backend: str) -> bool:
        """Whether ``backend`` runs in the Triton interpreter here (about a second per launch: small sets only)."""
        return backend == "triton" and ops_backend.interpreting()

    def sets(self, backend: str) -> list[tuple[str, list[harness.Shape]]]:
        """The (label, shapes) sets ``backend`` is checked on: the odd sizes, and the big set unless interpreted."""
        sets = [("5 odd tensors", SMALL)]
        if not self.interpreted(backend):
            sets.append((f"{len(self.big)} tensors, {harness.numel(self.big) / 1e6:.1f}M", self.big))
        return sets

    def op_backends(self, op: str) -> tuple[str, ...]:
        """The op table's backends for ``op`` that belong to this device (built or not: a missing build fails)."""
        return tuple(b for b in OPS[op].backends if b in self.backends)


def check_ops(plan: Plan) -> list[Check]:
    """Every op of the table, on every backend of the device, against the reference (:func:`run_op`)."""
    checks = []
    for name in plan.ops:
        for backend in plan.op_backends(name):
            for dtype, (rtol, atol) in TOLERANCE.get(name, {torch.float32: (0.0, 0.0)}).items():
                sets = plan.sets(backend)

                def run(name: str = name, backend: str = backend, dtype: torch.dtype = dtype,
                        sets: list = sets) -> tuple[list[Tensor], list[Tensor]]:
                    got, want = [], []
                    for _, shapes in sets:
                        got += run_op(name, backend, shapes, dtype, plan.device)
                        want += run_op(name, "reference", shapes, dtype, plan.device)
                    return got, want

                label = "; ".join(s for s, _ in sets)
                checks.append(verdict(f"op {name} {str(dtype).removeprefix('torch.')}", plan.device, backend, run,
                                      rtol, atol, label))
    return checks


# ---------------------------------------------------------------------------------------------------- optimizers


def optimizer_states(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor]:
    """The parameters and every state buffer (``step`` included) of ``opt``, in a fixed order."""
    state = opt.state_dict()["state"]
    return params + [state[i][k] for i in sorted(state) for k in sorted(state[i])]


def run_optimizer(cls: type, kwargs: dict, shapes: Sequence[harness.Shape], device: torch.device, masked: bool,
                  ours: bool, **extra: object) -> list[Tensor]:
    """``STEPS`` steps of ``cls`` from seeded parameters and gradients; for fastmask's class (``ours``) the masks are
    its own, for torch's the gradients are multiplied by them first (the papers' g ← M ⊙ g)."""
    gen = torch.Generator().manual_seed(1)
    params = [p.to(device) for p in _randn(shapes, gen)]
    masks = [m.to(device) for m in soft_masks(shapes, gen)] if masked else None
    if ours:
        extra = {**extra, "masks": masks}
    opt = cls(params, **kwargs, **extra)
    for _ in range(STEPS):
        for i, (p, g) in enumerate(zip(params, _randn(shapes, gen), strict=True)):
            g = g.to(device)
            p.grad = g * masks[i] if masked and not ours else g
        opt.step()
    return optimizer_states(opt, params)


def check_optimizers(plan: Plan) -> list[Check]:
    """MaskedAdam / MaskedAdamW / MaskedSGD on every backend, with and without a mask, against torch.optim
    (``foreach=False``) and torch's fused optimizer."""
    checks = []
    rtol, atol = _STEP[torch.float32]
    oracles = {"torch.optim": dict(foreach=False), "torch fused": dict(fused=True)}
    for name, (ours, theirs, kwargs) in OPTIMIZERS.items():
        op = "masked_sgd_" if ours is MaskedSGD else "masked_adam_"
        if op not in plan.ops:
            continue
        for backend in plan.op_backends(op):
            # Interpreted: the odd sizes but the 75645-element one (the op checks run it), a launch costs seconds.
            shapes = SMALL[:4] if plan.interpreted(backend) else [*SMALL, *plan.big]
            for masked in (False, True):
                mine: dict[str, list[Tensor]] = {}  # fastmask's run, once for both oracles
                for oracle, options in oracles.items():
                    def run(ours: type = ours, theirs: type = theirs, kwargs: dict = kwargs, backend: str = backend,
                            masked: bool = masked, options: dict = options, shapes: list = shapes,
                            mine: dict = mine) -> tuple[list[Tensor], list[Tensor]]:
                        if "got" not in mine:
                            mine["got"] = run_optimizer(ours, kwargs, shapes, plan.device, masked, True,
                                                        backend=backend)
                        return mine["got"], run_optimizer(theirs, kwargs, shapes, plan.device, masked, False,
                                                          **options)

                    what = f"{name} {'soft mask' if masked else 'no mask'} vs {oracle}"
                    checks.append(verdict(f"optim {what}", plan.device, backend, run, rtol, atol,
                                          f"{STEPS} steps, {len(shapes)} tensors, every state buffer"))
    return checks


# -------------------------------------------------------------------------------------------------- CUDA graphs


def check_graph(plan: Plan) -> list[Check]:
    """A MaskedAdam(capturable=True) step captured in a CUDA graph and replayed, against MaskedAdam's eager steps on
    the same gradients; on each backend of masked_adam_ on CUDA."""
    if plan.device.type != "cuda":
        return [Check("graph MaskedAdam capturable step", "cpu", "-", "skip", detail="skipped: no CUDA")]
    checks = []
    for backend in plan.op_backends("masked_adam_"):
        def run(backend: str = backend) -> tuple[list[Tensor], list[Tensor]]:
            gen = torch.Generator().manual_seed(2)
            shapes = [*SMALL, *plan.big]
            init = [p.to(plan.device) for p in _randn(shapes, gen)]
            masks = [m.to(plan.device) for m in soft_masks(shapes, gen)]
            grads = [[g.to(plan.device) for g in _randn(shapes, gen)] for _ in range(2 + STEPS)]
            eager_params = [p.clone() for p in init]
            eager = MaskedAdam(eager_params, lr=1e-2, masks=masks, backend=backend)
            for step in grads:
                for p, g in zip(eager_params, step, strict=True):
                    p.grad = g.clone()
                eager.step()
            params = [p.clone() for p in init]
            for p, g in zip(params, grads[0], strict=True):
                p.grad = g.clone()  # the static gradients the graph reads
            opt = MaskedAdam(params, lr=1e-2, masks=masks, backend=backend, capturable=True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up steps outside the graph, as torch's capture recipe has it
                for step in grads[:2]:
                    torch._foreach_copy_([p.grad for p in params], step)
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for step in grads[2:]:
                torch._foreach_copy_([p.grad for p in params], step)
                graph.replay()
            torch.cuda.synchronize()
            return optimizer_states(opt, params), optimizer_states(eager, eager_params)

        rtol, atol = _STEP[torch.float32]
        checks.append(verdict("graph MaskedAdam capturable step", plan.device, backend, run, rtol, atol,
                              f"2 eager warm-up steps, {STEPS} replays vs {2 + STEPS} eager steps"))
    return checks


# -------------------------------------------------------------------------------------------------- two processes


def _distributed_worker(rank: int, world: int, pg_backend: str, init: str, out: str,
                        shapes: list[harness.Shape]) -> None:
    """One rank: its half of the tensor set (every rank makes the whole set from one seed and keeps its share), the
    distributed percentile, and a masked Adam step on gradients summed over the ranks."""
    device = torch.device(f"cuda:{rank}" if pg_backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(pg_backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        gen = torch.Generator().manual_seed(3)
        scores = harness.score_like(shapes, gen)
        q = parallel_percentile.percentile([t.to(device) for t in scores[rank::world]], 50.0)
        params = [p.to(device) for p in _randn(shapes, gen)]
        masks = [m.to(device) for m in soft_masks(shapes, gen)]
        shares = [[g.to(device) for g in _randn(shapes, gen)] for _ in range(world)]  # rank r's gradient: shares[r]
        grads = [g.clone() for g in shares[rank]]
        ddp.all_reduce_grads(grads)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        MaskedAdam(params, lr=1e-2, masks=masks).step()
        torch.save({"percentile": q, "params": [p.detach().cpu() for p in params]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_distributed(plan: Plan) -> list[Check]:
    """Two processes over NCCL (two GPUs) or gloo (CPU) against one-process references."""
    name = "distributed 2 processes"
    if plan.device.type == "cuda" and torch.cuda.device_count() < 2:
        return [Check(name, "cuda", "nccl", "skip", detail="skipped: one CUDA device (NCCL needs two)")]
    pg_backend = "nccl" if plan.device.type == "cuda" else "gloo"
    shapes = SMALL if plan.quick and plan.device.type == "cpu" else [*SMALL, *plan.big]

    def run() -> tuple[list[Tensor], list[Tensor]]:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_distributed_worker, args=(2, pg_backend, f"file://{tmp}/store", tmp, shapes),
                               nprocs=2, start_method="spawn")
            ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
        gen = torch.Generator().manual_seed(3)
        scores = harness.score_like(shapes, gen)
        params, masks = _randn(shapes, gen), soft_masks(shapes, gen)
        shares = [_randn(shapes, gen) for _ in range(2)]
        for p, a, b in zip(params, *shares, strict=True):
            p.grad = a + b
        MaskedAdam(params, lr=1e-2, masks=masks, backend="reference").step()
        want = torch.tensor(ops.percentile(scores, 50.0, backend="reference"), dtype=torch.float64)
        got = [t for r in ranks for t in (torch.tensor(r["percentile"], dtype=torch.float64), *r["params"])]
        return got, [t for _ in ranks for t in (want, *params)]

    rtol, atol = _STEP[torch.float32]
    return [verdict(name, plan.device, pg_backend, run, rtol, atol,
                    f"percentile of the ranks' halves (exact) and a masked Adam step on all-reduced gradients, "
                    f"{len(shapes)} tensors")]


# --------------------------------------------------------------------------------------------------------- speed


def speed_case(name: str, shapes: Sequence[harness.Shape], device: torch.device
               ) -> tuple[Callable[[str], Callable[[], object]], Callable[[], object] | None, int]:
    """The bench case of op stem ``name`` on ``device``: a factory of each backend's call, what runs (untimed) before
    each call, and the bytes per element the op's bench script counts for its roofline."""
    gen = torch.Generator().manual_seed(0)
    if name == "fisher_accumulate_":
        ib, il, gb, gl = ([t.to(device) for t in harness.importance_like(shapes, gen)] for _ in range(4))
        return (lambda b: lambda: ops.fisher_accumulate_(ib, il, gb, gl, backend=b)), None, \
            bench_fisher_accumulate.BYTES_PER_ELEMENT
    if name == "soft_mask_":
        ib, il = ([t.to(device) for t in harness.importance_like(shapes, gen)] for _ in range(2))
        work = [t.clone() for t in ib]
        return (lambda b: lambda: ops.soft_mask_(work, il, backend=b)), \
            (lambda: torch._foreach_copy_(work, ib)), bench_soft_mask.BYTES_PER_ELEMENT
    if name in ("masked_adam_", "masked_sgd_"):
        case = harness.StepCase(shapes)
        params, grads, masks = ([t.to(device) for t in ts] for ts in (case.params, case.grads, case.masks))

        def step(b: str) -> Callable[[], object]:
            if name == "masked_sgd_":
                buffers = [torch.zeros_like(p) for p in params]
                return lambda: ops.masked_sgd_(params, grads, buffers, masks, **bench_masked_sgd.SGD, dampening=0.0,
                                               nesterov=False, maximize=False, backend=b)
            m, v, steps = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], \
                [torch.tensor(0.0) for _ in params]
            hyper = bench_masked_adam.ADAM
            return lambda: ops.masked_adam_(params, grads, m, v, [], steps, masks, lr=hyper["lr"],
                                            beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                                            weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=False,
                                            maximize=False, backend=b)

        module = bench_masked_sgd if name == "masked_sgd_" else bench_masked_adam
        return step, None, module.BYTES_PER_ELEMENT
    scores = [t.to(device) for t in harness.score_like(shapes, gen)]
    if name == "radix_histogram":
        digit = radix.DIGIT_BITS[device.type]
        return (lambda b: lambda: ops.radix_histogram(scores, [0], 0, digit, backend=b)), None, \
            bench_radix_histogram.BYTES_PER_ELEMENT
    if name == "hard_mask":
        return (lambda b: lambda: ops.hard_mask(scores, bench_hard_mask.ALPHA, backend=b)), None, \
            int(bench_hard_mask.BYTES_PER_ELEMENT["bool"])
    if name == "percentile":  # one read of the data per radix pass (bench_percentile.py's roofline)
        passes = math.ceil(radix.key_bits(torch.float32) / radix.DIGIT_BITS[device.type])
        return (lambda b: lambda: ops.percentile(scores, 50.0, backend=b)), None, 4 * passes
    raise ValueError(f"gpu_check has no speed case for op {name!r}; add it to speed_case")


def check_speed(plan: Plan, reps: int) -> tuple[list[Check], list[dict]]:
    """Every op stem's bench case, each backend of the device and the reference interleaved, with the roofline of
    a bandwidth probe sampled in the same run; returns the checks (the figures) and the bench rows."""
    shapes = plan.big
    n = harness.numel(shapes)
    on_gpu = plan.device.type == "cuda"
    probe = harness.Bandwidth(max(n, 1 << 28) if on_gpu else n, ("copy_",) if on_gpu else harness.IN_PLACE,
                              plan.device)
    measure = harness.timer(plan.device)
    checks, rows = [], []
    for name in (n for n in plan.ops if n not in UNTIMED):
        timed = [b for b in plan.op_backends(name) if not plan.interpreted(b)]
        checks += [Check(f"speed {name}", plan.device.type, b, "skip",
                         detail="skipped: the Triton interpreter is a CPU emulation, not timed")
                   for b in plan.op_backends(name) if b not in timed]
        try:
            make, before, per_element = speed_case(name, shapes, plan.device)
            providers = {b: make(b) for b in ("reference", *timed)}
            samples = harness.interleave(providers, reps, before=dict.fromkeys(providers, before) if before else None,
                                         probe=probe, measure=measure)
        except Exception as exc:  # noqa: BLE001  (a failing op is a failed check, the others still run)
            checks += [Check(f"speed {name}", plan.device.type, b, "fail", detail=one_line(exc)) for b in timed]
            continue
        case_rows = harness.timing_rows(name, samples, device=plan.device.type, elements=n)
        case_rows.append(probe.row(name, per_element * n, device=plan.device.type, elements=n,
                                   bytes_per_element=per_element, probe_gbps=probe.probe_gbps))
        harness.add_ratios(case_rows)
        rows += case_rows
        for r in case_rows:
            if r["provider"] in timed:
                checks.append(Check(f"speed {name}", plan.device.type, r["provider"], "pass",
                                    figure=f"{r['ms']:.2f} ms, {r['of_roofline']:.2f}x roofline, "
                                           f"{r['vs_reference']:.1f}x ref",
                                    detail=f"{n / 1e6:.1f}M elements, {per_element} B/element"))
    probe.free()
    return checks, rows


# --------------------------------------------------------------------------------------------------------- build


def check_build(device: torch.device, allowed: bool) -> list[Check]:
    """On CUDA: the CUDA kernels in fastmask._C, built now (and the check restarted) when missing and ``allowed``.
    On the CPU: whether fastmask._C loads."""
    if device.type == "cpu":
        reason = ops_backend.unavailable_reason("cpp", "hard_mask", device)
        return [Check("build fastmask._C (CPU kernels)", "cpu", "cpp", "fail" if reason else "pass",
                      detail=reason or "loaded; CUDA kernels are built only on a CUDA machine")]
    reason = ops_backend.unavailable_reason("cuda", "radix_histogram", device)
    name = "build fastmask._C (CUDA kernels)"
    if reason is None:
        built = os.environ.get(REBUILT_ENV)
        return [Check(name, "cuda", "cuda", "pass",
                      detail=f"built by this check in {built} s" if built else "already built")]
    if os.environ.get(REBUILT_ENV) or not allowed:
        return [Check(name, "cuda", "cuda", "fail", detail=reason if not allowed else f"still missing: {reason}")]
    print("building the CUDA extension: FASTMASK_BUILD_CUDA=1 python setup.py build_ext --inplace", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "FASTMASK_BUILD_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count()))}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return [Check(name, "cuda", "cuda", "fail", detail=f"build failed (exit {proc.returncode}): {tail}")]
    # The CPU-only fastmask._C is loaded in this process and cannot be replaced: start again with the new one.
    env = {**os.environ, REBUILT_ENV: f"{time.perf_counter() - t0:.0f}"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------- main


def device_info(plan: Plan) -> dict:
    """What ran where, for the JSON and the header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the triton checks then fail, saying so; the header still prints
        triton_version = "not installed"
    info = {"type": plan.device.type, "backends": list(plan.backends), "oracle": "reference",
            "triton_interpreter": ops_backend.interpreting(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "quick": plan.quick}
    if plan.device.type == "cuda":
        info |= {"name": torch.cuda.get_device_name(plan.device), "count": torch.cuda.device_count()}
    else:
        info |= {"name": platform.processor() or platform.machine(), "count": os.cpu_count()}
    return info


def print_checks(checks: Sequence[Check]) -> None:
    """The table of checks: name, device, backend, result, max error or figure, detail."""
    heads = ("check", "device", "backend", "result", "max err / figure", "detail")
    cells = [(c.name, c.device, c.backend, c.result,
              c.figure or ("" if c.max_error is None else f"{c.max_error:.3g}"), c.detail) for c in checks]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads[:-1])]
    print()
    for row in (heads, *cells):
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=False)) + "  " + row[-1])


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes on the CPU, fewer repetitions (CI)")
    ap.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the results "
                    "(default: gpu_check.json in the current directory)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated ops of the op table to check and time, "
                    "and the optimizers that step with them (default: all)")
    ap.add_argument("--reps", type=int, help="timed repetitions per provider (default 5, 3 with --quick)")
    ap.add_argument("--no-build", action="store_true", help="do not build missing CUDA kernels; report them")
    args = ap.parse_args(argv)
    args.checks = args.checks.split(",")
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        ap.error(f"--checks: unknown {unknown}; choose from {','.join(CHECKS)}")
    if not args.json.parent.is_dir():
        ap.error(f"--json: the folder {args.json.parent} does not exist")
    args.ops = tuple(args.ops.split(","))
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        ap.error(f"--ops: unknown {unknown}; the op table has {','.join(OPS)}")
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    args.reps = args.reps or (3 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big = harness.resnet50_shapes(16 if args.quick and device.type == "cpu" else 64)
    plan = Plan(device, DEVICE_BACKENDS[device.type], big, args.quick, args.ops)
    checks: list[Check] = []
    if "build" in args.checks:
        checks += check_build(device, not args.no_build)
    info = device_info(plan)
    interp = " (interpreter)" if info["triton_interpreter"] else ""
    print(f"device {device.type}: {info['name']} x{info['count']}; backends "
          f"{', '.join(b + (interp if b == 'triton' else '') for b in plan.backends)}; oracle reference; torch "
          f"{info['torch']}, triton {info['triton']}" + ("" if device.type == "cuda" else
                                                         " -- no CUDA device: every figure below is a CPU figure"),
          flush=True)
    rows: list[dict] = []
    for part, run in (("ops", check_ops), ("optim", check_optimizers), ("graph", check_graph),
                      ("distributed", check_distributed)):
        if part in args.checks:
            t = time.perf_counter()
            checks += run(plan)
            print(f"{part}: {time.perf_counter() - t:.1f} s", flush=True)
    if "speed" in args.checks:
        speed_checks, rows = check_speed(plan, args.reps)
        checks += speed_checks
        harness.print_table(rows)
    print_checks(checks)
    counts = {r: sum(c.result == r for c in checks) for r in ("pass", "fail", "skip")}
    seconds = time.perf_counter() - t0
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped on {device.type} in "
          f"{seconds:.0f} s; wrote {args.json}")
    args.json.write_text(json.dumps({"rows": rows, "checks": [asdict(c) for c in checks], "device": info,
                                     "counts": counts, "seconds": seconds,
                                     "meta": {"quick": args.quick, "reps": args.reps, "checks": args.checks,
                                              "ops": list(args.ops)}},
                                    indent=2))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
