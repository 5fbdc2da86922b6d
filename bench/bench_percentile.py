"""BMFT's global threshold: the q-th percentile over every parameter tensor of a backbone (spec §4).

Cases (ResNet-50 parameter shapes, 161 tensors, 25,557,032 elements per copy; values R = 7 u^3, u ~ U[0, 1)):

- ``25m``: one copy, float32 (102 MB).
- ``100m``: four copies, float32 (409 MB).
- ``2g``: 85 copies, bfloat16: 2,172,347,720 elements (> 2^31), 4.3 GB. Not run under ``--quick``.

Providers, all computing the 50th percentile (linear, BMFT's rate) of the same tensors:

- ``fastmask``: ``fastmask.ops.percentile`` (torch.ops.fastmask.percentile: radix selection over the float keys,
  16-bit digits, one pass for bf16, two for fp32; no concatenated copy).
- ``reference``: the papers' way, ``np.percentile`` over the concatenated host copy (for bf16: numpy has no bfloat16,
  so the copy is the exact float32 upcast, and ``overwrite_input=True`` spares numpy's second copy at 2g).
- ``peer``: ``torch.kthvalue`` over the concatenated copy, for the lower neighbour only (one order statistic,
  so less than the exact linear percentile needs). ``torch.quantile`` refuses inputs above 2^24 elements. Skipped
  at 2g: it clones its input and allocates an int64 index per element (~26 GB there, measured 16 B/element extra at
  25m/100m), more than this machine's 24 GiB.
- ``roofline``: the fastmask passes' bytes over the read bandwidth measured in the same run (``torch.sum`` over a
  256 MB float32 buffer, beyond the caches, interleaved with the providers), i.e. the time if each pass only
  streamed the input: 2 passes x 4 B per element for float32, 1 x 2 B for bf16.

``peak_extra_bytes``: the process's peak resident set during the call minus the resident set just before it
(Linux: the peak is reset through /proc/self/clear_refs, read from VmHWM in /proc/self/status). The script re-runs
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so every large block is its own mapping, returned to the system when
freed; the deltas then count each provider's own allocations, the concatenated copies included. Times: median of
the repetitions, providers interleaved, after one warm-up call each (none for the reference at 2g); ``cpu_ms`` is the
process CPU time of the call summed over its threads, which other load on the machine inflates less than the wall
time. fastmask's result is
checked to equal numpy's bit for bit in every case.

    python bench/bench_percentile.py [--quick] [--json PATH] [--cases 25m,100m,2g]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastmask import ops

Q = 50.0
CASES = {"25m": (1, torch.float32), "100m": (4, torch.float32), "2g": (85, torch.bfloat16)}
PASSES = {torch.float32: 2, torch.bfloat16: 1}  # 16-bit digits over the key width
PROBE_BYTES = 256 * 2**20


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (25,557,032 parameters), in module order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def make_tensors(copies: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=g).pow_(3).mul_(7)).to(dtype) for _ in range(copies) for s in resnet50_shapes()]


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measured(fn: Callable[[], object]) -> tuple[object, float, float, int]:
    """fn()'s result, its wall seconds, the process CPU seconds it used (all threads), and the peak resident memory
    it added (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, seconds, cpu, _status_bytes("VmHWM") - before


def numpy_percentile(tensors: list[torch.Tensor]) -> float:
    """np.percentile over one concatenated host copy, filled tensor by tensor (bf16 widened to float32 on the way,
    so the copy is the only large allocation), partitioned in place."""
    flat = np.empty(sum(t.numel() for t in tensors), np.float32)  # the cases are float32 and bf16
    at = 0
    for t in tensors:
        flat[at: at + t.numel()] = (t.float() if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()
        at += t.numel()
    return float(np.percentile(flat, Q, overwrite_input=True))


def kthvalue(tensors: list[torch.Tensor]) -> float:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    n = flat.numel()
    k = int(np.floor((n - 1) * (Q / 100))) + 1  # the lower neighbour of the linear percentile (1-based)
    return float(torch.kthvalue(flat, k).values)


def run_case(case: str, reps: int, probe: torch.Tensor) -> list[dict]:
    copies, dtype = CASES[case]
    tensors = make_tensors(copies, dtype)
    n = sum(t.numel() for t in tensors)
    nbytes = n * tensors[0].element_size()
    print(f"{case}: {len(tensors)} tensors, {n:,} elements ({'> 2^31, ' if n > 2**31 else ''}{dtype}), "
          f"{nbytes / 1e9:.2f} GB", flush=True)
    huge = n > 2**31  # one call of the reference there (about a minute), no warm-up; kthvalue does not fit
    slow_reps = 1 if huge else max(1, reps // 2)
    providers: dict[str, tuple[Callable[[], object], int]] = {
        "fastmask": (lambda: ops.percentile(tensors, Q, backend="cpp"), reps),
        "reference": (lambda: numpy_percentile(tensors), slow_reps),
        "read": (lambda: probe.sum(), reps),  # one streaming pass over PROBE_BYTES, for the roofline
    }
    if not huge:
        providers["peer"] = (lambda: kthvalue(tensors), slow_reps)
    for name, (fn, _) in providers.items():
        if not (huge and name == "reference"):
            fn()  # warm-up
    values, extras = {}, {}
    times: dict[str, list[float]] = {name: [] for name in providers}
    cpu_times: dict[str, list[float]] = {name: [] for name in providers}
    for rep in range(max(r for _, r in providers.values())):
        for name, (fn, count) in providers.items():  # interleaved, so load from other processes hits all alike
            if rep < count:
                value, seconds, cpu, extra = measured(fn)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                if rep == 0:
                    values[name], extras[name] = value, extra
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpu_times.items()}
    if values["fastmask"] != values["reference"]:
        raise AssertionError(f"{case}: fastmask gives {values['fastmask']!r}, np.percentile {values['reference']!r}")
    rows = [{"provider": p, "ms": ms[p], "cpu_ms": cpu_ms[p], "peak_extra_bytes": extras[p], "value": values[p]}
            for p in ("fastmask", "reference", "peer") if p in providers]
    bandwidth = PROBE_BYTES / (ms["read"] / 1e3)
    rows.append({"provider": "roofline", "ms": 1e3 * PASSES[dtype] * nbytes / bandwidth, "peak_extra_bytes": 0,
                 "read_gb_per_s": bandwidth / 1e9})
    for r in rows:
        r.update(case=case, elements=n, input_bytes=nbytes, dtype=str(dtype).replace("torch.", ""))
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{'case':<6} {'provider':<9} {'ms':>10} {'cpu ms':>9} {'ref/x':>8} {'peer/x':>8} {'x/roofline':>10} "
          f"{'peak extra':>12} {'% input':>8}  value")
    for r in rows:
        same = {p["provider"]: p["ms"] for p in rows if p["case"] == r["case"]}
        r["speedup_vs_reference"] = same["reference"] / r["ms"]
        if "peer" in same:
            r["speedup_vs_peer"] = same["peer"] / r["ms"]
        r["vs_roofline"] = r["ms"] / same["roofline"]
        r["peak_extra_pct_of_input"] = 100 * r["peak_extra_bytes"] / r["input_bytes"]
        vs_peer = f"{r['speedup_vs_peer']:>7.2f}x" if "speedup_vs_peer" in r else f"{'-':>8}"
        value = f"{r['value']!r}" if "value" in r else ""
        cpu = f"{r['cpu_ms']:>9.1f}" if "cpu_ms" in r else f"{'-':>9}"
        print(f"{r['case']:<6} {r['provider']:<9} {r['ms']:>10.1f} {cpu} {r['speedup_vs_reference']:>7.2f}x {vs_peer} "
              f"{r['vs_roofline']:>9.2f}x {r['peak_extra_bytes'] / 1e6:>10.1f}MB {r['peak_extra_pct_of_input']:>7.2f}%"
              f"  {value}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 25m case only, fewer repetitions (CI)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--cases", help="comma-separated subset of 25m,100m,2g (default: all; 25m with --quick)")
    args = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # see the module docstring: exact RSS deltas
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    cases = args.cases.split(",") if args.cases else (["25m"] if args.quick else list(CASES))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads; q = {Q}, linear")
    probe = torch.ones(PROBE_BYTES // 4)
    rows = []
    for case in cases:
        reps = 3 if args.quick else {"25m": 7, "100m": 5, "2g": 3}[case]
        rows += run_case(case, reps, probe)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "q": Q, "threads": torch.get_num_threads()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
