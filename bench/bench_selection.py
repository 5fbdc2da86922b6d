"""Wall time of choosing a configuration on held-out data, against one fixed-configuration run, on the demo.

Cases ``swift`` and ``bmft``: the tinted-digits benchmark of ``fastmask demo`` (seed 0: its splits and its biased ERM
CNN, trained once and not timed), each method's default configuration and default grid of 8 candidates. Providers:

- ``reference``: one run of the default configuration on all of the external set, as the papers run a method (with
  learning rates picked beforehand).
- ``peer``: the plain grid search a user would write: each candidate a run of its own from the original weights on
  the fitting part (its own importance pass and mask, every epoch of every step), the validation part scored after
  every epoch.
- ``fastmask``: :func:`fastmask.methods.selection.select` on the same parts and grid: the mask once, shared first
  steps, early stops (hopeless, patience), the validation part read once.

Each provider starts from the same model and loaders; one torch thread (the demo's CNN is fastest so). Reported:
the best wall time of ``--reps`` repetitions, interleaved, and ``x fixed``, each provider's time over the
reference's (the issue's budget for selection: at most 4x one fixed run). ``--quick`` shortens the ERM training and
every step to 2 epochs and the grid to its first 2 candidates.

    python bench/bench_selection.py [--quick] [--json PATH] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from typing import Any

import harness
import torch

from fastmask.app import demo
from fastmask.fairness.metrics import choose_threshold, evaluate
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import select
from fastmask.model.scoring import score


def quick_config(method: str, config: Any) -> Any:
    """``config`` with 2 epochs in each step."""
    return replace(config, **{s: replace(getattr(config, s), epochs=2) for s in METHODS[method].steps})


def grid_search(model: torch.nn.Module, method: str, mask_loader, train_loader, val_loader, config: Any,
                candidates) -> int:
    """The peer: every candidate run alone from ``model``'s weights, the validation part scored after each epoch;
    returns the number of validation scorings."""
    scored = 0

    def on_epoch(state) -> None:
        nonlocal scored
        if state.epoch:
            s = score(run_model, val_loader)
            evaluate(s.y, s.p, s.a, threshold=choose_threshold(s.y, s.p, "accuracy"))
            scored += 1

    for c in candidates:
        run_model = copy.deepcopy(model)
        METHODS[method](run_model, mask_loader, train_loader, config=c.apply(config), on_epoch=on_epoch)
    return scored


def bench(args: argparse.Namespace) -> list[dict]:
    splits, original = demo.prepare(0, progress=False) if not args.quick else quick_prepare()
    rows = []
    try:
        whole = demo.parts(splits.external, 0, 0.0)
        mask_fit, train_fit, val = demo.parts(splits.external, 0, 0.25)
        for method in ("swift", "bmft"):
            config = replace(METHODS[method].config(), seed=0)
            candidates = METHODS[method].grid
            if args.quick:
                config, candidates = quick_config(method, config), candidates[:2]
            providers = {
                "reference": lambda m=method, c=config: METHODS[m](copy.deepcopy(original), whole[0], whole[1],
                                                                   config=c),
                "peer": lambda m=method, c=config, g=candidates: grid_search(original, m, mask_fit, train_fit, val,
                                                                            c, g),
                "fastmask": lambda m=method, c=config, g=candidates: select(copy.deepcopy(original), m, mask_fit,
                                                                           train_fit, val, config=c, candidates=g),
            }
            samples = harness.interleave(providers, args.reps, cold=set(providers), measure=harness.profiled)
            fixed = min(r.seconds for r in samples["reference"])
            for provider, runs in samples.items():
                best = min(runs, key=lambda r: r.seconds)
                row = {"case": method, "provider": provider, "ms": 1e3 * best.seconds,
                       "x_fixed": best.seconds / fixed, "cpu_s": best.cpu_seconds, "candidates": len(candidates)}
                if provider == "fastmask":
                    sel = best.value
                    row.update(stopped=len(sel.stopped), converged=len(sel.converged), scored_epochs=len(sel.rows),
                               chosen=sel.describe_choice())
                elif provider == "peer":
                    row["scored_epochs"] = best.value
                rows.append(row)
    finally:
        splits.close()
    return rows


def quick_prepare():
    """The demo's splits with an ERM model trained for 3 epochs instead of 30 (only the timing matters here)."""
    torch.manual_seed(0)
    splits = demo.digits_benchmark(0)
    return splits, demo.train_erm(demo.DemoCNN(), demo.stream(splits.train, 0), epochs=3)


def notes(rows: list[dict], args: argparse.Namespace) -> dict:
    for r in rows:
        if r.get("chosen"):
            print(f"{r['case']}: selection chose {r['chosen']}")
    return {"budget": "fastmask x_fixed <= 4"}


COLUMNS: list[harness.Column] = [
    ("x fixed", "x_fixed", ".2fx"), ("cpu s", "cpu_s", ".1f"), ("epochs scored", "scored_epochs", "d"),
    ("stopped", "stopped", "d"), ("converged", "converged", "d"),
]

if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(3, 1), columns=COLUMNS, notes=notes, threads=1))
