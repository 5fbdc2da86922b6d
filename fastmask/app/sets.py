"""Which samples play which part in ``fastmask debias`` and ``fastmask compare``: the evaluation set (a fold of the
shards, or other shards) and the external set D_e (the rest), read from the shard index with the sensitive attribute
coded 0 / 1 (:func:`read_sets`); the decoded caches of the two sets that fit the run's memory budget
(:func:`decoded_caches`); and the loaders of one run over them (:func:`parts`): D_e split into a fitting and a
validation part when a configuration is selected, the group-balanced D_r drawn from the fitting part. Errors name
the command-line flag, the sample and the value at fault.

One module over 400 lines on purpose: everything between the command line's data options and the loaders of a
run (the spec, the sets, their splits, caches and accounting), which every subcommand that reads shards shares.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from fastmask.app.errors import UsageError
from fastmask.app.preprocessing import Resolved, resolve_preprocessing
from fastmask.data.balance import extreme_groups, group_balance
from fastmask.data.batch import attr_code
from fastmask.data.budget import CACHE_MIB, cache_bytes
from fastmask.data.cache import DecodedCache
from fastmask.data.loader import ShardLoader, make_loader
from fastmask.data.shards import ShardIndex
from fastmask.data.splits import stratified_split
from fastmask.data.stats import MAX_SKIP_FRACTION
from fastmask.data.transforms import Preprocessing
from fastmask.fairness.metrics import auc_by_group
from fastmask.model.scoring import score
from fastmask.parallel import ddp

log = logging.getLogger(__name__)

#: What each tracked loader reads, as error messages and reports name it.
SPLITS = {"evaluation": "evaluation set", "mask": "external set (importance pass)",
          "train": "group-balanced set (fine-tuning)", "validation": "validation part"}


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
        batch_size, workers: loader settings (the papers: batch 64).
        image_size, crop, center_crop, mean, std, augment: the preprocessing
            (:class:`~fastmask.data.transforms.Preprocessing`); None where the model's configuration or the
            default decides (:meth:`resolve`).
        seed: seed of the group balancing, the shuffling and the augmentation draws.
        balance_replace: ``group_balance``'s ``replace``: ``"auto"`` (docs/algorithm.md §8.4), True (the authors'
            code), False.
        strict: raise on a damaged sample instead of skipping and counting it.
        max_skip_fraction: the largest share of a pass's sample reads that may be skipped as damaged (``--max-skip-
            fraction``); a pass that loses more fails (:meth:`fastmask.data.stats.LoaderStats.check_loss`). It
            changes no result, only whether a run may go on, so a resumed run may raise it.
        val_fraction: the share of D_e held out, stratified by (group, label), to choose the configuration on
            (:func:`fastmask.data.splits.stratified_split`); used only when a configuration is selected.
        cache_mib: the memory budget, in MiB, of the decoded caches (:mod:`fastmask.data.cache`): the external set
            and then the evaluation set are each decoded once and kept as uint8 images when they fit in what is left
            of it (read every epoch, they would otherwise be decoded every epoch); a set that does not fit is
            streamed. 0: every set is streamed. It changes no result (the batches are the same either way).
        attr_groups: ``"binary"``: the attribute's values are groups 0 and 1 (or ``attr_map`` makes them so);
            ``"extremes"``: SWiFT's multi-attribute reduction (docs/algorithm.md §1): the two values whose AUC of
            the original model on D_e is the highest (group 0) and the lowest (group 1) are kept, the samples of
            the other values are left out of every set (:func:`read_sets` needs the model for it).
    """

    shards: str
    attr: str
    attr_map: dict[str, int] | None = None
    test_fold: str | None = None
    eval_shards: str | None = None
    external_folds: tuple[str, ...] = ()
    batch_size: int = 64
    image_size: int | None = None
    center_crop: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    augment: tuple[str, ...] | None = None
    workers: int = 0
    seed: int = 42
    balance_replace: Literal["auto"] | bool = "auto"
    strict: bool = False
    val_fraction: float = 0.25
    max_skip_fraction: float = MAX_SKIP_FRACTION
    attr_groups: Literal["binary", "extremes"] = "binary"
    cache_mib: int = CACHE_MIB

    def __post_init__(self) -> None:
        if self.cache_mib < 0:
            raise ValueError(f"cache_mib must be >= 0, got {self.cache_mib}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.attr_groups not in ("binary", "extremes"):
            raise ValueError(f"attr_groups must be 'binary' or 'extremes', got {self.attr_groups!r}")
        if self.attr_groups == "extremes" and self.attr_map:
            raise UsageError("--attr-groups extremes chooses the two groups from the model's AUC; it takes no "
                             "--attr-map")

    def resolve(self, model: nn.Module) -> tuple[DataSpec, Resolved]:
        """This spec with every preprocessing setting decided for ``model`` (:func:`~fastmask.app.preprocessing.
        resolve_preprocessing`; the run state records them, so a resumed run must preprocess alike), and the
        record of where each came from."""
        resolved = resolve_preprocessing(model, **{f.name: getattr(self, f.name) for f in fields(Preprocessing)})
        prep = resolved.preprocessing
        return replace(self, **{f.name: getattr(prep, f.name) for f in fields(Preprocessing)}), resolved

    def preprocessing(self) -> Preprocessing:
        """The preprocessing of a resolved spec (:meth:`resolve`)."""
        return Preprocessing(**{f.name: getattr(self, f.name) for f in fields(Preprocessing)})


@dataclass
class Sets:
    """The shard indexes and the samples of the external set D_e and of the evaluation set, with descriptions, the
    attribute map in effect (the reduction's, with ``attr_groups="extremes"``) and what the reduction found."""

    index: ShardIndex
    eval_index: ShardIndex
    external: pd.DataFrame  # index: key; columns y, a (group 0 / 1)
    test: pd.DataFrame
    descriptions: dict[str, str]
    attr_map: dict[str, int] | None = None
    reduction: dict[str, Any] | None = None


def load_index(path: str, flag: str) -> ShardIndex:
    try:
        return ShardIndex.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{flag} {path}: {err}") from None


def fold_keys(index: ShardIndex, fold: str, flag: str) -> set[str]:
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


def read_sets(data: DataSpec, model: nn.Module | None = None, device: torch.device | None = None,
              progress: bool = False) -> Sets:
    """The external and evaluation sets of ``data``; with ``attr_groups="extremes"`` reduced to the attribute's two
    extreme values by ``model``'s AUC on the external set (:func:`extreme_values`)."""
    index = load_index(data.shards, "--shards")
    eval_index = load_index(data.eval_shards, "--eval-shards") if data.eval_shards else index
    for idx, flag in ((index, "--shards"), (eval_index, "--eval-shards")):
        if data.attr not in idx.attr_cols:
            raise ValueError(f"--attr {data.attr!r}: no such attribute column in the shards under {idx.root} "
                             f"({flag}); their attribute columns are {idx.attr_cols}")
    if data.eval_shards is None and data.test_fold is None:
        raise ValueError("no evaluation set: pass --test-fold FOLD (a fold of --shards, left out of the external "
                         "set) or --eval-shards DIR")
    if data.test_fold is not None:
        test_keys = fold_keys(eval_index, data.test_fold, "--test-fold")
        test_desc = f"fold {data.test_fold!r} of {eval_index.root}"
    else:
        test_keys = set(eval_index.samples)
        test_desc = f"all of {eval_index.root}"
    # Evaluated samples of --shards itself never enter the external set.
    shared = eval_index.root.resolve() == index.root.resolve()
    ext_keys = set(index.samples) - test_keys if shared else set(index.samples)
    without = "" if not shared else (f" without fold {data.test_fold!r}" if data.test_fold is not None
                                     else " without the evaluation set")
    ext_desc = f"{index.root}{without}"
    if data.external_folds:
        ext_keys &= set().union(*(fold_keys(index, f, "--external-fold") for f in data.external_folds))
        ext_desc = f"folds {list(data.external_folds)} of {index.root}{without}"
    # In index (write) order, so the data do not depend on set iteration order.
    ext_list = [k for k in index.samples if k in ext_keys]
    test_list = [k for k in eval_index.samples if k in test_keys]
    attr_map, reduction = data.attr_map, None
    if data.attr_groups == "extremes":
        if model is None:
            raise ValueError("attr_groups='extremes' needs the model: read_sets(data, model)")
        reduction = extreme_values(index, ext_list, data, model, device, progress)
        attr_map = {reduction["g_max"]: 0, reduction["g_min"]: 1}
        ext_list, test_list = ([k for k in keys if str(idx.samples[k]["attrs"][data.attr]) in attr_map]
                               for idx, keys in ((index, ext_list), (eval_index, test_list)))
    external = _groups(index, ext_list, data.attr, attr_map, "external set")
    test = _groups(eval_index, test_list, data.attr, attr_map, "evaluation set")
    _check_set(external, "external set", ext_desc, data.attr, attr_map)
    _check_set(test, "evaluation set", test_desc, data.attr, attr_map)
    return Sets(index, eval_index, external, test, {"external": ext_desc, "test": test_desc}, attr_map, reduction)


def extreme_values(index: ShardIndex, keys: Sequence[str], data: DataSpec, model: nn.Module,
                   device: torch.device | None, progress: bool) -> dict[str, Any]:
    """SWiFT's multi-attribute reduction (docs/algorithm.md §1): the AUC of ``model`` on the samples ``keys`` (D_e)
    for every value of ``data.attr`` that holds both classes; ``g_max`` / ``g_min`` are the values (as text) of the
    highest and the lowest (:func:`fastmask.data.balance.extreme_groups`, ties by the smallest value)."""
    values = sorted({str(index.samples[k]["attrs"][data.attr]) for k in keys})
    loader = make_loader(index, batch_size=data.batch_size, train=False, image_size=data.image_size,
                         workers=data.workers, keys=keys, attr=data.attr, attr_map={v: i for i, v in enumerate(values)},
                         transform=data.preprocessing().transform(train=False), strict=data.strict, rank=0,
                         world_size=1)
    y, p, a, _ = score(model, loader, device, progress=progress, desc="attribute reduction")
    loader.stats.check_loss(data.max_skip_fraction, "the external set (attribute reduction)",
                            "; --max-skip-fraction raises the limit, --strict stops at the first damage")
    aucs = {values[g]: v for g, v in auc_by_group(y, p, a).items()}
    kept = extreme_groups(pd.DataFrame({"value": [values[g] for g in a]}), "value", aucs).attrs
    return {"auc_by_value": aucs, "g_max": kept["g_max"], "g_min": kept["g_min"],
            "values": values, "samples": len(y)}


def set_summary(frame: pd.DataFrame, description: str) -> dict[str, Any]:
    groups = {str(g): {"n": int((frame["a"] == g).sum()), "positives": int(frame.loc[frame["a"] == g, "y"].sum())}
              for g in (0, 1)}
    return {"samples": len(frame), "positives": int(frame["y"].sum()), "groups": groups, "description": description}


@dataclass
class Caches:
    """The decoded caches of a run's two sets (None: that set is streamed), and what each would take."""

    external: DecodedCache | None
    evaluation: DecodedCache | None
    budget_bytes: int
    needs: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """For report.json: the budget and, per set, whether it is cached and its decoded size."""
        return {"budget_mib": self.budget_bytes / 2**20, "describe": self.describe(), "sets": {
            name: {"cached": getattr(self, name) is not None, "mib": need / 2**20}
            for name, need in self.needs.items()}}

    def describe(self) -> str:
        """One line: which sets are decoded once and which are streamed, and why."""
        cached = [n for n in self.needs if getattr(self, n) is not None]
        streamed = [n for n in self.needs if getattr(self, n) is None]
        said = [f"{n} set decoded once into memory ({self.needs[n] / 2**20:.1f} MiB)" for n in cached]
        if streamed:
            why = "caching off (--cache-mib 0)" if not self.budget_bytes else \
                f"over the --cache-mib budget of {self.budget_bytes / 2**20:.0f} MiB"
            said.append(f"{' and '.join(streamed)} set streamed every pass ({why})")
        return "; ".join(said)


def decoded_caches(sets: Sets, data: DataSpec) -> Caches:
    """The caches of the external set and of the evaluation set, in that order (the external set is read the most:
    the importance pass, every fine-tuning epoch, the validation part), each when it fits in what is left of
    ``data.cache_mib``. They are filled at their first pass."""
    budget = left = data.cache_mib * 2**20
    prep = data.preprocessing()
    needs, caches = {}, {}
    for name, index, frame in (("external", sets.index, sets.external), ("evaluation", sets.eval_index, sets.test)):
        needs[name] = cache_bytes(len(frame), prep.input_size)
        caches[name] = None
        if needs[name] <= left and budget:
            caches[name] = DecodedCache(index, list(frame.index),
                                        transform=prep.transform(train=False),
                                        attr=data.attr, attr_map=sets.attr_map, strict=data.strict)
            left -= needs[name]
    out = Caches(caches["external"], caches["evaluation"], budget, needs)
    log.info("%s", out.describe())
    return out


@dataclass
class Parts:
    """The parts of one run: the samples (``fit``, the validation part ``val`` or None, ``balanced`` D_r, each
    indexed by key) and the loaders over them."""

    fit: pd.DataFrame
    val: pd.DataFrame | None
    balanced: pd.DataFrame
    mask: ShardLoader
    train: ShardLoader
    validation: ShardLoader | None
    evaluation: ShardLoader


def parts(sets: Sets, data: DataSpec, *, hold_out: bool, caches: Caches | None = None) -> Parts:
    """The loaders of a run over ``sets`` with the settings of ``data`` (its seed included), reading the sets that
    ``caches`` holds from there (:func:`decoded_caches`; None: every set streamed).

    With ``hold_out`` a validation part of D_e (``data.val_fraction``, stratified by group and label) is set aside
    to choose a configuration on; the mask and the steps see the rest. As in the authors' code (docs/algorithm.md
    §1) the mask loader reads the **unbalanced** fitting part with test transforms, shuffled; the train loader the
    group-balanced D_r drawn from it, with the training augmentation. Under torchrun those two split the data by
    rank, while every rank reads the whole validation and evaluation sets (the same numbers everywhere).
    """
    fit, val = sets.external, None
    if hold_out:
        ext = sets.external
        fit_i, val_i = stratified_split(ext["y"].to_numpy(), ext["a"].to_numpy(), data.val_fraction, data.seed)
        fit, val = ext.iloc[fit_i], ext.iloc[val_i]
    balanced = group_balance(fit, "a", "y", seed=data.seed, replace=data.balance_replace)
    prep = data.preprocessing()
    test = prep.transform(train=False)
    common = {"batch_size": data.batch_size, "image_size": data.image_size, "workers": data.workers,
              "seed": data.seed, "attr": data.attr, "attr_map": sets.attr_map, "strict": data.strict}
    whole = {"rank": 0, "world_size": 1, "transform": test, **common}
    ext_cache = {"cache": None if caches is None else caches.external}
    test_cache = {"cache": None if caches is None else caches.evaluation}
    return Parts(
        fit=fit, val=val, balanced=balanced,
        mask=make_loader(sets.index, train=False, shuffle=True, keys=list(fit.index), transform=test, **common,
                         **ext_cache),
        train=make_loader(sets.index, train=True, keys=balanced["source_index"], transform=prep.transform(train=True),
                          **common, **ext_cache),
        validation=None if val is None else make_loader(sets.index, train=False, shuffle=False,
                                                        keys=list(val.index), **whole, **ext_cache),
        evaluation=make_loader(sets.eval_index, train=False, keys=list(sets.test.index), return_keys=True, **whole,
                               **test_cache),
    )


class Tracked:
    """A loader that logs its :class:`~fastmask.data.stats.LoaderStats` after every complete pass (for the report)
    and fails a pass that skipped more than ``max_skip_fraction`` of its sample reads (``name`` is a key of
    :data:`SPLITS`)."""

    def __init__(self, loader: ShardLoader, name: str, log: list[dict[str, Any]],
                 max_skip_fraction: float = MAX_SKIP_FRACTION) -> None:
        self.loader, self.name, self.log, self.max_skip_fraction = loader, name, log, max_skip_fraction

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        """The wrapped loader's next epoch (:attr:`fastmask.data.loader.ShardLoader.epoch`)."""
        return self.loader.epoch

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        yield from self.loader
        stats = self.loader.stats
        self.log.append({"loader": self.name, **stats.to_dict()})
        totals = None
        if self.loader.world_size > 1:  # the ranks read disjoint shares: judge the split as a whole, on every rank
            skipped, samples = ddp.all_reduce_counts([stats.skipped, stats.samples], ddp.local_device())
            totals = (int(skipped), int(samples))
        stats.check_loss(self.max_skip_fraction, f"the {SPLITS[self.name]}",
                         "; --max-skip-fraction raises the limit, --strict stops at the first damage", totals=totals)


def split_counts(log: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per tracked loader, what its last complete epoch really had: ``read`` (samples delivered), ``skipped``
    (sample reads lost to damage) and ``epochs`` (complete epochs so far). An evaluation epoch is one pass over its
    set, and every pass meets the same damage, so the last epoch is the one the reported figures were computed on;
    a training epoch may pass over its set more than once (the resampling that fills its batches, :mod:`fastmask.
    data.loader`), so its ``read`` counts sample reads, not distinct samples."""
    counts: dict[str, dict[str, int]] = {}
    for entry in log:
        epochs = counts.get(entry["loader"], {}).get("epochs", 0) + 1
        counts[entry["loader"]] = {"read": entry["samples"], "skipped": entry["skipped"], "epochs": epochs}
    return counts


def read_counts(splits: Mapping[str, Mapping[str, int]], names: Sequence[str]) -> dict[str, int | None]:
    """``read`` and ``skipped`` of a set read by the loaders ``names`` (summed over those that finished an epoch;
    None when none did), from :func:`split_counts`."""
    ran = [splits[n] for n in names if n in splits]
    if not ran:
        return {"read": None, "skipped": None}
    return {"read": sum(c["read"] for c in ran), "skipped": sum(c["skipped"] for c in ran)}


def loader_summary(log: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What :class:`Tracked` loaders logged, summed: ``skipped`` (damaged sample reads), by reason, by loader, and
    one entry per damaged sample; and each split's last epoch (:func:`split_counts`)."""
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
            "splits": split_counts(log), "damaged": list(damaged.values())}
