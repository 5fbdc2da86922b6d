"""What every bench script shares: the tensor sets, the timing, the bandwidth probes, the table and the command line.

Not a benchmark itself (tests/test_bench.py runs ``bench_*.py`` only); the scripts import it from their own folder.
Over 400 lines because it is the one place the bench scripts share: a second module would split one toolbox.

- Tensor sets: :func:`resnet50_shapes` (torchvision's ResNet-50 parameter shapes, the set of every per-parameter
  op bench), :func:`resnet18` (the model of the importance pass), and the value generators :func:`importance_like`
  (accumulated squared gradients) and :func:`score_like` (BMFT's ratio scores, R = 7 u^3).
- Timing: :func:`interleave` runs the providers rep by rep, so that load from other processes on a shared machine
  hits them alike, after one warm-up call each (first-touch page faults, code paths); a provider's figure is its
  best repetition (the least disturbed one, as timeit does) unless the script says otherwise. :func:`fastest`
  keeps the faster of several measured candidates for one role (the best torch alternative is measured, not
  guessed).
- Roofline: :class:`Bandwidth` times the in-place probes ``a.add_(b)`` (12 bytes per float32 element), ``a.mul_(s)``
  (8) and ``a.addcmul_(b, c)`` (16), or the read probe ``a.sum()`` (4), interleaved with the providers; a
  ``roofline`` row is the bytes an op must move divided by that bandwidth. On a CUDA device (``device=``, used by
  gpu_check.py) the probe is a device-to-device ``a.copy_(b)`` (8), timed by :func:`timer` (synchronised).
- Masked optimizer steps (bench_masked_adam.py, bench_masked_sgd.py, bench_scale.py): :func:`shapes_of`,
  :class:`StepCase`, :func:`masked_torch_step`, :func:`step_bench` and :func:`step_summary`.
- Output: :func:`main` parses ``--quick``, ``--json PATH``, ``--reps R`` and ``--threads T`` (plus the script's
  own options), runs the script's bench, adds the ratios (:func:`add_ratios`), prints the table
  (:func:`print_table`) and writes ``{"rows": [{"case", "provider", "ms", ...}], ...}``.

Ratios are always another provider's time over this row's: ``vs_reference`` and ``vs_peer`` above 1 mean this row is
faster; ``of_roofline`` is the roofline's time over this row's (1.0 = at the memory bound).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastmask.util.memory import PeakMemory

Shape = tuple[int, ...]
Providers = dict[str, Callable[[], object]]

# ---------------------------------------------------------------------------------------------------- tensor sets


def resnet50_shapes(width: int = 64, head_outputs: int = 1) -> list[Shape]:
    """Parameter shapes of torchvision's ResNet-50 (bottleneck blocks [3, 4, 6, 3], expansion 4; every conv followed
    by a BN weight and bias, a downsample conv + BN in each stage's first block) with a ``head_outputs``-logit fc, in
    ``named_parameters`` order: 161 tensors. At width 64 the backbone has 23,508,032 parameters: 23,510,081 with one
    logit (the binary heads of SWiFT / BMFT), 25,557,032 with torchvision's 1000. ``width=16`` is the quick set
    (channels / 4: 1.5M elements)."""
    shapes: list[Shape] = [(width, 3, 7, 7), (width,), (width,)]
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


def numel(shapes: Sequence[Shape]) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def described(label: str, shapes: Sequence[Shape]) -> int:
    """Print what a tensor set is (``label``, tensors, elements); its element count."""
    n = numel(shapes)
    print(f"{label}: {len(shapes)} tensors, {n:,} elements ({n / 1e6:.1f}M)", flush=True)
    return n


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


def importance_like(shapes: Sequence[Shape], gen: torch.Generator) -> list[Tensor]:
    """Non-negative float32 tensors shaped like accumulated squared gradients (heavy-tailed, a few exact zeros)."""
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen).square_()
        t.view(-1)[:: 97].zero_()
        out.append(t)
    return out


def score_like(shapes: Sequence[Shape], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """BMFT-like ratio scores R = 7 u^3, u ~ U[0, 1) (skewed towards 0; median 7 / 8), in ``dtype``."""
    return [torch.rand(s, generator=gen).pow_(3).mul_(7).to(dtype) for s in shapes]


# --------------------------------------------------------------------------------------------------------- timing


def elapsed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timer(device: torch.device | str = "cpu") -> Callable[[Callable[[], object]], float]:
    """:func:`elapsed` for work on ``device``: on a CUDA device the queue is drained before and after the call, so
    that the wall time is the kernels' and not their launch's."""
    if torch.device(device).type != "cuda":
        return elapsed

    def synchronized(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return synchronized


@dataclass(frozen=True)
class Run:
    """One call measured in full: its result, wall and process CPU seconds (all threads), and the peak resident
    memory it added (:class:`fastmask.util.memory.PeakMemory`: Linux's VmHWM, reset at the start)."""

    value: object
    seconds: float
    cpu_seconds: float
    extra_bytes: int


def profiled(fn: Callable[[], object]) -> Run:
    meter = PeakMemory("cpu")
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Run(value, seconds, cpu, meter.stop().extra_bytes)


def _nothing() -> None:
    return None


def interleave(providers: Providers, reps: int | dict[str, int], *, before: Providers | None = None,
               probe: Bandwidth | None = None, cold: Collection[str] = (),
               measure: Callable[[Callable[[], object]], object] = elapsed) -> dict[str, list]:
    """``measure(fn)`` of every provider, ``reps`` times each (or ``reps[p]``), interleaved rep by rep after one
    warm-up call each (none for the providers in ``cold``); ``before[p]`` runs, untimed, before every call of p, and
    ``probe`` samples the bandwidth once per rep. Returns the samples per provider (seconds by default)."""
    before = before or {}
    counts = reps if isinstance(reps, dict) else dict.fromkeys(providers, reps)
    for p, fn in providers.items():
        if p not in cold:
            before.get(p, _nothing)()
            fn()
    samples: dict[str, list] = {p: [] for p in providers}
    for rep in range(max(counts.values(), default=0)):
        if probe is not None:
            probe.sample()
        for p, fn in providers.items():
            if rep < counts[p]:
                before.get(p, _nothing)()
                samples[p].append(measure(fn))
    return samples


def best_ms(seconds: Sequence[float]) -> float:
    return 1e3 * min(seconds)


def median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def fastest(samples: dict[str, list[float]], role: str) -> str:
    """Keep the fastest (best sample) of the candidates ``<role>:<variant>`` under the name ``role``, drop the
    others; returns the winning variant."""
    candidates = [p for p in samples if p.startswith(f"{role}:")]
    win = min(candidates, key=lambda p: min(samples[p]))
    for p in candidates:
        seconds = samples.pop(p)
        if p == win:
            samples[role] = seconds
    return win.split(":", 1)[1]


def timing_rows(case: str, samples: dict[str, list[float]], **fields: object) -> list[dict]:
    """One row per provider: its best time in ms, and ``fields``."""
    return [{"case": case, "provider": p, "ms": best_ms(s), **fields} for p, s in samples.items()]


# ------------------------------------------------------------------------------------------------------- roofline

#: Bytes per float32 element each probe moves: add_ reads a, b and writes a; mul_ reads and writes a; addcmul_
#: reads a, b, c and writes a (the written lines were just read: no extra read-for-ownership); sum reads a; copy_
#: reads b and writes a (the GPU roofline: a device-to-device copy; on a CPU the write also costs a
#: read-for-ownership that these 8 bytes do not count, so the CPU scripts use the in-place probes).
PROBE_BYTES = {"add_": 12, "mul_": 8, "addcmul_": 16, "sum": 4, "copy_": 8}
IN_PLACE = ("add_", "mul_", "addcmul_")


class Bandwidth:
    """Memory bandwidth probes over float32 buffers of ``elements`` (allocated, and warmed by one untimed run of each
    probe, at the first :meth:`sample`; :meth:`free` releases them between samples) on ``device``. Each sample times
    every probe once (:func:`timer`) and keeps the best bandwidth of the sample; the roofline takes the best sample
    (or the median).

    Which in-place probe wins depends on the machine: on this project's VM a loop gets less bandwidth the more
    arrays it streams (one core: mul_ ~50 GB/s, add_ ~48, addcmul_ ~46), so the best of the three is the fastest an
    in-place torch op streams memory in the run, and :attr:`probe_gbps` keeps each probe's own figure."""

    def __init__(self, elements: int, probes: Sequence[str] = IN_PLACE, device: torch.device | str = "cpu"):
        self.elements, self.probes, self.device = elements, tuple(probes), torch.device(device)
        self._elapsed = timer(self.device)
        self.samples: list[float] = []  # bytes/s, the best probe of each sample
        self._per_probe: dict[str, float] = dict.fromkeys(self.probes, 0.0)
        self._ops: dict[str, Callable[[], object]] | None = None

    def _allocate(self) -> dict[str, Callable[[], object]]:
        needs = {"a": True, "b": bool({"add_", "addcmul_", "copy_"} & set(self.probes)), "c": "addcmul_" in self.probes}
        a, b, c = (torch.ones(self.elements, device=self.device) if need else None for need in needs.values())
        ops = {"add_": lambda: a.add_(b), "mul_": lambda: a.mul_(0.999),
               "addcmul_": lambda: a.addcmul_(b, c, value=1e-9), "sum": lambda: a.sum(), "copy_": lambda: a.copy_(b)}
        ops = {p: ops[p] for p in self.probes}
        for op in ops.values():
            op()
        return ops

    def sample(self) -> float:
        """Time each probe once; the best bandwidth of this sample, in bytes/s."""
        self._ops = self._ops or self._allocate()
        best = 0.0
        for p, op in self._ops.items():
            bw = PROBE_BYTES[p] * self.elements / self._elapsed(op)
            self._per_probe[p] = max(self._per_probe[p], bw)
            best = max(best, bw)
        self.samples.append(best)
        return best

    def free(self) -> None:
        self._ops = None
        gc.collect()

    def reset(self) -> None:
        """Forget the samples (the buffers stay): the next case's roofline from its own samples."""
        self.samples.clear()
        self._per_probe = dict.fromkeys(self.probes, 0.0)

    @property
    def gbps(self) -> float:
        return max(self.samples) / 1e9

    @property
    def median_gbps(self) -> float:
        return statistics.median(self.samples) / 1e9

    @property
    def probe_gbps(self) -> dict[str, float]:
        return {p: bw / 1e9 for p, bw in self._per_probe.items()}

    def row(self, case: str, nbytes: float, median: bool = False, **fields: object) -> dict:
        """The ``roofline`` row of a case that moves ``nbytes``: their time at the best (or median) bandwidth."""
        gbps = self.median_gbps if median else self.gbps
        return {"case": case, "provider": "roofline", "ms": nbytes / (gbps * 1e6), "bandwidth_gbps": gbps, **fields}


# --------------------------------------------------------------------------------------------------------- memory


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_mmap_threshold(nbytes: int = 64 << 10) -> None:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned to the system when freed
    (glibc's ``mallopt(M_MMAP_THRESHOLD)``; it also stops glibc raising the threshold after each free), so that a
    resident-set delta counts a call's own allocations instead of pages recycled from earlier ones."""
    try:
        pinned = bool(ctypes.CDLL(None).mallopt(-3, nbytes))  # M_MMAP_THRESHOLD in glibc's malloc.h
    except (OSError, AttributeError):
        pinned = False
    if not pinned:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed (not glibc?): the memory figures would be wrong")


# ------------------------------------------------------------------------------------------ masked optimizer steps

#: Issue 3's targets for one masked optimizer step: fastmask's share of the roofline and its speed-ups.
STEP_TARGETS = {"roofline": 0.90, "peer": 1.15, "reference": 3.0}


class StepCase:
    """Parameters, gradients (with a saved copy to restore before each step) and float32 soft masks of one case."""

    def __init__(self, shapes: Sequence[Shape], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(s, generator=gen) for s in shapes]
        self.saved_grads = [torch.randn(s, generator=gen) for s in shapes]
        self.grads = [g.clone() for g in self.saved_grads]
        self.masks = [torch.rand(s, generator=gen) for s in shapes]
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def restore_grads(self) -> None:
        torch._foreach_copy_(self.grads, self.saved_grads)


def masked_torch_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], masks: Sequence[Tensor], *,
                      per_parameter: bool) -> Callable[[], None]:
    """A torch optimizer's step on masked gradients: ``p.grad.mul_(mask)`` per parameter (the papers' loop) or one
    ``torch._foreach_mul_(grads, masks)``, then ``opt.step()``."""
    grads = [p.grad for p in params]

    def step() -> None:
        if per_parameter:
            for g, m in zip(grads, masks, strict=True):
                g.mul_(m)
        else:
            torch._foreach_mul_(grads, masks)
        opt.step()

    return step


