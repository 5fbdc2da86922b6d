"""Debiasing without hand tuning: a handful of configurations tried on held-out external data, chosen by a stated
rule (docs/algorithm.md §10).

The papers tuned their learning rates and β per data set by looking at the results; :func:`select` does that on a
validation part of the external set, which the caller holds out (:func:`fastmask.data.splits.stratified_split`):

1. The mask is computed once, on the fitting part: it depends on neither the learning rates, β nor the epochs.
2. Every candidate of the grid (:class:`Candidate`: the two steps' learning rates and β) starts from the original
   weights and runs the method on the fitting part. Candidates whose first steps are the same (the same first
   learning rate, and for SWiFT the same β) share it: the second steps branch off the run state saved after it
   (the same weights, optimizer state and random-number state), as a resumed run would continue.
3. After every epoch the validation part is scored: a global decision threshold is chosen on it (``rule.threshold``;
   one for everyone, so no attribute is needed at inference), then AUC, accuracy, the share of positive predictions
   and the fairness gap in every form.
4. The rule (:class:`SelectionRule`): an epoch is *admissible* when its validation AUC is at most ``max_auc_drop``
   below the original model's, its accuracy at most ``max_acc_drop`` below the original's (at the original's
   threshold, 0.5), and its positive share within ``share_tolerance`` of the label rate (the guard, relative; a
   collapse to one class is far outside it). Among all admissible epochs of all candidates the smallest gap wins
   (``rule.gap``, by default the mean of |ΔTPR| and |ΔFPR|; never the signed sum, in which opposite gaps cancel);
   ties go to the higher AUC. A candidate whose validation AUC has fallen more than ``stop_auc_drop`` below the
   original's after an epoch is hopeless and stops (not after the first epoch of a head step, whose head is fresh).
5. When no epoch is admissible the model is left as it was, and the selection says so (``chosen`` is None).

Every candidate and epoch is a row of :attr:`Selection.rows`; the report shows them all.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fastmask.fairness.metrics import THRESHOLD_RULES, choose_threshold, evaluate
from fastmask.methods.bmft import bmft, bmft_masks
from fastmask.methods.configs import BmftConfig, SwiftConfig
from fastmask.methods.engine import seed_everything
from fastmask.methods.state import Result, RunState
from fastmask.methods.swift import swift, swift_masks
from fastmask.model.scoring import model_device, score

log = logging.getLogger(__name__)

#: The fairness gaps the rule may minimise (keys of :func:`fastmask.fairness.metrics.evaluate`).
GAPS = ("eodds_mean", "eodds_max", "eopp", "spd")
#: Each method's two steps, its run and mask functions, its configuration type, and whether β enters its first step
#: (SWiFT's step 1 minimises β·WBCE + (1 − β)·B; BMFT's impair step the bias alone).
_METHODS = {"swift": (("step1", "step2"), swift, swift_masks, SwiftConfig, True),
            "bmft": (("impair", "repair"), bmft, bmft_masks, BmftConfig, False)}


@dataclass(frozen=True)
class SelectionRule:
    """How the configuration is chosen on the validation part (module docstring, step 4).

    Args:
        gap: the fairness gap to minimise: ``"eodds_mean"`` (½(|ΔTPR| + |ΔFPR|), default), ``"eodds_max"``,
            ``"eopp"`` or ``"spd"``. The signed-sum EOdds is refused: opposite gaps cancel in it.
        max_auc_drop: largest admissible fall of validation AUC below the original model's.
        max_acc_drop: largest admissible fall of validation accuracy below the original model's.
        share_tolerance: largest admissible |share of positive predictions − label rate|.
        threshold: the decision threshold of each candidate epoch: ``"accuracy"`` (the one of the highest
            validation accuracy, default), ``"rate"`` (positive share equal to the label rate), or a number (0.5:
            the untuned threshold of the papers).
        stop_auc_drop: a candidate whose validation AUC fell further than this below the original's stops.
    """

    gap: str = "eodds_mean"
    max_auc_drop: float = 0.01
    max_acc_drop: float = 0.02
    share_tolerance: float = 0.10
    threshold: str | float = "accuracy"
    stop_auc_drop: float = 0.05

    def __post_init__(self) -> None:
        if self.gap == "eodds":
            raise ValueError("gap 'eodds' is the signed sum, in which opposite TPR and FPR gaps cancel: choose "
                             f"one of {list(GAPS)}")
        if self.gap not in GAPS:
            raise ValueError(f"gap must be one of {list(GAPS)}, got {self.gap!r}")
        for name in ("max_auc_drop", "max_acc_drop", "share_tolerance", "stop_auc_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if isinstance(self.threshold, str):
            if self.threshold not in THRESHOLD_RULES:
                raise ValueError(f"threshold must be one of {list(THRESHOLD_RULES)} or a number, got "
                                 f"{self.threshold!r}")
        elif not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class Candidate:
    """One configuration: the learning rates of the two steps (SWiFT step 1 and 2, BMFT impair and repair) and β."""

    lr1: float
    lr2: float
    beta: float

    def apply(self, method: str, config: SwiftConfig | BmftConfig) -> SwiftConfig | BmftConfig:
        """``config`` with this candidate's learning rates and β."""
        first, second = _METHODS[method][0]
        return replace(config, beta=self.beta, **{first: replace(getattr(config, first), lr=self.lr1),
                                                  second: replace(getattr(config, second), lr=self.lr2)})


