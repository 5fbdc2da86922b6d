"""SWiFT ([PS]; docs/algorithm.md §3-5): soft mask, masked step 1 on the feature extractor, partial head
re-initialisation, step 2 on the head. :func:`swift` modifies the model **in place** and returns a
:class:`~fastmask.methods.state.Result`.

1. M = tanh(R) from I_B (bias on log-probabilities) and I_L (WBCE) over ``mask_loader`` (docs/algorithm.md §3-4).
2. Step 1: the head frozen, E trained on ``train_loader`` with L = β·WBCE + (1 − β)·B ([PS] Eq. 10), the mask
   applied by the masked optimizer (g ← M ⊙ g, or Δθ ← M ⊙ Δθ with ``mask_mode="update"``).
3. Head re-initialisation: θ_t[M_t > mean(M_t)] = 0 per head tensor ([PS] Eq. 12 with the authors' strict ``>``
   and per-tensor mean; ``reinit_cmp`` / ``reinit_scope`` switch to ``>=`` / the mean over the whole head).
4. Step 2: E frozen, the head trained with L = (1 − β)·WBCE + β·B, no mask.

Resumable: ``on_epoch`` receives a :class:`~fastmask.methods.state.RunState` once the masks are ready and after every
finished epoch (model weights aside, everything needed to continue: masks, history, the step's optimizer state, the
global RNG states); passing a saved one back as ``resume=`` (with the model's weights at that point) skips what was
done and continues the run so that it ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from fastmask.masking.importance import fisher_importance
from fastmask.masking.masks import swift_mask
from fastmask.methods.configs import SwiftConfig, check_reinit
from fastmask.methods.engine import Frozen, begin, guard_check, train_step
from fastmask.methods.state import OnEpoch, Result, RunState
from fastmask.parallel import ddp, fsdp
from fastmask.util.profiling import phase


def swift_masks(model: nn.Module, mask_loader: Iterable, config: SwiftConfig,
                progress: bool = False) -> tuple[dict[str, Tensor], int]:
    """SWiFT's soft masks of ``model`` ([PS] Eq. 9; docs/algorithm.md §3-4): the importances I_B (``config.bias``)
    and I_L over ``mask_loader``, then M = tanh(R) written over I_B (the importances are dropped once the masks
    exist); with the number of batches read. For an FSDP2-sharded model, the masks of this rank's shards."""
    ib, il, n = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
    with phase("fastmask.mask"):
        return swift_mask(ib, il, sharded=fsdp.is_sharded(model), overwrite=True), n


@torch.no_grad()
def reinit_head(
    head_params: Mapping[str, nn.Parameter],
    masks: Mapping[str, Tensor],
    cmp: Literal["gt", "ge"] = "gt",
    scope: Literal["tensor", "head"] = "tensor",
) -> float:
    """SWiFT's partial head re-initialisation ([PS] Eq. 12, docs/algorithm.md §5 step 2): θ_t[M_t > γ] = 0.

    γ is the mean of M_t for each head tensor t (``scope="tensor"``, the authors' code) or the mean over every head
    element (``scope="head"``, the paper); ``cmp="ge"`` uses ``>=`` (the paper) instead of the authors' ``>``.
    With ``gt`` and ``tensor`` a 1-element tensor (the head bias) is never reset. Returns the share of head elements
    set to 0.
    """
    check_reinit(cmp, scope)
    missing = [n for n in head_params if n not in masks]
    if missing:
        raise ValueError(f"reinit_head: no mask for head parameter {missing[0]!r}")
    # FSDP2: the masks and the reset are this rank's shards', the means are over every rank's shard
    sharded = fsdp.is_sharded(head_params.values())
    params = {n: fsdp.local(p) for n, p in head_params.items()}
    m = {n: masks[n].detach().to(p.device, torch.float32) for n, p in params.items()}
    if sharded:
        sums, counts = fsdp.shard_sums(list(m.values()))
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
        reset, total_elems = ddp.all_reduce_counts([reset, total_elems])
    return reset / max(total_elems, 1)



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
    """Debias ``model`` in place with SWiFT ([PS]; docs/algorithm.md §3-5).

    Args:
        model: a binary classifier f = C∘E returning one logit per sample.
        mask_loader: batches (x, y, a, ...) for the importance pass; the authors' code uses the **unbalanced** external
            set D_e with test transforms (docs/algorithm.md §1, §8.5).
        train_loader: batches for both fine-tuning steps; the authors' code uses the group-balanced D_r
            (:func:`fastmask.data.balance.group_balance`) with training augmentation.
        config: :class:`SwiftConfig` (default: the authors' settings for skin).
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
    device, head, head_params, feat_params, run, result = begin(
        "swift", ("step1", "step2"), model, mask_loader, config, masks, swift_masks, progress, on_epoch, resume,
        {"balanced": train_loader})
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
        guard_check(result, "step1", "balanced", model, train_loader, device, config, last=False)

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
    guard_check(result, "step2", "balanced", model, train_loader, device, config)
    model.train(was_training)
    return result

