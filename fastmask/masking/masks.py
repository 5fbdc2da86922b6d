"""Parameter masks from the Fisher importances (docs/algorithm.md §4, §8.6, §8.13, §8.19-8.20, §9), and their
storage.

Every mask is a dict keyed by the names of ``model.named_parameters()``, one tensor per parameter, same shape.
Per tensor t, with Norm(x) = (x − min_t x) / (max_t x − min_t x + 1e-10) (the raw x when max_t = min_t):

    R_t = Norm(I_b,t) / (Norm(I_l,t) + 1e-10)                 (importance ratio; BMFT Eq. 3)
    SWiFT soft mask:  M_t = tanh(R_t) ∈ [0, 1)                  ([PS] Eq. 9)
    BMFT hard mask:   M_t = 1[R_t > α], α = percentile_rate(R over all feature tensors)  ([PB] Eq. 4); head M = 0

The builders take and return dicts (``swift_mask``, ``bmft_mask``, ...); the per-tensor arithmetic is the list ops
of :mod:`fastmask.ops` (``soft_mask``, ``percentile``, ``hard_mask``), fused kernels where available.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from fastmask import ops
from fastmask.model.head import split_head
from fastmask.parallel import fsdp
from fastmask.parallel.percentile import percentile as parallel_percentile
from fastmask.util.files import atomic_write_bytes

__all__ = [
    "importance_ratio",
    "swift_mask",
    "bmft_mask",
    "fraction_mask",
    "random_mask",
    "manual_mask",
    "mask_fraction",
    "save_masks",
    "load_masks",
]

Masks = dict[str, Tensor]


def _check_same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    if a.keys() != b.keys():
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        raise ValueError(f"{what}: the two importances name different parameters (only in I_b: {only_a}; "
                         f"only in I_l: {only_b})")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{what}: parameter {name!r} has I_b shape {tuple(a[name].shape)} but I_l shape "
                             f"{tuple(b[name].shape)}")


def _soft(imp_bias: Mapping[str, Tensor], imp_loss: Mapping[str, Tensor], apply_tanh: bool, what: str,
          sharded: bool = False, overwrite: bool = False) -> Masks:
    _check_same_keys(imp_bias, imp_loss, what)
    names = list(imp_bias)
    ib, il = [imp_bias[n] for n in names], [imp_loss[n] for n in names]
    bounds = None
    if sharded:  # this rank holds pieces of the tensors: each whole tensor's min / max, all-reduced
        bounds = fsdp.soft_mask_bounds(ib, il)
        pieces_b, pieces_l = [fsdp.local(t) for t in ib], [fsdp.local(t) for t in il]
    else:
        pieces_b, pieces_l = ib, il
    if overwrite:
        ops.soft_mask_(pieces_b, pieces_l, apply_tanh=apply_tanh, bounds=bounds)
        return dict(zip(names, ib, strict=True))
    return dict(zip(names, ops.soft_mask(pieces_b, pieces_l, apply_tanh=apply_tanh, bounds=bounds), strict=True))


def importance_ratio(imp_bias: Mapping[str, Tensor], imp_loss: Mapping[str, Tensor], *, sharded: bool = False,
                     overwrite: bool = False) -> Masks:
    """R_t = Norm(I_b,t) / (Norm(I_l,t) + 1e-10) per tensor (BMFT Eq. 3), with SWiFT's max == min guard
    (docs/algorithm.md §8.6: BMFT's unguarded normalisation gives NaN for a constant tensor, which would zero the whole
    hard mask).

    ``sharded=True``: the importances are this rank's shards of the parameters (FSDP), and each tensor's min / max
    is taken over all ranks (:func:`fastmask.parallel.fsdp.sharded_soft_mask`); every rank must call it. The ranks'
    results together are bit-identical to the ratio of the full tensors. The same holds for :func:`swift_mask` (to
    tanh's rounding) and :func:`bmft_mask` (the threshold is the distributed percentile).

    ``overwrite=True`` writes R into ``imp_bias``'s tensors (float32, one per parameter) and returns them: no memory
    beyond the importances, for callers that drop I_b afterwards."""
    return _soft(imp_bias, imp_loss, False, "importance_ratio", sharded, overwrite)


def swift_mask(imp_bias: Mapping[str, Tensor], imp_loss: Mapping[str, Tensor], *, sharded: bool = False,
              overwrite: bool = False) -> Masks:
    """SWiFT soft mask M_t = tanh(R_t) for every tensor, head included ([PS] Eq. 9, docs/algorithm.md §4). float32 in
    [0, 1).

    Elements where Norm(I_l) = 0 < Norm(I_b) get M ≈ 1, elements where Norm(I_b) = 0 get 0; a 1-element tensor
    (the head bias) is not normalised (max == min) and keeps tanh of its raw ratio. ``sharded``, ``overwrite``: see
    :func:`importance_ratio` (the pipeline overwrites: it drops I_b once the masks exist).
    """
    return _soft(imp_bias, imp_loss, True, "swift_mask", sharded, overwrite)


def _threshold_masks(
    ratio: Mapping[str, Tensor], feature_names: Iterable[str], q: float, inclusive: bool, head_from_threshold: bool,
    sharded: bool = False,
) -> Masks:
    feature = list(feature_names)
    unknown = [n for n in feature if n not in ratio]
    if unknown:
        raise ValueError(f"feature parameter {unknown[0]!r} has no importance ratio")
    if not feature:
        raise ValueError("no feature-extractor parameters to threshold")
    percentile = parallel_percentile if sharded else ops.percentile  # over every rank's shards, or local
    alpha = percentile([ratio[n] for n in feature], q)
    feature_set = set(feature)
    names = [n for n in ratio if n in feature_set or head_from_threshold]
    hard = dict(zip(names, ops.hard_mask([ratio[n] for n in names], alpha, inclusive=inclusive), strict=True))
    return {n: hard[n] if n in hard else torch.zeros_like(r, dtype=torch.bool) for n, r in ratio.items()}


def bmft_mask(
    imp_bias: Mapping[str, Tensor],
    imp_loss: Mapping[str, Tensor],
    feature_names: Iterable[str],
    rate: float = 50,
    inclusive: bool = False,
    *,
    sharded: bool = False,
    overwrite: bool = False,
) -> Masks:
    """BMFT hard mask ([PB] Eqs. 3-4, docs/algorithm.md §4): M = 1[R > α] on the feature extractor, M = 0 on the head.

    α = ``np.percentile(concat of R over the feature tensors, rate)`` (linear interpolation), one global value
    computed without a concatenated copy (``fastmask.ops.percentile``). ``rate`` is a **percentile rate**: the
    selected (fine-tuned) fraction of E is ≈ 1 − rate/100 (docs/algorithm.md §8.13; BMFT's code hard-codes rate = 50).

    Args:
        imp_bias, imp_loss: the importances I_B and I_L of every parameter.
        feature_names: the names of E's parameters (``split_head(model)[2]``); every other name is the head.
        rate: percentile rate in [0, 100].
        inclusive: ``M = 1[R >= α]`` instead of the authors' strict ``>``.
        sharded: the importances are this rank's shards (FSDP); see :func:`importance_ratio`.
        overwrite: compute R into ``imp_bias``'s tensors (see :func:`importance_ratio`), which then hold R.

    Returns:
        bool masks for every parameter (head all False).
    """
    ratio = importance_ratio(imp_bias, imp_loss, sharded=sharded, overwrite=overwrite)
    return _threshold_masks(ratio, feature_names, rate, inclusive, False, sharded)


def fraction_mask(
    ratio: Mapping[str, Tensor], fraction: float, feature_names: Iterable[str], inclusive: bool = False
) -> Masks:
    """SWiFT's hard-mask ablation (docs/algorithm.md §9): M = 1[R > q] with q the (1 − fraction)·100-th percentile of R
    over the feature tensors, so that ≈ ``fraction`` of E is fine-tuned and the rest is fixed.

    The same threshold is applied to the head tensors, whose mask then drives SWiFT's partial head
    re-initialisation (θ[M > mean(M)] = 0). ``ratio`` comes from :func:`importance_ratio`.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return _threshold_masks(ratio, feature_names, 100.0 * (1.0 - fraction), inclusive, True)


def _named_tensors(params: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return dict(params.named_parameters()) if isinstance(params, nn.Module) else params


def random_mask(params: nn.Module | Mapping[str, Tensor], seed: int = 0) -> Masks:
    """Random soft mask M ~ U[0, 1) per element (SWiFT's "random mask" baseline; uniform as [PS] describes it,
    docs/algorithm.md §8.19, not the authors' code's ``randn``). Deterministic for a given ``seed``; float32, on the
    parameters' devices."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in _named_tensors(params).items()}


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def manual_mask(
    model: nn.Module, kind: Literal["bn", "shallow_conv"], n_shallow: int = 1, head: str | None = None
) -> Masks:
    """BMFT's manual masks (docs/algorithm.md §9): M = 1 on every BatchNorm parameter (``"bn"``) or on the parameters of
    the first ``n_shallow`` convolution layers in module order (``"shallow_conv"``, BMFT's "Top"); 0 elsewhere, and
    always 0 on the head (found as in :func:`fastmask.models.split_head`). bool masks."""
    if kind == "bn":
        chosen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not chosen:
            raise ValueError(f"manual_mask(kind='bn'): {type(model).__name__} has no BatchNorm layer")
    elif kind == "shallow_conv":
        if n_shallow < 1:
            raise ValueError(f"n_shallow must be >= 1, got {n_shallow}")
        convs = [m for m in model.modules() if isinstance(m, _CONVS)]
        if len(convs) < n_shallow:
            raise ValueError(f"manual_mask: n_shallow={n_shallow} but {type(model).__name__} has {len(convs)} "
                             "convolution layers")
        chosen = convs[:n_shallow]
    else:
        raise ValueError(f"manual_mask: kind must be 'bn' or 'shallow_conv', got {kind!r}")
    selected = {id(p) for m in chosen for p in m.parameters()}
    _, head_params, _ = split_head(model, head)
    head_ids = {id(p) for p in head_params.values()}
    return {
        n: torch.full_like(p, id(p) in selected and id(p) not in head_ids, dtype=torch.bool)
        for n, p in model.named_parameters()
    }


def mask_fraction(masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """Mean mask value over the elements of ``names`` (default: all): the selected fraction of a hard mask."""
    chosen = list(masks) if names is None else list(names)
    total = sum(masks[n].numel() for n in chosen)
    if total == 0:
        raise ValueError("mask_fraction: no elements")
    return float(sum(masks[n].float().sum().item() for n in chosen) / total)


def save_masks(masks: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write ``masks`` as a safetensors file keyed by parameter name, atomically (temporary file + rename)."""
    path = Path(path)
    tensors = {}
    for name, m in masks.items():
        if not isinstance(m, Tensor):
            raise TypeError(f"mask {name!r} is a {type(m).__name__}, not a tensor")
        tensors[name] = m.detach().to("cpu").contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"format": "fastmask-masks"}))


def load_masks(path: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> Masks:
    """Read masks written by :func:`save_masks` and check them against ``model``.

    Every key must name a parameter of ``model`` with the same shape; with ``strict`` every parameter must have a
    mask. Errors name the parameter at fault. Masks are moved to their parameters' devices.
    """
    loaded = load_file(os.fspath(path))
    params = dict(model.named_parameters())
    for name, m in loaded.items():
        if name not in params:
            raise ValueError(f"{os.fspath(path)}: mask {name!r} is not a parameter of {type(model).__name__}")
        if m.shape != params[name].shape:
            raise ValueError(f"{os.fspath(path)}: mask {name!r} has shape {tuple(m.shape)} but the parameter has "
                             f"shape {tuple(params[name].shape)}")
    if strict:
        missing = [n for n in params if n not in loaded]
        if missing:
            raise ValueError(f"{os.fspath(path)}: no mask for parameter {missing[0]!r} ({len(missing)} missing; "
                             "pass strict=False to allow)")
    return {n: m.to(params[n].device) for n, m in loaded.items()}