def shapes_of(size: str, quick: bool) -> list[Shape]:
    """``23m``: the 161 tensors of a ResNet-50 backbone plus a binary head Linear(2048, 1), 23,510,081 elements
    (``quick``: channels / 4, 1.5M); ``300m``: four tensors of 75M elements (``quick``: 4 x 2M). The quick sizes
    largely fit in the caches: a smoke test of the script, whose figures say nothing about the targets."""
    if size == "23m":
        shapes = resnet50_shapes(16 if quick else 64)
        assert quick or (len(shapes) == 161 and numel(shapes) == 23_508_032 + 2049), numel(shapes)
        return shapes
    return [(2_000_000,) if quick else (75_000_000,)] * 4


def check_steps(providers: Callable[[StepCase], dict[str, Callable[[], Callable[[], None]]]], size: str,
                steps: int = 2) -> None:
    """Before timing: every provider takes ``steps`` steps on its own copy of the quick-sized case, with parameters
    starting at zero so that they hold the updates alone (no cancellation against the initial values); each must
    match the reference's within rtol 1e-5, atol 1e-6 x the largest update."""
    shapes = shapes_of(size, quick=True)
    params = {}
    for p in providers(StepCase(shapes)):
        case = StepCase(shapes)
        torch._foreach_zero_(case.params)
        step = providers(case)[p]()
        for _ in range(steps):
            case.restore_grads()
            step()
        params[p] = case.params
    want = params.pop("reference")
    scale = max(float(t.abs().max()) for t in want)
    for p, got in params.items():
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=lambda m, p=p: f"{p}: {m}")


