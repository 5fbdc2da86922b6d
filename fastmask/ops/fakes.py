"""Fake (meta) kernels of every op declared in csrc/ops.cpp, for FakeTensor tracing (torch.compile, torch.export,
``torch.library.opcheck``): each gives the output's metadata without computing it. The in-place ops return nothing,
so their fakes only check that the lists line up. Registered once ``fastmask._C`` is loaded; which ops have a schema
is the op table's ``schema`` column (a test checks that every one has a fake).

The same schemas and fakes also declare ``fastmask_triton::<name>`` for every op with a Triton kernel: the Triton
launcher as an opaque op. Dynamo cannot trace a launch through pointer tables (``data_ptr()`` of fake tensors), so
under torch.compile :mod:`fastmask.ops` calls the launcher through that op, and the compiled graph keeps it as one
node, as it keeps the C++ op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._library.simple_registry import singleton as fake_registry

from fastmask.ops.backend import _extension_error
from fastmask.ops.reference import check_bounds
from fastmask.ops.table import OPS

TRITON_NAMESPACE = "fastmask_triton"


def _same_lengths(op: str, **lists: Sequence) -> None:
    lengths = {name: len(v) for name, v in lists.items() if len(v)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: list lengths differ: {lengths}")


def register(triton_kernel: Callable[[str], Callable]) -> None:
    """Register the fakes, then declare the ``fastmask_triton`` ops with them, whose kernel for op ``name`` is
    ``triton_kernel(name)`` (once, when the extension is built)."""
    if _extension_error() is not None or getattr(register, "done", False):
        return
    register.done = True  # type: ignore[attr-defined]
    _register_fakes()
    library = torch.library.Library(TRITON_NAMESPACE, "DEF")
    register.library = library  # type: ignore[attr-defined]  (a Library drops its ops when it is collected)
    for op in OPS.values():
        if not (op.schema and "triton" in op.backends):
            continue
        library.define(str(getattr(torch.ops.fastmask, op.name).default._schema).removeprefix("fastmask::"))
        # The Triton module is imported at the first call, not when fastmask.ops is.
        library.impl(op.name, lambda *args, _name=op.name, **kwargs: triton_kernel(_name)(*args, **kwargs),
                     "CompositeExplicitAutograd")
        fake = fake_registry.find(f"fastmask::{op.name}").fake_impl.kernel.func
        torch.library.register_fake(f"{TRITON_NAMESPACE}::{op.name}", fake, lib=library)


def _register_fakes() -> None:

    @torch.library.register_fake("fastmask::fisher_accumulate_")
    def _(imp_bias: list[Tensor], imp_loss: list[Tensor], grad_bias: list[Tensor], grad_loss: list[Tensor]) -> None:
        _same_lengths("fisher_accumulate_", imp_bias=imp_bias, imp_loss=imp_loss, grad_bias=grad_bias,
                      grad_loss=grad_loss)

    @torch.library.register_fake("fastmask::soft_mask")
    def _(imp_bias: list[Tensor], imp_loss: list[Tensor], eps: float = 1e-10, apply_tanh: bool = True,
          bounds: Tensor | None = None) -> list[Tensor]:
        _same_lengths("soft_mask", imp_bias=imp_bias, imp_loss=imp_loss)
        check_bounds("soft_mask", bounds, len(imp_bias))
        return [torch.empty_like(b, dtype=torch.float32, memory_format=torch.contiguous_format) for b in imp_bias]

    @torch.library.register_fake("fastmask::soft_mask_")
    def _(imp_bias: list[Tensor], imp_loss: list[Tensor], eps: float = 1e-10, apply_tanh: bool = True,
          bounds: Tensor | None = None) -> None:
        _same_lengths("soft_mask_", imp_bias=imp_bias, imp_loss=imp_loss)
        check_bounds("soft_mask_", bounds, len(imp_bias))

    @torch.library.register_fake("fastmask::masked_adam_")
    def _(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], masks: list[Tensor | None], *, lr: float,
          beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
          decoupled_weight_decay: bool, mask_update: bool, grad_scale: Tensor | None = None,
          found_inf: Tensor | None = None) -> None:
        _same_lengths("masked_adam_", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                      state_steps=state_steps, masks=masks)

    @torch.library.register_fake("fastmask::masked_sgd_")
    def _(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], masks: list[Tensor | None], *,
          lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
          first_step: bool, mask_update: bool, grad_scale: Tensor | None = None,
          found_inf: Tensor | None = None) -> None:
        _same_lengths("masked_sgd_", params=params, grads=grads, momentum_buffers=momentum_buffers, masks=masks)

    @torch.library.register_fake("fastmask::radix_histogram")
    def _(tensors: list[Tensor], prefixes: list[int], prefix_bits: int, digit_bits: int) -> Tensor:
        # Counts come back on the host: every pass's choice is made there.
        return torch.empty((len(prefixes), 1 << digit_bits), dtype=torch.int64, device="cpu")

    @torch.library.register_fake("fastmask::hard_mask")
    def _(tensors: list[Tensor], threshold: float, inclusive: bool = False, layout: str = "bool") -> list[Tensor]:
        if layout == "bits":
            return [t.new_empty(((t.numel() + 7) // 8,), dtype=torch.int8) for t in tensors]
        return [t.new_empty(t.shape, dtype=torch.bool) for t in tensors]
