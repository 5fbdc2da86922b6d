"""Drop-in masked optimizers: ``MaskedAdam``, ``MaskedAdamW`` and ``MaskedSGD``.

Each is a subclass of its torch.optim counterpart with the same constructor arguments, defaults, validation and error
messages, param groups, state keys and ``state_dict()``, plus a mask per parameter. The class only gathers tensors
(with torch's own ``_init_group``, so state is created exactly as torch creates it); the step is computed by the
functional ops ``fastmask.ops.masked_adam_`` / ``masked_sgd_``, one call per param group, which run one fused launch
per (device, dtype) on the backend fastmask/backend.py chooses. Without a mask they take torch's step, on any
parameter torch steps: tensors the fused kernels cannot walk (non-dense parameters, state or masks in another
layout) take the reference implementation, gradients in another layout are copied into the parameter's, complex
parameters are stepped as their float views (a real mask scaling both parts), and MaskedSGD steps sparse gradients
with torch.optim.SGD's own algorithm (docs/optim.md, "Any parameter torch steps").

How the mask M enters the step (docs/algorithm.md §5, §8.9-8.10), chosen by ``mask_mode``:

- ``"grad"`` (default, the papers'): g ← M ⊙ g before the optimizer sees the gradient. SGD's weight decay and
  momentum still move masked-out entries. Adam divides by √v̂, so a constant M cancels out of m̂/√v̂ and the mask acts
  only through eps, i.e. only where M is close to 0.
- ``"update"``: the unmasked step Δθ is computed and θ ← θ + M ⊙ Δθ; entries with M = 0 keep their parameter and
  every state buffer bit for bit.

Masks are not part of ``state_dict()`` (which stays loadable by torch.optim and vice versa); save them with
``mask_state_dict()`` and restore them with ``load_mask_state_dict()``.

This package imports only :mod:`fastmask.ops` (and :mod:`fastmask.util`), so it can be used without the rest of
fastmask; the shared mask bookkeeping is :mod:`fastmask.optim.base`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmask import ops
from fastmask.optim.base import MASK_ARGS_DOC, MaskedOptimizer, Masks

__all__ = ["MaskedAdam", "MaskedAdamW", "MaskedSGD"]


class MaskedAdam(MaskedOptimizer, torch.optim.Adam):
    __doc__ = f"""Adam with a mask per parameter; torch.optim.Adam when no mask is set.

    With t the step, g the gradient (negated if ``maximize``, divided by GradScaler's scale) and M the mask:

        "grad" mode:   g ← M ⊙ g
        g ← g + λθ                                   (weight_decay λ; AdamW instead: θ ← θ(1 − γλ))
        m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²;   v_max ← max(v_max, v) if amsgrad
        Δθ = −γ/(1 − β1^t) · m / (√(v or v_max) / √(1 − β2^t) + eps)
        "grad" mode:   θ ← θ + Δθ
        "update" mode: θ ← θ + M ⊙ Δθ, and m, v, v_max change only where M ≠ 0

    In "grad" mode a constant mask cancels out of m/√v (only eps keeps it), so a soft mask acts only where it is
    near 0 (docs/algorithm.md §8.9); "update" mode scales the step itself.

    Args:
        params (iterable): parameters or named parameters (``model.named_parameters()``) or param group dicts.
        lr (float, Tensor, optional): learning rate γ (default: 1e-3).
        betas (tuple[float, float], optional): β1, β2 (default: (0.9, 0.999)).
        eps (float, optional): term added to the denominator (default: 1e-8).
        weight_decay (float, optional): λ, L2 penalty added to the gradient (default: 0).
        amsgrad (bool, optional): use the running maximum of v (default: False).
        foreach (bool, optional): accepted for compatibility; the step is always one fused launch per
            (device, dtype) group.
        maximize (bool, optional): maximise the objective (default: False).
        capturable (bool, optional): keep ``step`` on the parameter's device and take the step without host
            synchronisation, so it can be captured in a CUDA graph; as in torch, params must be on a device torch
            supports for capture (CUDA), except under torch.compile (default: False).
        differentiable (bool, optional): must be False.
        fused (bool, optional): accepted; as in torch, it keeps ``step`` as a float32 tensor on the parameter's
            device and requires a device torch's fused Adam supports.
        decoupled_weight_decay (bool, optional): AdamW's decay θ ← θ(1 − γλ) (default: False).
{MASK_ARGS_DOC}
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        masks: Masks | None = None,
        mask_mode: str = "grad",
        backend: str | None = None,
    ) -> None:
        self._setup_masking(mask_mode, backend)
        # Named explicitly: for MaskedAdamW, super() would resolve to AdamW, which takes no decoupled_weight_decay.
        torch.optim.Adam.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._finish_init(masks)

    def _step_group(self, group: dict[str, Any]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        # torch's own gathering: lazy state creation exactly as torch.optim.Adam, its sparse-gradient error and
        # its fused device check.
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        self._check_step(group, params, state_steps)
        if not params:
            return
        beta1, beta2 = group["betas"]
        ops.masked_adam_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, self._masks_of(params),
            lr=group["lr"], beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]), amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"], mask_mode=self.mask_mode,
            backend=self.backend, **self._amp(),
        )