def grid(lr1: Sequence[float], lr2: Sequence[float], beta: Sequence[float]) -> tuple[Candidate, ...]:
    """Every combination, first step's learning rate slowest, so candidates sharing a first step are neighbours."""
    return tuple(Candidate(a, c, b) for a, b, c in itertools.product(lr1, beta, lr2))


#: The default grids: 2 × 2 × 2 = 8 candidates each, around the authors' learning rates (SWiFT: step 1 10⁻⁴, step 2
#: 10⁻³; BMFT: impair 10⁻⁴, repair 10⁻³) one decade up, and β at the authors' 0.1 and at 0.5 (more weight on the
#: task loss in SWiFT's step 1 and on the bias in its step 2; more on the bias in BMFT's repair step).
DEFAULT_GRIDS: dict[str, tuple[Candidate, ...]] = {
    "swift": grid(lr1=(1e-4, 1e-3), lr2=(1e-3, 1e-2), beta=(0.1, 0.5)),
    "bmft": grid(lr1=(1e-4, 1e-3), lr2=(1e-3, 1e-2), beta=(0.1, 0.5)),
}


@dataclass(frozen=True)
class Plan:
    """What to choose among and how: the ``candidates`` (None: the method's :data:`DEFAULT_GRIDS`) and the
    :class:`SelectionRule`."""

    candidates: tuple[Candidate, ...] | None = None
    rule: SelectionRule = SelectionRule()


@dataclass
class Selection:
    """What :func:`select` tried and chose.

    Attributes:
        method: ``"swift"`` or ``"bmft"``.
        rule: the :class:`SelectionRule`.
        candidates: the grid, in the order tried.
        original: the original model's validation scores (at threshold 0.5).
        rows: one dict per candidate and epoch: ``candidate`` (index), ``lr1``, ``lr2``, ``beta``, ``step``,
            ``epoch``, ``threshold``, every metric of :func:`~fastmask.fairness.metrics.evaluate`, ``admissible``
            and ``why`` (the budgets it broke).
        chosen: the chosen row, or None when no epoch was admissible (the model is then unchanged).
        result: the chosen candidate's run (masks, history, guard checks), or None.
        stopped: the indices of the candidates stopped early as hopeless.
        masks: the masks every candidate used (computed once on the fitting part).
        seconds: wall time of the selection.
    """

    method: str
    rule: SelectionRule
    candidates: tuple[Candidate, ...]
    original: dict[str, float]
    masks: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    result: Result | None = None
    stopped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def threshold(self) -> float:
        """The decision threshold that goes with the selected model (0.5 when the model is unchanged)."""
        return float(self.chosen["threshold"]) if self.chosen is not None else 0.5

    def to_dict(self) -> dict[str, Any]:
        """Everything but the run result, as plain data (for report.json)."""
        return {"method": self.method, "rule": asdict(self.rule), "candidates": [asdict(c) for c in self.candidates],
                "original": self.original, "rows": self.rows, "chosen": self.chosen, "stopped": self.stopped,
                "threshold": self.threshold, "seconds": self.seconds}


class _Hopeless(Exception):
    """Raised from the epoch callback to stop a candidate whose validation AUC fell beyond the stop margin."""


def _val_scores(model: nn.Module, loader: Iterable, device: torch.device, threshold: str | float) -> dict[str, Any]:
    s = score(model, loader, device)
    t = choose_threshold(s.y, s.p, threshold) if isinstance(threshold, str) else float(threshold)
    return evaluate(s.y, s.p, s.a, threshold=t)


def _judge(row: dict[str, Any], original: dict[str, float], rule: SelectionRule) -> list[str]:
    """The budgets ``row`` breaks (empty: admissible)."""
    why = []
    if original["auc"] - row["auc"] > rule.max_auc_drop:
        why.append(f"AUC {row['auc']:.4f} more than {rule.max_auc_drop} below the original {original['auc']:.4f}")
    if original["acc"] - row["acc"] > rule.max_acc_drop:
        why.append(f"ACC {row['acc']:.4f} more than {rule.max_acc_drop} below the original {original['acc']:.4f}")
    if abs(row["positive_rate"] - row["label_positive_rate"]) > rule.share_tolerance:
        why.append(f"positive share {row['positive_rate']:.3f} more than {rule.share_tolerance} from the label rate "
                   f"{row['label_positive_rate']:.3f}")
    return why


