"""Mask generation and one masked Adam step at backbone scale on the CPU: step time and peak extra memory.

Parameter sets shaped like three backbones (one logit per class of ImageNet's 1000, as the published counts):
``resnet50`` (torchvision layout, 25.6M), ``vit-b`` (ViT-B/16 at 224 px, 86.6M) and ``vit-l`` (ViT-L/16, 304.3M);
``--quick`` runs ``resnet50`` only.

Cases and providers, side by side in one run:

- ``mask-generation``: allocate I_b and I_l, accumulate I += g² for two synthetic gradient pairs (the gradients are
  inputs, as autograd makes them in a real run), then build the soft mask M = tanh(Norm(I_b) / (Norm(I_l) + eps))
  (docs/algorithm.md §3-4). ``reference`` = the papers' per-tensor loop (``fastmask.ops.reference``: ``imp +=
  g.square()``, per-tensor min / max / arithmetic / tanh, the mask in new tensors), ``fastmask`` = ``fastmask.ops``
  with the C++ backend, the mask written over I_b as the pipeline does (``soft_mask_``). The floor is 2x the parameter
  bytes for fastmask (the two float32 importances) and 3x for the reference (the importances and a new float32 mask).
- ``masked-adam``: one masked Adam step (state, gradients and mask already allocated). ``reference`` = the papers'
  loop, ``p.grad *= M`` per parameter then ``torch.optim.Adam`` as it comes (the single-tensor loop on CPU),
  ``peer`` = ``torch._foreach_mul_(grads, masks)`` then ``torch.optim.Adam(fused=True)``, ``fastmask`` =
  ``fastmask.ops.masked_adam_`` (C++).

Memory: the peak resident set of the process during the stretch minus the resident set at its start
(:class:`fastmask.util.memory.PeakMemory`: Linux's VmHWM, reset per stretch), reported against the parameter bytes
(float32). The stretch's own outputs (importances, mask) count; its inputs (parameters, gradients, optimizer state)
do not. glibc's malloc serves blocks below its mmap threshold from a heap that it keeps after a free, and raises
that threshold (up to 32 MB) each time it unmaps a block, so after the first case most tensors would be recycled
from pages already resident and the measured extra would shrink to nearly nothing; the bench therefore pins the
threshold at 64 KiB (``harness.pin_mmap_threshold``): every tensor gets fresh pages and returns them on free.
That would also tax the per-tensor temporaries of the reference loops with page faults, so the times are measured
in this process with the allocator as it comes, and the memory in a child process per model with the threshold
pinned, each provider run once (page first-touch included, as in a real run). Time: the best of ``--reps`` runs,
providers interleaved, no warm-up run (outputs freed and ``gc.collect()`` between runs).

    python bench/bench_scale.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable

import harness
import torch
from torch import Tensor

from fastmask import ops

MB = 2**20


def vit_shapes(dim: int, depth: int, mlp: int, patch: int = 16, tokens: int = 197, classes: int = 1000):
    """Parameter shapes of timm's ViT (patch embedding, cls token, position embedding, ``depth`` pre-norm blocks,
    final norm, head): ViT-B/16 (768, 12, 3072) has 86.6M, ViT-L/16 (1024, 24, 4096) 304.3M."""
    shapes: list[tuple[int, ...]] = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
                   (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return [*shapes, (dim,), (dim,), (classes, dim), (classes,)]


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": lambda: harness.resnet50_shapes(head_outputs=1000),
    "vit-b": lambda: vit_shapes(768, 12, 3072),
    "vit-l": lambda: vit_shapes(1024, 24, 4096),
}


def filled(shapes, gen: torch.Generator, positive: bool = False) -> list[Tensor]:
    out = [torch.randn(s, generator=gen) for s in shapes]
    if positive:
        for t in out:
            t.square_()
    return out


def mask_generation(backend: str, grads_b: list[Tensor], grads_l: list[Tensor]) -> list[Tensor]:
    imp_b = [torch.zeros_like(g) for g in grads_b]
    imp_l = [torch.zeros_like(g) for g in grads_l]
    for _ in range(2):
        ops.fisher_accumulate_(imp_b, imp_l, grads_b, grads_l, backend=backend)
    if backend == "reference":  # the papers' way: a new mask next to both importances
        return ops.soft_mask(imp_b, imp_l, backend=backend)
    ops.soft_mask_(imp_b, imp_l, backend=backend)  # fastmask's pipeline (masks.soft_mask(overwrite=True)): M over I_b
    return imp_b


def measure(providers: harness.Providers, reps: int, memory: bool) -> dict[str, tuple[float, int | None]]:
    """(best ms over ``reps``, None) per provider or, with ``memory``, (ms, peak extra bytes) of one run; no warm-up,
    outputs freed and garbage collected between runs."""
    before = dict.fromkeys(providers, gc.collect)
    if not memory:
        return {p: (harness.best_ms(s), None) for p, s in
                harness.interleave(providers, reps, before=before, cold=providers).items()}
    runs = harness.interleave(providers, 1, before=before, cold=providers,
                              measure=lambda fn: (lambda r: (1e3 * r.seconds, r.extra_bytes))(harness.profiled(fn)))
    return {p: r[0] for p, r in runs.items()}


def bench_model(name: str, reps: int, gen: torch.Generator, memory: bool = False) -> list[dict]:
    shapes = MODELS[name]()
    n = harness.numel(shapes)
    param_bytes = 4 * n
    rows = []

    def add(case: str, results: dict[str, tuple[float, int | None]]) -> None:
        rows.extend({"case": f"{case}/{name}", "provider": p, "ms": ms, "parameters": n,
                     "parameter_bytes": param_bytes, "peak_extra_bytes": extra} for p, (ms, extra) in results.items())

    grads_b, grads_l = filled(shapes, gen), filled(shapes, gen)
    if not memory:
        want = mask_generation("reference", grads_b, grads_l)
        got = mask_generation("cpp", grads_b, grads_l)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=3e-7, atol=0)  # the fused kernels agree before they are timed
        del want, got
    add("mask-generation", measure({p: lambda b=b, gb=grads_b, gl=grads_l: mask_generation(b, gb, gl)
                                    for p, b in (("reference", "reference"), ("fastmask", "cpp"))}, reps, memory))
    del grads_b, grads_l

    params = filled(shapes, gen)
    grads = filled(shapes, gen)
    masks = [torch.rand(s, generator=gen) for s in shapes]
    m1, m2 = filled(shapes, gen), filled(shapes, gen, positive=True)
    steps = [torch.tensor(5.0) for _ in shapes]
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    # The other two step torch.optim.Adam over the same tensors (its state is m1, m2): `reference` is the papers'
    # loop, p.grad *= M per parameter and torch's default Adam (the single-tensor loop on CPU); `peer` is the best
    # torch alternative, one _foreach_mul_ and the fused Adam.
    leaves = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(leaves, grads, strict=True):
        p.grad = g

    def adam(**kind: bool) -> torch.optim.Adam:
        opt = torch.optim.Adam(leaves, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"], **kind)
        for p, a, b in zip(leaves, m1, m2, strict=True):
            opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": a, "exp_avg_sq": b}
        return opt

    add("masked-adam", measure({
        "fastmask": lambda: ops.masked_adam_(params, grads, m1, m2, [], steps, masks, **hyper, backend="cpp"),
        "reference": harness.masked_torch_step(adam(), leaves, masks, per_parameter=True),
        "peer": harness.masked_torch_step(adam(fused=True), leaves, masks, per_parameter=False),
    }, reps, memory))
    return rows


def memory_rows(name: str) -> dict[tuple[str, str], int]:
    """Peak extra bytes per (case, provider) for ``name``, measured in a child process with the threshold pinned."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", name], check=True, capture_output=True, text=True)
    return {(r["case"], r["provider"]): r["peak_extra_bytes"] for r in json.loads(out.stdout.splitlines()[-1])}


