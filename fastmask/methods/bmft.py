"""BMFT ([PB]; docs/algorithm.md §3-5): hard mask, impair step, head zeroed, repair step. :func:`bmft` modifies
the model **in place** and returns a :class:`~fastmask.methods.state.Result`.

M = 1[R > percentile_rate(R over E)] from the bias on logits (head mask 0); impair step over all parameters with
L = B only on the **unbalanced** external data (the authors' choice); the head set to 0; repair step on the head
with L = WBCE + β·B ([PB] Eq. 5). Resumable as :func:`fastmask.methods.swift.swift`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fastmask.masking.importance import fisher_importance
from fastmask.masking.masks import bmft_mask
from fastmask.methods.configs import BmftConfig
from fastmask.methods.engine import Frozen, begin, guard_check, train_step
from fastmask.methods.state import OnEpoch, Result, RunState
from fastmask.model.head import split_head
from fastmask.parallel import fsdp
from fastmask.util.profiling import phase


def bmft_masks(model: nn.Module, mask_loader: Iterable, config: BmftConfig,
               progress: bool = False) -> tuple[dict[str, Tensor], int]:
    """BMFT's hard masks of ``model`` ([PB] Eqs. 3-4; docs/algorithm.md §3-4): the importances I_B
    (``config.bias``) and I_L over ``mask_loader``, R written over I_B, M = 1[R > α] on the feature extractor
    (α its ``config.rate`` percentile) and 0 on the head; with the number of batches read. For an FSDP2-sharded
    model, the masks of this rank's shards (α over every rank's)."""
    _, _, feat_params = split_head(model, config.head)
    ib, il, n = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
    with phase("fastmask.mask"):
        return bmft_mask(ib, il, list(feat_params), rate=config.rate, inclusive=config.inclusive,
                         sharded=fsdp.is_sharded(model), overwrite=True), n


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
    """Debias ``model`` in place with BMFT ([PB]; docs/algorithm.md §3-5).

    Args:
        model: a binary classifier f = C∘E returning one logit per sample.
        mask_loader: the external set D_e for the importance pass and (``impair_data="external"``, the authors' code)
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
    impair_loader = mask_loader if config.impair_data == "external" else train_loader
    impair_data = "external" if config.impair_data == "external" else "balanced"
    device, head, head_params, feat_params, run, result = begin(
        "bmft", ("impair", "repair"), model, mask_loader, config, masks, bmft_masks, progress, on_epoch, resume,
        {impair_data: impair_loader, "balanced": train_loader})
    masks = result.masks
    was_training = model.training

    # Impair: every parameter in the optimiser, the head's mask 0 (weight decay and momentum still reach it in
    # "grad" mode, as in the authors' code); loss B only.
    if not run.skip("impair"):
        start, state = run.start("impair")
        all_params = [*feat_params.items(), *head_params.items()]
        with phase("fastmask.step1"), Frozen(model, (p for _, p in all_params)):
            opt = config.impair.build(all_params, {n: masks[n] for n, _ in all_params}, config.mask_mode)
            if state is not None:
                opt.load_state_dict(state)
            train_step("impair", model, head, impair_loader, opt, config.impair.epochs, 0.0, 1.0, config.bias,
                       False, device, result.history, progress, start, lambda e: run.report("impair", e, result, opt))
        guard_check(result, "impair", impair_data, model, impair_loader, device, config, last=False, head_kept=False)

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
    guard_check(result, "repair", "balanced", model, train_loader, device, config)
    model.train(was_training)
    return result