def select(
    model: nn.Module,
    method: str,
    mask_loader: Iterable,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    config: SwiftConfig | BmftConfig | None = None,
    candidates: Sequence[Candidate] | None = None,
    rule: SelectionRule | None = None,
    progress: bool = False,
) -> Selection:
    """Debias ``model`` in place with the configuration of ``candidates`` (default :data:`DEFAULT_GRIDS`) that the
    ``rule`` chooses on ``val_loader`` (module docstring), or leave it unchanged when none is admissible.

    Args:
        model: the classifier (one logit per sample).
        method: ``"swift"`` or ``"bmft"``.
        mask_loader: the fitting part of the external set, unbalanced (the mask, and BMFT's impair step).
        train_loader: the fitting part, group-balanced (the fine-tuning steps).
        val_loader: the validation part, unbalanced, every (group, label) cell present; never trained on.
        config: the method's settings; each candidate changes its learning rates and β.
        candidates: the grid.
        rule: :class:`SelectionRule`.
        progress: progress bars.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    steps, run_method, build_masks, config_type, beta_in_first = _METHODS[method]
    config = config or config_type()
    if not isinstance(config, config_type):
        raise TypeError(f"method {method!r} needs a {config_type.__name__}, got {type(config).__name__}")
    rule = rule or SelectionRule()
    candidates = tuple(candidates if candidates is not None else DEFAULT_GRIDS[method])
    if not candidates:
        raise ValueError("select: the grid holds no candidate")
    started = time.perf_counter()
    device = model_device(model)
    original_weights = copy.deepcopy(model.state_dict())
    original = _val_scores(model, val_loader, device, 0.5)
    selection = Selection(method, rule, candidates, original)
    seed_everything(config.seed)  # as a run seeds before its importance pass
    masks, n_batches = build_masks(model, mask_loader, config, progress)
    selection.masks = masks
    best: dict[str, Any] = {"row": None, "weights": None, "candidate": None}
    results: dict[int, Result] = {}

    def watch(index: int, candidate: Candidate, snapshot: dict[str, Any]):
        """The epoch callback of candidate ``index``: score, judge, keep the best, stop the hopeless, and save the
        run state after the first step (``snapshot``) for the candidates that branch off it."""
        def on_epoch(state: RunState) -> None:
            results[index] = state.result
            if state.step == steps[0] and state.epoch == getattr(state.result.config, steps[0]).epochs:
                snapshot["weights"] = copy.deepcopy(model.state_dict())
                snapshot["state"] = state.to_state()
            if state.epoch == 0:
                return
            with torch.random.fork_rng(devices=[]):  # scoring must not move the run's random numbers
                scores = _val_scores(model, val_loader, device, rule.threshold)
            row = {"candidate": index, **asdict(candidate), "step": state.step, "epoch": state.epoch, **scores}
            row["why"] = _judge(row, original, rule)
            row["admissible"] = not row["why"]
            selection.rows.append(row)
            if row["admissible"] and (best["row"] is None or (row[rule.gap], -row["auc"])
                                      < (best["row"][rule.gap], -best["row"]["auc"])):
                best.update(row=row, weights=copy.deepcopy(model.state_dict()), candidate=index)
            fresh_head = state.step == steps[1] and state.epoch == 1
            if original["auc"] - row["auc"] > rule.stop_auc_drop and not fresh_head:
                raise _Hopeless
        return on_epoch

    branches: dict[tuple[float, ...], list[int]] = {}
    for i, c in enumerate(candidates):
        branches.setdefault((c.lr1, c.beta) if beta_in_first else (c.lr1,), []).append(i)
    for members in branches.values():
        snapshot: dict[str, Any] = {}
        for k, i in enumerate(members):
            cand_config = candidates[i].apply(method, config)
            if k == 0:
                model.load_state_dict(original_weights)
                run = {"masks": masks}
            elif "state" in snapshot:  # branch off the state after the shared first step
                model.load_state_dict(snapshot["weights"])
                run = {"resume": RunState.from_state(snapshot["state"], cand_config)}
                shared = [r for r in selection.rows if r["candidate"] == members[0] and r["step"] == steps[0]]
                selection.rows += [{**r, "candidate": i, **asdict(candidates[i])} for r in shared]
            else:  # the shared first step was hopeless
                selection.stopped.append(i)
                continue
            try:
                run_method(model, mask_loader, train_loader, config=cand_config, progress=progress,
                           on_epoch=watch(i, candidates[i], snapshot), **run)
            except _Hopeless:
                selection.stopped.append(i)
                log.info("selection: candidate %d (%s) stopped: validation AUC more than %s below the original's",
                         i, candidates[i], rule.stop_auc_drop)
    if best["row"] is None:
        model.load_state_dict(original_weights)
        log.warning("selection: no candidate met the budgets on the validation part; the model is left unchanged")
    else:
        model.load_state_dict(best["weights"])
        selection.chosen = best["row"]
        selection.result = results[best["candidate"]]
        selection.result.n_importance_batches = n_batches
    selection.seconds = time.perf_counter() - started
    return selection
