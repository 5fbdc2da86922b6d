"""Marcinkevics et al.'s (2022) bias-proxy baselines (docs/algorithm.md §9): DiffGda, gradient descent / ascent on a
signed differentiable bias proxy, and DiffPrune, structured pruning by the proxy's activation × gradient saliency;
both keep the checkpoint (or pruning step) with the smallest validation |bias| above a performance floor."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import Tensor, nn

from fastmask.data.batch import unpack_batch
from fastmask.fairness.metrics import hard_predictions
from fastmask.methods.baselines.finetune import all_named, finetune
from fastmask.methods.configs import StepConfig
from fastmask.methods.engine import seed_everything
from fastmask.methods.state import OnEpoch, Result
from fastmask.model.head import split_head
from fastmask.model.scoring import model_device, score
from fastmask.util.profiling import phase

log = logging.getLogger(__name__)

ProxyMetric = Literal["eodds", "spd", "eod"]
_PROXIES = ("eodds", "spd", "eod")


def signed_proxy(z: Tensor, y: Tensor, a: Tensor, metric: ProxyMetric = "eodds") -> Tensor:
    """Marcinkevics et al.'s (2022) **signed** differentiable bias proxy on the scores p = σ(z):

    - ``"spd"``: m_0(p) − m_1(p);
    - ``"eod"`` (equal opportunity, positives only): m_{0,1}(p) − m_{1,1}(p);
    - ``"eodds"``: ½·[(m_{0,0}(p) − m_{1,0}(p)) + (m_{0,1}(p) − m_{1,1}(p))], the signed form of the reference
      code's EOdds (docs/algorithm.md §6), the fairness metric the comparison table reports.

    An empty cell's mean is the constant 0 (docs/algorithm.md §8.2); the result is always attached to z's graph.
    """
    if metric not in _PROXIES:
        raise ValueError(f"metric must be one of {list(_PROXIES)}, got {metric!r}")
    z = z.reshape(-1)
    p = torch.sigmoid(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z)
    y = y.reshape(-1).to(p.device).long()
    a = a.reshape(-1).to(p.device).long()
    if metric == "spd":
        cell, n = a, 2
    else:
        cell, n = 2 * a + y, 4
    sums = torch.zeros(n, dtype=p.dtype, device=p.device).index_add(0, cell, p)
    means = sums / torch.bincount(cell, minlength=n).to(p.dtype).clamp_min(1)
    if metric == "spd":
        return means[0] - means[1]
    tpr_gap = means[1] - means[3]
    return tpr_gap if metric == "eod" else 0.5 * ((means[0] - means[2]) + tpr_gap)


def _signed_bias(y: np.ndarray, p: np.ndarray, a: np.ndarray, metric: ProxyMetric) -> float:
    """The signed gap of the hard predictions ŷ = 1[p > 0.5] (the proxy's metric; empty cells give 0)."""
    yhat = hard_predictions(p).astype(np.float64)

    def rate(sel: np.ndarray) -> float:
        return float(yhat[sel].mean()) if sel.any() else 0.0

    if metric == "spd":
        return rate(a == 0) - rate(a == 1)
    tpr_gap = rate((a == 0) & (y == 1)) - rate((a == 1) & (y == 1))
    if metric == "eod":
        return tpr_gap
    return 0.5 * (rate((a == 0) & (y == 0)) - rate((a == 1) & (y == 0)) + tpr_gap)


class _Selection:
    """Marcinkevics et al.'s model selection: evaluate each candidate on the validation data (the signed bias of
    the hard predictions and the balanced accuracy, both at the 0.5 threshold the comparison evaluates at) and keep
    the one with the smallest |bias| whose balanced accuracy is at least ``floor``. Candidate 0 is the unchanged
    model, so the floor ``initial − max_drop`` always admits one."""

    def __init__(self, model: nn.Module, val_loader: Iterable, metric: ProxyMetric, min_performance: float | None,
                 max_drop: float) -> None:
        self.model, self.val_loader, self.metric = model, val_loader, metric
        self.trajectory: list[dict[str, float]] = []
        self.initial_state = copy.deepcopy(model.state_dict())
        bias0, perf0 = self.measure()
        self.floor = min_performance if min_performance is not None else perf0 - max_drop
        self.sign = 1.0 if bias0 >= 0 else -1.0  # descend on a positive bias, ascend on a negative one
        self.best: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.consider(0, bias0, perf0)

    def measure(self) -> tuple[float, float]:
        y, p, a, _ = score(self.model, self.val_loader)
        return _signed_bias(y, p, a, self.metric), float(balanced_accuracy_score(y, hard_predictions(p)))

    def consider(self, index: int, bias: float | None = None, perf: float | None = None) -> None:
        if bias is None or perf is None:
            bias, perf = self.measure()
        self.trajectory.append({"index": index, "bias": bias, "balanced_accuracy": perf})
        best_bias = None if self.best is None else abs(self.trajectory[self.best]["bias"])
        if perf >= self.floor and (best_bias is None or abs(bias) < best_bias):
            self.best = len(self.trajectory) - 1
            self.best_state = copy.deepcopy(self.model.state_dict())

    def restore(self, method: str) -> int:
        """Load the kept candidate into the model and return its index; when no candidate met the floor, keep the
        unchanged model (as Marcinkevics et al. do), warn, and return 0."""
        if self.best is None:
            log.warning("%s: no candidate reached the balanced-accuracy floor %.4f; keeping the unchanged model",
                        method, self.floor)
            self.model.load_state_dict(self.initial_state)
            return 0
        self.model.load_state_dict(self.best_state)
        return int(self.trajectory[self.best]["index"])

    def details(self, what: str) -> dict[str, Any]:
        selected = None if self.best is None else self.trajectory[self.best]["index"]
        return {"trajectory": self.trajectory, f"selected_{what}": selected, "performance_floor": self.floor,
                "sign": self.sign, "metric": self.metric}


@dataclass(kw_only=True)
class SelectionConfig:
    """What DiffGda and DiffPrune share: the checkpoint selection on a validation proxy and the data they read.

    Args:
        metric: the signed proxy (:func:`signed_proxy`): ``"eodds"`` (default, the table's metric), ``"spd"`` or
            ``"eod"`` (Marcinkevics et al.'s two).
        min_performance: lower bound on the validation balanced accuracy of the kept checkpoint; None (default):
            the unchanged model's balanced accuracy minus ``max_drop``.
        max_drop: see ``min_performance`` (default 0.05).
        data: ``"external"`` (default: D_e, as Marcinkevics et al.'s validation-only setting) or ``"balanced"`` (D_r).
        head, seed: as in :class:`fastmask.methods.configs.SwiftConfig`.
    """

    metric: ProxyMetric = "eodds"
    min_performance: float | None = None
    max_drop: float = 0.05
    data: Literal["external", "balanced"] = "external"
    head: str | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        if self.metric not in _PROXIES:
            raise ValueError(f"metric must be one of {list(_PROXIES)}, got {self.metric!r}")
        if self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {self.max_drop}")
        if self.data not in ("external", "balanced"):
            raise ValueError(f"data must be 'external' or 'balanced', got {self.data!r}")


# ---- DiffGda -----------------------------------------------------------------------------------------------------


@dataclass
class DiffGdaConfig(SelectionConfig):
    """Settings of :func:`diffgda`.

    Args:
        step: the optimiser over all parameters (default Adam, lr 1e-5, 10 epochs: Marcinkevics et al.'s chest X-ray
            configuration).
        metric, min_performance, max_drop, head, seed: keyword-only, as in :class:`SelectionConfig`.
        data: what the steps train on, as in :class:`SelectionConfig`.
    """

    step: StepConfig = StepConfig(10, 1e-5, "adam", momentum=0.0, weight_decay=0.0)


def diffgda(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: DiffGdaConfig | None = None,
            val_loader: Iterable | None = None, progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """DiffGda, bias gradient descent/ascent (Marcinkevics et al. 2022, ``biasGrad.py``; docs/algorithm.md §9).

    All parameters are trained (train mode) with Adam on s·μ(z, y, a), where μ is the **signed** differentiable proxy
    (:func:`signed_proxy`) and s = sign of the unchanged model's bias on the validation data: descent when the bias is
    positive, ascent when it is negative. No task loss. After every epoch the model is evaluated on the validation
    data; the checkpoint with the smallest |bias| whose balanced accuracy is at least the lower bound is kept (the
    unchanged model is candidate 0), and ``model`` ends holding it. Marcinkevics et al. evaluate 5 times per epoch
    and pick the balanced-accuracy-optimal threshold; here the evaluation is once per epoch, at the 0.5 threshold
    every method is evaluated at (docs/algorithm.md §6).

    Data: the steps run on D_e (``mask_loader``; ``config.data="balanced"``: on ``train_loader``); the validation
    data is ``val_loader`` (default ``mask_loader``).
    """
    config = config or DiffGdaConfig()
    seed_everything(config.seed)
    val = mask_loader if val_loader is None else val_loader
    select = _Selection(model, val, config.metric, config.min_performance, config.max_drop)
    sign, metric = select.sign, config.metric

    def objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
        return sign * signed_proxy(z, y, a, metric)

    result = Result("diffgda", config, {})
    loader = mask_loader if config.data == "external" else train_loader
    finetune(model, loader, all_named(model), config.step, wbce_weight=0.0, bias_weight=1.0, bias=objective,
             head=config.head, name="diffgda", result=result, data=config.data,
             after_epoch=lambda e: select.consider(e), on_epoch=on_epoch, progress=progress)
    select.restore("diffgda")
    result.details = select.details("epoch")
    return result


# ---- DiffPrune ---------------------------------------------------------------------------------------------------


@dataclass
class DiffPruneConfig(SelectionConfig):
    """Settings of :func:`diffprune`.

    Args:
        units_per_step: channels pruned per step.
        max_steps: pruning steps (Marcinkevics et al.'s chest X-ray configuration: 10).
        dynamic: recompute the saliencies after every step (their configuration: True).
        metric, min_performance, max_drop, head, seed: keyword-only, as in :class:`SelectionConfig`.
        data: the saliency data, as in :class:`SelectionConfig`.
    """

    units_per_step: int = 1
    max_steps: int = 10
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.units_per_step < 1 or self.max_steps < 0:
            raise ValueError(f"units_per_step must be >= 1 and max_steps >= 0, got {self.units_per_step}, "
                             f"{self.max_steps}")


_BN = nn.modules.batchnorm._BatchNorm
_UNIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, head: str | None = None) -> list[tuple[str, nn.Module]]:
    """The layers whose output channels are DiffPrune's units: every affine BatchNorm of the feature extractor (a
    channel is removed exactly by setting its BN weight and bias to 0: its output is then 0 in train and eval mode);
    without any, every Conv / Linear layer of E (weight row and bias set to 0)."""
    head_module, _, _ = split_head(model, head)
    in_head = {id(m) for m in head_module.modules()}
    named = [(n, m) for n, m in model.named_modules() if id(m) not in in_head]
    bns = [(n, m) for n, m in named if isinstance(m, _BN) and m.affine]
    layers = bns or [(n, m) for n, m in named if isinstance(m, _UNIT_LAYERS)]
    if not layers:
        raise ValueError(f"DiffPrune: {type(model).__name__} has no BatchNorm, Conv or Linear layer outside the head")
    return layers


@torch.no_grad()
def _zero_unit(layer: nn.Module, channel: int) -> None:
    layer.weight[channel] = 0
    if layer.bias is not None:
        layer.bias[channel] = 0


def _unit_saliency(model: nn.Module, layers: list[tuple[str, nn.Module]], loader: Iterable, metric: ProxyMetric,
                   sign: float) -> list[Tensor]:
    """Per unit, s·Σ_{samples, positions} a·∂μ/∂a averaged over the batches: the first-order decrease of s·μ when the
    unit's output a is set to 0 (Taylor: Δμ ≈ −Σ a·∂μ/∂a). Eval mode."""
    device = model_device(model)
    outputs: list[Tensor] = [torch.empty(0)] * len(layers)

    def keeper(i: int) -> Callable:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> None:
            outputs[i] = out
        return hook

    handles = [m.register_forward_hook(keeper(i)) for i, (_, m) in enumerate(layers)]
    sal = [torch.zeros(m.weight.shape[0], dtype=torch.float64) for _, m in layers]
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in loader:
                x, y, a = unpack_batch(batch, device)
                mu = sign * signed_proxy(model(x), y, a, metric)
                grads = torch.autograd.grad(mu, outputs, allow_unused=True, materialize_grads=True)
                for i, (act, g) in enumerate(zip(outputs, grads, strict=True)):
                    prod = (act.detach() * g).double()
                    sal[i] += prod.transpose(0, 1).reshape(prod.shape[1], -1).sum(1).cpu()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("DiffPrune: the saliency loader yielded no batches")
    return [s / n_batches for s in sal]


def diffprune(model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *,
              config: DiffPruneConfig | None = None, val_loader: Iterable | None = None,
              progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
    """DiffPrune, bias-gradient structured pruning (Marcinkevics et al. 2022, ``pruning.py``; docs/algorithm.md §9).

    Units are the output channels of E's BatchNorm layers (:func:`prunable_layers`). A unit's saliency is s·Σ a·∂μ/∂a
    over the saliency data (activation × gradient of the signed proxy μ, :func:`signed_proxy`; s = sign of the unchanged
    model's validation bias), i.e. how much removing the unit is expected to shrink the bias (Δμ ≈ −Σ a·∂μ/∂a). Step by
    step, the ``units_per_step`` unpruned units with the largest saliency are removed (weight and bias 0), the
    saliencies recomputed when ``dynamic``; after each step the model is evaluated on the validation data and the step
    with the smallest |bias| whose balanced accuracy is at least the lower bound is kept (step 0 is the unchanged
    model). No training: the only parameters that change are the pruned channels', set to 0. (Marcinkevics et al.'s code
    ranks by the gradient alone, over every activation position; docs/algorithm.md §9 and this function use activation ×
    gradient per channel.)

    Data: saliencies on D_e (``mask_loader``; ``config.data="balanced"``: ``train_loader``); validation
    ``val_loader`` (default ``mask_loader``). No epochs: ``on_epoch`` is never called.
    """
    config = config or DiffPruneConfig()
    seed_everything(config.seed)
    val = mask_loader if val_loader is None else val_loader
    saliency_loader = mask_loader if config.data == "external" else train_loader
    layers = prunable_layers(model, config.head)
    select = _Selection(model, val, config.metric, config.min_performance, config.max_drop)
    pruned: list[tuple[int, int]] = []  # (layer index, channel) in pruning order
    done = [torch.zeros(m.weight.shape[0], dtype=torch.bool) for _, m in layers]
    sal: list[Tensor] | None = None
    with phase("fastmask.prune"):
        for step in range(1, config.max_steps + 1):
            if sal is None or config.dynamic:
                sal = _unit_saliency(model, layers, saliency_loader, config.metric, select.sign)
            score = torch.cat([s.masked_fill(d, -torch.inf) for s, d in zip(sal, done, strict=True)])
            available = int(torch.isfinite(score).sum())
            if available == 0:
                break
            # stable descending order: ties go to the earlier layer / channel
            order = torch.sort(score, descending=True, stable=True).indices[:min(config.units_per_step, available)]
            offsets = np.cumsum([0] + [len(s) for s in sal])
            for flat in order.tolist():
                li = int(np.searchsorted(offsets, flat, side="right") - 1)
                ch = flat - int(offsets[li])
                _zero_unit(layers[li][1], ch)
                done[li][ch] = True
                pruned.append((li, ch))
            select.consider(step)
    best_step = select.restore("diffprune")
    kept = pruned[:best_step * config.units_per_step]
    # rebuild the selected step exactly: the original weights minus its units
    model.load_state_dict(select.initial_state)
    for li, ch in kept:
        _zero_unit(layers[li][1], ch)
    result = Result("diffprune", config, _keep_masks(model, layers, kept))
    result.details = select.details("step") | {
        "pruned_units": [(layers[li][0], ch) for li, ch in kept],
        "pruning_order": [(layers[li][0], ch) for li, ch in pruned],
        "units": sum(len(d) for d in done),
    }
    return result


def _keep_masks(model: nn.Module, layers: list[tuple[str, nn.Module]], kept: list[tuple[int, int]]) -> dict:
    """bool masks, True where a parameter entry was kept (a pruned unit's weight row and bias are False)."""
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for li, ch in kept:
        layer = layers[li][1]
        for p in (layer.weight, layer.bias):
            if p is not None:
                masks[names[id(p)]][ch] = False
    return masks
