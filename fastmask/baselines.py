"""The baselines SWiFT and BMFT are compared against ([PS] §4.3, [PB] §3.3; spec §9), on the same engine.

Every method has the call shape of :func:`fastmask.pipeline.swift` / :func:`~fastmask.pipeline.bmft`::

    method(model, mask_loader, train_loader, *, config=None, progress=False) -> Result

``model`` is modified in place; ``mask_loader`` is the **unbalanced** external set D_e (batches (x, y, a, ...)) and
``train_loader`` the **group-balanced** D_r (:func:`fastmask.balance.group_balance`). Which of the two a method
reads, which parameters it changes and which loss it minimises is what defines it; each docstring says so.

==============  ======================================  =======================  ==================================
method          parameters changed                      data                     loss / criterion
==============  ======================================  =======================  ==================================
Baseline        none                                    none                     --
FullFT-RW       all                                     D_r                      WBCE
FullFT-Reg      all                                     D_e                      β·WBCE + (1 − β)·B   ([PS] Eq. 10)
FullFT-FDR      all                                     D_r                      β·WBCE + (1 − β)·B   (Le et al.)
LLFT            head (re-initialised)                   D_r                      WBCE + β·B           (Mao et al.)
DiffGda         all                                     D_e                      ±(signed proxy), best checkpoint
DiffPrune       BN (or conv) channels set to 0          D_e                      activation × ∂proxy, best step
FairPrune       weights set to 0                        D_e, per group           ½θ²F per group (Wu et al.)
Random mask     SWiFT pipeline, M ~ U[0, 1)             D_e, D_r                 as SWiFT
Hard mask       SWiFT pipeline, M = 1[R > q]            D_e, D_r                 as SWiFT
Manual masks    BMFT pipeline, M = 1 on BN / 1st convs  D_e, D_r                 as BMFT
==============  ======================================  =======================  ==================================

:data:`METHODS` maps a method's command-line name to its function; it includes ``"swift"`` and ``"bmft"``.

References: Le et al. 2023 (FDR: "Fairness via data balancing and regularisation"), Mao et al. 2023 ("Last-layer
fairness fine-tuning is simple and effective for neural networks"), Marcinkevics et al. 2022 ("Debiasing deep chest
X-ray classifiers using intra- and post-processing methods", MLHC; DiffGda, DiffPrune), Wu et al. 2022 ("FairPrune:
achieving fairness through pruning for dermatological disease diagnosis", MICCAI).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import Tensor, nn

from fastmask.importance import Objective, fisher_importance, unpack_batch
from fastmask.losses import SWIFT_BIAS, BiasSpec, wbce
from fastmask.masks import hard_mask_fraction, importance_ratio, manual_mask, random_mask
from fastmask.metrics import predict as hard_predictions
from fastmask.models import split_head
from fastmask.pipeline import (
    BmftConfig,
    Frozen,
    Result,
    StepConfig,
    SwiftConfig,
    bmft,
    checked_masks,
    collapse_check,
    model_device,
    seed_everything,
    swift,
    train_step,
)
from fastmask.profiling import phase

__all__ = [
    "BaselineResult", "BaselineConfig", "FullFTConfig", "LLFTConfig", "SelectionConfig", "DiffGdaConfig",
    "DiffPruneConfig", "FairPruneConfig", "RandomMaskConfig", "HardMaskConfig", "ManualMaskConfig", "finetune",
    "collect_predictions", "signed_proxy", "prunable_layers", "baseline", "fullft_rw", "fullft_reg", "fullft_fdr",
    "llft", "diffgda", "diffprune", "fairprune", "random_mask_swift", "hard_mask_swift", "manual_mask_bmft", "METHODS",
    "LABELS", "HARD_FRACTIONS", "DEFAULT_CONFIGS", "Method",
]

log = logging.getLogger(__name__)

ProxyMetric = Literal["eodds", "spd", "eod"]
_PROXIES = ("eodds", "spd", "eod")


@dataclass
class BaselineResult(Result):
    """A :class:`fastmask.pipeline.Result` plus ``details``: what the method decided (the selected checkpoint or
    pruning step and its validation trajectory, the privileged group, the mask fraction, ...)."""

    details: dict[str, Any] = field(default_factory=dict)


def _from_pipeline(result: Result, method: str, **details: Any) -> BaselineResult:
    out = BaselineResult(**{f.name: getattr(result, f.name) for f in fields(Result)}, details=details)
    out.method = method
    return out


# ---- shared building blocks --------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    loader: Iterable,
    params: Mapping[str, nn.Parameter],
    step: StepConfig,
    *,
    wbce_weight: float,
    bias_weight: float,
    bias: BiasSpec | Objective = SWIFT_BIAS,
    masks: Mapping[str, Tensor] | None = None,
    mask_mode: Literal["grad", "update"] = "grad",
    feature_eval: bool = False,
    head: str | None = None,
    name: str = "finetune",
    result: Result | None = None,
    collapse_threshold: float = 0.95,
    after_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One fine-tuning step on the pipeline's loop (:func:`fastmask.pipeline.train_step`): only ``params`` are
    trainable (every other parameter frozen, the flags restored afterwards), the masked optimizer
    ``step.build(params, masks, mask_mode)``, and ``step.epochs`` passes of zero-grad → forward →
    L = wbce_weight·WBCE + bias_weight·B → backward → step.

    Args:
        model: the classifier (one logit per sample); modified in place, its train/eval mode restored.
        loader: the step's batches (x, y, a, ...).
        params: the trainable parameters, keyed by ``model.named_parameters()`` names.
        step: optimiser and number of epochs.
        wbce_weight, bias_weight: the loss weights; bias: the bias function B(z, y, a).
        masks: per-parameter masks for the masked optimizer (None: plain optimizer).
        feature_eval: run everything but the head in eval mode (spec §8.11), e.g. when E is frozen.
        head: module path of the head (default: the last nn.Linear); used by ``feature_eval``.
        name: the step's name in the history and in the collapse check.
        result: when given, the epochs are appended to ``result.history`` and the collapse guard runs on
            ``loader`` after the step (recorded in ``result.checks`` / ``collapse_warnings``).
        after_epoch: called with the epoch number (1-based) after every epoch, e.g. to evaluate a checkpoint.

    Returns:
        The step's history entries (one per epoch).
    """
    device = model_device(model)
    head_module, _, _ = split_head(model, head)
    history = result.history if result is not None else []
    first = len(history)
    was_training = model.training
    optimizer_masks = None if masks is None else {n: masks[n] for n in params}
    with phase("fastmask.finetune"), Frozen(model, params.values()):
        opt = step.build(list(params.items()), optimizer_masks, mask_mode)
        # One epoch per call so that a checkpoint can be evaluated between epochs; the optimizer (and its state)
        # persists across the calls, so this equals one call over step.epochs epochs.
        for epoch in range(1, step.epochs + 1):
            train_step(name, model, head_module, loader, opt, 1, wbce_weight, bias_weight, bias, feature_eval,
                       device, history, progress)
            history[-1]["epoch"] = epoch
            if after_epoch is not None:
                after_epoch(epoch)
    if result is not None:
        collapse_check(result, name, model, loader, device, collapse_threshold)
    model.train(was_training)
    return history[first:]