def step_bench(args: argparse.Namespace, providers: Callable[[StepCase], dict[str, Callable[[], Callable[[], None]]]],
               bytes_per_element: int) -> list[dict]:
    """Time one step of every provider on each case of ``args.cases`` (``<kind>-<size>``, sizes as
    :func:`shapes_of`). ``providers(case)`` gives factories that build a provider's optimizer state and return its
    step; the gradients are restored, untimed, before each step. The in-place probes run over buffers as large as
    the case, interleaved with the providers rep by rep when all their states fit comfortably in memory, else before
    and after the providers, which then run one after the other. Candidates ``peer:<variant>`` are reduced to the
    fastest (the ``variant`` field).

    The providers are checked against the reference first (:func:`check_steps`). Rows: ``roofline``
    (``bytes_per_element`` x elements over the best probe sample; ``ms_median`` at the median
    sample; ``probe_gbps`` each probe's best) and the providers (best and median step; ``bandwidth_gbps`` = the
    step's bytes over its best time); ``fastmask_speedup`` = the row's time over fastmask's."""
    rows = []
    for name in args.cases.split(","):
        check_steps(providers, name.split("-")[1])
        shapes = shapes_of(name.split("-")[1], args.quick)
        n, case = numel(shapes), StepCase(shapes)
        factories = providers(case)
        state_bytes = 4 * n * (2 + 2 + 2 + 3)  # Adam state of three providers + the probe buffers (SGD needs less)
        interleaved = state_bytes < 0.6 * available_bytes()
        restore = dict.fromkeys(factories, case.restore_grads)
        probe = Bandwidth(n)
        if interleaved:
            samples = interleave({p: make() for p, make in factories.items()}, args.reps, before=restore, probe=probe)
        else:
            for _ in range(args.reps):
                probe.sample()
            probe.free()
            samples = {}
            for p, make in factories.items():
                samples |= interleave({p: make()}, args.reps, before=restore)
                gc.collect()
            for _ in range(args.reps):
                probe.sample()
        probe.free()
        del case, factories
        gc.collect()
        variant = fastest(samples, "peer")
        nbytes = bytes_per_element * n
        sizes = {"elements": n, "tensors": len(shapes), "bytes": nbytes}
        case_rows = [probe.row(name, nbytes, ms_median=nbytes / (probe.median_gbps * 1e6), **sizes,
                               interleaved=interleaved, probe_gbps=probe.probe_gbps)]
        for p in ("fastmask", "peer", "reference"):
            case_rows.append({"case": name, "provider": p, "ms": best_ms(samples[p]),
                              "ms_median": median_ms(samples[p]), **sizes,
                              "bandwidth_gbps": nbytes / min(samples[p]) / 1e9})
        case_rows[2]["variant"] = f"{variant}=True"
        for row in case_rows:
            row["fastmask_speedup"] = row["ms"] / case_rows[1]["ms"]  # > 1: fastmask is faster (roofline: its share)
        rows += case_rows
    return rows


