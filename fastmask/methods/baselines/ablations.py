"""The mask ablations on the SWiFT and BMFT pipelines (docs/algorithm.md §9): SWiFT with a random mask or a hard
mask of a given fraction, BMFT with a manual mask (every BatchNorm parameter, or the shallowest convolutions)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from fastmask.masking.importance import fisher_importance
from fastmask.masking.masks import fraction_mask, importance_ratio, manual_mask, random_mask
from fastmask.methods.bmft import bmft
from fastmask.methods.configs import BmftConfig, SwiftConfig
from fastmask.methods.engine import checked_masks, seed_everything
from fastmask.methods.state import OnEpoch, Result
from fastmask.methods.swift import swift
from fastmask.model.head import split_head
from fastmask.util.profiling import phase

# ---- mask ablations on the SWiFT / BMFT pipelines -----------------------------------------------------------------


@dataclass
class RandomMaskConfig(SwiftConfig):
    """:class:`fastmask.methods.configs.SwiftConfig` plus ``mask_seed``, the seed of the random mask (default: ``seed``,
    or 0 when that is None)."""

    mask_seed: int | None = None


def random_mask_swift(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                      config: RandomMaskConfig | None = None, progress: bool = False,
                      on_epoch: OnEpoch | None = None) -> Result:
    """Random mask ([PS] §4.3 ablation; docs/algorithm.md §9, §8.19): the SWiFT pipeline
    (:func:`fastmask.methods.swift.swift`) with the soft mask replaced by M ~ U[0, 1) per element
    (:func:`fastmask.masking.masks.random_mask`), head included (so the head re-initialisation is random too). No
    importance pass: ``mask_loader`` is not read."""
    config = config or RandomMaskConfig()
    seed = config.mask_seed if config.mask_seed is not None else (config.seed or 0)
    masks = random_mask(model, seed)
    result = swift(model, mask_loader, train_loader, config=config, masks=masks, progress=progress, on_epoch=on_epoch)
    return _renamed(result, "random-mask", mask_seed=seed)


@dataclass
class HardMaskConfig(SwiftConfig):
    """:class:`fastmask.methods.configs.SwiftConfig` plus ``fraction``, the share r of E that is fine-tuned, and
    ``inclusive`` (M = 1[R >= q] instead of 1[R > q])."""

    fraction: float = 0.5
    inclusive: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


def hard_mask_swift(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                    config: HardMaskConfig | None = None, progress: bool = False,
                    on_epoch: OnEpoch | None = None) -> Result:
    """Hard-mask ablation ([PS] §5 ablation; docs/algorithm.md §9): the SWiFT pipeline with M = 1[R > q], R the
    importance ratio Norm(I_B)/(Norm(I_L) + 1e-10) from the same importance pass as SWiFT (on ``mask_loader``), q the
    global (1 − r)·100-th percentile of R over all non-head tensors (:func:`fastmask.ops.percentile`, as BMFT), so a
    fraction r of E is fine-tuned in step 1 and the rest receives no gradient. The same threshold gives the head's mask,
    which drives SWiFT's head re-initialisation (:func:`fastmask.masking.masks.fraction_mask`)."""
    config = config or HardMaskConfig()
    seed_everything(config.seed)
    _, _, feat_params = split_head(model, config.head)
    ib, il, n_imp = fisher_importance(model, mask_loader, bias=config.bias, progress=progress)
    with phase("fastmask.mask"):
        masks = fraction_mask(importance_ratio(ib, il), config.fraction, list(feat_params), config.inclusive)
    checked_masks(masks, model)
    result = swift(model, mask_loader, train_loader, config=config, masks=masks, progress=progress, on_epoch=on_epoch)
    result.n_importance_batches = n_imp
    selected = sum(int(masks[n].sum()) for n in feat_params) / sum(p.numel() for p in feat_params.values())
    return _renamed(result, f"hard-{config.fraction:g}", selected_fraction=selected)


@dataclass
class ManualMaskConfig(BmftConfig):
    """:class:`fastmask.methods.configs.BmftConfig` plus the manual mask: ``kind`` ``"bn"`` (every BatchNorm parameter)
    or ``"shallow_conv"`` (the first ``n_shallow`` convolution layers, BMFT's "Top")."""

    kind: Literal["bn", "shallow_conv"] = "bn"
    n_shallow: int = 1


def manual_mask_bmft(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
                     config: ManualMaskConfig | None = None, progress: bool = False,
                     on_epoch: OnEpoch | None = None) -> Result:
    """BMFT's manual masks ([PB] §3.3 ablation; docs/algorithm.md §9): the BMFT pipeline
    (:func:`fastmask.methods.bmft.bmft`) with the hard mask replaced by M = 1 on all BatchNorm parameters ("BN") or on
    the shallow convolution layers ("Top"), 0 elsewhere and on the head (:func:`fastmask.masking.masks.manual_mask`).
    The impair step (on ``mask_loader``) then moves only those parameters' gradients; the head is zeroed and retrained
    on ``train_loader``. No importance pass."""
    config = config or ManualMaskConfig()
    masks = manual_mask(model, config.kind, config.n_shallow, head=config.head)
    result = bmft(model, mask_loader, train_loader, config=config, masks=masks, progress=progress, on_epoch=on_epoch)
    return _renamed(result, f"manual-{config.kind}", kind=config.kind, n_shallow=config.n_shallow)


def _renamed(result: Result, method: str, **details: Any) -> Result:
    """The pipeline's result under the ablation's name, with what the ablation chose."""
    result.method = method
    result.details = details
    return result
