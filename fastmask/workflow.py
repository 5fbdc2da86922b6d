"""The workflows behind ``fastmask debias`` and ``fastmask evaluate``: shards in, debiased weights and reports out.

:func:`debias` (spec §1, §5):

1. The model: :func:`fastmask.checkpoint.load_model` (an architecture or ``module:callable`` plus a state dict).
2. The data, all from shards written by ``fastmask shards``: the evaluation set (a fold of the shards, or other
   shards), the external set D_e (the rest) and the group-balanced D_r drawn from D_e by
   :func:`fastmask.balance.group_balance` on the shard index and applied to the stream by key. As in the reference
   code (spec §1 table) the mask is computed on the **unbalanced** D_e with test transforms, shuffled; both steps
   run on D_r with the training augmentation (BMFT's impair step on D_e, ``impair_data``).
3. The run: :func:`fastmask.pipeline.swift` or :func:`fastmask.pipeline.bmft`, with an ``on_epoch`` callback that
   evaluates the model on the evaluation set after every epoch (for the per-epoch plot) and saves the whole run
   state atomically to ``OUT/checkpoint/state.pt`` (model, optimizer, masks, epoch, RNG states, loader positions,
   history). ``resume=True`` continues from there and ends with the same weights as an uninterrupted run.
4. The outputs, each written atomically: ``weights.safetensors``, ``mask.safetensors``, ``report.json``,
   ``report.md``, ``mask_layers.png`` and ``epochs.png`` (see :mod:`fastmask.report`).

:func:`evaluate`: per-group metrics of a model on shards, for any number of attributes (any number of groups each),
as ``metrics.md``, ``groups.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import fastmask
from fastmask.balance import group_balance
from fastmask.checkpoint import Library, load_model, save_weights
from fastmask.data import ShardIndex, ShardLoader, atomic_write_bytes, attr_code, make_loader
from fastmask.importance import unpack_batch
from fastmask.losses import BiasSpec
from fastmask.masks import mask_fraction, save_masks
from fastmask.metrics import acc, auc, auc_gap, eodds, eopp, group_table, spd, worst_group_auc
from fastmask.metrics import evaluate as scalar_metrics
from fastmask.models import find_head_name, split_head
from fastmask.pipeline import (
    BmftConfig,
    CollapseWarning,
    Result,
    RunState,
    StepConfig,
    SwiftConfig,
    bmft,
    swift,
)
from fastmask.report import (
    group_rows,
    jsonable,
    mask_layer_stats,
    plot_epochs,
    plot_mask_layers,
    write_debias_report,
    write_evaluation,
)

__all__ = ["DataSpec", "RunStopped", "method_config", "predict", "debias", "evaluate"]

CHECKPOINT = "checkpoint/state.pt"
_STATE_FORMAT = "fastmask.debias-state"
_STATE_VERSION = 1
OUTPUTS = {
    "weights": "weights.safetensors",
    "mask": "mask.safetensors",
    "report_json": "report.json",
    "report_md": "report.md",
}
PLOTS = {"mask": "mask_layers.png", "epochs": "epochs.png"}


class RunStopped(Exception):
    """``stop_after_epochs`` epochs ran in this invocation; the run state is saved, ``resume=True`` continues."""

    def __init__(self, step: str, epoch: int, epochs_run: int, checkpoint: Path) -> None:
        super().__init__(f"stopped after {epochs_run} epoch(s) in this invocation, at {step} epoch {epoch}; "
                         f"the run state is in {checkpoint}: run again with --resume to continue")
        self.step, self.epoch, self.epochs_run, self.checkpoint = step, epoch, epochs_run, checkpoint


@dataclass(frozen=True)
class DataSpec:
    """Which samples play which part in :func:`debias`, and how they are read.

    Args:
        shards: directory of shards written by ``fastmask shards`` (with its index).
        attr: the sensitive attribute (one of the shards' attribute columns).
        attr_map: raw attribute value (as text) -> group 0 or 1; default: the values must already be 0 and 1.
        test_fold: the samples of this fold (compared as text) are the evaluation set; when they come from
            ``shards`` they are left out of D_e.
        eval_shards: evaluate on these shards instead (all of them, or their ``test_fold``).
        external_folds: draw D_e from these folds only (default: every sample of ``shards`` not evaluated on).
        batch_size, image_size, center_crop, workers: loader settings (the papers: batch 64, 256 px skin, 224 CXR).
        seed: seed of the group balancing, the shuffling and the augmentation draws.
        balance_replace: ``group_balance``'s ``replace``: ``"auto"`` (spec §8.4), True (the reference), False.
        strict: raise on a damaged sample instead of skipping and counting it.
    """

    shards: str
    attr: str
    attr_map: dict[str, int] | None = None
    test_fold: str | None = None
    eval_shards: str | None = None
    external_folds: tuple[str, ...] = ()
    batch_size: int = 64
    image_size: int = 256
    center_crop: int | None = None
    workers: int = 0
    seed: int = 42
    balance_replace: Literal["auto"] | bool = "auto"
    strict: bool = False


def method_config(method: str, *, epochs1: int | None = None, epochs2: int | None = None, lr1: float | None = None,
                  lr2: float | None = None, optimizer: str | None = None, momentum: float | None = None,
                  weight_decay: float | None = None, bias_space: str | None = None, bias_form: str | None = None,
                  bias_empty: str | None = None, **options: Any) -> SwiftConfig | BmftConfig:
    """The pipeline configuration of ``method`` (``"swift"`` / ``"bmft"``) with the given options changed.

    Options left as None keep the configuration's default (so ``faithful=True`` still checks every quirk option);
    ``epochs1`` / ``lr1`` set step 1 (SWiFT) or the impair step (BMFT), ``epochs2`` / ``lr2`` step 2 or the repair
    step; ``optimizer``, ``momentum``, ``weight_decay`` apply to both steps; ``bias_*`` change the method's bias
    function field by field; every other keyword is a field of :class:`SwiftConfig` / :class:`BmftConfig`.
    """
    if method not in ("swift", "bmft"):
        raise ValueError(f"method must be 'swift' or 'bmft', got {method!r}")
    cls = SwiftConfig if method == "swift" else BmftConfig
    steps = ("step1", "step2") if method == "swift" else ("impair", "repair")
    options = {k: v for k, v in options.items() if v is not None}
    base = cls(**options)  # the defaults this method and task resolve to
    bias_changes = {k: v for k, v in (("space", bias_space), ("form", bias_form), ("empty", bias_empty))
                    if v is not None}
    if bias_changes:
        options["bias"] = replace(base.bias, **bias_changes)
    shared = {k: v for k, v in (("optimizer", optimizer), ("momentum", momentum), ("weight_decay", weight_decay))
              if v is not None}
    for name, epochs, lr in ((steps[0], epochs1, lr1), (steps[1], epochs2, lr2)):
        changes = {**shared, **{k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}}
        if changes:
            step: StepConfig = getattr(base, name)
            options[name] = replace(step, **changes)
    return cls(**options)


# ---- data ---------------------------------------------------------------------------------------------------------


@dataclass
class _Sets:
    index: ShardIndex
    eval_index: ShardIndex
    external: pd.DataFrame  # index: key; columns y, a (group 0 / 1)
    test: pd.DataFrame
    descriptions: dict[str, str]


def _load_index(path: str, flag: str) -> ShardIndex:
    try:
        return ShardIndex.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{flag} {path}: {err}") from None


def _fold_keys(index: ShardIndex, fold: str, flag: str) -> set[str]:
    folds = sorted({str(r["fold"]) for r in index.samples.values() if r.get("fold") is not None})
    if not folds:
        raise ValueError(f"{flag} {fold!r}: the shards under {index.root} have no fold column (write them with "
                         "`fastmask shards --fold-col COLUMN`)")
    if fold not in folds:
        raise ValueError(f"{flag} {fold!r}: no sample of the shards under {index.root} is in that fold "
                         f"(their folds: {folds})")
    return {k for k, r in index.samples.items() if str(r.get("fold")) == fold}


def _groups(index: ShardIndex, keys: Sequence[str], attr: str, attr_map: Mapping[str, int] | None,
            name: str) -> pd.DataFrame:
    """Labels and 0 / 1 attribute groups of ``keys``; errors name the sample and the value."""
    ys, groups = [], []
    for key in keys:
        rec = index.samples[key]
        where = f"{name}: key {key} (row {rec['row']}, shard {rec['shard']})"
        value = rec["attrs"].get(attr)
        try:
            code = attr_code(value, attr, attr_map, where)
        except ValueError as err:
            raise ValueError(f"{err} (on the command line: --attr-map VALUE=GROUP, once per value)") from None
        if code not in (0, 1):
            raise ValueError(f"{where}: attribute {attr!r} value {value!r} is group {code}, not 0 or 1; debiasing "
                             "needs a binary attribute: map its values with --attr-map VALUE=0 / VALUE=1")
        ys.append(int(rec["label"]))
        groups.append(code)
    return pd.DataFrame({"y": ys, "a": groups}, index=pd.Index(list(keys), name="key"))


def _group_name(g: int, attr_map: Mapping[str, int] | None) -> str:
    if not attr_map:
        return str(g)
    return f"{g} ({', '.join(v for v, c in attr_map.items() if c == g)})"


def _check_set(frame: pd.DataFrame, name: str, description: str, attr: str,
               attr_map: Mapping[str, int] | None) -> None:
    if frame.empty:
        raise ValueError(f"the {name} ({description}) has no samples")
    labels = sorted(set(frame["y"]))
    if len(labels) < 2:
        raise ValueError(f"single-class data: all {len(frame)} samples of the {name} ({description}) have label "
                         f"{labels[0]}; debiasing and AUC need both classes")
    for g in (0, 1):
        if not (frame["a"] == g).any():
            raise ValueError(f"attribute {attr!r}: group {_group_name(g, attr_map)} has no samples in the {name} "
                             f"({description}); both groups are needed")


def _select(data: DataSpec) -> _Sets:
    index = _load_index(data.shards, "--shards")
    eval_index = _load_index(data.eval_shards, "--eval-shards") if data.eval_shards else index
    for idx, flag in ((index, "--shards"), (eval_index, "--eval-shards")):
        if data.attr not in idx.attr_cols:
            raise ValueError(f"--attr {data.attr!r}: no such attribute column in the shards under {idx.root} "
                             f"({flag}); their attribute columns are {idx.attr_cols}")
    if data.eval_shards is None and data.test_fold is None:
        raise ValueError("no evaluation set: pass --test-fold FOLD (a fold of --shards, left out of the external "
                         "set) or --eval-shards DIR")
    if data.test_fold is not None:
        test_keys = _fold_keys(eval_index, data.test_fold, "--test-fold")
        test_desc = f"fold {data.test_fold!r} of {eval_index.root}"
    else:
        test_keys = set(eval_index.samples)
        test_desc = f"all of {eval_index.root}"
    ext_keys = set(index.samples) if data.eval_shards else set(index.samples) - test_keys
    ext_desc = f"{index.root}" + ("" if data.eval_shards else f" without fold {data.test_fold!r}")
    if data.external_folds:
        chosen = set().union(*(_fold_keys(index, f, "--external-fold") for f in data.external_folds))
        ext_keys &= chosen
        ext_desc = f"folds {list(data.external_folds)} of {index.root}" + (
            "" if data.eval_shards else f" without fold {data.test_fold!r}")
    # In index (write) order, so the data do not depend on set iteration order.
    external = _groups(index, [k for k in index.samples if k in ext_keys], data.attr, data.attr_map,
                       "external set")
    test = _groups(eval_index, [k for k in eval_index.samples if k in test_keys], data.attr, data.attr_map,
                   "evaluation set")
    _check_set(external, "external set", ext_desc, data.attr, data.attr_map)
    _check_set(test, "evaluation set", test_desc, data.attr, data.attr_map)
    return _Sets(index, eval_index, external, test, {"external": ext_desc, "test": test_desc})


def _set_summary(frame: pd.DataFrame, description: str) -> dict[str, Any]:
    groups = {str(g): {"n": int((frame["a"] == g).sum()), "positives": int(frame.loc[frame["a"] == g, "y"].sum())}
              for g in (0, 1)}
    return {"samples": len(frame), "positives": int(frame["y"].sum()), "groups": groups, "description": description}


class _Tracked:
    """A loader that logs its :class:`~fastmask.data.LoaderStats` after every complete pass (for the report)."""

    def __init__(self, loader: ShardLoader, name: str, log: list[dict[str, Any]]) -> None:
        self.loader, self.name, self.log = loader, name, log

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield from self.loader
        self.log.append({"loader": self.name, **self.loader.stats.to_dict()})


def _loader_summary(log: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_loader: dict[str, dict[str, int]] = {}
    by_reason: dict[str, int] = {}
    damaged: dict[tuple, dict[str, Any]] = {}
    for entry in log:
        agg = by_loader.setdefault(entry["loader"], {"passes": 0, "samples": 0, "skipped": 0})
        agg["passes"] += 1
        agg["samples"] += entry["samples"]
        agg["skipped"] += entry["skipped"]
        for reason, n in entry["by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        for r in entry["records"]:
            where = (entry["loader"], r["shard"], r["key"], r["reason"])
            if where in damaged:
                damaged[where]["samples"] += r["samples"]
            else:
                damaged[where] = {"loader": entry["loader"], "shard": r["shard"], "key": r["key"],
                                  "reason": r["reason"], "samples": r["samples"], "detail": r["detail"]}
    return {"skipped": sum(by_reason.values()), "by_reason": by_reason, "by_loader": by_loader,
            "damaged": list(damaged.values())}


# ---- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device | str, *, progress: bool = False,
            desc: str = "evaluate") -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(y, p = σ(z), a, keys) over one pass of ``loader`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    ys, ps, groups, keys = [], [], [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y, a = unpack_batch(batch, torch.device(device))
            ps.append(torch.sigmoid(model(x).reshape(-1).float()).cpu())
            ys.append(y.reshape(-1).cpu())
            groups.append(a.reshape(-1).cpu())
            if len(batch) > 3:
                keys.extend(batch[3])
    finally:
        model.train(was_training)
    if not ps:
        raise ValueError(f"{desc}: the loader yielded no samples")
    return torch.cat(ys).numpy(), torch.cat(ps).numpy(), torch.cat(groups).numpy(), keys


def _scores(y: np.ndarray, p: np.ndarray, a: np.ndarray, attr_map: Mapping[str, int] | None) -> dict[str, Any]:
    labels = {g: ", ".join(v for v, c in attr_map.items() if c == g) for g in (0, 1)} if attr_map else None
    return {"overall": scalar_metrics(y, p, a), "groups": group_rows(group_table(y, p, a), labels)}


# ---- run state ----------------------------------------------------------------------------------------------------


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _index_digest(index: ShardIndex) -> str:
    return hashlib.sha256(json.dumps(index.to_json(), sort_keys=True).encode()).hexdigest()


def _rng_to_saved(rng: Mapping[str, Any]) -> dict[str, Any]:
    # Plain types and tensors only, so the state loads with torch.load(weights_only=True).
    version, internal, gauss = rng["random"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out = {"random": [version, torch.tensor(internal, dtype=torch.int64), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
           "torch": rng["torch"].clone()}
    if "cuda" in rng:
        out["cuda"] = [s.clone() for s in rng["cuda"]]
    return out


def _rng_from_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
    version, internal, gauss = saved["random"]
    name, keys, pos, has_gauss, cached = saved["numpy"]
    out = {"random": (version, tuple(internal.tolist()), gauss),
           "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
           "torch": saved["torch"]}
    if "cuda" in saved:
        out["cuda"] = saved["cuda"]
    return out


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _load_state(path: Path) -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged file
        raise ValueError(f"run state {path} cannot be read ({type(err).__name__}: {err}); delete {path.parent} to "
                         "start over") from None
    if not isinstance(saved, dict) or saved.get("format") != _STATE_FORMAT or saved.get("version") != _STATE_VERSION:
        raise ValueError(f"{path} is not a fastmask debias run state (version {_STATE_VERSION}); delete "
                         f"{path.parent} to start over")
    return saved


def _check_same_run(saved: Mapping[str, Any], spec: Mapping[str, Any], path: Path) -> None:
    old, new = _flatten(saved), _flatten(spec)
    diffs = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(f"--resume: {path} belongs to a run with other inputs or options ({'; '.join(diffs[:8])}); "
                         f"rerun with the same ones, or delete {path.parent} to start over")


# ---- debias -------------------------------------------------------------------------------------------------------


def debias(
    *,
    model: str,
    weights: str | os.PathLike,
    data: DataSpec,
    out: str | os.PathLike,
    method: Literal["swift", "bmft"],
    config: SwiftConfig | BmftConfig,
    trust_pickle: bool = False,
    library: Library = "auto",
    device: str | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    epoch_eval: bool = True,
    keep_checkpoint: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Debias ``model`` (with ``weights``) on shards and write weights, mask, reports and plots to ``out``.

    Args:
        model: ``module:callable`` or a torchvision / timm architecture name (:mod:`fastmask.checkpoint`).
        weights: its state dict (safetensors or torch.save; pickles only with ``trust_pickle``).
        data: :class:`DataSpec`.
        out: output directory (created).
        method, config: ``"swift"`` with a :class:`SwiftConfig` or ``"bmft"`` with a :class:`BmftConfig`
            (:func:`method_config` builds one from options).
        library: where architecture names are looked up.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        resume: continue the run saved in ``out/checkpoint`` (a fresh start when there is none).
        stop_after_epochs: stop (raising :class:`RunStopped`) once this many epochs ran in this call; the run state
            is saved, so a later call with ``resume=True`` continues.
        epoch_eval: evaluate on the evaluation set after every epoch (the per-epoch plot).
        keep_checkpoint: keep ``out/checkpoint`` after the run finished (by default it is removed).
        progress: show progress bars.

    Returns:
        The content of ``report.json``.

    Raises:
        ValueError / FileNotFoundError: bad inputs; the message names the file, column, attribute value, group or
            option at fault. :class:`RunStopped`: see ``stop_after_epochs``.
    """
    started = time.perf_counter()
    if method not in ("swift", "bmft") or not isinstance(config, SwiftConfig if method == "swift" else BmftConfig):
        raise ValueError(f"method {method!r} needs a {'SwiftConfig' if method == 'swift' else 'BmftConfig'}")
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ValueError(f"stop_after_epochs must be >= 1, got {stop_after_epochs}")
    if not isinstance(config.bias, BiasSpec):
        raise ValueError("debias records its configuration: config.bias must be a BiasSpec")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / CHECKPOINT
    saved = _load_state(state_path) if state_path.is_file() else None
    if saved is not None and not resume:
        raise FileExistsError(
            f"{state_path} holds an unfinished run ({saved['run']['step']} epoch {saved['run']['epoch']}); pass "
            f"--resume to continue it, or delete {state_path.parent} to start over"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    net = load_model(model, weights, trust_pickle=trust_pickle, library=library).to(dev)
    head_name = config.head or find_head_name(net)
    _, head_params, feat_params = split_head(net, head_name)
    sets = _select(data)
    balanced = group_balance(sets.external, "a", "y", seed=data.seed, replace=data.balance_replace)
    common = {"batch_size": data.batch_size, "image_size": data.image_size, "workers": data.workers,
              "seed": data.seed, "attr": data.attr, "attr_map": data.attr_map, "center_crop": data.center_crop,
              "strict": data.strict}
    loader_log: list[dict[str, Any]] = []
    # Importance on the unbalanced D_e with test transforms, shuffled (spec §1); both steps on D_r, augmented.
    mask_loader = make_loader(sets.index, train=False, shuffle=True, keys=list(sets.external.index), **common)
    train_loader = make_loader(sets.index, train=True, keys=balanced["source_index"], **common)
    eval_loader = make_loader(sets.eval_index, train=False, keys=list(sets.test.index), return_keys=True, **common)
    tracked_mask, tracked_train = _Tracked(mask_loader, "mask", loader_log), _Tracked(train_loader, "train", loader_log)
    tracked_eval = _Tracked(eval_loader, "evaluation", loader_log)

    # What the run depends on: the shard paths may change between invocations, their content (the index) may not.
    spec = jsonable({
        "method": method, "config": asdict(config), "model": model,
        "data": {k: v for k, v in asdict(data).items() if k not in ("shards", "eval_shards")},
        "weights_sha256": _sha256(weights), "shards_index": _index_digest(sets.index),
        "eval_index": _index_digest(sets.eval_index), "epoch_eval": epoch_eval,
    })

    def evaluate_now(desc: str) -> dict[str, Any]:
        y, p, a, _ = predict(net, tracked_eval, dev, progress=progress, desc=desc)
        return _scores(y, p, a, data.attr_map)

    resume_state = None
    if saved is not None:
        _check_same_run(json.loads(saved["spec"]), spec, state_path)
        net.load_state_dict(saved["model"])
        mask_loader.set_epoch(saved["loaders"]["mask"])
        train_loader.set_epoch(saved["loaders"]["train"])
        params = dict(net.named_parameters())
        r = saved["result"]
        result = Result(method, config, {n: m.to(params[n].device) for n, m in r["masks"].items()},
                        history=list(r["history"]), checks=list(r["checks"]),
                        collapse_warnings=[CollapseWarning(**w) for w in r["collapse_warnings"]],
                        n_importance_batches=r["n_importance_batches"], head_reset_fraction=r["head_reset_fraction"])
        run = saved["run"]
        resume_state = RunState(run["step"], run["epoch"], result, run["optimizer"], _rng_from_saved(run["rng"]))
        before, epochs = saved["before"], list(saved["epochs"])
        loader_log.extend(saved["loader_log"])
        elapsed = saved["seconds"]
    else:
        before = evaluate_now("evaluate before")
        epochs = [{"step": "before", "epoch": 0, **before["overall"]}] if epoch_eval else []
        elapsed = 0.0

    epochs_run = 0

    def on_epoch(state: RunState) -> None:
        nonlocal epochs_run
        if state.epoch > 0:
            epochs_run += 1
            if epoch_eval:
                # Forked so that the evaluation (DataLoader workers draw a seed) leaves the run's RNG untouched.
                with torch.random.fork_rng(devices=[]):
                    scores = evaluate_now(f"evaluate {state.step} epoch {state.epoch}")
                epochs.append({"step": state.step, "epoch": state.epoch, **scores["overall"]})
        res = state.result
        payload = {
            "format": _STATE_FORMAT, "version": _STATE_VERSION, "spec": json.dumps(spec),
            "model": _cpu(net.state_dict()),
            "run": {"step": state.step, "epoch": state.epoch, "optimizer": state.optimizer,
                    "rng": _rng_to_saved(state.rng)},
            "result": {"masks": _cpu(res.masks), "history": res.history, "checks": res.checks,
                       "collapse_warnings": [asdict(w) for w in res.collapse_warnings],
                       "n_importance_batches": res.n_importance_batches,
                       "head_reset_fraction": res.head_reset_fraction},
            "loaders": {"mask": mask_loader.epoch, "train": train_loader.epoch},
            "before": before, "epochs": epochs, "loader_log": loader_log,
            "seconds": elapsed + time.perf_counter() - started,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(state_path, buf.getvalue())
        if stop_after_epochs is not None and state.epoch > 0 and epochs_run >= stop_after_epochs:
            raise RunStopped(state.step, state.epoch, epochs_run, state_path)

    run_fn = swift if method == "swift" else bmft
    result = run_fn(net, tracked_mask, tracked_train, config=config, progress=progress, on_epoch=on_epoch,
                    resume=resume_state)
    after = evaluate_now("evaluate after")

    save_weights(net, out / OUTPUTS["weights"], metadata={"format": "fastmask-weights", "method": method})
    save_masks(result.masks, out / OUTPUTS["mask"])
    hard = all(m.dtype == torch.bool for m in result.masks.values())
    layers = mask_layer_stats(result.masks, head_params)
    plot_mask_layers(layers, out / PLOTS["mask"], hard=hard)
    plots = {"mask": PLOTS["mask"], "epochs": None}
    if len(epochs) > 1:
        plot_epochs(epochs, out / PLOTS["epochs"], title=f"{method.upper()} on {sets.descriptions['test']}")
        plots["epochs"] = PLOTS["epochs"]
    mask = {"kind": "hard" if hard else "soft", "layers": layers}
    if hard:
        mask["fraction_selected"] = mask_fraction(result.masks, feat_params)
    else:
        mask["mean_features"] = mask_fraction(result.masks, feat_params)
        mask["mean_head"] = mask_fraction(result.masks, head_params)
    bal_groups = balanced.assign(a=balanced["a"].astype(int))
    report = {
        "fastmask": fastmask.__version__,
        "method": method,
        "seconds": elapsed + time.perf_counter() - started,
        "model": {"spec": model, "weights": os.fspath(weights), "weights_sha256": spec["weights_sha256"],
                  "parameters": sum(p.numel() for p in net.parameters()), "head": head_name,
                  "head_parameters": list(head_params)},
        "config": result.config_dict(),
        "data": {**asdict(data), "sets": {
            "external": _set_summary(sets.external, sets.descriptions["external"]),
            "balanced": {**_set_summary(bal_groups, "group-balanced from the external set (spec §1)"),
                         "with_replacement": balanced.attrs.get("replace")},
            "test": _set_summary(sets.test, sets.descriptions["test"]),
        }},
        "loader": _loader_summary(loader_log),
        "before": before,
        "after": after,
        "change": {k: _diff(after["overall"][k], before["overall"][k]) for k in before["overall"]},
        "epochs": epochs,
        "history": result.history,
        "checks": result.checks,
        "collapse_warnings": [asdict(w) for w in result.collapse_warnings],
        "head_reset_fraction": result.head_reset_fraction,
        "n_importance_batches": result.n_importance_batches,
        "mask": mask,
        "outputs": {**OUTPUTS, "plots": plots},
    }
    write_debias_report(out, report)
    if not keep_checkpoint and state_path.exists():
        state_path.unlink()
        if not any(state_path.parent.iterdir()):
            state_path.parent.rmdir()
    return jsonable(report)


def _diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return a - b


# ---- evaluate -----------------------------------------------------------------------------------------------------


def evaluate(
    *,
    model: str,
    weights: str | os.PathLike | None,
    shards: str | os.PathLike,
    out: str | os.PathLike,
    attrs: Sequence[str] | None = None,
    fold: str | None = None,
    batch_size: int = 64,
    image_size: int = 256,
    center_crop: int | None = None,
    workers: int = 0,
    trust_pickle: bool = False,
    library: Library = "auto",
    device: str | None = None,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-group metrics of ``model`` on shards (all, or one ``fold``) for each attribute in ``attrs`` (default:
    all of the shards' attributes), written as ``metrics.md``, ``groups.csv`` and ``metrics.json`` in ``out``.

    Per attribute: :func:`fastmask.metrics.group_table` over its raw values (any number of groups), the
    worst-group AUC and AUC gap over the groups holding both classes, and for a two-valued attribute the gaps SPD,
    EOpp and EOdds (code, max, mean) between its two values. Returns the content of ``metrics.json``.
    """
    index = _load_index(os.fspath(shards), "--shards")
    names = list(attrs) if attrs else index.attr_cols
    missing = [a for a in names if a not in index.attr_cols]
    if missing:
        raise ValueError(f"--attr {missing[0]!r}: no such attribute column in the shards under {index.root}; their "
                         f"attribute columns are {index.attr_cols}")
    chosen = set(index.samples) if fold is None else _fold_keys(index, fold, "--fold")
    keys = [k for k in index.samples if k in chosen]
    description = f"fold {fold!r} of {index.root}" if fold is not None else f"all of {index.root}"
    labels = {int(index.samples[k]["label"]) for k in keys}
    if len(labels) < 2:
        raise ValueError(f"single-class data: all {len(keys)} samples of {description} have label {labels.pop()}; "
                         "AUC needs both classes")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_model(model, weights, trust_pickle=trust_pickle, library=library).to(dev)
    # The loader's `a` is not used (groups come from the raw values below); any value must still map to an int.
    values = sorted({str(index.samples[k]["attrs"][names[0]]) for k in keys})
    loader = make_loader(index, batch_size=batch_size, train=False, image_size=image_size, workers=workers,
                         keys=keys, attr=names[0], attr_map={v: i for i, v in enumerate(values)},
                         center_crop=center_crop, strict=strict, return_keys=True)
    y, p, _, got = predict(net, loader, dev, progress=progress, desc="evaluate")
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        raise ValueError(f"single-class data: the {len(y)} readable samples of {description} all have label "
                         f"{int(y[0])}; AUC needs both classes")
    evaluation: dict[str, Any] = {
        "fastmask": fastmask.__version__,
        "model": model,
        "weights": None if weights is None else os.fspath(weights),
        "shards": os.fspath(shards),
        "fold": fold,
        "description": description,
        "overall": {"n": len(y), "positives": n_pos, "auc": auc(y, p), "acc": acc(y, p),
                    "positive_rate": float((p > 0.5).mean()), "label_positive_rate": float(y.mean())},
        "attributes": {},
        "loader": loader.stats.to_dict(),
    }
    for attr in names:
        raw = np.array([index.samples[k]["attrs"][attr] for k in got], dtype=object)
        try:
            raw = raw.astype(np.int64) if all(isinstance(v, int) for v in raw) else raw.astype(str)
        except (TypeError, ValueError):
            raw = raw.astype(str)
        res: dict[str, Any] = {"groups": group_rows(group_table(y, p, raw))}
        try:
            res["worst_group_auc"], res["auc_gap"] = worst_group_auc(y, p, raw), auc_gap(y, p, raw)
        except ValueError:  # no group holds both classes
            res["worst_group_auc"] = res["auc_gap"] = None
        groups = sorted(set(raw.tolist()))
        if len(groups) == 2:
            # The gaps are symmetric in the two groups, so which one is coded 1 does not matter.
            codes = (raw == groups[1]).astype(np.int64)
            res["gap_groups"] = groups
            res["gaps"] = {"spd": spd(y, p, codes), "eopp": eopp(y, p, codes), "eodds": eodds(y, p, codes),
                           "eodds_max": eodds(y, p, codes, definition="max"),
                           "eodds_mean": eodds(y, p, codes, definition="mean")}
        evaluation["attributes"][attr] = res
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation["outputs"] = write_evaluation(out, evaluation)
    return jsonable(evaluation)
