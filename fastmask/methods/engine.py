"""The training engine SWiFT, BMFT and the baselines share: seeding, freezing, one fine-tuning step's epochs, the
guard, the mask checks, and a run's progress through its steps (what a resumed run skips, the ``on_epoch`` reports).

The guard (docs/algorithm.md §5): a bias term is minimised by predicting one class for everyone (EOdds 0, a useless
model), and a debiased model may drift to predicting positive far more or less often than the labels are, losing
accuracy while its gaps look small. Before training the engine scores the original model on each step's data; after
each step it scores the model there again (eval mode, ŷ = 1[p > 0.5]) and records a
:class:`~fastmask.methods.state.GuardWarning`, and logs it, when

- ``"collapse"`` (the severe case, after every step whose head the run keeps): one class takes
  ``collapse_threshold`` (95 %) or more of the predictions while its share of the labels is below that;
- ``"share"`` (after the last step): the share of positive predictions parts from the label rate by more than
  ``share_tolerance`` (0.10);
- ``"accuracy"`` (after the last step): accuracy fell more than ``max_acc_drop`` (0.02) below the original model's on
  the same data.

The last two judge the model a run delivers: after a first step the head is still to be re-initialised (SWiFT) or
zeroed (BMFT, whose impair step minimises the bias alone and is meant to cost accuracy), so shares and accuracy in
between say little about the result. After BMFT's impair step nothing is judged: the whole head is replaced next,
and a collapse there is what a bias-only loss does, not a fault of the run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastmask.data.batch import unpack_batch
from fastmask.fairness.losses import BiasSpec, combined_loss
from fastmask.masking.importance import Objective
from fastmask.methods.state import GuardWarning, OnEpoch, Result, RunState, rng_state, set_rng_state
from fastmask.model.head import split_head
from fastmask.model.scoring import model_device, score
from fastmask.parallel import ddp, fsdp
from fastmask.util.profiling import ranged

log = logging.getLogger(__name__)


#: The guard's collapse: one class takes at least this share of the predictions (while less of the labels are in
#: it); ``fastmask evaluate`` warns on the same.
COLLAPSE_THRESHOLD = 0.95


def one_class_warnings(share: float, label_rate: float, threshold: float = COLLAPSE_THRESHOLD) -> list[str]:
    """The collapse to one class: a message for each class that takes at least ``threshold`` of the predictions
    (``share`` of them positive) while less than that of the labels (``label_rate`` positive) are in it."""
    return [f"{pred:.1%} of the predictions are {cls} while {lab:.1%} of the labels are; the model may have "
            "collapsed to one class"
            for cls, pred, lab in (("positive", share, label_rate), ("negative", 1 - share, 1 - label_rate))
            if pred >= threshold and lab < threshold]


@dataclass(kw_only=True)
class GuardConfig:
    """The guard's tolerances, a part of every configuration of a method that fine-tunes.

    Args:
        collapse_threshold: the severe case: one class takes at least this share of the predictions while less of
            the labels are in it.
        share_tolerance: the largest allowed |share of positive predictions − label rate|.
        max_acc_drop: the largest allowed fall of accuracy below the original model's on the same data.
    """

    collapse_threshold: float = COLLAPSE_THRESHOLD
    share_tolerance: float = 0.10
    max_acc_drop: float = 0.02

    def __post_init__(self) -> None:
        if not 0.5 < self.collapse_threshold <= 1.0:
            raise ValueError(f"collapse_threshold must be in (0.5, 1], got {self.collapse_threshold}")
        if not 0.0 <= self.share_tolerance <= 1.0:
            raise ValueError(f"share_tolerance must be in [0, 1], got {self.share_tolerance}")
        if not 0.0 <= self.max_acc_drop <= 1.0:
            raise ValueError(f"max_acc_drop must be in [0, 1], got {self.max_acc_drop}")


def seed_everything(seed: int | None) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed`` (None: leave them as they are)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_modes(model: nn.Module, head: nn.Module, feature_eval: bool) -> None:
    """Train mode for the whole model, or eval mode for E and train mode for the head."""
    if feature_eval:
        model.eval()
        head.train()
    else:
        model.train()


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
    """Epochs ``start + 1 .. epochs`` of step ``name``: zero-grad → forward → loss → backward → (masked) optimizer step,
    the loss ``wbce_weight``·WBCE + ``bias_weight``·bias term (docs/algorithm.md §5); ``after_epoch(e)`` after each, and
    a {"step", "epoch", "loss", "positive_share"} row per epoch appended to ``history``."""
    for epoch in tqdm(range(start, epochs), desc=name, disable=not progress, leave=False, initial=start,
                      total=epochs):
        _set_modes(model, head, feature_eval)
        total, n_batches, positives, seen = 0.0, 0, 0, 0
        for batch in ranged(tqdm(loader, desc=f"{name} epoch {epoch + 1}", disable=not progress, leave=False)):
            x, y, a = unpack_batch(batch, device)
            optimizer.zero_grad(set_to_none=True)
            # Under torchrun: the global batch's loss, this rank's share of its gradient, summed over the ranks
            # before the (masked) step, so every rank takes the same step (fastmask.parallel).
            z, y, a = ddp.global_batch(model(x), y, a)
            loss = combined_loss(z, y, a, wbce_weight=wbce_weight, bias_weight=bias_weight, bias=bias)
            fsdp.backward(loss, [p for group in optimizer.param_groups for p in group["params"]])
            optimizer.step()
            ddp.broadcast_buffers(model)
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


def _check_scores(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Share of predictions with p > 0.5, share of positive labels and accuracy in eval mode over ``loader``, over
    every rank's samples under torchrun."""
    s = score(model, loader, device)
    yhat = s.p > 0.5
    pos, lab, right, n = ddp.all_reduce_counts(
        [float(yhat.sum()), float(s.y.sum()), float((yhat == s.y).sum()), len(s.y)], device)
    return {"positive_share": pos / n, "label_positive_rate": lab / n, "acc": right / n}