class MaskedAdamW(MaskedAdam, torch.optim.AdamW):
    __doc__ = f"""AdamW (decoupled weight decay θ ← θ(1 − γλ)) with a mask per parameter; torch.optim.AdamW when no
    mask is set. The step and the mask modes are MaskedAdam's with ``decoupled_weight_decay=True``; in "update" mode
    the decay is part of Δθ, so masked-out entries do not decay.

    Args:
        params (iterable): parameters or named parameters (``model.named_parameters()``) or param group dicts.
        lr (float, Tensor, optional): learning rate γ (default: 1e-3).
        betas (tuple[float, float], optional): β1, β2 (default: (0.9, 0.999)).
        eps (float, optional): term added to the denominator (default: 1e-8).
        weight_decay (float, optional): decoupled decay coefficient λ (default: 1e-2).
        amsgrad (bool, optional): use the running maximum of v (default: False).
        maximize, foreach, capturable, differentiable, fused: as in MaskedAdam.
{MASK_ARGS_DOC}
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: Masks | None = None,
        mask_mode: str = "grad",
        backend: str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            masks=masks, mask_mode=mask_mode, backend=backend,
        )


class MaskedSGD(MaskedOptimizer, torch.optim.SGD):
    __doc__ = f"""SGD (momentum, dampening, Nesterov, weight decay) with a mask per parameter; torch.optim.SGD when
    no mask is set.

    With g the gradient (negated if ``maximize``, divided by GradScaler's scale) and M the mask:

        "grad" mode:   g ← M ⊙ g
        d = g + λθ;   b ← d on the first step, else b ← μ b + (1 − τ) d;   d ← d + μ b if nesterov else b
        "grad" mode:   θ ← θ − γ d
        "update" mode: θ ← θ − γ M ⊙ d, and b changes only where M ≠ 0

    In "grad" mode weight decay and momentum still move masked-out entries (the papers' behaviour, docs/algorithm.md
    §8.10); "update" mode freezes them. A sparse gradient takes torch.optim.SGD's own sparse step, its mask (in "grad"
    mode only) scaling the gradient's stored values.

    Args:
        params (iterable): parameters or named parameters (``model.named_parameters()``) or param group dicts.
        lr (float, Tensor, optional): learning rate γ (default: 1e-3).
        momentum (float, optional): μ (default: 0).
        dampening (float, optional): τ (default: 0).
        weight_decay (float, optional): λ, L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        maximize (bool, optional): maximise the objective (default: False).
        foreach (bool, optional): accepted for compatibility; the step is always one fused launch per
            (device, dtype) group.
        differentiable (bool, optional): must be False.
        fused (bool, optional): accepted; requires a device torch's fused SGD supports, as in torch.
{MASK_ARGS_DOC}
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: Masks | None = None,
        mask_mode: str = "grad",
        backend: str | None = None,
    ) -> None:
        self._setup_masking(mask_mode, backend)
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused,
        )
        self._finish_init(masks)

    def _step_group(self, group: dict[str, Any]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffers: list[Tensor | None] = []
        has_sparse_grad = self._init_group(group, params, grads, momentum_buffers)
        self._check_step(group, params)
        if has_sparse_grad and group["fused"]:
            raise RuntimeError("`_fused_sgd` does not support sparse gradients")  # torch's fused SGD's own error
        if has_sparse_grad and self.mask_mode == "update":
            # A sparse gradient takes torch's own sparse SGD, where a mask can scale the gradient's values ("grad"
            # mode) but has no dense step to scale ("update" mode): see fastmask.ops._sparse_sgd_.
            for j, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse and p in self._masks:
                    raise ValueError(f"MaskedSGD: {self._describe(self._index(group), j)} has a sparse gradient and "
                                     "a mask; a mask applies to a sparse gradient only in mask_mode='grad'")
        if not params:
            return
        momentum_buffers = ops.masked_sgd_(
            params, grads, momentum_buffers, self._masks_of(params), lr=group["lr"],
            weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), nesterov=group["nesterov"], maximize=group["maximize"],
            mask_mode=self.mask_mode, backend=self.backend, **self._amp(),
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffers, strict=True):
                # None only after a first step that GradScaler skipped: no buffer yet, as in torch.
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