STEP_COLUMNS: list[Column] = [("ms (median)", "ms_median", ".2f"), ("GB/s", "bandwidth_gbps", ".1f"),
                              ("vs fastmask", "fastmask_speedup", ".2fx"), ("peer variant", "variant", "")]


def step_summary(rows: list[dict], bytes_per_element: int, other_bytes: dict[str, int]) -> dict:
    """fastmask's three figures per case against :data:`STEP_TARGETS` (best and median steps), and the byte bounds:
    at equal bandwidth fastmask can be at most (their bytes / its bytes) faster than the peer and the reference, more
    only where their temporaries' page faults cost extra. Printed, and returned for the JSON."""
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["provider"]: r for r in rows if r["case"] == case}
        figures = {k: by[k]["ms"] / by["fastmask"]["ms"] for k in STEP_TARGETS}
        medians = {k: by[k]["ms_median"] / by["fastmask"]["ms_median"] for k in STEP_TARGETS}
        bound = {k: other_bytes[k] / bytes_per_element for k in ("peer", "reference")}
        summary.append({"case": case, **{f"vs_{k}": v for k, v in figures.items()},
                        **{f"vs_{k}_median": v for k, v in medians.items()},
                        "meets_targets": all(figures[k] >= t for k, t in STEP_TARGETS.items()),
                        **{f"byte_bound_vs_{k}": v for k, v in bound.items()}})
        fast_gbps = by["fastmask"]["bandwidth_gbps"]
        per_probe = ", ".join(f"{p} {fast_gbps / g:.2f}x" for p, g in by["roofline"]["probe_gbps"].items())
        print(f"{case}: {figures['roofline']:.2f}x roofline (target >= {STEP_TARGETS['roofline']}), "
              f"{figures['peer']:.2f}x peer (>= {STEP_TARGETS['peer']}; byte bound {bound['peer']:.2f}x), "
              f"{figures['reference']:.2f}x reference (>= {STEP_TARGETS['reference']}; byte bound "
              f"{bound['reference']:.2f}x); medians: {medians['roofline']:.2f}x, {medians['peer']:.2f}x, "
              f"{medians['reference']:.2f}x; of each probe's bandwidth: {per_probe}")
    return {"summary": summary}


