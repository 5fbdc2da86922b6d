"""SWiFT and BMFT end to end: importance → mask → step 1 → head re-initialisation → step 2 (spec §5, §8).

Both functions modify the model **in place** and return a :class:`Result` (masks, per-epoch history, collapse
warnings, the resolved configuration).

SWiFT (:func:`swift`, [PS] §3):

1. M = tanh(R) from I_B (bias on log-probabilities) and I_L (WBCE) over ``mask_loader`` (spec §3-4).
2. Step 1: the head frozen, E trained on ``train_loader`` with L = β·WBCE + (1 − β)·B ([PS] Eq. 10), the mask
   applied by the masked optimizer (g ← M ⊙ g, or Δθ ← M ⊙ Δθ with ``mask_mode="update"``).
3. Head re-initialisation: θ_t[M_t > mean(M_t)] = 0 per head tensor ([PS] Eq. 12 with the reference's strict ``>``
   and per-tensor mean; ``reinit_cmp`` / ``reinit_scope`` switch to ``>=`` / the mean over the whole head).
4. Step 2: E frozen, the head trained with L = (1 − β)·WBCE + β·B, no mask.

BMFT (:func:`bmft`, [PB] §2): M = 1[R > percentile_rate(R over E)] from the bias on logits (head mask 0); impair
step over all parameters with L = B only on the **unbalanced** external data (the reference's choice); the head set
to 0; repair step on the head with L = WBCE + β·B ([PB] Eq. 5).

Resumable runs: ``on_epoch`` receives a :class:`RunState` once the masks are ready and after every finished epoch
(model weights aside, everything needed to continue: masks, history, the step's optimizer state, the global RNG
states); passing a saved one back as ``resume=`` (with the model's weights at that point) skips what was done and
continues the run so that it ends exactly as an uninterrupted one would.

Collapse guard: SWiFT's log-probability bias is minimised by predicting one class for everyone (EOdds 0, a useless
model). After each step the pipeline predicts on that step's data in eval mode and, when one class takes
``collapse_threshold`` (95 %) or more of the predictions while its share of the labels is below that, logs a warning
and records a :class:`CollapseWarning` in the result.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastmask import distributed
from fastmask.importance import Objective, fisher_importance, unpack_batch
from fastmask.losses import BMFT_BIAS, SWIFT_BIAS, BiasSpec, combined_loss
from fastmask.masks import hard_mask, soft_mask
from fastmask.models import split_head
from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastmask.profiling import phase, ranged

__all__ = ["StepConfig", "SwiftConfig", "BmftConfig", "CollapseWarning", "Result", "RunState", "swift", "bmft",
           "reinit_head", "seed_everything", "model_device", "train_step", "collapse_check", "Frozen", "checked_masks"]

log = logging.getLogger(__name__)

Task = Literal["skin", "cxr"]
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class StepConfig:
    """The optimiser and length of one fine-tuning step. The learning rate is constant: the reference creates a
    cosine scheduler but never steps it (spec §8.12).

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
        params = distributed.shard_views(params)
        common = {"masks": masks, "mask_mode": mask_mode}
        if self.optimizer == "sgd":
            return MaskedSGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, **common)
        cls = MaskedAdam if self.optimizer == "adam" else MaskedAdamW
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, **common)


def reference_step(task: Task, lr: float, epochs: int) -> StepConfig:
    """The reference code's optimiser for ``task`` (spec §5): skin SGD(lr, momentum 0.9, weight decay 5e-4); CXR
    Adam(lr, betas (0.9, 0.999), eps 1e-8, no weight decay)."""
    if task == "skin":
        return StepConfig(epochs, lr, "sgd", momentum=0.9, weight_decay=5e-4)
    if task == "cxr":
        return StepConfig(epochs, lr, "adam", momentum=0.0, weight_decay=0.0)
    raise ValueError(f"task must be 'skin' or 'cxr', got {task!r}")


def _check_faithful(config: Any, reference: Mapping[str, Any]) -> None:
    """With faithful=True every quirk option must hold the reference value; name the first that does not."""
    for name, ref in reference.items():
        value = getattr(config, name)
        if value != ref:
            raise ValueError(
                f"{type(config).__name__}(faithful=True) reproduces the reference code, which uses {name}={ref!r}; "
                f"got {name}={value!r}. Set faithful=False to use this option."
            )


