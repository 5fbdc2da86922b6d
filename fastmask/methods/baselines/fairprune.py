"""FairPrune (Wu et al. 2022; docs/algorithm.md §9): prune the weights that matter to the privileged group but
little to the unprivileged one, by per-group OBD saliencies with Fisher-approximated Hessian diagonals."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fastmask.fairness.losses import wbce
from fastmask.fairness.metrics import hard_predictions
from fastmask.masking.importance import Objective, fisher_importance
from fastmask.methods.engine import seed_everything
from fastmask.methods.state import OnEpoch, Result
from fastmask.model.head import split_head
from fastmask.model.scoring import score
from fastmask.util.profiling import phase

# ---- FairPrune ---------------------------------------------------------------------------------------------------


@dataclass
class FairPruneConfig:
    """Settings of :func:`fairprune`.

    Args:
        ratio: fraction of each weight tensor's entries to prune (tuned in Wu et al.).
        beta: β in the pruning score S_unpriv − β·S_priv (tuned in Wu et al.).
        data: the data of the per-group saliencies, ``"external"`` (D_e, default) or ``"balanced"`` (D_r).
        head, seed: as in :class:`fastmask.methods.configs.SwiftConfig`.
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
              config: FairPruneConfig | None = None, progress: bool = False,
              on_epoch: OnEpoch | None = None) -> Result:
    """FairPrune (Wu et al. 2022; docs/algorithm.md §9): prune the weights that matter to the privileged group but
    little to the unprivileged one.

    1. Per group g, the OBD saliency (LeCun et al. 1989) S_g(θ_i) = ½·θ_i²·H_ii^g with the Hessian diagonal
       approximated by the Fisher diagonal of the task loss on group g's samples, H_ii^g ≈ F_ii^g (the engine's
       :func:`fastmask.masking.importance.fisher_importance`, WBCE restricted to a = g). S_g estimates how much group
       g's loss grows when θ_i is set to 0.
    2. The privileged group is the one with the higher accuracy (ŷ = 1[p > 0.5]) on the same data (a tie: group 0).
    3. Score = S_unpriv − β·S_priv. **Sign convention:** the ``ratio`` entries with the *smallest* score are pruned,
       i.e. weights whose removal costs the unprivileged group least while costing the privileged group most, so the
       gap between the groups shrinks; a large score marks a weight the unprivileged group needs, which is kept.
       This is Wu et al.'s stated goal ("pruning the parameters important for the privileged group but less
       important for the unprivileged group"), the form docs/algorithm.md §9 gives.
    4. Per weight tensor (every parameter with ≥ 2 dimensions: convolution and linear weights, head included;
       BatchNorm and bias vectors are not pruned), the ``round(ratio·numel)`` entries with the smallest score are
       set to 0 (ties by index). No fine-tuning follows; nothing else changes.

    Data: D_e (``mask_loader``; ``config.data="balanced"``: ``train_loader``). One-shot: Wu et al. tune the ratio
    and β; iterated pruning is not implemented. No epochs: ``on_epoch`` is never called.
    """
    config = config or FairPruneConfig()
    seed_everything(config.seed)
    loader = mask_loader if config.data == "external" else train_loader
    split_head(model, config.head)  # checks the binary-logit contract
    y, p, a, _ = score(model, loader)
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
                prune_score = (s_unpriv - config.beta * s_priv).reshape(-1)
                k = int(round(config.ratio * prune_score.numel()))
                idx = torch.sort(prune_score, stable=True).indices[:k]
                keep.view(-1)[idx] = False
                param.masked_fill_(~keep, 0.0)
                pruned += k
            masks[name] = keep
    result = Result("fairprune", config, masks)
    result.details = {"privileged_group": privileged, "group_accuracy": acc, "pruned_weights": pruned}
    return result
