"""Mask generation and one masked Adam step at backbone scale on the CPU: step time and peak extra memory.

Parameter sets shaped like three backbones (one logit per class of ImageNet's 1000, as the published counts):
``resnet50`` (torchvision layout, 25.6M), ``vit-b`` (ViT-B/16 at 224 px, 86.6M) and ``vit-l`` (ViT-L/16, 304.3M);
``--quick`` runs ``resnet50`` only.

Cases and providers, side by side in one run:

- ``mask-generation``: allocate I_b and I_l, accumulate I += g² for two synthetic gradient pairs (the gradients are
  inputs, as autograd makes them in a real run), then build the soft mask M = tanh(Norm(I_b) / (Norm(I_l) + eps))
  (spec §3-4). ``reference`` = the papers' per-tensor loop (``fastmask.reference``: ``imp += g.square()``, per-tensor
  min / max / arithmetic / tanh, the mask in new tensors), ``fastmask`` = ``fastmask.ops`` with the C++ backend,
  the mask written over I_b as the pipeline does (``soft_mask_``). The floor is 2x the parameter bytes for
  fastmask (the two float32 importances) and 3x for the reference (the importances and a new float32 mask).
- ``masked-adam``: one masked Adam step (state, gradients and mask already allocated). ``reference`` = the papers'
  loop, ``p.grad *= M`` per parameter then ``torch.optim.Adam`` as it comes (the single-tensor loop on CPU),
  ``peer`` = ``torch._foreach_mul_(grads, masks)`` then ``torch.optim.Adam(fused=True)``, ``fastmask`` =
  ``fastmask.ops.masked_adam_`` (C++).

Memory: the peak resident set of the process during the stretch minus the resident set at its start
(:class:`fastmask.memory.PeakMemory`: Linux's VmHWM, reset per stretch), reported against the parameter bytes
(float32). The stretch's own outputs (importances, mask) count; its inputs (parameters, gradients, optimizer state)
do not. glibc's malloc serves blocks below its mmap threshold from a heap that it keeps after a free, and raises
that threshold (up to 32 MB) each time it unmaps a block, so after the first case most tensors would be recycled
from pages already resident and the measured extra would shrink to nearly nothing; the bench therefore pins the
threshold at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``): every tensor gets fresh pages and returns them on free.
That would also tax the per-tensor temporaries of the reference loops with page faults, so the times are measured
in this process with the allocator as it comes, and the memory in a child process per model with the threshold
pinned, each provider run once (page first-touch included, as in a real run). Time: the best of ``--reps`` runs.

    python bench/bench_scale.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_fisher import resnet50_shapes
from torch import Tensor

from fastmask import ops
from fastmask.util.memory import PeakMemory

MB = 2**20
M_MMAP_THRESHOLD = -3  # glibc malloc.h


def pin_mmap_threshold(nbytes: int = 64 << 10) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, unmapped on free (see the module docstring).
    False where the C library has no mallopt (not glibc)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def vit_shapes(dim: int, depth: int, mlp: int, patch: int = 16, tokens: int = 197, classes: int = 1000):
    """Parameter shapes of timm's ViT (patch embedding, cls token, position embedding, ``depth`` pre-norm blocks,
    final norm, head): ViT-B/16 (768, 12, 3072) has 86.6M, ViT-L/16 (1024, 24, 4096) 304.3M."""
    shapes: list[tuple[int, ...]] = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
                   (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return [*shapes, (dim,), (dim,), (classes, dim), (classes,)]


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": lambda: resnet50_shapes(head_outputs=1000),
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


def measure(fn: Callable[[], object], reps: int, memory: bool) -> tuple[float, int | None]:
    """(best ms over ``reps``, None) or, with ``memory``, (ms, peak extra bytes) of one run; outputs are freed
    between runs."""
    best, extra = float("inf"), None
    for _ in range(1 if memory else reps):
        gc.collect()
        meter = PeakMemory("cpu") if memory else None
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if meter is not None:
            extra = meter.stop().extra_bytes
        del out
    return 1e3 * best, extra


def bench_model(name: str, reps: int, gen: torch.Generator, memory: bool = False) -> list[dict]:
    shapes = MODELS[name]()
    n = sum(torch.Size(s).numel() for s in shapes)
    param_bytes = 4 * n
    rows = []

    def row(case: str, provider: str, ms: float, extra: int | None) -> None:
        rows.append({"case": f"{case}/{name}", "provider": provider, "ms": ms, "parameters": n,
                     "parameter_bytes": param_bytes, "peak_extra_bytes": extra})

    grads_b, grads_l = filled(shapes, gen), filled(shapes, gen)
    if not memory:
        want = mask_generation("reference", grads_b, grads_l)
        got = mask_generation("cpp", grads_b, grads_l)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=3e-7, atol=0)  # the fused kernels agree before they are timed
        del want, got
    for provider, backend in (("reference", "reference"), ("fastmask", "cpp")):
        row("mask-generation", provider,
            *measure(lambda b=backend, gb=grads_b, gl=grads_l: mask_generation(b, gb, gl), reps, memory))
    del grads_b, grads_l

    params = filled(shapes, gen)
    grads = filled(shapes, gen)
    masks = [torch.rand(s, generator=gen) for s in shapes]
    m1, m2 = filled(shapes, gen), filled(shapes, gen, positive=True)
    steps = [torch.tensor(5.0) for _ in shapes]
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    row("masked-adam", "fastmask", *measure(
        lambda: ops.masked_adam_(params, grads, m1, m2, [], steps, masks, **hyper, backend="cpp"), reps, memory))
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

    papers, fused = adam(), adam(fused=True)

    def reference() -> None:
        for p, m in zip(leaves, masks, strict=True):
            p.grad.mul_(m)
        papers.step()

    def peer() -> None:
        torch._foreach_mul_(grads, masks)
        fused.step()

    row("masked-adam", "reference", *measure(reference, reps, memory))
    row("masked-adam", "peer", *measure(peer, reps, memory))
    return rows


def memory_rows(name: str) -> dict[tuple[str, str], int]:
    """Peak extra bytes per (case, provider) for ``name``, measured in a child process with the threshold pinned."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", name], check=True, capture_output=True, text=True)
    return {(r["case"], r["provider"]): r["peak_extra_bytes"] for r in json.loads(out.stdout.splitlines()[-1])}


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<28}{'provider':<11}{'ms':>10}{'x ref':>8}{'extra MiB':>11}{'x params':>10}")
    ref = {r["case"]: r["ms"] for r in rows if r["provider"] == "reference"}
    for r in rows:
        print(f"{r['case']:<28}{r['provider']:<11}{r['ms']:>10.1f}{ref[r['case']] / r['ms']:>8.2f}"
              f"{r['peak_extra_bytes'] / MB:>11.1f}{r['extra_over_parameter_bytes']:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-50 only, 1 repetition (< 30 s on an idle machine)")
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    ap.add_argument("--reps", type=int, help="repetitions per provider (default 2, --quick 1)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--memory-of", choices=tuple(MODELS), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.memory_of:
        if not pin_mmap_threshold():
            raise SystemExit("bench_scale: mallopt(M_MMAP_THRESHOLD) failed; the memory figures would be wrong")
        print(json.dumps(bench_model(args.memory_of, 1, gen, memory=True)))
        return 0
    reps = args.reps or (1 if args.quick else 2)
    rows = []
    for name in ("resnet50",) if args.quick else tuple(MODELS):
        timed = bench_model(name, reps, gen)
        gc.collect()
        extra = memory_rows(name)
        for r in timed:
            r["peak_extra_bytes"] = extra[(r["case"], r["provider"])]
            r["extra_over_parameter_bytes"] = r["peak_extra_bytes"] / r["parameter_bytes"]
        rows += timed
    print_table(rows)
    over = [r for r in rows if r["case"].startswith("mask-generation/") and r["provider"] == "fastmask"
            and r["extra_over_parameter_bytes"] > 3.0]
    print("mask generation (fastmask) peak extra memory <= 3x the parameter bytes: "
          + ("yes" if not over else "NO: " + ", ".join(r["case"] for r in over)))
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
