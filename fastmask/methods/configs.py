"""The settings of SWiFT and BMFT (docs/algorithm.md §5, §7, §8) and of one fine-tuning step.

Defaults follow the authors' code where it makes a modelling choice and docs/algorithm.md §8's resolution where
it has a plain bug; ``faithful=True`` checks that every quirk option holds the authors' value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastmask.fairness.losses import BMFT_BIAS, SWIFT_BIAS, BiasSpec
from fastmask.masking.importance import Objective
from fastmask.methods.engine import GuardConfig
from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastmask.parallel import fsdp

Task = Literal["skin", "cxr"]
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class StepConfig:
    """The optimiser and length of one fine-tuning step. The learning rate is constant: the authors' code creates a
    cosine scheduler but never steps it (docs/algorithm.md §8.12).

    Args:
        epochs: passes over the step's loader.
        lr: learning rate.
        optimizer: ``"sgd"`` (fastmask.optim.MaskedSGD), ``"adam"`` (MaskedAdam) or ``"adamw"`` (MaskedAdamW).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 decay (SGD, Adam) or decoupled decay (AdamW).
        betas, eps: Adam's.
    """

    epochs: int
    lr: float
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"StepConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 0:
            raise ValueError(f"StepConfig.epochs must be >= 0, got {self.epochs}")
        if not self.lr >= 0:
            raise ValueError(f"StepConfig.lr must be >= 0, got {self.lr}")

    def build(self, params: list[tuple[str, nn.Parameter]], masks: Mapping[str, Tensor] | None,
              mask_mode: str) -> torch.optim.Optimizer:
        """The masked optimizer over ``params`` (named), with ``masks`` keyed by name; for FSDP2-sharded parameters
        over their local shards (the masks are then the local shards' masks)."""
        params = fsdp.shard_views(params)
        common = {"masks": masks, "mask_mode": mask_mode}
        if self.optimizer == "sgd":
            return MaskedSGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, **common)
        cls = MaskedAdam if self.optimizer == "adam" else MaskedAdamW
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, **common)


def authors_step(task: Task, lr: float, epochs: int) -> StepConfig:
    """The authors' code's optimiser for ``task`` (docs/algorithm.md §5): skin SGD(lr, momentum 0.9, weight decay 5e-4);
    CXR Adam(lr, betas (0.9, 0.999), eps 1e-8, no weight decay)."""
    if task == "skin":
        return StepConfig(epochs, lr, "sgd", momentum=0.9, weight_decay=5e-4)
    if task == "cxr":
        return StepConfig(epochs, lr, "adam", momentum=0.0, weight_decay=0.0)
    raise ValueError(f"task must be 'skin' or 'cxr', got {task!r}")


def _check_faithful(config: Any, reference: Mapping[str, Any]) -> None:
    """With faithful=True every quirk option must hold the authors' value; name the first that does not."""
    for name, ref in reference.items():
        value = getattr(config, name)
        if value != ref:
            raise ValueError(
                f"{type(config).__name__}(faithful=True) reproduces the authors' code, which uses {name}={ref!r}; "
                f"got {name}={value!r}. Set faithful=False to use this option."
            )


def _check_common(config: Any) -> None:
    GuardConfig.__post_init__(config)
    if config.mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {config.mask_mode!r}")
    if not isinstance(config.bias, BiasSpec) and not callable(config.bias):
        raise TypeError(f"bias must be a BiasSpec or a callable (z, y, a) -> loss, got {type(config.bias).__name__}")


@dataclass
class SwiftConfig(GuardConfig):
    """SWiFT's settings (docs/algorithm.md §5, §7, §8). Defaults follow the authors' code where it makes a modelling
    choice and docs/algorithm.md §8's resolution where it has a plain bug; ``faithful=True`` checks that every quirk
    option holds the authors' value.

    Args:
        task: ``"skin"`` or ``"cxr"``: picks the authors' optimiser of both steps when ``step1`` / ``step2`` are
            not given (skin SGD momentum 0.9, weight decay 5e-4; CXR Adam).
        beta: β of [PS] Eq. 10 (authors' ``--beta`` default 0.1; README 0.01): step 1 minimises
            β·WBCE + (1 − β)·B, step 2 (1 − β)·WBCE + β·B.
        bias: the bias function (default SWiFT [PS] Eqs. 2-4 on log-probabilities, docs/algorithm.md §8.1).
        step1: E's optimiser (default: the task's optimiser, lr 1e-4 = ``lr_forget``, 10 epochs).
        step2: the head's optimiser (default: the task's optimiser, lr 1e-3 = ``lr_base``, 10 epochs).
        mask_mode: ``"grad"`` (authors' code: g ← M ⊙ g, so weight decay and momentum bypass the mask and Adam cancels a
            constant mask, docs/algorithm.md §8.9-8.10) or ``"update"`` (Δθ ← M ⊙ Δθ).
        reinit_cmp: ``"gt"`` (authors' code: θ[M > γ] = 0, the head bias is never reset) or ``"ge"`` ([PS] Eq. 12).
        reinit_scope: ``"tensor"`` (authors' code: γ = mean of each head tensor's mask) or ``"head"`` (γ = the mean over
            all head parameters, [PS] Eq. 12).
        step2_feature_eval: run E in eval mode during step 2 (docs/algorithm.md §8.11). Authors' code: False, so
            the frozen E's BatchNorm statistics keep drifting during step 2.
        head: module path of the head (default: the last nn.Linear).
        seed: seeds Python's, NumPy's and torch's global RNGs (dropout, DataLoader shuffling) at the start; None
            leaves them alone. Authors' code: 42.
        collapse_threshold, share_tolerance, max_acc_drop: the guard's tolerances (keyword-only;
            :class:`~fastmask.methods.engine.GuardConfig`).
        faithful: require the authors' value of every quirk option (``mask_mode``, ``reinit_cmp``,
            ``reinit_scope``, ``step2_feature_eval`` and the task's optimiser type,
            momentum and weight decay in both steps).
    """

    task: Task = "skin"
    beta: float = 0.1
    bias: BiasSpec | Objective = SWIFT_BIAS
    step1: StepConfig | None = None
    step2: StepConfig | None = None
    mask_mode: Literal["grad", "update"] = "grad"
    reinit_cmp: Literal["gt", "ge"] = "gt"
    reinit_scope: Literal["tensor", "head"] = "tensor"
    step2_feature_eval: bool = False
    head: str | None = None
    seed: int | None = 42
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.step1 is None:
            self.step1 = authors_step(self.task, 1e-4, 10)
        if self.step2 is None:
            self.step2 = authors_step(self.task, 1e-3, 10)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        _check_common(self)
        check_reinit(self.reinit_cmp, self.reinit_scope)
        if self.faithful:
            _check_faithful(self, {"mask_mode": "grad", "reinit_cmp": "gt", "reinit_scope": "tensor",
                                   "step2_feature_eval": False})
            _check_faithful_steps(self, ("step1", "step2"))