@torch.no_grad()
def collect_predictions(model: nn.Module, loader: Iterable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, p = σ(z), a) over ``loader`` in eval mode, as float64 / int64 numpy vectors; the mode is restored."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    ys, ps, as_ = [], [], []
    for batch in loader:
        x, y, a = unpack_batch(batch, device)
        ps.append(torch.sigmoid(model(x).reshape(-1).double()).cpu())
        ys.append(y.reshape(-1).cpu())
        as_.append(a.reshape(-1).cpu())
    model.train(was_training)
    if not ps:
        raise ValueError("collect_predictions: the loader yielded no batches")
    return (torch.cat(ys).numpy().astype(np.int64), torch.cat(ps).numpy(),
            torch.cat(as_).numpy().astype(np.int64))


def signed_proxy(z: Tensor, y: Tensor, a: Tensor, metric: ProxyMetric = "eodds") -> Tensor:
    """Marcinkevics et al.'s (2022) **signed** differentiable bias proxy on the scores p = σ(z):

    - ``"spd"``: m_0(p) − m_1(p);
    - ``"eod"`` (equal opportunity, positives only): m_{0,1}(p) − m_{1,1}(p);
    - ``"eodds"``: ½·[(m_{0,0}(p) − m_{1,0}(p)) + (m_{0,1}(p) − m_{1,1}(p))], the signed form of the reference
      code's EOdds (spec §6), the fairness metric the comparison table reports.

    An empty cell's mean is the constant 0 (spec §8.2); the result is always attached to z's graph.
    """
    if metric not in _PROXIES:
        raise ValueError(f"metric must be one of {list(_PROXIES)}, got {metric!r}")
    z = z.reshape(-1)
    p = torch.sigmoid(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z)
    y = y.reshape(-1).to(p.device).long()
    a = a.reshape(-1).to(p.device).long()
    if metric == "spd":
        cell, n = a, 2
    else:
        cell, n = 2 * a + y, 4
    sums = torch.zeros(n, dtype=p.dtype, device=p.device).index_add(0, cell, p)
    means = sums / torch.bincount(cell, minlength=n).to(p.dtype).clamp_min(1)
    if metric == "spd":
        return means[0] - means[1]
    tpr_gap = means[1] - means[3]
    return tpr_gap if metric == "eod" else 0.5 * ((means[0] - means[2]) + tpr_gap)


def _signed_bias(y: np.ndarray, p: np.ndarray, a: np.ndarray, metric: ProxyMetric) -> float:
    """The signed gap of the hard predictions ŷ = 1[p > 0.5] (the proxy's metric; empty cells give 0)."""
    yhat = hard_predictions(p).astype(np.float64)

    def rate(sel: np.ndarray) -> float:
        return float(yhat[sel].mean()) if sel.any() else 0.0

    if metric == "spd":
        return rate(a == 0) - rate(a == 1)
    tpr_gap = rate((a == 0) & (y == 1)) - rate((a == 1) & (y == 1))
    if metric == "eod":
        return tpr_gap
    return 0.5 * (rate((a == 0) & (y == 0)) - rate((a == 1) & (y == 0)) + tpr_gap)