def guard_before(result: Result, loaders: Mapping[str, Iterable], model: nn.Module, device: torch.device) -> None:
    """The guard's reference: the original model's scores on each named loader (the data its checks will read),
    recorded in ``result.checks`` as steps ``"original"``."""
    for data, loader in loaders.items():
        result.checks.append({"step": "original", "data": data, **_check_scores(model, loader, device)})


def guard_check(result: Result, step: str, data: str, model: nn.Module, loader: Iterable, device: torch.device,
                guard: GuardConfig, last: bool = True, head_kept: bool = True) -> None:
    """The guard after ``step`` (the run's ``last`` step or not) on the loader named ``data``: record the shares and
    the accuracy in ``result.checks`` and warn (log and ``result.guard_warnings``) as the module docstring says.
    ``head_kept=False``: the next step replaces the head (BMFT zeroes it after its impair step), so the predictions
    after this one say nothing about the result: they are recorded, not judged."""
    now = _check_scores(model, loader, device)
    result.checks.append({"step": step, "data": data, **now})
    if not head_kept:
        return
    share, label_rate, acc = now["positive_share"], now["label_positive_rate"], now["acc"]
    found = [("collapse", m) for m in one_class_warnings(share, label_rate, guard.collapse_threshold)]
    if last and not found and abs(share - label_rate) > guard.share_tolerance:
        found.append(("share", f"{share:.1%} of the predictions are positive while {label_rate:.1%} of the labels "
                               f"are (more than {guard.share_tolerance:.0%} apart)"))
    original = next((c for c in result.checks if c["step"] == "original" and c.get("data") == data), None)
    if last and original is not None and original["acc"] - acc > guard.max_acc_drop:
        found.append(("accuracy", f"accuracy {acc:.3f} is {original['acc'] - acc:.3f} below the original model's "
                                  f"{original['acc']:.3f} (more than {guard.max_acc_drop})"))
    for kind, what in found:
        msg = (f"guard ({kind}): after {step}, on the {data} data, {what}; lower the step's learning rate or raise "
               "the WBCE weight")
        log.warning(msg)
        result.guard_warnings.append(GuardWarning(kind, step, share, label_rate, acc, msg))


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



def checked_masks(masks: Mapping[str, Tensor], model: nn.Module) -> Mapping[str, Tensor]:
    """``masks`` itself, once every parameter of ``model`` has a mask of its shape; errors name the parameter."""
    for name, p in model.named_parameters():
        if name not in masks:
            raise ValueError(f"masks: no mask for parameter {name!r}")
        p = fsdp.local(p)  # FSDP2: the masks of this rank's shards
        if tuple(masks[name].shape) != tuple(p.shape):
            raise ValueError(f"masks: mask {name!r} has shape {tuple(masks[name].shape)}, the parameter "
                             f"{tuple(p.shape)}")
    return masks


# ---- a run's progress -------------------------------------------------------------------------------------------


class Progress:
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
            self.on_epoch(RunState(step, epoch, result, state, rng_state()))


def resumed(resume: RunState | None, masks: Mapping[str, Tensor] | None, config: Any,
            model: nn.Module) -> Result | None:
    """The resumed result (masks checked against ``model`` and moved to its parameters' devices, RNG restored), or
    None for a fresh run."""
    if resume is None:
        return None
    if masks is not None:
        raise ValueError("pass either masks= or resume= (a resumed run keeps its saved masks)")
    checked_masks(resume.result.masks, model)
    set_rng_state(resume.rng)
    params = dict(model.named_parameters())
    moved = {n: m.to(params[n].device) for n, m in resume.result.masks.items()}
    return replace(resume.result, config=config, masks=moved)


def begin(method: str, steps: tuple[str, str], model: nn.Module, mask_loader: Iterable, config: Any,
          masks: Mapping[str, Tensor] | None, build_masks: Callable, progress: bool, on_epoch: OnEpoch | None,
          resume: RunState | None, guard_loaders: Mapping[str, Iterable]) -> tuple:
    """What SWiFT and BMFT share before their first step: seeding, the head / feature-extractor split, the masks
    (``build_masks(model, mask_loader, config, progress) -> (masks, batches read)``, unless ``masks`` are given) and
    the guard's scores of the original model on ``guard_loaders``, all before the first ``on_epoch`` report; or the
    state of a resumed run."""
    seed_everything(config.seed)
    device = model_device(model)
    head, head_params, feat_params = split_head(model, config.head)
    run = Progress(method, steps, on_epoch, resume)
    if resume is not None and fsdp.is_sharded(model):
        raise ValueError(f"{method}: resuming is not supported for FSDP-sharded models (the run state holds one "
                         "rank's shards)")
    result = resumed(resume, masks, config, model)
    if result is None:
        n_imp = 0
        if masks is None:
            masks, n_imp = build_masks(model, mask_loader, config, progress)
        masks = checked_masks(masks, model)
        result = Result(method, config, dict(masks), n_importance_batches=n_imp)
        guard_before(result, guard_loaders, model, device)
        run.report(steps[0], 0, result, None)
    return device, head, head_params, feat_params, run, result

