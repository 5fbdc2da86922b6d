"""The Fisher-importance path on the CPU: the importance pass, the fused accumulation and the soft-mask build.

Cases and providers, side by side in one run:

- ``importance-resnet18``: the importance pass over a ResNet-18-sized CNN (64 px, batch 32, one logit).
  ``reference`` = ``fisher_importance_two_pass`` (spec §3: one forward + backward per objective per batch),
  ``fastmask`` = ``fisher_importance`` (one forward and two backward passes per batch, fused accumulation). Both
  importances are checked equal (rtol 1e-5) before timing.
- ``accumulate``: I_b += g_b², I_l += g_l² over a ResNet-50-shaped tensor set (161 tensors, 23.5M elements; the
  1000-class fc replaced by a 1-logit head). ``reference`` = ``fastmask.reference.fisher_accumulate_`` (the papers'
  per-tensor ``imp += grad.square()``), ``peer`` = ``torch._foreach_addcmul_`` on both lists (the best torch
  alternative: one multi-tensor kernel per list, no temporaries), ``fastmask`` = ``fastmask.ops.fisher_accumulate_``
  with the C++ backend.
- ``soft-mask``: M = tanh(Norm(I_b) / (Norm(I_l) + eps)) per tensor over the same set. ``reference`` =
  ``fastmask.reference.soft_mask`` (per-tensor min / max / arithmetic / tanh), ``peer`` = a vectorised torch version
  (one ``torch.aminmax`` per importance, then ``torch._foreach_*`` arithmetic over all tensors and
  ``torch._foreach_tanh_``), ``fastmask`` = ``fastmask.ops.soft_mask_`` with the C++ backend: the mask written over
  I_b, as the pipeline builds it (I_b restored, untimed, before each run). The JSON's ``new_tensors_ms`` is
  ``fastmask.ops.soft_mask`` (a new mask set) in the same run, and ``in_cache_ms`` the same in-place kernel on one
  cache-resident tensor of 1M elements, its rate scaled to the whole set: what its arithmetic alone costs
  (three IEEE divisions per element keep R bit-identical to the reference, plus tanh), a floor that memory
  bandwidth does not move.

``roofline`` rows: the bytes the op moves divided by the in-place memory bandwidth measured in the same run,
interleaved with the providers: ``a.add_(b)`` on two float32 tensors of 64M elements (32M with ``--quick``; far
above the caches) moves 12 bytes per element; the best of the repetitions gives the bandwidth. Bytes moved:
accumulate reads and writes both importances and reads both gradients, 24 B per element with float32 gradients;
soft-mask reads both importances twice (min / max, then the mask: the min and max must be known before the first
mask element can be written) and writes the mask, 20 B per element. fastmask's soft mask re-reads cache-sized
batches from the cache, so its DRAM traffic is closer to the compulsory 12 B (each importance read once, the mask
written once); the JSON rows carry that figure too (``compulsory_bytes_per_element``, ``of_compulsory``). The
reference and the peer return new tensors, so they also pay for fresh output memory (page faults and the kernel
zeroing the pages); ``output_alloc_ms`` in the soft-mask rows is that cost alone (empty + fill of the mask shapes),
measured in the same run. Every time is the best of the repetitions (providers interleaved, so drift hits all
alike); the fastmask row's ``of_roofline`` is roofline_ms / fastmask_ms.

    python bench/bench_fisher.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from fastmask import ops
from fastmask.masking.importance import fisher_importance, fisher_importance_two_pass
from fastmask.ops import reference

EPS = reference.NORM_EPS
PROBE_ELEMENTS = 64 << 20  # 2 x 256 MB: far above the last-level cache (32 MB on the machines this was tuned on)
ROOFLINE_BYTES_PER_ELEMENT = {"accumulate": 24, "soft-mask": 20}
COMPULSORY_BYTES_PER_ELEMENT = {"accumulate": 24, "soft-mask": 12}
IN_CACHE_ELEMENTS = 1 << 20  # 2 x 4 MB of importances: within the two cores' L2 + L3 here


def resnet50_shapes(width: int = 64, head_outputs: int = 1) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (bottleneck blocks [3, 4, 6, 3]) with a ``head_outputs``-logit
    fc, in ``named_parameters`` order: 161 tensors, 23.5M elements at width 64 with one logit."""
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for block in range(blocks):
            for out_c, in_c, k in ((planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)):
                shapes += [(out_c, in_c, k, k), (out_c,), (out_c,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return [*shapes, (head_outputs, inplanes), (head_outputs,)]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN pairs and a projected or identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 layout (stem 7x7/2 + max-pool, stages of two basic blocks at widths 64-512) with a
    one-logit head: 11.2M parameters at width 64."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        layers += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1), nn.Flatten(0)]
    return nn.Sequential(*layers)


def bench_importance(reps: int, quick: bool, gen: torch.Generator) -> list[dict]:
    """ResNet-18 at 64 px, batch 32: the reference two-pass loop against fastmask's one-forward pass."""
    torch.manual_seed(0)
    model = resnet18(width=32 if quick else 64)
    n_batches, batch, px = (2, 16, 64) if quick else (4, 32, 64)
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
    providers = {
        "reference": lambda: fisher_importance_two_pass(model, loader),
        "fastmask": lambda: fisher_importance(model, loader),
    }
    times = run_interleaved(providers, reps, probe=None)
    params = sum(p.numel() for p in model.parameters())
    return [{"case": "importance-resnet18", "provider": p, "ms": ms, "batches": n_batches, "batch": batch,
             "pixels": px, "parameters": params} for p, ms in times.items()]


def best_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def importance_like(shapes: list[tuple[int, ...]], gen: torch.Generator) -> list[Tensor]:
    """Non-negative float32 tensors shaped like accumulated squared gradients (heavy-tailed, a few exact zeros)."""
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen).square_()
        t.view(-1)[:: 97].zero_()
        out.append(t)
    return out


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


def bench_accumulate(shapes, reps, gen, probe) -> list[dict]:
    n = sum(torch.Size(s).numel() for s in shapes)
    grads_b = [torch.randn(s, generator=gen) for s in shapes]
    grads_l = [torch.randn(s, generator=gen) for s in shapes]
    start = (importance_like(shapes, gen), importance_like(shapes, gen))
    state = {p: tuple([t.clone() for t in ts] for ts in start) for p in ("reference", "peer", "fastmask")}
    providers = {
        "reference": lambda: reference.fisher_accumulate_(*state["reference"], grads_b, grads_l),
        "peer": lambda: torch._foreach_addcmul_(
            state["peer"][0] + state["peer"][1], grads_b + grads_l, grads_b + grads_l
        ),
        "fastmask": lambda: ops.fisher_accumulate_(*state["fastmask"], grads_b, grads_l, backend="cpp"),
    }
    times = run_interleaved(providers, reps, probe)
    # Every provider ran the same number of accumulations from the same start. fastmask rounds g² and the sum
    # separately, as the reference does (bit-identical); torch's addcmul fuses them (one rounding per step).
    for p, rtol in (("peer", 4e-6), ("fastmask", 0.0)):
        for a, b in zip(state[p][0] + state[p][1], state["reference"][0] + state["reference"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    return rows_for("accumulate", times, n)


def bench_soft_mask(shapes, reps, gen, probe) -> list[dict]:
    n = sum(torch.Size(s).numel() for s in shapes)
    ib, il = importance_like(shapes, gen), importance_like(shapes, gen)
    work = [b.clone() for b in ib]  # fastmask's I_b, restored (untimed) before each in-place build

    def restore() -> None:
        torch._foreach_copy_(work, ib)

    def fastmask() -> list[Tensor]:
        ops.soft_mask_(work, il, backend="cpp")
        return work

    providers = {
        "reference": lambda: reference.soft_mask(ib, il),
        "peer": lambda: peer_soft_mask(ib, il),
        "fastmask": fastmask,
        # Not providers: fastmask's soft_mask into new tensors, and what fresh output tensors of the masks' shapes
        # cost alone (allocation, faults, zeroed pages).
        "new_tensors": lambda: ops.soft_mask(ib, il, backend="cpp"),
        "output_alloc": lambda: [torch.empty(s).fill_(0.0) for s in shapes],
    }
    want = reference.soft_mask(ib, il)
    for p in ("peer", "fastmask", "new_tensors"):
        restore()
        for got, ref in zip(providers[p](), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=3e-7, atol=0)  # tanh within 2 ulp of torch.tanh
    # The arithmetic alone: the same kernel on one cache-resident tensor of the set's first IN_CACHE_ELEMENTS
    # values, its rate scaled to the whole set.
    small_ib = [torch.cat([b.reshape(-1) for b in ib])[:IN_CACHE_ELEMENTS]]
    small_il = [torch.cat([l.reshape(-1) for l in il])[:IN_CACHE_ELEMENTS]]
    small_work = [small_ib[0].clone()]

    def in_cache() -> None:
        ops.soft_mask_(small_work, small_il, backend="cpp")

    providers["in_cache"] = in_cache
    restore_small = lambda: torch._foreach_copy_(small_work, small_ib)  # noqa: E731
    times = run_interleaved(providers, reps, probe, before={"fastmask": restore, "in_cache": restore_small})
    alloc, new_tensors = times.pop("output_alloc"), times.pop("new_tensors")
    in_cache_ms = times.pop("in_cache") * n / small_ib[0].numel()
    rows = rows_for("soft-mask", times, n)
    for r in rows:
        r["output_alloc_ms"] = alloc
        if r["provider"] == "fastmask":
            r["new_tensors_ms"] = new_tensors
            r["in_cache_ms"] = in_cache_ms
    return rows


def run_interleaved(providers: dict[str, Callable[[], object]], reps: int, probe: Callable[[], float] | None,
                    before: dict[str, Callable[[], None]] | None = None):
    """Best time per provider (and, with a probe, the best bandwidth), the providers interleaved rep by rep;
    ``before[p]`` runs untimed before each run of provider p."""
    before = before or {}
    for p, fn in providers.items():  # warm-up: first-touch page faults, code paths
        before.get(p, lambda: None)()
        fn()
    times: dict[str, float] = {p: float("inf") for p in providers}
    if probe is not None:
        times["bandwidth"] = 0.0
    for _ in range(reps):
        for p, fn in providers.items():
            before.get(p, lambda: None)()
            times[p] = min(times[p], best_ms(fn))
        if probe is not None:
            times["bandwidth"] = max(times["bandwidth"], probe())
    return times


def rows_for(case: str, times: dict[str, float], n: int) -> list[dict]:
    gbps = times.pop("bandwidth")
    roof = ROOFLINE_BYTES_PER_ELEMENT[case] * n / (gbps * 1e6)
    compulsory = COMPULSORY_BYTES_PER_ELEMENT[case] * n / (gbps * 1e6)
    rows = [{"case": case, "provider": p, "ms": ms, "elements": n, "of_compulsory": compulsory / ms}
            for p, ms in times.items()]
    rows.append({"case": case, "provider": "roofline", "ms": roof, "elements": n, "bandwidth_gbps": gbps,
                 "bytes_per_element": ROOFLINE_BYTES_PER_ELEMENT[case],
                 "compulsory_bytes_per_element": COMPULSORY_BYTES_PER_ELEMENT[case], "compulsory_ms": compulsory})
    return rows


def make_probe(elements: int) -> Callable[[], float]:
    """In-place add over 2 x ``elements`` float32: returns the bandwidth it reached, in GB/s (12 bytes per element)."""
    a = torch.ones(elements)
    b = torch.ones(elements)
    a.add_(b)

    def probe() -> float:
        return 12 * elements / (best_ms(lambda: a.add_(b)) * 1e6)

    return probe


def summarise(rows: list[dict]) -> None:
    by = {(r["case"], r["provider"]): r for r in rows}
    for r in rows:
        ref, peer = by.get((r["case"], "reference")), by.get((r["case"], "peer"))
        r["vs_reference"] = ref["ms"] / r["ms"] if ref else None
        r["vs_peer"] = peer["ms"] / r["ms"] if peer else None
        roof = by.get((r["case"], "roofline"))
        r["of_roofline"] = roof["ms"] / r["ms"] if roof and r["provider"] != "roofline" else None
    fmt = lambda v: f"{v:>8.2f}x" if v is not None else f"{'':>9}"  # noqa: E731
    print(f"{'case':<20} {'provider':<10} {'ms':>9} {'vs ref':>9} {'vs peer':>9} {'of roof':>9}")
    for r in rows:
        print(f"{r['case']:<20} {r['provider']:<10} {r['ms']:>9.2f} {fmt(r['vs_reference'])} {fmt(r['vs_peer'])} "
              f"{fmt(r['of_roofline'])}")
    for r in rows:
        if r["provider"] == "roofline":
            print(f"{r['case']}: {r['bandwidth_gbps']:.1f} GB/s in-place add; roofline {r['bytes_per_element']} B/elt"
                  f" (compulsory {r['compulsory_bytes_per_element']} B: {r['compulsory_ms']:.2f} ms)"
                  + (f"; fresh output memory alone {r['output_alloc_ms']:.2f} ms" if "output_alloc_ms" in r else ""))
        if "in_cache_ms" in r:
            print(f"{r['case']}: fastmask's arithmetic alone (in-cache rate x elements) {r['in_cache_ms']:.2f} ms;"
                  f" into new tensors {r['new_tensors_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller tensor set and fewer repetitions (CI, < 30 s)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--reps", type=int, help="timed repetitions per provider (default 15, 5 with --quick)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch / OpenMP threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 15)
    shapes = resnet50_shapes(width=32 if args.quick else 64)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"tensor set: ResNet-50 shapes, {len(shapes)} tensors, {n / 1e6:.1f}M elements; {args.threads} threads; "
          f"best of {reps}; torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    probe = make_probe(PROBE_ELEMENTS // 2 if args.quick else PROBE_ELEMENTS)
    rows = bench_importance(max(3, reps // 3), args.quick, gen)
    rows += bench_accumulate(shapes, reps, gen, probe) + bench_soft_mask(shapes, reps, gen, probe)
    summarise(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads, "reps": reps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