class _Selection:
    """Marcinkevics et al.'s model selection: evaluate each candidate on the validation data (the signed bias of
    the hard predictions and the balanced accuracy, both at the 0.5 threshold the comparison evaluates at) and keep
    the one with the smallest |bias| whose balanced accuracy is at least ``floor``. Candidate 0 is the unchanged
    model, so the floor ``initial − max_drop`` always admits one."""

    def __init__(self, model: nn.Module, val_loader: Iterable, metric: ProxyMetric, min_performance: float | None,
                 max_drop: float) -> None:
        self.model, self.val_loader, self.metric = model, val_loader, metric
        self.trajectory: list[dict[str, float]] = []
        self.initial_state = copy.deepcopy(model.state_dict())
        bias0, perf0 = self.measure()
        self.floor = min_performance if min_performance is not None else perf0 - max_drop
        self.sign = 1.0 if bias0 >= 0 else -1.0  # descend on a positive bias, ascend on a negative one
        self.best: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.consider(0, bias0, perf0)

    def measure(self) -> tuple[float, float]:
        y, p, a = collect_predictions(self.model, self.val_loader)
        return _signed_bias(y, p, a, self.metric), float(balanced_accuracy_score(y, hard_predictions(p)))

    def consider(self, index: int, bias: float | None = None, perf: float | None = None) -> None:
        if bias is None or perf is None:
            bias, perf = self.measure()
        self.trajectory.append({"index": index, "bias": bias, "balanced_accuracy": perf})
        best_bias = None if self.best is None else abs(self.trajectory[self.best]["bias"])
        if perf >= self.floor and (best_bias is None or abs(bias) < best_bias):
            self.best = len(self.trajectory) - 1
            self.best_state = copy.deepcopy(self.model.state_dict())

    def restore(self, method: str) -> int:
        """Load the kept candidate into the model and return its index; when no candidate met the floor, keep the
        unchanged model (as Marcinkevics et al. do), warn, and return 0."""
        if self.best is None:
            log.warning("%s: no candidate reached the balanced-accuracy floor %.4f; keeping the unchanged model",
                        method, self.floor)
            self.model.load_state_dict(self.initial_state)
            return 0
        self.model.load_state_dict(self.best_state)
        return int(self.trajectory[self.best]["index"])

    def details(self, what: str) -> dict[str, Any]:
        selected = None if self.best is None else self.trajectory[self.best]["index"]
        return {"trajectory": self.trajectory, f"selected_{what}": selected, "performance_floor": self.floor,
                "sign": self.sign, "metric": self.metric}


@dataclass(kw_only=True)
class SelectionConfig:
    """What DiffGda and DiffPrune share: the checkpoint selection on a validation proxy and the data they read.

    Args:
        metric: the signed proxy (:func:`signed_proxy`): ``"eodds"`` (default, the table's metric), ``"spd"`` or
            ``"eod"`` (Marcinkevics et al.'s two).
        min_performance: lower bound on the validation balanced accuracy of the kept checkpoint; None (default):
            the unchanged model's balanced accuracy minus ``max_drop``.
        max_drop: see ``min_performance`` (default 0.05).
        data: ``"external"`` (default: D_e, as Marcinkevics et al.'s validation-only setting) or ``"balanced"`` (D_r).
        head, seed: as in :class:`fastmask.pipeline.SwiftConfig`.
    """

    metric: ProxyMetric = "eodds"
    min_performance: float | None = None
    max_drop: float = 0.05
    data: Literal["external", "balanced"] = "external"
    head: str | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        if self.metric not in _PROXIES:
            raise ValueError(f"metric must be one of {list(_PROXIES)}, got {self.metric!r}")
        if self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {self.max_drop}")
        if self.data not in ("external", "balanced"):
            raise ValueError(f"data must be 'external' or 'balanced', got {self.data!r}")


def _all_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


# ---- Baseline and full fine-tuning -------------------------------------------------------------------------------


@dataclass
class BaselineConfig:
    """The Baseline has no settings."""


def baseline(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: BaselineConfig | None = None,
             progress: bool = False) -> BaselineResult:
    """Baseline ([PS] §4.3, spec §9): the pretrained ERM model, unchanged. Reads no data."""
    return BaselineResult("baseline", config or BaselineConfig(), {})


@dataclass
class FullFTConfig:
    """Settings of the full fine-tuning baselines (spec §9).

    Args:
        step: the optimiser; default BMFT ``main.py``'s ``finetune`` loop: SGD(lr_base = 1e-3, momentum 0.9,
            weight decay 5e-4), 20 epochs.
        beta: β of [PS] Eq. 10, L = β·WBCE + (1 − β)·B (FullFT-Reg, FullFT-FDR; ignored by FullFT-RW).
        bias: the bias function B (default SWiFT's [PS] Eqs. 2-4 on log-probabilities).
        head, seed, collapse_threshold: as in :class:`fastmask.pipeline.SwiftConfig`.
    """

    step: StepConfig = StepConfig(20, 1e-3, "sgd", momentum=0.9, weight_decay=5e-4)
    beta: float = 0.1
    bias: BiasSpec | Objective = SWIFT_BIAS
    head: str | None = None
    seed: int | None = 42
    collapse_threshold: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def _full_ft(method: str, model: nn.Module, loader: Iterable, config: FullFTConfig, wbce_weight: float,
             bias_weight: float, progress: bool) -> BaselineResult:
    seed_everything(config.seed)
    result = BaselineResult(method, config, {})
    finetune(model, loader, _all_named(model), config.step, wbce_weight=wbce_weight, bias_weight=bias_weight,
             bias=config.bias, head=config.head, name=method, result=result,
             collapse_threshold=config.collapse_threshold, progress=progress)
    return result


