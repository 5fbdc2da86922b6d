"""One masked optimizer step on the CPU: fastmask's fused kernels against torch's best alternative, a per-parameter
loop, and the memory-bandwidth roofline measured in the same run (issue 3).

Cases (float32):
- ``adam-23m`` / ``sgd-23m``: the 161 parameter tensors of a ResNet-50 backbone (torchvision's layout: conv1, bn1,
  Bottleneck layers [3, 4, 6, 3], 23,508,032 parameters) plus a binary head Linear(2048, 1): 23,510,081 elements.
- ``adam-300m`` / ``sgd-300m``: four tensors of 75M elements (300M).
``--quick`` scales both down (ResNet-50 channels / 4: 1.5M elements; 4 x 2M), for CI: a smoke test of the script
whose buffers largely fit in the caches, so its figures say nothing about the targets.

Providers, each timing one step after the gradients were restored (untimed) from a saved copy:
- ``fastmask``: ``fastmask.ops.masked_adam_`` / ``masked_sgd_`` on the C++ backend, float32 soft masks, grad mode.
- ``peer``: ``torch._foreach_mul_(grads, masks)`` + ``torch.optim.Adam(fused=True).step()``; for SGD the faster of
  ``SGD(fused=True)`` and ``SGD(foreach=True)`` (measured, the ``variant`` field says which).
- ``reference``: ``p.grad.mul_(mask)`` per parameter + ``torch.optim.Adam(foreach=False)`` / ``SGD(foreach=False)``.
- ``roofline``: the bytes a one-pass step must move, divided by the in-place bandwidth. Adam: 32 bytes per element
  (read p, g, m, v, mask; write p, m, v, each 4 bytes; the written lines were just read, so no extra
  read-for-ownership); SGD with momentum: 24 bytes (read p, g, buf, mask; write p, buf). Bandwidth: the best of
  ``a.add_(b)`` (12 bytes per element), ``a.mul_(s)`` (8) and ``a.addcmul_(b, c)`` (16) over float32 buffers as
  large as the case, timed in the same run: interleaved with the providers' steps when memory allows (as for the 23m
  cases), else before and after them.

Adam: lr 1e-4, betas (0.9, 0.999), eps 1e-8 (SWiFT's CXR step); SGD: lr 1e-4, momentum 0.9, weight decay 5e-4 (the
skin / BMFT step). Times are the best of ``--reps`` steps (on a shared machine the least disturbed one, as timeit
does); the median is reported too. Targets (issue 3): fastmask >= 0.90x the roofline, >= 1.15x faster than peer,
>= 3x faster than reference.

    python bench/bench_optimizer.py [--quick] [--json PATH] [--reps R] [--cases adam-23m,...] [--threads T]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import fastmask.ops as fops

ADAM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
SGD = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)
BYTES_PER_ELEMENT = {"adam": 32, "sgd": 24}
# The fewest bytes per element the other providers' passes move (float32; temporaries counted once, written and read):
# peer = _foreach_mul_(grads, masks) (read g, M; write g: 12) + torch's fused step (Adam: read p, g, m, v, write p, m,
# v: 28; SGD: read p, g, buf, write p, buf: 20). reference = p.grad.mul_(mask) (12) + torch's single-tensor step:
# Adam lerp_ (12), mul_ + addcmul_ (20), sqrt / div / add_ into two temporaries (24), addcdiv_ (16); SGD with weight
# decay grad.add(param) into a temporary (12), buf.mul_ + add_ (20), param.add_ (12). At equal bandwidth fastmask
# can be at most (their bytes / its bytes) faster; more only where their temporaries' page faults cost extra.
OTHER_BYTES_PER_ELEMENT = {"adam": {"peer": 40, "reference": 84}, "sgd": {"peer": 32, "reference": 56}}
RESNET50_BACKBONE_PARAMS = 23_508_032  # torchvision resnet50: 25,557,032 minus fc (2048 x 1000 + 1000)
TARGETS = {"roofline": 0.90, "peer": 1.15, "reference": 3.0}


def resnet50_shapes(width_divisor: int = 1) -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-50 backbone in module order, then a binary head Linear(2048, 1).

    conv1 (64, 3, 7, 7) + bn1; layer1-4 of Bottleneck blocks [3, 4, 6, 3] with widths 64, 128, 256, 512 and
    expansion 4: conv1x1 (w, in), conv3x3 (w, w), conv1x1 (4w, w), each followed by a BN (weight, bias), and in the
    first block a downsample conv1x1 (4w, in) + BN. 53 convs, 53 BN, 2 head tensors: 161 tensors.
    """
    def c(n: int) -> int:
        return max(1, n // width_divisor)

    shapes: list[tuple[int, ...]] = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    in_ch = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = c(width), c(width * 4)
        for b in range(blocks):
            shapes += [(w, in_ch, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,), (out, w, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    shapes += [(1, in_ch), (1,)]
    return shapes


def case_shapes(size: str, quick: bool) -> list[tuple[int, ...]]:
    if size == "23m":
        return resnet50_shapes(4 if quick else 1)
    return [(2_000_000,) if quick else (75_000_000,)] * 4


def numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def timed(fn: Callable[[], None], before: Callable[[], None] | None = None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Roofline:
    """In-place bandwidth probes over float32 buffers of n elements: a.add_(b) (12 bytes per element), a.mul_(s)
    (8) and a.addcmul_(b, c) (16). ``sample()`` times one of each and returns the best bandwidth (bytes/s).

    The best of the three is the roofline: the fastest an in-place torch op streams memory in this run. Which probe
    wins depends on the machine; on this project's VM a loop gets less bandwidth the more arrays it streams (one
    core: mul_ ~50 GB/s, add_ ~48, addcmul_ ~46), so it is mul_, and a step streaming 6-8 arrays stays below it.
    ``best`` keeps every probe's figure, and the summary prints fastmask's share of each."""

    def __init__(self, n: int):
        self.n = n
        self.a, self.b, self.c = torch.rand(n), torch.rand(n), torch.rand(n)
        self.best = {"add_": 0.0, "mul_": 0.0, "addcmul_": 0.0}  # bytes/s per probe

    def sample(self) -> float:
        sample = 0.0
        for name, nbytes, op in (
            ("add_", 12, lambda: self.a.add_(self.b)),
            ("mul_", 8, lambda: self.a.mul_(0.999)),
            ("addcmul_", 16, lambda: self.a.addcmul_(self.b, self.c, value=1e-9)),
        ):
            bw = nbytes * self.n / timed(op)
            self.best[name] = max(self.best[name], bw)
            sample = max(sample, bw)
        return sample


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Case:
    """Parameters, gradients (with a saved copy to restore before each step) and soft masks of one case."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(s, generator=gen) for s in shapes]
        self.saved_grads = [torch.randn(s, generator=gen) for s in shapes]
        self.grads = [g.clone() for g in self.saved_grads]
        self.masks = [torch.rand(s, generator=gen) for s in shapes]
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def restore_grads(self) -> None:
        torch._foreach_copy_(self.grads, self.saved_grads)


def providers(kind: str, case: Case) -> dict[str, Callable[[], Callable[[], None]]]:
    """Factories: each builds a provider's optimizer state and returns its step function."""
    params, grads, masks = case.params, case.grads, case.masks

    def fastmask_adam():
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        b1, b2 = ADAM["betas"]

        def step():
            fops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, masks, lr=ADAM["lr"], beta1=b1,
                              beta2=b2, weight_decay=ADAM["weight_decay"], eps=ADAM["eps"], amsgrad=False,
                              maximize=False, backend="cpp")
        return step

    def fastmask_sgd():
        buffers: list[Tensor | None] = [None] * len(params)

        def step():
            buffers[:] = fops.masked_sgd_(params, grads, buffers, masks, lr=SGD["lr"], weight_decay=SGD["weight_decay"],
                                          momentum=SGD["momentum"], dampening=0.0, nesterov=False, maximize=False,
                                          backend="cpp")
        return step

    def torch_step(opt: torch.optim.Optimizer, per_parameter: bool) -> Callable[[], None]:
        if per_parameter:
            def step():
                for p, m in zip(params, masks, strict=True):
                    p.grad.mul_(m)
                opt.step()
        else:
            def step():
                torch._foreach_mul_(grads, masks)
                opt.step()
        return step

    if kind == "adam":
        return {
            "fastmask": fastmask_adam,
            "peer": lambda: torch_step(torch.optim.Adam(params, **ADAM, fused=True), per_parameter=False),
            "reference": lambda: torch_step(torch.optim.Adam(params, **ADAM, foreach=False), per_parameter=True),
        }
    return {
        "fastmask": fastmask_sgd,
        "peer:fused": lambda: torch_step(torch.optim.SGD(params, **SGD, fused=True), per_parameter=False),
        "peer:foreach": lambda: torch_step(torch.optim.SGD(params, **SGD, foreach=True), per_parameter=False),
        "reference": lambda: torch_step(torch.optim.SGD(params, **SGD, foreach=False), per_parameter=True),
    }


def run_case(name: str, quick: bool, reps: int) -> list[dict]:
    kind, size = name.split("-")
    shapes = case_shapes(size, quick)
    n = numel(shapes)
    if size == "23m" and not quick:
        assert len(shapes) == 161 and n == RESNET50_BACKBONE_PARAMS + 2049, n
    case = Case(shapes)
    factories = providers(kind, case)
    # Interleave the providers and the roofline probes rep by rep, so that load from other processes on a shared
    # machine hits them alike; when all their states do not fit comfortably, run them one after the other.
    state_bytes = 4 * n * (2 + 2 + 2 + 3)  # Adam state of three providers + roofline buffers (SGD needs less)
    interleave = state_bytes < 0.6 * available_bytes()
    times: dict[str, list[float]] = {p: [] for p in factories}
    bws: list[float] = []
    probes: dict[str, float] = {}

    def warmed(make: Callable[[], Callable[[], None]]) -> Callable[[], None]:
        step = make()
        step()  # warm-up: creates torch's optimizer state, faults in every page
        return step

    if interleave:
        steps = {p: warmed(make) for p, make in factories.items()}
        roof = Roofline(n)
        roof.sample()
        for _ in range(reps):
            bws.append(roof.sample())
            for p, step in steps.items():
                times[p].append(timed(step, before=case.restore_grads))
        probes = roof.best
        del steps, roof
    else:
        roof = Roofline(n)
        bws += [roof.sample() for _ in range(reps + 1)][1:]
        probes = dict(roof.best)
        del roof
        for p, make in factories.items():
            step = warmed(make)
            times[p] = [timed(step, before=case.restore_grads) for _ in range(reps)]
            del step
            gc.collect()
        roof = Roofline(n)
        bws += [roof.sample() for _ in range(reps)]
        probes = {k: max(v, probes[k]) for k, v in roof.best.items()}
        del roof
    del case, factories
    gc.collect()
    bw = max(bws)

    if kind == "sgd":  # the faster torch alternative is the peer
        variant = min(("fused", "foreach"), key=lambda v: min(times[f"peer:{v}"]))
        times["peer"] = times.pop(f"peer:{variant}")
        times.pop("peer:fused" if variant == "foreach" else "peer:foreach")
    bytes_moved = BYTES_PER_ELEMENT[kind] * n
    roofline_s = bytes_moved / bw
    rows = [{"case": name, "provider": "roofline", "ms": roofline_s * 1e3,
             "ms_median": bytes_moved / statistics.median(bws) * 1e3, "elements": n, "tensors": len(shapes),
             "bytes": bytes_moved, "bandwidth_gbps": bw / 1e9, "interleaved": interleave,
             "probe_gbps": {k: v / 1e9 for k, v in probes.items()}}]
    for provider in ("fastmask", "peer", "reference"):
        ts = times[provider]
        row = {"case": name, "provider": provider, "ms": min(ts) * 1e3, "ms_median": statistics.median(ts) * 1e3,
               "elements": n, "tensors": len(shapes), "bytes": bytes_moved,
               "bandwidth_gbps": bytes_moved / min(ts) / 1e9}
        if provider == "peer":
            row["variant"] = "fused=True" if kind == "adam" else f"{variant}=True"
        rows.append(row)
    fast = rows[1]["ms"]
    for row in rows:
        row["fastmask_speedup"] = row["ms"] / fast  # > 1: fastmask is faster (roofline: fastmask's share of it)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':10s} {'provider':10s} {'ms (best)':>10s} {'ms (median)':>12s} {'GB/s':>7s} {'vs fastmask':>12s}")
    for r in rows:
        note = f"  ({r['variant']})" if "variant" in r else ""
        print(f"{r['case']:10s} {r['provider']:10s} {r['ms']:10.2f} {r['ms_median']:12.2f} {r['bandwidth_gbps']:7.1f} "
              f"{r['fastmask_speedup']:11.2f}x{note}")


def summarise(rows: list[dict]) -> list[dict]:
    """fastmask's three figures per case: share of the roofline, speed-up over peer and over reference."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["provider"]: r for r in rows if r["case"] == case}
        figures = {k: by[k]["ms"] / by["fastmask"]["ms"] for k in TARGETS}
        medians = {k: by[k]["ms_median"] / by["fastmask"]["ms_median"] for k in TARGETS}
        out.append({"case": case, **{f"vs_{k}": v for k, v in figures.items()},
                    **{f"vs_{k}_median": v for k, v in medians.items()},
                    "meets_targets": all(figures[k] >= t for k, t in TARGETS.items())})
        kind = case.split("-")[0]
        bound = {k: OTHER_BYTES_PER_ELEMENT[kind][k] / BYTES_PER_ELEMENT[kind] for k in ("peer", "reference")}
        fast_gbps = by["fastmask"]["bandwidth_gbps"]
        per_probe = ", ".join(f"{p} {fast_gbps / g:.2f}x" for p, g in by["roofline"]["probe_gbps"].items())
        out[-1].update({f"byte_bound_vs_{k}": v for k, v in bound.items()})
        print(f"{case}: {figures['roofline']:.2f}x roofline (target >= {TARGETS['roofline']}), "
              f"{figures['peer']:.2f}x peer (>= {TARGETS['peer']}; byte bound {bound['peer']:.2f}x), "
              f"{figures['reference']:.2f}x reference (>= {TARGETS['reference']}; byte bound "
              f"{bound['reference']:.2f}x); medians: {medians['roofline']:.2f}x, {medians['peer']:.2f}x, "
              f"{medians['reference']:.2f}x; of each probe's bandwidth: {per_probe}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions (CI)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--reps", type=int, help="timed steps per provider (default 10, 3 with --quick)")
    ap.add_argument("--cases", default="adam-23m,adam-300m,sgd-23m,sgd-300m")
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's, all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f"{', quick sizes' if args.quick else ''}; best of {reps} steps")
    rows: list[dict] = []
    for name in args.cases.split(","):
        rows += run_case(name, args.quick, reps)
        gc.collect()
    print_table(rows)
    summary = summarise(rows)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick, "reps": reps}
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "meta": meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
