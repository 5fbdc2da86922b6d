"""Diagonal "Fisher" importances of every parameter for the bias objective and the task loss (docs/algorithm.md §3).

For J ∈ {B, L} (B the bias function, L the WBCE) and every parameter θ (head and BatchNorm included):

    I_J[θ] = (1/N_b) Σ_batches (∂J_batch/∂θ)²          (SWiFT Eqs. 7-8, BMFT Eq. 3)

the squared **batch-mean** gradient, averaged over the N_b batches (the last partial batch included), with the
model in ``eval()`` mode (BatchNorm running statistics, no dropout).

:func:`fisher_importance` does this with **one forward pass per batch**: both objectives are computed from the same
logits and each is differentiated through the same graph (``torch.autograd.grad`` with ``retain_graph`` on the first).
It never touches ``.grad``, so nothing accumulates across batches or objectives (the authors' CXR bug, docs/algorithm.md
§8.8, cannot occur), and the squares are accumulated by the fused ``fastmask.ops.fisher_accumulate_``.
:func:`fisher_importance_two_pass` is the authors' two-pass loop of docs/algorithm.md §3 (one full pass per objective);
it is the test oracle and the benchmark's baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# tqdm.auto is avoided on purpose: its asyncio class calls iter() on the loader in __init__ and again when iterated,
# which would start a DataLoader's worker processes twice.
from tqdm import tqdm

from fastmask import ops
from fastmask.data.batch import unpack_batch
from fastmask.fairness.losses import SWIFT_BIAS, BiasSpec, wbce
from fastmask.model.scoring import model_device
from fastmask.parallel import ddp, fsdp
from fastmask.util.profiling import phase, ranged

__all__ = ["fisher_importance", "fisher_importance_two_pass", "Objective"]

Objective = Callable[[Tensor, Tensor, Tensor], Tensor]
"""A scalar objective of a batch's (logits z, labels y, attribute a)."""

Importances = dict[str, Tensor]


@contextmanager
def _eval_with_all_grads(model: nn.Module):
    """Eval mode and requires_grad on every parameter for the duration; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def fisher_importance(
    model: nn.Module,
    loader: Iterable,
    *,
    bias: BiasSpec | Objective = SWIFT_BIAS,
    loss: Callable[[Tensor, Tensor], Tensor] = wbce,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Importances, Importances, int]:
    """Both Fisher diagonals, I_B and I_L, with one forward pass per batch (docs/algorithm.md §3).

    Args:
        model: the classifier; it must output one logit per sample, shape (B,) or (B, 1).
        loader: an iterable of batches (x, y, a, ...).
        bias: the bias objective B(z, y, a): a :class:`~fastmask.losses.BiasSpec` (SWiFT: ``SWIFT_BIAS``, on
            log-probabilities; BMFT: ``BMFT_BIAS``, on logits) or any callable with that signature.
        loss: the task loss L(z, y); default the authors' WBCE.
        device: where to run; default the device of the model's first parameter.
        progress: show a tqdm progress bar.

    Returns:
        ``(I_bias, I_loss, n_batches)``: float32 tensors keyed by ``model.named_parameters()`` names.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    names, params = zip(*model.named_parameters(), strict=True)
    sharded = fsdp.is_sharded(model)
    # FSDP2: each rank accumulates the importances of its own parameter shards
    imp_b = [torch.zeros_like(fsdp.local(p), dtype=torch.float32) for p in params]
    imp_l = [torch.zeros_like(fsdp.local(p), dtype=torch.float32) for p in params]
    n_batches = 0
    with phase("fastmask.importance"), _eval_with_all_grads(model):
        for batch in ranged(tqdm(loader, desc="importance", disable=not progress, leave=False)):
            x, y, a = unpack_batch(batch, dev)
            if sharded:
                # autograd.grad cannot reach DTensor parameters (the forward runs on FSDP's gathered copies), so
                # each objective takes its own forward and backward; FSDP leaves the reduced gradient shards.
                g_b = fsdp.sharded_grads(bias(*ddp.global_batch(model(x), y, a)), params)
                g_l = fsdp.sharded_grads(loss(*ddp.global_batch(model(x), y, a)[:2]), params)
                ops.fisher_accumulate_(imp_b, imp_l, g_b, g_l)
                n_batches += 1
                continue
            # Under torchrun both objectives are the global batch's (fastmask.ddp.global_batch) and the
            # gradients are summed over the ranks before squaring: every rank accumulates the same importances.
            z, y, a = ddp.global_batch(model(x), y, a)
            j_b = bias(z, y, a)
            j_l = loss(z, y)
            # Two VJPs through one graph: the forward is shared, and autograd.grad leaves .grad untouched. One
            # batched backward over both cotangents (is_grads_batched=True, vmap) measured 1.8x slower than these two
            # on CPU (6-layer CNN, batch 32, 32 px: 256 ms vs 145 ms).
            g_b = torch.autograd.grad(j_b, params, retain_graph=True, allow_unused=True, materialize_grads=True)
            g_l = torch.autograd.grad(j_l, params, allow_unused=True, materialize_grads=True)
            ddp.all_reduce_grads([*g_b, *g_l])
            ops.fisher_accumulate_(imp_b, imp_l, g_b, g_l)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("fisher_importance: the loader yielded no batches")
    for t in (*imp_b, *imp_l):
        t.div_(n_batches)
    return dict(zip(names, imp_b, strict=True)), dict(zip(names, imp_l, strict=True)), n_batches


def fisher_importance_two_pass(
    model: nn.Module,
    loader: Iterable,
    *,
    bias: BiasSpec | Objective = SWIFT_BIAS,
    loss: Callable[[Tensor, Tensor], Tensor] = wbce,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Importances, Importances, int]:
    """The authors' two-pass loop of docs/algorithm.md §3: one full pass per objective, J = B first, then J = L.

    Per batch: zero all gradients, forward, J, backward, I_J[θ] += (θ.grad)²; finally I_J /= N_b. Same arguments and
    result as :func:`fisher_importance`; the loader must give the same batches on both passes (no shuffling) for
    the two to agree. This is the oracle for :func:`fisher_importance` and the benchmark's reference.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    named = list(model.named_parameters())
    objectives: list[Callable[[Tensor, Tensor, Tensor], Tensor]] = [bias, lambda z, y, a: loss(z, y)]
    results: list[Importances] = []
    n_batches = 0
    with _eval_with_all_grads(model):
        for objective in objectives:
            imp = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
            n_batches = 0
            for batch in tqdm(loader, desc="importance (two-pass)", disable=not progress, leave=False):
                model.zero_grad(set_to_none=True)
                x, y, a = unpack_batch(batch, dev)
                objective(model(x), y, a).backward()
                for n, p in named:
                    if p.grad is not None:
                        imp[n] += p.grad.float().square()
                n_batches += 1
            if n_batches == 0:
                raise ValueError("fisher_importance_two_pass: the loader yielded no batches")
            for t in imp.values():
                t.div_(n_batches)
            results.append(imp)
        model.zero_grad(set_to_none=True)
    return results[0], results[1], n_batches
