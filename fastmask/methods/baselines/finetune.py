"""The fine-tuning baselines (docs/algorithm.md §9): the unchanged Baseline, full fine-tuning on balanced data
(FullFT-RW), with the fairness regulariser (FullFT-Reg on D_e, FullFT-FDR on D_r), and last-layer fine-tuning
(LLFT); and :func:`finetune`, the one fine-tuning step they (and DiffGda) run on the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastmask.fairness.losses import SWIFT_BIAS, BiasSpec
from fastmask.masking.importance import Objective
from fastmask.methods.configs import StepConfig
from fastmask.methods.engine import Frozen, GuardConfig, guard_before, guard_check, seed_everything, train_step
from fastmask.methods.state import OnEpoch, Result, RunState, rng_state
from fastmask.model.head import split_head
from fastmask.model.scoring import model_device
from fastmask.util.profiling import phase


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
    data: str = "training",
    guard: GuardConfig | None = None,
    after_epoch: Callable[[int], None] | None = None,
    on_epoch: OnEpoch | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One fine-tuning step on the pipeline's loop (:func:`fastmask.methods.engine.train_step`): only ``params`` are
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
        feature_eval: run everything but the head in eval mode (docs/algorithm.md §8.11), e.g. when E is frozen.
        head: module path of the head (default: the last nn.Linear); used by ``feature_eval``.
        name: the step's name in the history and in the guard's checks.
        result: when given, the epochs are appended to ``result.history`` and the guard
            (:mod:`fastmask.methods.engine`) scores ``loader``, named ``data`` in the checks, before and after the
            step, with the tolerances of ``guard`` (default :class:`~fastmask.methods.engine.GuardConfig`()); it
            records in ``result.checks`` and ``result.guard_warnings``.
        after_epoch: called with the epoch number (1-based) after every epoch, e.g. to evaluate a checkpoint.
        on_epoch: called after every epoch (after ``after_epoch``) with a :class:`~fastmask.methods.state.RunState`
            of step ``name`` (a report: a fine-tuning baseline cannot be resumed from it), as SWiFT and BMFT report
            their epochs; :func:`fastmask.methods.selection.select` scores the model there.

    Returns:
        The step's history entries (one per epoch).
    """
    device = model_device(model)
    head_module, _, _ = split_head(model, head)
    history = result.history if result is not None else []
    first = len(history)
    was_training = model.training
    optimizer_masks = None if masks is None else {n: masks[n] for n in params}
    if result is not None:
        guard_before(result, {data: loader}, model, device)
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
            if on_epoch is not None:
                on_epoch(RunState(name, epoch, result or Result(name, None, {}), opt.state_dict(), rng_state()))
    if result is not None:
        guard_check(result, name, data, model, loader, device, guard or GuardConfig())
    model.train(was_training)
    return history[first:]


def all_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


# ---- Baseline and full fine-tuning -------------------------------------------------------------------------------


@dataclass
class BaselineConfig:
    """The Baseline has no settings."""


def baseline(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: BaselineConfig | None = None,
             progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """Baseline ([PS] §4.3, docs/algorithm.md §9): the pretrained ERM model, unchanged. Reads no data and has no
    epochs (``on_epoch`` is never called)."""
    return Result("baseline", config or BaselineConfig(), {})


@dataclass
class FullFTConfig(GuardConfig):
    """Settings of the full fine-tuning baselines (docs/algorithm.md §9).

    Args:
        step: the optimiser; default BMFT ``main.py``'s ``finetune`` loop: SGD(lr_base = 1e-3, momentum 0.9,
            weight decay 5e-4), 20 epochs.
        beta: β of [PS] Eq. 10, L = β·WBCE + (1 − β)·B (FullFT-Reg, FullFT-FDR; ignored by FullFT-RW).
        bias: the bias function B (default SWiFT's [PS] Eqs. 2-4 on log-probabilities).
        head, seed, and the guard's tolerances: as in :class:`fastmask.methods.configs.SwiftConfig`.
    """

    step: StepConfig = StepConfig(20, 1e-3, "sgd", momentum=0.9, weight_decay=5e-4)
    beta: float = 0.1
    bias: BiasSpec | Objective = SWIFT_BIAS
    head: str | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def _full_ft(method: str, model: nn.Module, loader: Iterable, data: str, config: FullFTConfig, wbce_weight: float,
             bias_weight: float, progress: bool, on_epoch: OnEpoch | None) -> Result:
    seed_everything(config.seed)
    result = Result(method, config, {})
    finetune(model, loader, all_named(model), config.step, wbce_weight=wbce_weight, bias_weight=bias_weight,
             bias=config.bias, head=config.head, name=method, result=result, data=data, guard=config,
             on_epoch=on_epoch, progress=progress)
    return result


def fullft_rw(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
              progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """FullFT-RW ([PS] §4.3, docs/algorithm.md §9): fine-tune **all** parameters on the group-balanced ("re-weighted")
    D_r (``train_loader``) with the task loss only, L = WBCE. ``mask_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-rw", model, train_loader, "balanced", config, 1.0, 0.0, progress, on_epoch)


def fullft_reg(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
               progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """FullFT-Reg ([PS] §4.3, [PB] §3.3 "Full FT", docs/algorithm.md §9): fine-tune **all** parameters on the
    **unbalanced** external set D_e (``mask_loader``) with the fairness-regularised L = β·WBCE + (1 − β)·B ([PS] Eq.
    10). ``train_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-reg", model, mask_loader, "external", config, config.beta, 1.0 - config.beta, progress,
                    on_epoch)


def fullft_fdr(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: FullFTConfig | None = None,
               progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """FullFT-FDR (Le et al. 2023, fairness via data balancing and regularisation; BMFT's ``FullFT_RWReg``; spec
    §9): fine-tune **all** parameters on the group-balanced D_r (``train_loader``) with
    L = β·WBCE + (1 − β)·B ([PS] Eq. 10). ``mask_loader`` is not read."""
    config = config or FullFTConfig()
    return _full_ft("fullft-fdr", model, train_loader, "balanced", config, config.beta, 1.0 - config.beta, progress,
                    on_epoch)


# ---- LLFT --------------------------------------------------------------------------------------------------------


@dataclass
class LLFTConfig(GuardConfig):
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
        head, seed, and the guard's tolerances: as in :class:`fastmask.methods.configs.SwiftConfig`.
    """

    step: StepConfig = StepConfig(20, 1e-3, "sgd", momentum=0.9, weight_decay=5e-4)
    beta: float = 0.1
    bias: BiasSpec | Objective = SWIFT_BIAS
    reinit: Literal["reset", "zero", "none"] = "reset"
    feature_eval: bool = True
    head: str | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reinit not in ("reset", "zero", "none"):
            raise ValueError(f"reinit must be 'reset', 'zero' or 'none', got {self.reinit!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def llft(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: LLFTConfig | None = None,
         progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """LLFT, last-layer fairness fine-tuning (Mao et al. 2023; [PB] §3.3; docs/algorithm.md §9): freeze the feature
    extractor E, re-initialise the head C and train **only the head** on the group-balanced D_r (``train_loader``) with
    the fairness-regularised L = WBCE + β·B. E stays bit-identical; ``mask_loader`` is not read."""
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
    result = Result("llft", config, {}, head_reset_fraction=0.0 if config.reinit == "none" else 1.0)
    finetune(model, train_loader, head_params, config.step, wbce_weight=1.0, bias_weight=config.beta,
             bias=config.bias, feature_eval=config.feature_eval, head=config.head, name="llft", result=result,
             data="balanced", guard=config, on_epoch=on_epoch, progress=progress)
    return result