def bench(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    if args.memory_of:  # the child process: the memory rows as JSON on its last line, nothing else to do
        harness.pin_mmap_threshold()
        print(json.dumps(bench_model(args.memory_of, 1, gen, memory=True)))
        raise SystemExit(0)
    rows = []
    for name in ("resnet50",) if args.quick else tuple(MODELS):
        timed = bench_model(name, args.reps, gen)
        gc.collect()
        extra = memory_rows(name)
        for r in timed:
            r["peak_extra_bytes"] = extra[(r["case"], r["provider"])]
            r["extra_over_parameter_bytes"] = r["peak_extra_bytes"] / r["parameter_bytes"]
        rows += timed
    return rows


def notes(rows: list[dict], args: argparse.Namespace) -> None:
    over = [r for r in rows if r["case"].startswith("mask-generation/") and r["provider"] == "fastmask"
            and r["extra_over_parameter_bytes"] > 3.0]
    print("mask generation (fastmask) peak extra memory <= 3x the parameter bytes: "
          + ("yes" if not over else "NO: " + ", ".join(r["case"] for r in over)))


if __name__ == "__main__":
    sys.exit(harness.main(
        __doc__, bench, reps=(2, 1), notes=notes,
        columns=[("extra MiB", lambda r: r["peak_extra_bytes"] / MB, ".1f"),
                 ("x params", "extra_over_parameter_bytes", ".2f")],
        options=lambda ap: ap.add_argument("--memory-of", choices=tuple(MODELS), help=argparse.SUPPRESS)))
