"""One SWiFT run end to end on images: the papers' loop against ``fastmask debias``, with the time of every phase.

Cases (synthetic PNG images with a label pattern and a tint attribute, upsampled as MNIST's 28 px are to 32; an
external set and an evaluation set of equal size, 600 each; batch 64; SWiFT's default 10 + 10 epochs):

- ``cnn-32px``: a small CNN (3 conv layers, 16-32-64 channels, 24k parameters) at 32 px, from 28 px files.
- ``cnn-64px``: a larger CNN (4 conv stages, 32-64-128-256 channels, 0.4M parameters) at 64 px, from 56 px files.
  The issue asks for ResNet-18 at 64 px where torchvision is importable; it is not installed here, so this case
  is the larger CNN (the script says which ran).

Providers, same data, same mask, same epochs, one process, no loader workers:

- ``reference``: the papers' loop. A per-file image dataset decoded every epoch (PIL from the PNG files on disk,
  ``fastmask.data.image_table.ImageTableDataset``) under a torch DataLoader; the importances by the authors'
  two-pass loop (``fisher_importance_two_pass``: one forward and backward per objective and batch,
  ``imp += p.grad ** 2``), over the very batches fastmask's importance pass reads (same samples, same order), and
  SWiFT's mask by the per-tensor reference (``fastmask.ops.reference.soft_mask``); step 1 and step 2 with
  ``p.grad *= M`` per parameter and ``torch.optim.SGD``; the head re-initialised as SWiFT does; the evaluation set
  scored before, after every epoch and after the run.
- ``fastmask``: ``fastmask.app.debias.debias`` (the ``fastmask debias`` command without its argument parsing),
  ``--select none``, its defaults otherwise: the decoded cache (each set decoded once), the fused importance pass and
  masked optimizer, the per-epoch evaluation, the guard, the run state saved after every epoch, the reports and
  plots.
- ``streamed``: the same with ``--cache-mib 0``, every pass streamed and decoded from the shards: what the cache
  buys (its mask is checked bit-equal to ``fastmask``'s).
- ``floor``: the reference's loop on images decoded (and augmented once) before its clock starts, so no data cost at
  all: the model's own forward and backward passes, the optimizer and the metrics, which no loader can remove. The
  best end-to-end ratio any data path could reach is the reference's time over this one.

Phases (seconds): ``importance`` (the importance pass and the mask), ``step1``, ``step2`` (with the head
re-initialisation), ``evaluation`` (every evaluation: before, after each epoch and after the run, each a scoring pass
and the per-group metrics fastmask reports; for fastmask also the guard's pass over D_r after each step) and
``other``: the rest of the wall time (loading the model and the index, the run state saved after every epoch, the
reports and plots). A set's decoded cache is filled inside the first pass that reads it (the evaluation before the
run, the importance pass). fastmask's phases are read from its own profiling ranges
(``fastmask.util.profiling.phase``, timed here), each loader's time counted in the phase it feeds, as the
reference's. The masks are compared after every run (``mask_max_abs_diff``: the largest difference between the two
providers' soft masks over every parameter).

All figures are CPU figures on a shared, loaded machine (2 cores, other jobs running): the load average at the start
is printed and written to the JSON. Each provider runs ``--reps`` times, interleaved; its best run is reported.

    python bench/bench_debias.py [--quick] [--json PATH] [--reps R] [--threads T] [--case NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import harness
import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from fastmask.app import debias as debias_module
from fastmask.app.debias import debias
from fastmask.app.report import evaluation_scores
from fastmask.app.sets import DataSpec, parts, read_sets
from fastmask.data.budget import CACHE_MIB
from fastmask.data.image_table import ImageTableDataset
from fastmask.data.loader import make_loader
from fastmask.data.shards import write_shards
from fastmask.masking.importance import fisher_importance_two_pass
from fastmask.methods.configs import SwiftConfig, method_config
from fastmask.methods.engine import combined_loss
from fastmask.methods.swift import reinit_head
from fastmask.model import scoring
from fastmask.model.head import find_head_name, split_head
from fastmask.model.scoring import score
from fastmask.ops import reference
from fastmask.util import profiling

BATCH = 64
SEED = 0
PHASES = ("importance", "step1", "step2", "evaluation", "other")
# fastmask's profiling ranges -> the bench's phases; fastmask.data (loading) is charged to the phase it feeds.
RANGES = {"fastmask.importance": "importance", "fastmask.mask": "importance", "fastmask.step1": "step1",
          "fastmask.head_reinit": "step2", "fastmask.step2": "step2", "fastmask.evaluate": "evaluation"}


def small_cnn() -> nn.Module:
    """The ``cnn-32px`` model: 3 conv layers (16, 32, 64 channels, BatchNorm), global pooling, one logit."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