def _check_common(config: Any) -> None:
    if config.mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {config.mask_mode!r}")
    if not 0.5 < config.collapse_threshold <= 1.0:
        raise ValueError(f"collapse_threshold must be in (0.5, 1], got {config.collapse_threshold}")
    if not isinstance(config.bias, BiasSpec) and not callable(config.bias):
        raise TypeError(f"bias must be a BiasSpec or a callable (z, y, a) -> loss, got {type(config.bias).__name__}")


@dataclass
class SwiftConfig:
    """SWiFT's settings (spec §5, §7, §8). Defaults follow the reference code where it makes a modelling choice and
    spec §8's resolution where it has a plain bug; ``faithful=True`` checks that every quirk option holds the
    reference value.

    Args:
        task: ``"skin"`` or ``"cxr"``: picks the reference optimiser of both steps when ``step1`` / ``step2`` are
            not given (skin SGD momentum 0.9, weight decay 5e-4; CXR Adam).
        beta: β of [PS] Eq. 10 (reference ``--beta`` default 0.1; README 0.01): step 1 minimises
            β·WBCE + (1 − β)·B, step 2 (1 − β)·WBCE + β·B.
        bias: the bias function (default SWiFT [PS] Eqs. 2-4 on log-probabilities, spec §8.1).
        step1: E's optimiser (default: the task's optimiser, lr 1e-4 = ``lr_forget``, 10 epochs).
        step2: the head's optimiser (default: the task's optimiser, lr 1e-3 = ``lr_base``, 10 epochs).
        mask_mode: ``"grad"`` (reference: g ← M ⊙ g, so weight decay and momentum bypass the mask and Adam cancels a
            constant mask, spec §8.9-8.10) or ``"update"`` (Δθ ← M ⊙ Δθ).
        reinit_cmp: ``"gt"`` (reference: θ[M > γ] = 0, the head bias is never reset) or ``"ge"`` ([PS] Eq. 12).
        reinit_scope: ``"tensor"`` (reference: γ = mean of each head tensor's mask) or ``"head"`` (γ = the mean over
            all head parameters, [PS] Eq. 12).
        step2_feature_eval: run E in eval mode during step 2 (spec §8.11). Reference: False, so the frozen E's
            BatchNorm statistics keep drifting during step 2.
        head: module path of the head (default: the last nn.Linear).
        seed: seeds Python's, NumPy's and torch's global RNGs (dropout, DataLoader shuffling) at the start; None
            leaves them alone. Reference: 42.
        collapse_threshold: share of predictions in one class at which the collapse guard fires.
        faithful: require the reference value of every quirk option (``mask_mode``, ``reinit_cmp``,
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
    collapse_threshold: float = 0.95
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.step1 is None:
            self.step1 = reference_step(self.task, 1e-4, 10)
        if self.step2 is None:
            self.step2 = reference_step(self.task, 1e-3, 10)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        _check_common(self)
        _check_reinit(self.reinit_cmp, self.reinit_scope)
        if self.faithful:
            _check_faithful(self, {"mask_mode": "grad", "reinit_cmp": "gt", "reinit_scope": "tensor",
                                   "step2_feature_eval": False})
            _check_faithful_steps(self, ("step1", "step2"))


@dataclass
class BmftConfig:
    """BMFT's settings (spec §4-5, §7, §8). Defaults as :class:`SwiftConfig`: the reference's modelling choices, and
    spec §8's resolutions.

    Args:
        beta: β of the repair loss WBCE + β·B ([PB] Eq. 5; reference default 0.1, paper 0.02).
        bias: the bias function (default: the reference's ``eodds`` on logits; [PB] Eq. 2 is ``BMFT_PAPER_BIAS``).
        rate: the percentile **rate** of the hard mask; ≈ (100 − rate) % of E is fine-tuned (spec §8.13).
        inclusive: hard mask 1[R >= α] instead of the reference's strict 1[R > α].
        impair: the impair step's optimiser (default SGD, lr 1e-4 = ``lr_forget``, momentum 0.9, weight decay 5e-4,
            5 epochs (spec §8.14); faithful: 10 epochs as in the code).
        repair: the repair step's optimiser (default SGD lr 1e-3 = ``lr_base``, same epochs as ``impair``).
        impair_data: ``"external"`` (reference: the impair step runs on the unbalanced ``mask_loader``) or
            ``"balanced"`` ([PB]: on ``train_loader``).
        mask_mode, step2_feature_eval, head, seed, collapse_threshold: as in :class:`SwiftConfig` (step 2 is the
            repair step).
        faithful: require the reference value of every quirk option (``mask_mode``, ``impair_data``, ``inclusive``,
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
    collapse_threshold: float = 0.95
    faithful: bool = False

    def __post_init__(self) -> None:
        epochs = 10 if self.faithful else 5
        if self.impair is None:
            self.impair = reference_step("skin", 1e-4, epochs)
        if self.repair is None:
            self.repair = reference_step("skin", 1e-3, epochs)
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


def _check_reinit(cmp: str, scope: str) -> None:
    if cmp not in ("gt", "ge"):
        raise ValueError(f"reinit_cmp must be 'gt' or 'ge', got {cmp!r}")
    if scope not in ("tensor", "head"):
        raise ValueError(f"reinit_scope must be 'tensor' or 'head', got {scope!r}")


def _check_faithful_steps(config: Any, names: tuple[str, str], task: Task | None = None) -> None:
    ref = reference_step(task or config.task, 0.0, 0)
    for name in names:
        step: StepConfig = getattr(config, name)
        # momentum matters to SGD only, betas and eps to Adam only
        relevant = ("momentum",) if ref.optimizer == "sgd" else ("betas", "eps")
        for attr in ("optimizer", "weight_decay", *relevant):
            if getattr(step, attr) != getattr(ref, attr):
                raise ValueError(
                    f"{type(config).__name__}(faithful=True): the reference's {name} optimiser has "
                    f"{attr}={getattr(ref, attr)!r}, got {getattr(step, attr)!r}. Set faithful=False to change it."
                )


@dataclass
class CollapseWarning:
    """One firing of the collapse guard: after ``step``, ``positive_share`` of the predictions were positive while
    ``label_positive_rate`` of the labels were."""

    step: str
    positive_share: float
    label_positive_rate: float
    message: str


@dataclass
class Result:
    """What a debiasing run produced. The model itself is modified in place.

    Attributes:
        method: ``"swift"`` or ``"bmft"``.
        config: the resolved configuration.
        masks: the mask of every parameter, keyed by ``model.named_parameters()`` names.
        history: one dict per epoch: ``step``, ``epoch``, ``loss`` (mean over batches) and ``positive_share`` (share
            of the step's training predictions with p > 0.5).
        checks: one dict per step: ``step``, ``positive_share`` and ``label_positive_rate`` in eval mode on the
            step's data (what the collapse guard looked at).
        collapse_warnings: the collapse guard's findings (empty when healthy).
        n_importance_batches: batches seen by the importance pass (0 when masks were given).
        head_reset_fraction: share of the head's elements set to 0 by the re-initialisation.
    """

    method: str
    config: SwiftConfig | BmftConfig
    masks: dict[str, Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    collapse_warnings: list[CollapseWarning] = field(default_factory=list)
    n_importance_batches: int = 0
    head_reset_fraction: float = 0.0

    def config_dict(self) -> dict[str, Any]:
        """The configuration as plain data (BiasSpec and StepConfig expanded)."""
        out = {}
        for f in fields(self.config):
            v = getattr(self.config, f.name)
            out[f.name] = asdict(v) if isinstance(v, (StepConfig, BiasSpec)) else v
        return out


@dataclass
class RunState:
    """Where a run stands: given to ``on_epoch`` once the masks are ready (``epoch=0``) and after every finished
    epoch; given back as ``resume=`` it continues the run from there. The caller saves the model's ``state_dict()``
    beside it (and, if its loaders depend on how often they were iterated, their positions).

    The tensors are the live ones (``optimizer`` is ``optimizer.state_dict()``): serialise them in the callback.

    Attributes:
        step: the step in progress (SWiFT ``"step1"`` / ``"step2"``, BMFT ``"impair"`` / ``"repair"``).
        epoch: epochs of ``step`` finished.
        result: the result so far (masks, history, checks, collapse warnings, head_reset_fraction).
        optimizer: the step's optimizer state (None when no epoch of the step has run).
        rng: the global RNG states (``random``, ``numpy``, ``torch``, and ``cuda`` when CUDA is initialised).
    """

    step: str
    epoch: int
    result: Result
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]


OnEpoch = Callable[[RunState], None]


def _rng_state() -> dict[str, Any]:
    """The global RNG states that a run draws from (dropout, DataLoader seeds, user code)."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`_rng_state`."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _Progress:
    """Which steps and epochs a (possibly resumed) run still has to do, and the ``on_epoch`` reports."""

    def __init__(self, method: str, steps: tuple[str, str], on_epoch: OnEpoch | None, resume: RunState | None):
        if resume is not None:
            if resume.result.method != method:
                raise ValueError(f"resume: the saved run is {resume.result.method!r}, not {method!r}")
            if resume.step not in steps:
                raise ValueError(f"resume: unknown step {resume.step!r} (the {method} steps are {list(steps)})")
        self.steps = steps
        self.on_epoch = on_epoch
        self.resume = resume

    def skip(self, step: str) -> bool:
        """True for a step that the resumed run had finished."""
        return self.resume is not None and self.steps.index(step) < self.steps.index(self.resume.step)

    def start(self, step: str) -> tuple[int, dict[str, Any] | None]:
        """(epochs of ``step`` already done, its optimizer state)."""
        if self.resume is not None and self.resume.step == step:
            return self.resume.epoch, self.resume.optimizer
        return 0, None

    def report(self, step: str, epoch: int, result: Result, optimizer: torch.optim.Optimizer | None) -> None:
        if self.on_epoch is not None:
            state = None if optimizer is None else optimizer.state_dict()
            self.on_epoch(RunState(step, epoch, result, state, _rng_state()))


def _resumed(resume: RunState | None, masks: Mapping[str, Tensor] | None, config: SwiftConfig | BmftConfig,
             model: nn.Module) -> Result | None:
    """The resumed result (masks checked against ``model``, RNG restored), or None for a fresh run."""
    if resume is None:
        return None
    if masks is not None:
        raise ValueError("pass either masks= or resume= (a resumed run keeps its saved masks)")
    checked_masks(resume.result.masks, model)
    _set_rng_state(resume.rng)
    return replace(resume.result, config=config)


# ---- building blocks ---------------------------------------------------------------------------------------------


def seed_everything(seed: int | None) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed`` (None: leave them as they are)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter; a model without parameters is an error naming its class."""
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no parameters")
    return p.device


def _set_modes(model: nn.Module, head: nn.Module, feature_eval: bool) -> None:
    """Train mode for the whole model, or eval mode for E and train mode for the head."""
    if feature_eval:
        model.eval()
        head.train()
    else:
        model.train()


@torch.no_grad()
def reinit_head(
    head_params: Mapping[str, nn.Parameter],
    masks: Mapping[str, Tensor],
    cmp: Literal["gt", "ge"] = "gt",
    scope: Literal["tensor", "head"] = "tensor",
) -> float:
    """SWiFT's partial head re-initialisation ([PS] Eq. 12, spec §5 step 2): θ_t[M_t > γ] = 0.

    γ is the mean of M_t for each head tensor t (``scope="tensor"``, the reference) or the mean over every head
    element (``scope="head"``, the paper); ``cmp="ge"`` uses ``>=`` (the paper) instead of the reference's ``>``.
    With ``gt`` and ``tensor`` a 1-element tensor (the head bias) is never reset. Returns the share of head elements
    set to 0.
    """
    _check_reinit(cmp, scope)
    missing = [n for n in head_params if n not in masks]
    if missing:
        raise ValueError(f"reinit_head: no mask for head parameter {missing[0]!r}")
    # FSDP2: the masks and the reset are this rank's shards', the means are over every rank's shard
    sharded = distributed.is_sharded(head_params.values())
    params = {n: distributed.local(p) for n, p in head_params.items()}
    m = {n: masks[n].detach().to(p.device, torch.float32) for n, p in params.items()}
    if sharded:
        sums, counts = distributed.shard_sums(list(m.values()))
        means = {n: s / max(c, 1) for n, s, c in zip(m, sums, counts, strict=True)}
    if scope == "head":
        total = sum(counts) if sharded else sum(t.numel() for t in m.values())
        gamma_all = (sum(sums) if sharded else sum(t.sum() for t in m.values())) / total
    reset = 0
    total_elems = 0
    for n, p in params.items():
        gamma = (means[n] if sharded else m[n].mean()) if scope == "tensor" else gamma_all
        sel = m[n] >= gamma if cmp == "ge" else m[n] > gamma
        p.masked_fill_(sel, 0.0)
        reset += int(sel.sum())
        total_elems += p.numel()
    if sharded:
        reset, total_elems = distributed.all_reduce_counts([reset, total_elems])
    return reset / max(total_elems, 1)


def train_step(
    name: str,
    model: nn.Module,
    head: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    wbce_weight: float,
    bias_weight: float,
    bias: BiasSpec | Objective,
    feature_eval: bool,
    device: torch.device,
    history: list[dict[str, Any]],
    progress: bool,
    start: int = 0,
    after_epoch: Callable[[int], None] | None = None,
) -> None:
    """Epochs ``start + 1 .. epochs`` of step ``name``: zero-grad → forward → loss → backward → (masked) optimizer
    step, the loss ``wbce_weight``·WBCE + ``bias_weight``·bias term (spec §5); ``after_epoch(e)`` after each, and a
    {"step", "epoch", "loss", "positive_share"} row per epoch appended to ``history``."""
    for epoch in tqdm(range(start, epochs), desc=name, disable=not progress, leave=False, initial=start,
                      total=epochs):
        _set_modes(model, head, feature_eval)
        total, n_batches, positives, seen = 0.0, 0, 0, 0
        for batch in ranged(tqdm(loader, desc=f"{name} epoch {epoch + 1}", disable=not progress, leave=False)):
            x, y, a = unpack_batch(batch, device)
            optimizer.zero_grad(set_to_none=True)
            # Under torchrun: the global batch's loss, this rank's share of its gradient, summed over the ranks
            # before the (masked) step, so every rank takes the same step (fastmask.distributed).
            z, y, a = distributed.global_batch(model(x), y, a)
            loss = combined_loss(z, y, a, wbce_weight=wbce_weight, bias_weight=bias_weight, bias=bias)
            distributed.backward(loss, [p for group in optimizer.param_groups for p in group["params"]])
            optimizer.step()
            distributed.broadcast_buffers(model)
            total += float(loss.detach())
            n_batches += 1
            positives += int((z.detach() > 0).sum())
            seen += z.shape[0]
        if n_batches == 0:
            raise ValueError(f"{name}: the loader yielded no batches")
        history.append({"step": name, "epoch": epoch + 1, "loss": total / n_batches,
                        "positive_share": positives / seen})
        if after_epoch is not None:
            after_epoch(epoch + 1)


@torch.no_grad()
def _positive_share(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, float]:
    """(share of predictions with p > 0.5, share of positive labels) in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    pos, lab, n = 0, 0.0, 0
    for batch in ranged(loader):
        x, y, _ = unpack_batch(batch, device)
        z = model(x).reshape(-1)
        pos += int((z > 0).sum())  # p = σ(z) > 0.5 ⇔ z > 0, as np.round(p) predicts (spec §6)
        lab += float(y.reshape(-1).float().sum())
        n += z.shape[0]
    model.train(was_training)
    pos, lab, n = distributed.all_reduce_counts([pos, lab, n], device)  # every rank's samples (torchrun)
    return pos / n, lab / n


def collapse_check(result: Result, step: str, model: nn.Module, loader: Iterable, device: torch.device,
                   threshold: float) -> None:
    """The collapse guard after ``step``: record the positive-prediction and positive-label shares over ``loader`` in
    ``result.checks``, and warn (log and ``result.collapse_warnings``) when at least ``threshold`` of the predictions
    fall in one class while less than ``threshold`` of the labels do."""
    with phase("fastmask.evaluate"):
        share, label_rate = _positive_share(model, loader, device)
    result.checks.append({"step": step, "positive_share": share, "label_positive_rate": label_rate})
    for cls, pred, lab in (("positive", share, label_rate), ("negative", 1 - share, 1 - label_rate)):
        if pred >= threshold and lab < threshold:
            msg = (f"collapse guard: after {step}, {pred:.1%} of the predictions are {cls} while {lab:.1%} of the "
                   f"labels are; the model may have collapsed to one class (lower the step's learning rate or raise "
                   f"the WBCE weight)")
            log.warning(msg)
            result.collapse_warnings.append(CollapseWarning(step, share, label_rate, msg))


class Frozen:
    """Context manager: only ``trainable`` parameters of ``model`` require grad for a step; every original flag is
    restored on exit."""

    def __init__(self, model: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
        self.model = model
        self.trainable = {id(p) for p in trainable}

    def __enter__(self) -> None:
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.trainable)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)


# ---- the two methods ---------------------------------------------------------------------------------------------


def _begin(method: str, steps: tuple[str, str], model: nn.Module, mask_loader: Iterable, config: Any,
           masks: Mapping[str, Tensor] | None, build_mask: Any, progress: bool, on_epoch: Any,
           resume: Any) -> tuple:
    """What SWiFT and BMFT share before their first step: seeding, the head / feature-extractor split, and the masks
    (importance pass + ``build_mask(I_b, I_l, feature_names, sharded)``, which may overwrite I_b: the importances are
    dropped once the masks exist), or the state of a resumed run."""
    seed_everything(config.seed)
    device = model_device(model)
    head, head_params, feat_params = split_head(model, config.head)
    run = _Progress(method, steps, on_epoch, resume)
    if resume is not None and distributed.is_sharded(model):
        raise ValueError(f"{method}: resuming is not supported for FSDP-sharded models (the run state holds one "
                         "rank's shards)")
    result = _resumed(resume, masks, config, model)
    if result is None:
        n_imp = 0
        if masks is None:
            ib, il, n_imp = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
            with phase("fastmask.mask"):  # FSDP2: ib, il and the masks are this rank's shards
                masks = build_mask(ib, il, list(feat_params), distributed.is_sharded(model))
        masks = checked_masks(masks, model)
        result = Result(method, config, dict(masks), n_importance_batches=n_imp)
        run.report(steps[0], 0, result, None)
    return device, head, head_params, feat_params, run, result


def swift(
    model: nn.Module,
    mask_loader: Iterable,
    train_loader: Iterable,
    *,
    config: SwiftConfig | None = None,
    masks: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    on_epoch: OnEpoch | None = None,
    resume: RunState | None = None,
) -> Result:
    """Debias ``model`` in place with SWiFT ([PS]; spec §3-5).

    Args:
        model: a binary classifier f = C∘E returning one logit per sample.
        mask_loader: batches (x, y, a, ...) for the importance pass; the reference uses the **unbalanced** external
            set D_e with test transforms (spec §1, §8.5).
        train_loader: batches for both fine-tuning steps; the reference uses the group-balanced D_r
            (:func:`fastmask.balance.group_balance`) with training augmentation.
        config: :class:`SwiftConfig` (default: the reference settings for skin).
        masks: use these masks instead of computing them (e.g. :func:`fastmask.masks.random_mask`); keyed by
            parameter name, every parameter present.
        progress: show tqdm progress bars.
        on_epoch: called with a :class:`RunState` once the masks are ready and after every finished epoch (to
            checkpoint the run, or to evaluate it per epoch; it must not draw from the global RNGs).
        resume: a saved :class:`RunState`; ``model`` must hold the weights saved with it. The run continues after
            its last finished epoch and ends as the uninterrupted run would (same data order given loaders in
            the same position, same RNG draws).
    """
    config = config or SwiftConfig()
    device, head, head_params, feat_params, run, result = _begin(
        "swift", ("step1", "step2"), model, mask_loader, config, masks,
        lambda ib, il, feat, sharded: soft_mask(ib, il, sharded=sharded, overwrite=True),
        progress, on_epoch, resume)
    masks = result.masks
    was_training = model.training

    if not run.skip("step1"):
        start, state = run.start("step1")
        with phase("fastmask.step1"), Frozen(model, feat_params.values()):
            opt = config.step1.build(list(feat_params.items()), {n: masks[n] for n in feat_params}, config.mask_mode)
            if state is not None:
                opt.load_state_dict(state)
            train_step("step1", model, head, train_loader, opt, config.step1.epochs, config.beta, 1 - config.beta,
                       config.bias, False, device, result.history, progress, start,
                       lambda e: run.report("step1", e, result, opt))
        collapse_check(result, "step1", model, train_loader, device, config.collapse_threshold)

    start, state = run.start("step2")
    if start == 0:  # a resumed step 2 already has its re-initialised head in the model's weights
        with phase("fastmask.head_reinit"):
            result.head_reset_fraction = reinit_head(head_params, masks, config.reinit_cmp, config.reinit_scope)

    with phase("fastmask.step2"), Frozen(model, head_params.values()):
        opt2 = config.step2.build(list(head_params.items()), None, config.mask_mode)
        if state is not None:
            opt2.load_state_dict(state)
        train_step("step2", model, head, train_loader, opt2, config.step2.epochs, 1 - config.beta, config.beta,
                   config.bias, config.step2_feature_eval, device, result.history, progress, start,
                   lambda e: run.report("step2", e, result, opt2))
    collapse_check(result, "step2", model, train_loader, device, config.collapse_threshold)
    model.train(was_training)
    return result


def bmft(
    model: nn.Module,
    mask_loader: Iterable,
    train_loader: Iterable,
    *,
    config: BmftConfig | None = None,
    masks: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    on_epoch: OnEpoch | None = None,
    resume: RunState | None = None,
) -> Result:
    """Debias ``model`` in place with BMFT ([PB]; spec §3-5).

    Args:
        model: a binary classifier f = C∘E returning one logit per sample.
        mask_loader: the external set D_e for the importance pass and (``impair_data="external"``, the reference)
            the impair step.
        train_loader: the group-balanced D_r for the repair step (and the impair step with
            ``impair_data="balanced"``).
        config: :class:`BmftConfig`.
        masks: use these masks instead of the hard mask (e.g. :func:`fastmask.masks.manual_mask`).
        progress: show tqdm progress bars.
        on_epoch: called with a :class:`RunState` once the masks are ready and after every finished epoch (to
            checkpoint the run, or to evaluate it per epoch; it must not draw from the global RNGs).
        resume: a saved :class:`RunState`; ``model`` must hold the weights saved with it. The run continues after
            its last finished epoch and ends as the uninterrupted run would (same data order given loaders in
            the same position, same RNG draws).
    """
    config = config or BmftConfig()
    device, head, head_params, feat_params, run, result = _begin(
        "bmft", ("impair", "repair"), model, mask_loader, config, masks,
        lambda ib, il, feat, sharded: hard_mask(ib, il, feat, rate=config.rate, inclusive=config.inclusive,
                                                sharded=sharded, overwrite=True),
        progress, on_epoch, resume)
    masks = result.masks
    was_training = model.training
    impair_loader = mask_loader if config.impair_data == "external" else train_loader

    # Impair: every parameter in the optimiser, the head's mask 0 (weight decay and momentum still reach it in
    # "grad" mode, as in the reference); loss B only.
    if not run.skip("impair"):
        start, state = run.start("impair")
        all_params = [*feat_params.items(), *head_params.items()]
        with phase("fastmask.step1"), Frozen(model, (p for _, p in all_params)):
            opt = config.impair.build(all_params, {n: masks[n] for n, _ in all_params}, config.mask_mode)
            if state is not None:
                opt.load_state_dict(state)
            train_step("impair", model, head, impair_loader, opt, config.impair.epochs, 0.0, 1.0, config.bias,
                       False, device, result.history, progress, start, lambda e: run.report("impair", e, result, opt))
        collapse_check(result, "impair", model, impair_loader, device, config.collapse_threshold)

    start, state = run.start("repair")
    if start == 0:  # a resumed repair step already has the zeroed head in the model's weights
        with phase("fastmask.head_reinit"), torch.no_grad():
            for p in head_params.values():
                p.zero_()
            result.head_reset_fraction = 1.0

    with phase("fastmask.step2"), Frozen(model, head_params.values()):
        opt2 = config.repair.build(list(head_params.items()), None, config.mask_mode)
        if state is not None:
            opt2.load_state_dict(state)
        train_step("repair", model, head, train_loader, opt2, config.repair.epochs, 1.0, config.beta, config.bias,
                   config.step2_feature_eval, device, result.history, progress, start,
                   lambda e: run.report("repair", e, result, opt2))
    collapse_check(result, "repair", model, train_loader, device, config.collapse_threshold)
    model.train(was_training)
    return result


def checked_masks(masks: Mapping[str, Tensor], model: nn.Module) -> Mapping[str, Tensor]:
    """``masks`` itself, once every parameter of ``model`` has a mask of its shape; errors name the parameter."""
    for name, p in model.named_parameters():
        if name not in masks:
            raise ValueError(f"masks: no mask for parameter {name!r}")
        p = distributed.local(p)  # FSDP2: the masks of this rank's shards
        if tuple(masks[name].shape) != tuple(p.shape):
            raise ValueError(f"masks: mask {name!r} has shape {tuple(masks[name].shape)}, the parameter "
                             f"{tuple(p.shape)}")
    return masks
