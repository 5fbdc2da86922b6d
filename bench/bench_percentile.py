"""BMFT's global threshold: the q-th percentile over every parameter tensor of a backbone (docs/algorithm.md §4).

Cases (ResNet-50 parameter shapes with torchvision's 1000-class head, 161 tensors, 25,557,032 elements per copy;
values R = 7 u^3, u ~ U[0, 1)):

- ``25m``: one copy, float32 (102 MB).
- ``100m``: four copies, float32 (409 MB).
- ``2g``: 85 copies, bfloat16: 2,172,347,720 elements (> 2^31), 4.3 GB. Not run under ``--quick``.

Providers, all computing the 50th percentile (linear, BMFT's rate) of the same tensors:

- ``fastmask``: ``fastmask.ops.percentile(..., backend="cpp")``: the radix selection of ``fastmask.ops.radix`` over
  the float keys, one ``radix_histogram`` pass per 16-bit digit (one for bf16, two for fp32); no concatenated copy.
- ``reference``: the papers' way, ``np.percentile`` over the concatenated host copy (for bf16: numpy has no bfloat16,
  so the copy is the exact float32 upcast, and ``overwrite_input=True`` spares numpy's second copy at 2g).
- ``peer``: ``torch.kthvalue`` over the concatenated copy, for the lower neighbour only (one order statistic,
  so less than the exact linear percentile needs). ``torch.quantile`` refuses inputs above 2^24 elements. Skipped
  at 2g: it clones its input and allocates an int64 index per element (~26 GB there, measured 16 B/element extra at
  25m/100m), more than this machine's 24 GiB.
- ``roofline``: the fastmask passes' bytes over the read bandwidth measured in the same run (``torch.sum`` over a
  256 MB float32 buffer, beyond the caches, interleaved with the providers; the median sample), i.e. the time if
  each pass only streamed the input: 2 passes x 4 B per element for float32, 1 x 2 B for bf16.

``peak_extra_bytes``: the process's peak resident set during the call minus the resident set just before it
(``fastmask.util.memory.PeakMemory``: Linux's VmHWM, reset through /proc/self/clear_refs). The script pins glibc's
mmap threshold at 64 KiB first (``harness.pin_mmap_threshold``), so every large block is its own mapping, returned
to the system when freed; the deltas then count each provider's own allocations, the concatenated copies included.
Times: median of the repetitions (``--reps`` for every case; default 7 / 5 / 3 for 25m / 100m / 2g, 3 with
``--quick``, half as many for the reference and the peer), providers interleaved, after one warm-up call each (none
for the reference at 2g); ``cpu_ms`` is the process CPU time of the call summed over its threads, which other load
on the machine inflates less than the wall time. fastmask's result is checked to equal numpy's bit for bit in every
case. JSON: ``speedup_vs_reference`` / ``speedup_vs_peer`` (= ``vs_reference`` / ``vs_peer``) and ``vs_roofline``,
the time over the roofline's (the inverse of ``of_roofline``).

    python bench/bench_percentile.py [--quick] [--json PATH] [--reps R] [--cases 25m,100m,2g] [--threads T]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import harness
import numpy as np
import torch

from fastmask import ops

Q = 50.0
CASES = {"25m": (1, torch.float32), "100m": (4, torch.float32), "2g": (85, torch.bfloat16)}
CASE_REPS = {"25m": 7, "100m": 5, "2g": 3}
PASSES = {torch.float32: 2, torch.bfloat16: 1}  # 16-bit digits over the key width
PROBE_BYTES = 256 * 2**20


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


def run_case(case: str, reps: int, probe: harness.Bandwidth) -> list[dict]:
    copies, dtype = CASES[case]
    gen = torch.Generator().manual_seed(0)
    tensors = harness.score_like(harness.resnet50_shapes(head_outputs=1000) * copies, gen, dtype)
    n = sum(t.numel() for t in tensors)
    nbytes = n * tensors[0].element_size()
    huge = n > 2**31  # one call of the reference there (about a minute), no warm-up; kthvalue does not fit
    slow_reps = 1 if huge else max(1, reps // 2)
    print(f"{case}: {len(tensors)} tensors, {n:,} elements ({'> 2^31, ' if n > 2**31 else ''}{dtype}), "
          f"{nbytes / 1e9:.2f} GB; medians of {reps} calls ({slow_reps} for the reference and the peer)", flush=True)
    providers: dict[str, Callable[[], object]] = {
        "fastmask": lambda: ops.percentile(tensors, Q, backend="cpp"),
        "reference": lambda: numpy_percentile(tensors),
    }
    if not huge:
        providers["peer"] = lambda: kthvalue(tensors)
    counts = {p: reps if p == "fastmask" else slow_reps for p in providers}
    runs = harness.interleave(providers, counts, probe=probe, cold={"reference"} if huge else (),
                              measure=harness.profiled)
    values = {p: r[0].value for p, r in runs.items()}
    if values["fastmask"] != values["reference"]:
        raise AssertionError(f"{case}: fastmask gives {values['fastmask']!r}, np.percentile {values['reference']!r}")
    rows = [{"provider": p, "ms": harness.median_ms([x.seconds for x in r]),
             "cpu_ms": harness.median_ms([x.cpu_seconds for x in r]), "peak_extra_bytes": r[0].extra_bytes,
             "value": values[p]} for p, r in runs.items()]
    rows.append({**probe.row(case, PASSES[dtype] * nbytes, median=True), "peak_extra_bytes": 0,
                 "read_gb_per_s": probe.median_gbps})
    probe.reset()  # each case's roofline from its own samples
    for r in rows:
        r.update(case=case, elements=n, input_bytes=nbytes, dtype=str(dtype).replace("torch.", ""))
    return rows


def bench(args: argparse.Namespace) -> list[dict]:
    harness.pin_mmap_threshold()  # see the module docstring: exact resident-set deltas
    cases = args.cases.split(",") if args.cases else (["25m"] if args.quick else list(CASES))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print(f"numpy {np.__version__}; q = {Q}, linear")
    probe = harness.Bandwidth(PROBE_BYTES // 4, ("sum",))
    rows = []
    for case in cases:
        rows += run_case(case, CASE_REPS[case] if args.default_reps and not args.quick else args.reps, probe)
    return rows


def notes(rows: list[dict], args: argparse.Namespace) -> dict:
    by = {(r["case"], r["provider"]): r for r in rows}
    for r in rows:
        r["speedup_vs_reference"] = r["vs_reference"]
        if r["vs_peer"] is not None:
            r["speedup_vs_peer"] = r["vs_peer"]
        r["vs_roofline"] = r["ms"] / by[(r["case"], "roofline")]["ms"]
        r["peak_extra_pct_of_input"] = 100 * r["peak_extra_bytes"] / r["input_bytes"]
    return {"q": Q}


COLUMNS: list[harness.Column] = [
    ("cpu ms", "cpu_ms", ".1f"), ("peak extra MB", lambda r: r["peak_extra_bytes"] / 1e6, ".1f"),
    ("% input", lambda r: 100 * r["peak_extra_bytes"] / r["input_bytes"], ".2f"),
    ("value", lambda r: repr(r["value"]) if "value" in r else None, ""),
]

if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(7, 3), columns=COLUMNS, notes=notes,
                          options=lambda ap: ap.add_argument("--cases", help="comma-separated subset of 25m,100m,2g "
                                                             "(default: all; 25m with --quick)")))