def larger_cnn() -> nn.Module:
    """The ``cnn-64px`` model: 4 conv stages (32, 64, 128, 256 channels, BatchNorm), global pooling, one logit."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128, 256):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 1))


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a callable of this file
    image_size: int
    file_size: int


CASES = (Case("cnn-32px", "small_cnn", 32, 28), Case("cnn-64px", "larger_cnn", 64, 56))


def make_images(root: Path, n_ext: int, n_test: int, size: int, seed: int = SEED) -> pd.DataFrame:
    """PNG files under ``root``: label y = a bright square somewhere, attribute ``tint`` (a colour cast) agreeing with
    y for 75% of the images; fold ``ext`` then ``test``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_ext + n_test):
        y = int(rng.integers(2))
        tint = y if rng.random() < 0.75 else 1 - y
        img = rng.integers(0, 90, size=(size, size, 3)).astype(np.int16)
        if y:
            r, c = rng.integers(0, size // 2, size=2)
            img[r:r + size // 3, c:c + size // 3] += 130
        img[..., 2 if tint else 0] += 50
        name = f"img{i:05d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
        rows.append({"filepath": name, "target": y, "tint": tint, "fold": "ext" if i < n_ext else "test"})
    return pd.DataFrame(rows)


class Clock:
    """Wall time per phase: :meth:`enter` / :meth:`exit` switch the phase charged (nested phases charge the inner
    one); whatever runs outside every phase is ``other``."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.stack: list[str] = ["other"]
        self.mark = time.perf_counter()

    def _switch(self) -> None:
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.mark
        self.mark = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()


@contextlib.contextmanager
def timed_ranges(clock: Clock) -> Iterator[None]:
    """Charge fastmask's profiling ranges to ``clock`` (each module imported ``phase`` by name: patch them all)."""
    original = profiling.phase

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        with original(name):
            if name in RANGES:
                with clock.phase(RANGES[name]):
                    yield
            else:
                yield

    # score() took its range when it was decorated, before this patch: its callers' name for it is wrapped instead;
    # and the run's evaluation (scoring and the per-group metrics) as a whole.
    scored, evaluated = scoring.score, debias_module._DebiasRun.evaluate

    def score(*args, **kwargs):
        with clock.phase("evaluation"):
            return scored(*args, **kwargs)

    def evaluate(*args, **kwargs):
        with clock.phase("evaluation"):
            return evaluated(*args, **kwargs)

    patched = [(m, "phase", original, phase) for m in list(sys.modules.values())
               if getattr(m, "phase", None) is original]
    patched += [(m, "score", scored, score) for m in list(sys.modules.values())
                if getattr(m, "score", None) is scored]
    patched.append((debias_module._DebiasRun, "evaluate", evaluated, evaluate))
    for m, name, _, new in patched:
        setattr(m, name, new)
    try:
        yield
    finally:
        for m, name, old, _ in patched:
            setattr(m, name, old)


@dataclass
class Setup:
    """One case's files: the images, the table, the shards, the weights, and what both providers read."""

    case: Case
    root: Path
    table: pd.DataFrame
    weights: Path
    data: DataSpec
    config: SwiftConfig
    fit_keys: list[str]
    balanced_keys: list[str]
    test_keys: list[str]
    mask_batches: list[list[str]]  # fastmask's importance pass: the keys of each batch, in order


def prepare(case: Case, root: Path, n_ext: int, n_test: int, epochs: int) -> Setup:
    table = make_images(root / "images", n_ext, n_test, case.file_size)
    write_shards(table, root / "images", root / "shards", attr_cols=["tint"], fold_col="fold", maxcount=1000)
    torch.manual_seed(SEED)
    torch.save(globals()[case.model]().state_dict(), root / "weights.pt")
    # resolved as debias resolves it: the case's models carry no configuration, so the defaults
    data, _ = DataSpec(shards=str(root / "shards"), attr="tint", test_fold="test", batch_size=BATCH,
                       image_size=case.image_size, seed=SEED).resolve(globals()[case.model]())
    sets = read_sets(data)
    run = parts(sets, data, hold_out=False)
    # The importance pass's batches, as debias's mask loader (parts(): shuffled, test transforms) gives them.
    order = make_loader(sets.index, batch_size=BATCH, train=False, shuffle=True, image_size=case.image_size,
                        keys=list(run.fit.index), attr="tint", seed=SEED, return_keys=True, rank=0, world_size=1)
    mask_batches = [list(b[3]) for b in order]
    return Setup(case, root, table, root / "weights.pt", data,
                 method_config("swift", seed=SEED, epochs1=epochs, epochs2=epochs), list(run.fit.index),
                 list(run.balanced["source_index"]), list(sets.test.index), mask_batches)


def run_fastmask(s: Setup, out: Path, cache_mib: int = CACHE_MIB) -> tuple[Clock, float, dict[str, torch.Tensor]]:
    """``fastmask debias`` on the case, its sets decoded once (the default) or streamed every pass
    (``cache_mib=0``)."""
    clock = Clock()
    with timed_ranges(clock):
        t0 = time.perf_counter()
        debias(model=f"{Path(__file__).stem}:{s.case.model}", weights=s.weights,
               data=replace(s.data, cache_mib=cache_mib), out=out, method="swift", config=s.config, selection=None,
               progress=False, overwrite=True)
        total = time.perf_counter() - t0
    clock.phase("other").__enter__()  # close the last stretch
    return clock, total, load_file(out / "mask.safetensors")


def run_reference(s: Setup, decoded: bool = False) -> tuple[Clock, float, dict[str, torch.Tensor]]:
    """The papers' loop (module docstring); ``decoded``: the ``floor`` provider, every image decoded (and augmented
    once) before the clock starts."""
    cfg = s.config
    rows = {f"{i:08d}": i for i in range(len(s.table))}  # write_shards names a sample by its row

    def files(keys: list[str], train: bool) -> torch.utils.data.Dataset:
        ds = ImageTableDataset(s.table.iloc[[rows[k] for k in keys]].reset_index(drop=True), s.root / "images",
                               image_size=s.case.image_size, attr="tint", train=train, seed=cfg.seed)
        if not decoded:
            return ds
        return torch.utils.data.TensorDataset(*(torch.stack(t) for t in zip(*(ds[i] for i in range(len(ds))),
                                                                                strict=True)))

    position = {k: i for i, k in enumerate(s.fit_keys)}
    mask_loader = torch.utils.data.DataLoader(files(s.fit_keys, False),
                                              batch_sampler=[[position[k] for k in b] for b in s.mask_batches])
    train_set = files(s.balanced_keys, True)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = torch.utils.data.DataLoader(files(s.test_keys, False), batch_size=BATCH)
    clock = Clock()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = globals()[s.case.model]()
    model.load_state_dict(torch.load(s.weights, weights_only=True))

    def evaluate() -> None:
        with clock.phase("evaluation"):  # the scores fastmask reports after every epoch, computed the same way
            evaluation_scores(*score(model, test_loader)[:3], None, 0.5)

    evaluate()
    with clock.phase("importance"):
        ib, il, _ = fisher_importance_two_pass(model, mask_loader, bias=cfg.bias)
        masks = dict(zip(ib, reference.soft_mask(list(ib.values()), list(il.values())), strict=True))
    head = find_head_name(model)
    head_module, head_params, feat_params = split_head(model, head)

    def epochs(step: str, params: dict[str, nn.Parameter], frozen: dict[str, nn.Parameter], masked: bool,
               wbce_weight: float, bias_weight: float, n: int) -> None:
        for p in frozen.values():
            p.requires_grad_(False)
        opt = torch.optim.SGD(params.values(), lr=getattr(cfg, step).lr, momentum=getattr(cfg, step).momentum,
                              weight_decay=getattr(cfg, step).weight_decay)
        for epoch in range(n):
            with clock.phase(step):
                model.train()
                if not decoded:
                    train_set.set_epoch(epoch)
                for x, y, a in train_loader:
                    opt.zero_grad(set_to_none=True)
                    loss = combined_loss(model(x), y, a, wbce_weight=wbce_weight, bias_weight=bias_weight,
                                         bias=cfg.bias)
                    loss.backward()
                    if masked:
                        for name, p in params.items():
                            p.grad *= masks[name]
                    opt.step()
            evaluate()
        for p in frozen.values():
            p.requires_grad_(True)

    epochs("step1", feat_params, head_params, True, cfg.beta, 1 - cfg.beta, cfg.step1.epochs)
    with clock.phase("step2"):
        reinit_head(head_params, masks, cfg.reinit_cmp, cfg.reinit_scope)
    epochs("step2", head_params, feat_params, False, 1 - cfg.beta, cfg.beta, cfg.step2.epochs)
    evaluate()
    total = time.perf_counter() - t0
    clock.phase("other").__enter__()
    del head_module
    return clock, total, masks


def bench(args: argparse.Namespace) -> list[dict]:
    n_ext, n_test, epochs = (128, 32, 1) if args.quick else (600, 600, 10)
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (1 min); {n_ext} external and {n_test} evaluation "
          f"images, {epochs} + {epochs} epochs, batch {BATCH}; torchvision not imported: the 64 px case is a larger "
          "CNN, not ResNet-18", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_debias_") as tmp:
        for case in (c for c in CASES if args.case in (None, c.name)):
            s = prepare(case, Path(tmp) / case.name, n_ext, n_test, epochs)
            providers = {"reference": lambda s=s: run_reference(s),
                         "fastmask": lambda s=s: run_fastmask(s, s.root / "out"),
                         "streamed": lambda s=s: run_fastmask(s, s.root / "out-streamed", cache_mib=0),
                         "floor": lambda s=s: run_reference(s, decoded=True)}
            runs: dict[str, list[tuple[Clock, float]]] = {p: [] for p in providers}
            masks: dict[str, dict[str, torch.Tensor]] = {}
            for _ in range(args.reps):
                for provider, run in providers.items():
                    clock, total, masks[provider] = run()
                    runs[provider].append((clock, total))
            del masks["floor"]  # the reference's, from the same batches
            streamed = masks.pop("streamed")
            assert all(torch.equal(streamed[n], masks["fastmask"][n]) for n in streamed), "cache changed the mask"
            diff = max(float((masks["reference"][n] - masks["fastmask"][n]).abs().max()) for n in masks["fastmask"])
            equal = all(torch.equal(masks["reference"][n], masks["fastmask"][n]) for n in masks["fastmask"])
            print(f"{case.name}: masks {'bit-equal' if equal else 'equal within'} "
                  f"{'' if equal else f'{diff:.1e} '}(reference vs fastmask, every parameter)", flush=True)
            assert diff <= 1e-5, f"{case.name}: the two providers' masks differ by {diff}"
            for provider, done in runs.items():
                clock, total = min(done, key=lambda r: r[1])
                sec = clock.seconds
                rows.append({"case": case.name, "provider": provider, "ms": 1e3 * total, "s": total,
                             **{f"{p}_s": sec[p] for p in PHASES}, "evaluation_share": sec["evaluation"] / total,
                             "mask_max_abs_diff": diff, "masks_bit_equal": equal, "images": n_ext + n_test,
                             "epochs": 2 * epochs, "image_size": case.image_size})
    return rows


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--case", choices=[c.name for c in CASES], help="run this case only (default: both)")


def notes(rows: list[dict], args: argparse.Namespace) -> dict:
    for r in rows:
        if r["provider"] == "fastmask":
            print(f"{r['case']}: fastmask {r['vs_reference']:.2f}x the reference end to end; evaluation "
                  f"{r['evaluation_share']:.1%} of fastmask's run, {r['evaluation_s'] / r['epochs']:.3f} s per epoch")
    return {"load_average": os.getloadavg(), "batch": BATCH,
            "models": {"cnn-32px": "small CNN (3 conv)", "cnn-64px": "larger CNN (4 conv stages); torchvision is not "
                       "installed, so not ResNet-18"}}


COLUMNS: list[harness.Column] = [("s", "s", ".2f"), *((f"{p} s", f"{p}_s", ".2f") for p in PHASES),
                                 ("eval share", "evaluation_share", ".1%")]

if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(1, 1), options=options, notes=notes, columns=COLUMNS, threads=1))