@dataclass
class BmftConfig(GuardConfig):
    """BMFT's settings (docs/algorithm.md §4-5, §7, §8). Defaults as :class:`SwiftConfig`: the authors' modelling
    choices, and docs/algorithm.md §8's resolutions.

    Args:
        beta: β of the repair loss WBCE + β·B ([PB] Eq. 5; authors' default 0.1, paper 0.02).
        bias: the bias function (default: the authors' ``eodds`` on logits; [PB] Eq. 2 is ``BMFT_PAPER_BIAS``).
        rate: the percentile **rate** of the hard mask; ≈ (100 − rate) % of E is fine-tuned (docs/algorithm.md §8.13).
        inclusive: hard mask 1[R >= α] instead of the authors' strict 1[R > α].
        impair: the impair step's optimiser (default SGD, lr 1e-4 = ``lr_forget``, momentum 0.9, weight decay 5e-4,
            5 epochs (docs/algorithm.md §8.14); faithful: 10 epochs as in the code).
        repair: the repair step's optimiser (default SGD lr 1e-3 = ``lr_base``, same epochs as ``impair``).
        impair_data: ``"external"`` (authors' code: the impair step runs on the unbalanced ``mask_loader``) or
            ``"balanced"`` ([PB]: on ``train_loader``).
        mask_mode, step2_feature_eval, head, seed, and the guard's tolerances: as in :class:`SwiftConfig` (step 2 is the
            repair step).
        faithful: require the authors' value of every quirk option (``mask_mode``, ``impair_data``, ``inclusive``,
            ``step2_feature_eval``, SGD with momentum 0.9 and weight decay 5e-4 in both
            steps) and default to 10 + 10 epochs.
    """

    beta: float = 0.1
    bias: BiasSpec | Objective = BMFT_BIAS
    rate: float = 50.0
    inclusive: bool = False
    impair: StepConfig | None = None
    repair: StepConfig | None = None
    impair_data: Literal["external", "balanced"] = "external"
    mask_mode: Literal["grad", "update"] = "grad"
    step2_feature_eval: bool = False
    head: str | None = None
    seed: int | None = 42
    faithful: bool = False

    def __post_init__(self) -> None:
        epochs = 10 if self.faithful else 5
        if self.impair is None:
            self.impair = authors_step("skin", 1e-4, epochs)
        if self.repair is None:
            self.repair = authors_step("skin", 1e-3, epochs)
        if not 0.0 <= self.rate <= 100.0:
            raise ValueError(f"rate must be in [0, 100], got {self.rate}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.impair_data not in ("external", "balanced"):
            raise ValueError(f"impair_data must be 'external' or 'balanced', got {self.impair_data!r}")
        _check_common(self)
        if self.faithful:
            _check_faithful(self, {"mask_mode": "grad", "impair_data": "external", "inclusive": False,
                                   "step2_feature_eval": False})
            _check_faithful_steps(self, ("impair", "repair"), task="skin")


def check_reinit(cmp: str, scope: str) -> None:
    if cmp not in ("gt", "ge"):
        raise ValueError(f"reinit_cmp must be 'gt' or 'ge', got {cmp!r}")
    if scope not in ("tensor", "head"):
        raise ValueError(f"reinit_scope must be 'tensor' or 'head', got {scope!r}")


def _check_faithful_steps(config: Any, names: tuple[str, str], task: Task | None = None) -> None:
    ref = authors_step(task or config.task, 0.0, 0)
    for name in names:
        step: StepConfig = getattr(config, name)
        # momentum matters to SGD only, betas and eps to Adam only
        relevant = ("momentum",) if ref.optimizer == "sgd" else ("betas", "eps")
        for attr in ("optimizer", "weight_decay", *relevant):
            if getattr(step, attr) != getattr(ref, attr):
                raise ValueError(
                    f"{type(config).__name__}(faithful=True): the authors' {name} optimiser has "
                    f"{attr}={getattr(ref, attr)!r}, got {getattr(step, attr)!r}. Set faithful=False to change it."
                )


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