# --------------------------------------------------------------------------------------------------------- output

#: An extra table column: header, the row's key (or a function of the row), format spec; None prints blank.
Column = tuple[str, "str | Callable[[dict], object]", str]


def add_ratios(rows: list[dict], key: str = "ms", suffix: str = "") -> None:
    """``vs_reference``, ``vs_peer`` and ``of_roofline`` (+ ``suffix``) on every row, from ``key``: the other
    provider's value over this row's (None where the case has no such provider; no ``of_roofline`` for the roofline
    itself)."""
    by = {(r["case"], r["provider"]): r for r in rows}
    for r in rows:
        for field, other in (("vs_reference", "reference"), ("vs_peer", "peer"), ("of_roofline", "roofline")):
            o = by.get((r["case"], other))
            r[field + suffix] = o[key] / r[key] if o is not None and r.get(key) else None
        if r["provider"] == "roofline":
            r["of_roofline" + suffix] = None


def _cell(value: object, spec: str, width: int) -> str:
    """``spec`` ending in "fx" is a ratio: the float and an "x"."""
    if value is None:
        return f" {'':>{width}}"
    text = format(value, spec[:-1]) + "x" if spec.endswith("fx") else format(value, spec)
    return f" {text:>{width}}"


def print_table(rows: list[dict], columns: Sequence[Column] = ()) -> None:
    """case, provider, ms and the three ratios, then the script's own columns."""
    width = max(len("case"), *(len(r["case"]) for r in rows))
    columns = [("ms", "ms", ".2f"), ("vs ref", "vs_reference", ".2fx"), ("vs peer", "vs_peer", ".2fx"),
               ("of roof", "of_roofline", ".2fx"), *columns]
    widths = [max(9, len(c[0])) for c in columns]
    heads = "".join(f" {c[0]:>{w}}" for c, w in zip(columns, widths, strict=True))
    print(f"\n{'case':<{width}} {'provider':<10}{heads}")
    for r in rows:
        cells = (_cell(get(r) if callable(get) else r.get(get), spec, w)
                 for (_, get, spec), w in zip(columns, widths, strict=True))
        print(f"{r['case']:<{width}} {r['provider']:<10}" + "".join(cells))


