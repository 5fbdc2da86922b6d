"""The training engine SWiFT, BMFT and the baselines share: seeding, freezing, one fine-tuning step's epochs, the
collapse guard, the mask checks, and a run's progress through its steps (what a resumed run skips, the
``on_epoch`` reports).

The collapse guard: SWiFT's log-probability bias is minimised by predicting one class for everyone (EOdds 0, a
useless model). After each step the engine predicts on that step's data in eval mode and, when one class takes
``collapse_threshold`` (95 %) or more of the predictions while its share of the labels is below that, logs a
warning and records a :class:`~fastmask.methods.state.CollapseWarning` in the result.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastmask.data.batch import unpack_batch
from fastmask.fairness.losses import BiasSpec, combined_loss
from fastmask.masking.importance import Objective, fisher_importance
from fastmask.methods.state import CollapseWarning, OnEpoch, Result, RunState, rng_state, set_rng_state
from fastmask.model.head import split_head
from fastmask.model.scoring import model_device, score
from fastmask.parallel import ddp, fsdp
from fastmask.util.profiling import phase, ranged

log = logging.getLogger(__name__)


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


def _positive_share(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, float]:
    """(share of predictions with p > 0.5, share of positive labels) in eval mode over ``loader``, over every
    rank's samples under torchrun."""
    s = score(model, loader, device)
    pos, lab, n = ddp.all_reduce_counts([float((s.p > 0.5).sum()), float(s.y.sum()), len(s.y)], device)
    return pos / n, lab / n


def collapse_check(result: Result, step: str, model: nn.Module, loader: Iterable, device: torch.device,
                   threshold: float) -> None:
    """The collapse guard after ``step``: record the positive-prediction and positive-label shares over ``loader`` in
    ``result.checks``, and warn (log and ``result.collapse_warnings``) when at least ``threshold`` of the predictions
    fall in one class while less than ``threshold`` of the labels do."""
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
          masks: Mapping[str, Tensor] | None, build_mask: Callable, progress: bool, on_epoch: OnEpoch | None,
          resume: RunState | None) -> tuple:
    """What SWiFT and BMFT share before their first step: seeding, the head / feature-extractor split, and the masks
    (importance pass + ``build_mask(I_b, I_l, feature_names, sharded)``, which may overwrite I_b: the importances are
    dropped once the masks exist), or the state of a resumed run."""
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
            ib, il, n_imp = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
            with phase("fastmask.mask"):  # FSDP2: ib, il and the masks are this rank's shards
                masks = build_mask(ib, il, list(feat_params), fsdp.is_sharded(model))
        masks = checked_masks(masks, model)
        result = Result(method, config, dict(masks), n_importance_batches=n_imp)
        run.report(steps[0], 0, result, None)
    return device, head, head_params, feat_params, run, result