def fullft_rw(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
              progress: bool = False) -> BaselineResult:
    """FullFT-RW ([PS] §4.3, spec §9): fine-tune **all** parameters on the group-balanced ("re-weighted") D_r
    (``train_loader``) with the task loss only, L = WBCE. ``mask_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-rw", model, train_loader, config, 1.0, 0.0, progress)


def fullft_reg(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
               progress: bool = False) -> BaselineResult:
    """FullFT-Reg ([PS] §4.3, [PB] §3.3 "Full FT", spec §9): fine-tune **all** parameters on the **unbalanced**
    external set D_e (``mask_loader``) with the fairness-regularised L = β·WBCE + (1 − β)·B ([PS] Eq. 10).
    ``train_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-reg", model, mask_loader, config, config.beta, 1.0 - config.beta, progress)


def fullft_fdr(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
               progress: bool = False) -> BaselineResult:
    """FullFT-FDR (Le et al. 2023, fairness via data balancing and regularisation; BMFT's ``FullFT_RWReg``; spec
    §9): fine-tune **all** parameters on the group-balanced D_r (``train_loader``) with
    L = β·WBCE + (1 − β)·B ([PS] Eq. 10). ``mask_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-fdr", model, train_loader, config, config.beta, 1.0 - config.beta, progress)


# ---- LLFT --------------------------------------------------------------------------------------------------------


@dataclass
class LLFTConfig:
    """Settings of :func:`llft`.

    Args:
        step: the head's optimiser (default SGD lr 1e-3 = ``lr_base``, momentum 0.9, weight decay 5e-4, 20 epochs).
        beta: weight of the fairness term in L = WBCE + β·B.
        bias: the bias function B (default SWiFT's [PS] Eqs. 2-4).
        reinit: ``"reset"`` (default; the head trained "from scratch" as [PB] describes LLFT: each head module's
            ``reset_parameters()``, drawn from the seeded torch RNG), ``"zero"`` (all head parameters 0, as BMFT's
            repair step) or ``"none"`` (keep the trained head, as SWiFT's unused ``fisher_mask_debiasing``).
        feature_eval: run the frozen E in eval mode (default True: the last layer is fitted on fixed features, so
            E's BatchNorm statistics must not drift).
        head, seed, collapse_threshold: as in :class:`fastmask.pipeline.SwiftConfig`.
    """

    step: StepConfig = StepConfig(20, 1e-3, "sgd", momentum=0.9, weight_decay=5e-4)
    beta: float = 0.1
    bias: BiasSpec | Objective = SWIFT_BIAS
    reinit: Literal["reset", "zero", "none"] = "reset"
    feature_eval: bool = True
    head: str | None = None
    seed: int | None = 42
    collapse_threshold: float = 0.95

    def __post_init__(self) -> None:
        if self.reinit not in ("reset", "zero", "none"):
            raise ValueError(f"reinit must be 'reset', 'zero' or 'none', got {self.reinit!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def llft(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: LLFTConfig | None = None,
         progress: bool = False) -> BaselineResult:
    """LLFT, last-layer fairness fine-tuning (Mao et al. 2023; [PB] §3.3; spec §9): freeze the feature extractor E,
    re-initialise the head C and train **only the head** on the group-balanced D_r (``train_loader``) with the
    fairness-regularised L = WBCE + β·B. E stays bit-identical; ``mask_loader`` is not read."""
    config = config or LLFTConfig()
    seed_everything(config.seed)
    head_module, head_params, _ = split_head(model, config.head)
    with torch.no_grad():
        if config.reinit == "zero":
            for p in head_params.values():
                p.zero_()
        elif config.reinit == "reset":
            resettable = [m for m in head_module.modules() if hasattr(m, "reset_parameters")]
            if not resettable:
                raise ValueError(f"LLFT reinit='reset': no module of the head {config.head or 'found'} has "
                                 "reset_parameters(); use reinit='zero'")
            for m in resettable:
                m.reset_parameters()
    result = BaselineResult("llft", config, {}, head_reset_fraction=0.0 if config.reinit == "none" else 1.0)
    finetune(model, train_loader, head_params, config.step, wbce_weight=1.0, bias_weight=config.beta,
             bias=config.bias, feature_eval=config.feature_eval, head=config.head, name="llft", result=result,
             collapse_threshold=config.collapse_threshold, progress=progress)
    return result


# ---- DiffGda -----------------------------------------------------------------------------------------------------


@dataclass
class DiffGdaConfig(SelectionConfig):
    """Settings of :func:`diffgda`.

    Args:
        step: the optimiser over all parameters (default Adam, lr 1e-5, 10 epochs: Marcinkevics et al.'s chest X-ray
            configuration).
        metric, min_performance, max_drop, head, seed: keyword-only, as in :class:`SelectionConfig`.
        data: what the steps train on, as in :class:`SelectionConfig`.
    """

    step: StepConfig = StepConfig(10, 1e-5, "adam", momentum=0.0, weight_decay=0.0)


def diffgda(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: DiffGdaConfig | None = None,
            val_loader: Iterable | None = None, progress: bool = False) -> BaselineResult:
    """DiffGda, bias gradient descent/ascent (Marcinkevics et al. 2022, ``biasGrad.py``; spec §9).

    All parameters are trained (train mode) with Adam on s·μ(z, y, a), where μ is the **signed** differentiable proxy
    (:func:`signed_proxy`) and s = sign of the unchanged model's bias on the validation data: descent when the bias is
    positive, ascent when it is negative. No task loss. After every epoch the model is evaluated on the validation
    data; the checkpoint with the smallest |bias| whose balanced accuracy is at least the lower bound is kept (the
    unchanged model is candidate 0), and ``model`` ends holding it. Marcinkevics et al. evaluate 5 times per epoch
    and pick the balanced-accuracy-optimal threshold; here the evaluation is once per epoch, at the 0.5 threshold
    every method is evaluated at (spec §6).

    Data: the steps run on D_e (``mask_loader``; ``config.data="balanced"``: on ``train_loader``); the validation
    data is ``val_loader`` (default ``mask_loader``).
    """
    config = config or DiffGdaConfig()
    seed_everything(config.seed)
    val = mask_loader if val_loader is None else val_loader
    select = _Selection(model, val, config.metric, config.min_performance, config.max_drop)
    sign, metric = select.sign, config.metric

    def objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
        return sign * signed_proxy(z, y, a, metric)

    result = BaselineResult("diffgda", config, {})
    loader = mask_loader if config.data == "external" else train_loader
    finetune(model, loader, _all_named(model), config.step, wbce_weight=0.0, bias_weight=1.0, bias=objective,
             head=config.head, name="diffgda", result=result, after_epoch=lambda e: select.consider(e),
             progress=progress)
    select.restore("diffgda")
    result.details = select.details("epoch")
    return result


# ---- DiffPrune ---------------------------------------------------------------------------------------------------


@dataclass
class DiffPruneConfig(SelectionConfig):
    """Settings of :func:`diffprune`.

    Args:
        units_per_step: channels pruned per step.
        max_steps: pruning steps (Marcinkevics et al.'s chest X-ray configuration: 10).
        dynamic: recompute the saliencies after every step (their configuration: True).
        metric, min_performance, max_drop, head, seed: keyword-only, as in :class:`SelectionConfig`.
        data: the saliency data, as in :class:`SelectionConfig`.
    """

    units_per_step: int = 1
    max_steps: int = 10
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.units_per_step < 1 or self.max_steps < 0:
            raise ValueError(f"units_per_step must be >= 1 and max_steps >= 0, got {self.units_per_step}, "
                             f"{self.max_steps}")


_BN = nn.modules.batchnorm._BatchNorm
_UNIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, head: str | None = None) -> list[tuple[str, nn.Module]]:
    """The layers whose output channels are DiffPrune's units: every affine BatchNorm of the feature extractor (a
    channel is removed exactly by setting its BN weight and bias to 0: its output is then 0 in train and eval mode);
    without any, every Conv / Linear layer of E (weight row and bias set to 0)."""
    head_module, _, _ = split_head(model, head)
    in_head = {id(m) for m in head_module.modules()}
    named = [(n, m) for n, m in model.named_modules() if id(m) not in in_head]
    bns = [(n, m) for n, m in named if isinstance(m, _BN) and m.affine]
    layers = bns or [(n, m) for n, m in named if isinstance(m, _UNIT_LAYERS)]
    if not layers:
        raise ValueError(f"DiffPrune: {type(model).__name__} has no BatchNorm, Conv or Linear layer outside the head")
    return layers


@torch.no_grad()
def _zero_unit(layer: nn.Module, channel: int) -> None:
    layer.weight[channel] = 0
    if layer.bias is not None:
        layer.bias[channel] = 0


def _unit_saliency(model: nn.Module, layers: list[tuple[str, nn.Module]], loader: Iterable, metric: ProxyMetric,
                   sign: float) -> list[Tensor]:
    """Per unit, s·Σ_{samples, positions} a·∂μ/∂a averaged over the batches: the first-order decrease of s·μ when the
    unit's output a is set to 0 (Taylor: Δμ ≈ −Σ a·∂μ/∂a). Eval mode."""
    device = model_device(model)
    outputs: list[Tensor] = [torch.empty(0)] * len(layers)

    def keeper(i: int) -> Callable:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> None:
            outputs[i] = out
        return hook

    handles = [m.register_forward_hook(keeper(i)) for i, (_, m) in enumerate(layers)]
    sal = [torch.zeros(m.weight.shape[0], dtype=torch.float64) for _, m in layers]
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in loader:
                x, y, a = unpack_batch(batch, device)
                mu = sign * signed_proxy(model(x), y, a, metric)
                grads = torch.autograd.grad(mu, outputs, allow_unused=True, materialize_grads=True)
                for i, (act, g) in enumerate(zip(outputs, grads, strict=True)):
                    prod = (act.detach() * g).double()
                    sal[i] += prod.transpose(0, 1).reshape(prod.shape[1], -1).sum(1).cpu()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("DiffPrune: the saliency loader yielded no batches")
    return [s / n_batches for s in sal]


def diffprune(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
              config: DiffPruneConfig | None = None, val_loader: Iterable | None = None,
              progress: bool = False) -> BaselineResult:
    """DiffPrune, bias-gradient structured pruning (Marcinkevics et al. 2022, ``pruning.py``; spec §9).

    Units are the output channels of E's BatchNorm layers (:func:`prunable_layers`). A unit's saliency is
    s·Σ a·∂μ/∂a over the saliency data (activation × gradient of the signed proxy μ, :func:`signed_proxy`; s = sign
    of the unchanged model's validation bias), i.e. how much removing the unit is expected to shrink the bias
    (Δμ ≈ −Σ a·∂μ/∂a). Step by step, the ``units_per_step`` unpruned units with the largest saliency are removed
    (weight and bias 0), the saliencies recomputed when ``dynamic``; after each step the model is evaluated on the
    validation data and the step with the smallest |bias| whose balanced accuracy is at least the lower bound is kept
    (step 0 is the unchanged model). No training: the only parameters that change are the pruned channels', set to 0.
    (Marcinkevics et al.'s code ranks by the gradient alone, over every activation position; spec §9 and this
    function use activation × gradient per channel.)

    Data: saliencies on D_e (``mask_loader``; ``config.data="balanced"``: ``train_loader``); validation
    ``val_loader`` (default ``mask_loader``).
    """
    config = config or DiffPruneConfig()
    seed_everything(config.seed)
    val = mask_loader if val_loader is None else val_loader
    saliency_loader = mask_loader if config.data == "external" else train_loader
    layers = prunable_layers(model, config.head)
    select = _Selection(model, val, config.metric, config.min_performance, config.max_drop)
    pruned: list[tuple[int, int]] = []  # (layer index, channel) in pruning order
    done = [torch.zeros(m.weight.shape[0], dtype=torch.bool) for _, m in layers]
    sal: list[Tensor] | None = None
    with phase("fastmask.prune"):
        for step in range(1, config.max_steps + 1):
            if sal is None or config.dynamic:
                sal = _unit_saliency(model, layers, saliency_loader, config.metric, select.sign)
            score = torch.cat([s.masked_fill(d, -torch.inf) for s, d in zip(sal, done, strict=True)])
            available = int(torch.isfinite(score).sum())
            if available == 0:
                break
            # stable descending order: ties go to the earlier layer / channel
            order = torch.sort(score, descending=True, stable=True).indices[:min(config.units_per_step, available)]
            offsets = np.cumsum([0] + [len(s) for s in sal])
            for flat in order.tolist():
                li = int(np.searchsorted(offsets, flat, side="right") - 1)
                ch = flat - int(offsets[li])
                _zero_unit(layers[li][1], ch)
                done[li][ch] = True
                pruned.append((li, ch))
            select.consider(step)
    best_step = select.restore("diffprune")
    kept = pruned[:best_step * config.units_per_step]
    # rebuild the selected step exactly: the original weights minus its units
    model.load_state_dict(select.initial_state)
    for li, ch in kept:
        _zero_unit(layers[li][1], ch)
    result = BaselineResult("diffprune", config, _keep_masks(model, layers, kept))
    result.details = select.details("step") | {
        "pruned_units": [(layers[li][0], ch) for li, ch in kept],
        "pruning_order": [(layers[li][0], ch) for li, ch in pruned],
        "units": sum(len(d) for d in done),
    }
    return result


def _keep_masks(model: nn.Module, layers: list[tuple[str, nn.Module]], kept: list[tuple[int, int]]) -> dict:
    """bool masks, True where a parameter entry was kept (a pruned unit's weight row and bias are False)."""
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for li, ch in kept:
        layer = layers[li][1]
        for p in (layer.weight, layer.bias):
            if p is not None:
                masks[names[id(p)]][ch] = False
    return masks


# ---- FairPrune ---------------------------------------------------------------------------------------------------


@dataclass
class FairPruneConfig:
    """Settings of :func:`fairprune`.

    Args:
        ratio: fraction of each weight tensor's entries to prune (tuned in Wu et al.).
        beta: β in the pruning score S_unpriv − β·S_priv (tuned in Wu et al.).
        data: the data of the per-group saliencies, ``"external"`` (D_e, default) or ``"balanced"`` (D_r).
        head, seed: as in :class:`fastmask.pipeline.SwiftConfig`.
    """

    ratio: float = 0.05
    beta: float = 1.0
    data: Literal["external", "balanced"] = "external"
    head: str | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.data not in ("external", "balanced"):
            raise ValueError(f"data must be 'external' or 'balanced', got {self.data!r}")


def _group_loss(group: int) -> Objective:
    """WBCE on the batch's samples with a = group (0, attached to the graph, when there are none)."""

    def loss(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
        sel = a.reshape(-1) == group
        if not bool(sel.any()):
            return 0.0 * z.sum()
        return wbce(z.reshape(-1)[sel], y.reshape(-1)[sel])

    return loss


def fairprune(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
              config: FairPruneConfig | None = None, progress: bool = False) -> BaselineResult:
    """FairPrune (Wu et al. 2022; spec §9): prune the weights that matter to the privileged group but little to the
    unprivileged one.

    1. Per group g, the OBD saliency (LeCun et al. 1989) S_g(θ_i) = ½·θ_i²·H_ii^g with the Hessian diagonal
       approximated by the Fisher diagonal of the task loss on group g's samples, H_ii^g ≈ F_ii^g (the engine's
       :func:`fastmask.importance.fisher_importance`, WBCE restricted to a = g). S_g estimates how much group g's loss
       grows when θ_i is set to 0.
    2. The privileged group is the one with the higher accuracy (ŷ = 1[p > 0.5]) on the same data (a tie: group 0).
    3. Score = S_unpriv − β·S_priv. **Sign convention:** the ``ratio`` entries with the *smallest* score are pruned,
       i.e. weights whose removal costs the unprivileged group least while costing the privileged group most, so the
       gap between the groups shrinks; a large score marks a weight the unprivileged group needs, which is kept.
       This is Wu et al.'s stated goal ("pruning the parameters important for the privileged group but less
       important for the unprivileged group"), the form spec §9 gives.
    4. Per weight tensor (every parameter with ≥ 2 dimensions: convolution and linear weights, head included;
       BatchNorm and bias vectors are not pruned), the ``round(ratio·numel)`` entries with the smallest score are
       set to 0 (ties by index). No fine-tuning follows; nothing else changes.

    Data: D_e (``mask_loader``; ``config.data="balanced"``: ``train_loader``). One-shot: Wu et al. tune the ratio
    and β; iterated pruning is not implemented.
    """
    config = config or FairPruneConfig()
    seed_everything(config.seed)
    loader = mask_loader if config.data == "external" else train_loader
    split_head(model, config.head)  # checks the binary-logit contract
    y, p, a = collect_predictions(model, loader)
    yhat = hard_predictions(p)
    acc = []
    for g in (0, 1):
        if not (a == g).any():
            raise ValueError(f"FairPrune: the data has no sample of attribute group {g}")
        acc.append(float((yhat[a == g] == y[a == g]).mean()))
    privileged = 0 if acc[0] >= acc[1] else 1
    fisher = {}
    for g in (0, 1):
        fisher[g], _, _ = fisher_importance(model, loader, bias=_group_loss(g), progress=progress)
    masks: dict[str, Tensor] = {}
    pruned = 0
    with phase("fastmask.prune"), torch.no_grad():
        for name, param in model.named_parameters():
            keep = torch.ones_like(param, dtype=torch.bool)
            if param.dim() >= 2:
                half_sq = 0.5 * param.detach().float() ** 2
                s_unpriv = half_sq * fisher[1 - privileged][name]
                s_priv = half_sq * fisher[privileged][name]
                score = (s_unpriv - config.beta * s_priv).reshape(-1)
                k = int(round(config.ratio * score.numel()))
                idx = torch.sort(score, stable=True).indices[:k]
                keep.view(-1)[idx] = False
                param.masked_fill_(~keep, 0.0)
                pruned += k
            masks[name] = keep
    result = BaselineResult("fairprune", config, masks)
    result.details = {"privileged_group": privileged, "group_accuracy": acc, "pruned_weights": pruned}
    return result


# ---- mask ablations on the SWiFT / BMFT pipelines -----------------------------------------------------------------


@dataclass
class RandomMaskConfig(SwiftConfig):
    """:class:`fastmask.pipeline.SwiftConfig` plus ``mask_seed``, the seed of the random mask (default: ``seed``,
    or 0 when that is None)."""

    mask_seed: int | None = None


def random_mask_swift(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                      config: RandomMaskConfig | None = None, progress: bool = False) -> BaselineResult:
    """Random mask ([PS] §4.3 ablation; spec §9, §8.19): the SWiFT pipeline (:func:`fastmask.pipeline.swift`) with
    the soft mask replaced by M ~ U[0, 1) per element (:func:`fastmask.masks.random_mask`), head included (so the
    head re-initialisation is random too). No importance pass: ``mask_loader`` is not read."""
    config = config or RandomMaskConfig()
    seed = config.mask_seed if config.mask_seed is not None else (config.seed or 0)
    masks = random_mask(model, seed)
    result = swift(model, mask_loader, train_loader, config=config, masks=masks, progress=progress)
    return _from_pipeline(result, "random-mask", mask_seed=seed)


@dataclass
class HardMaskConfig(SwiftConfig):
    """:class:`fastmask.pipeline.SwiftConfig` plus ``fraction``, the share r of E that is fine-tuned, and
    ``inclusive`` (M = 1[R >= q] instead of 1[R > q])."""

    fraction: float = 0.5
    inclusive: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


def hard_mask_swift(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                    config: HardMaskConfig | None = None, progress: bool = False) -> BaselineResult:
    """Hard-mask ablation ([PS] §5 ablation; spec §9): the SWiFT pipeline with M = 1[R > q], R the importance ratio
    Norm(I_B)/(Norm(I_L) + 1e-10) from the same importance pass as SWiFT (on ``mask_loader``), q the global
    (1 − r)·100-th percentile of R over all non-head tensors (``fastmask.ops.percentile``, as BMFT), so a fraction
    r of E is fine-tuned in step 1 and the rest receives no gradient. The same threshold gives the head's mask, which
    drives SWiFT's head re-initialisation (:func:`fastmask.masks.hard_mask_fraction`)."""
    config = config or HardMaskConfig()
    seed_everything(config.seed)
    _, _, feat_params = split_head(model, config.head)
    ib, il, n_imp = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
    with phase("fastmask.mask"):
        masks = hard_mask_fraction(importance_ratio(ib, il), config.fraction, list(feat_params), config.inclusive)
    checked_masks(masks, model)
    result = swift(model, mask_loader, train_loader, config=config, masks=masks, progress=progress)
    result.n_importance_batches = n_imp
    selected = sum(int(masks[n].sum()) for n in feat_params) / sum(p.numel() for p in feat_params.values())
    return _from_pipeline(result, f"hard-{config.fraction:g}", selected_fraction=selected)


@dataclass
class ManualMaskConfig(BmftConfig):
    """:class:`fastmask.pipeline.BmftConfig` plus the manual mask: ``kind`` ``"bn"`` (every BatchNorm parameter) or
    ``"shallow_conv"`` (the first ``n_shallow`` convolution layers, BMFT's "Top")."""

    kind: Literal["bn", "shallow_conv"] = "bn"
    n_shallow: int = 1


def manual_mask_bmft(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                     config: ManualMaskConfig | None = None, progress: bool = False) -> BaselineResult:
    """BMFT's manual masks ([PB] §3.3 ablation; spec §9): the BMFT pipeline (:func:`fastmask.pipeline.bmft`) with
    the hard mask replaced by M = 1 on all BatchNorm parameters ("BN") or on the shallow convolution layers ("Top"),
    0 elsewhere and on the head (:func:`fastmask.masks.manual_mask`). The impair step (on ``mask_loader``) then moves
    only those parameters' gradients; the head is zeroed and retrained on ``train_loader``. No importance pass."""
    config = config or ManualMaskConfig()
    masks = manual_mask(model, config.kind, config.n_shallow, head=config.head)
    result = bmft(model, mask_loader, train_loader, config=config, masks=masks, progress=progress)
    return _from_pipeline(result, f"manual-{config.kind}", kind=config.kind, n_shallow=config.n_shallow)


# ---- the registry ------------------------------------------------------------------------------------------------

Method = Callable[..., Result]


def _preset(fn: Method, key: str, what: str) -> Method:
    def run(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: Any | None = None,
            progress: bool = False) -> Result:
        return fn(model, mask_loader, train_loader, config=config or DEFAULT_CONFIGS[key](), progress=progress)

    run.__doc__ = f"{fn.__doc__}\n\n    Default: {what}."
    return run


HARD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)

METHODS: dict[str, Method] = {
    "baseline": baseline,
    "swift": swift,
    "bmft": bmft,
    "fullft-rw": fullft_rw,
    "fullft-reg": fullft_reg,
    "fullft-fdr": fullft_fdr,
    "llft": llft,
    "diffgda": diffgda,
    "diffprune": diffprune,
    "fairprune": fairprune,
    "random-mask": random_mask_swift,
    **{f"hard-{r:g}": _preset(hard_mask_swift, f"hard-{r:g}", f"fraction r = {r:g}") for r in HARD_FRACTIONS},
    "manual-bn": _preset(manual_mask_bmft, "manual-bn", "kind 'bn'"),
    "manual-top": _preset(manual_mask_bmft, "manual-top", "kind 'shallow_conv' (the first convolution layer)"),
}
"""Every method by its command-line name; each is called as ``fn(model, mask_loader, train_loader, config=...,
progress=...)``."""

DEFAULT_CONFIGS: dict[str, Callable[[], Any]] = {
    "baseline": BaselineConfig, "swift": SwiftConfig, "bmft": BmftConfig, "fullft-rw": FullFTConfig,
    "fullft-reg": FullFTConfig, "fullft-fdr": FullFTConfig, "llft": LLFTConfig, "diffgda": DiffGdaConfig,
    "diffprune": DiffPruneConfig, "fairprune": FairPruneConfig, "random-mask": RandomMaskConfig,
    **{f"hard-{r:g}": partial(HardMaskConfig, fraction=r) for r in HARD_FRACTIONS},
    "manual-bn": partial(ManualMaskConfig, kind="bn"), "manual-top": partial(ManualMaskConfig, kind="shallow_conv"),
}
"""Each method's default configuration (what ``config=None`` runs), as a factory."""

LABELS: dict[str, str] = {
    "baseline": "Baseline", "swift": "SWiFT", "bmft": "BMFT", "fullft-rw": "FullFT-RW", "fullft-reg": "FullFT-Reg",
    "fullft-fdr": "FullFT-FDR", "llft": "LLFT", "diffgda": "DiffGda", "diffprune": "DiffPrune",
    "fairprune": "FairPrune", "random-mask": "Random mask",
    **{f"hard-{r:g}": f"Hard mask r={r:g}" for r in HARD_FRACTIONS},
    "manual-bn": "BMFT manual BN", "manual-top": "BMFT manual Top",
}
"""The names the comparison table prints."""