def main(doc: str, bench: Callable[[argparse.Namespace], list[dict]], *, reps: tuple[int, int],
         options: Callable[[argparse.ArgumentParser], None] | None = None, columns: Sequence[Column] = (),
         notes: Callable[[list[dict], argparse.Namespace], dict | None] | None = None, threads: int | None = None,
         ratio_key: str = "ms", argv: list[str] | None = None) -> int:
    """A bench script's command line: parse ``--quick`` / ``--json`` / ``--reps`` (default ``reps[0]``, ``reps[1]``
    with --quick) / ``--threads`` (default ``threads``, else torch's) and the script's ``options``; run ``bench``
    (``args.reps`` is set; ``args.default_reps`` says whether it was the default); add the ratios, print the table
    and ``notes(rows, args)`` (which may return more top-level JSON fields), and write the JSON."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions (CI: under 30 s)")
    ap.add_argument("--json", type=Path, help="write {'rows': [{'case', 'provider', 'ms', ...}], ...} here")
    ap.add_argument("--reps", type=int, help=f"repetitions per provider (default {reps[0]}, {reps[1]} with --quick)")
    ap.add_argument("--threads", type=int, default=threads, help="torch / OpenMP threads (default: "
                    + (f"{threads})" if threads else "torch's, all cores)"))
    if options is not None:
        options(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.default_reps = args.reps is None
    args.reps = args.reps or reps[args.quick]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick, "reps": args.reps}
    print(f"torch {meta['torch']}, {meta['threads']} threads, {platform.processor() or platform.machine()}"
          f"{', quick sizes' if args.quick else ''}; {args.reps} repetitions", flush=True)
    rows = bench(args)
    add_ratios(rows, ratio_key)
    print_table(rows, columns)
    extra = (notes(rows, args) if notes is not None else None) or {}
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **meta, "meta": meta, **extra}, indent=2))
    return 0
