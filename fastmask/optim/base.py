"""The mask bookkeeping that MaskedAdam, MaskedAdamW and MaskedSGD share: mask validation and storage, the mask
state dict, the step loop (closure, per-group checks) and pickling. Each optimizer adds only its ``_step_group``:
gather the group's tensors with torch's own ``_init_group`` and call its fused op.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from fastmask import ops
from fastmask.ops.table import BACKENDS

MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool)

# Masks given as {parameter or parameter name: mask} (missing or None: no mask) or as a list aligned with the
# parameters of all param groups in order.
Masks = Mapping[Any, Tensor | None] | Sequence[Tensor | None]


class MaskedOptimizer(torch.optim.Optimizer):
    """Mask bookkeeping shared by the three optimizers: validation, accessors, (mask) state dicts, and the step loop
    (closure, per-group checks) around each optimizer's ``_step_group``."""

    # torch.amp.GradScaler.step() then sets ``self.grad_scale`` / ``self.found_inf`` and calls step() without
    # unscaling the gradients first, as it does for torch's fused optimizers; the ops unscale and skip in the kernel.
    _step_supports_amp_scaling = True
    _masks: dict[Tensor, Tensor]

    def _setup_masking(self, mask_mode: str, backend: str | None) -> None:
        if mask_mode not in ops.MASK_MODES:
            raise ValueError(f"mask_mode must be one of {ops.MASK_MODES}, got {mask_mode!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.mask_mode = mask_mode
        self.backend = backend
        self._masks = {}

    def _finish_init(self, masks: Masks | None) -> None:
        for gi in range(len(self.param_groups)):
            self._check_group(gi)
        self._constructed = True
        self.set_masks(masks)

    # ---- validation -------------------------------------------------------------------------------------------

    def _describe(self, gi: int, j: int) -> str:
        group = self.param_groups[gi]
        where = f"param_groups[{gi}]['params'][{j}]"
        if "param_names" in group:
            return f"parameter {group['param_names'][j]!r} ({where})"
        return f"parameter {where}"

    def _check_group(self, gi: int) -> None:
        """Reject the torch option these optimizers do not implement, differentiable=True (also after
        ``load_state_dict``)."""
        group = self.param_groups[gi]
        name = type(self).__name__
        if group.get("differentiable", False):
            raise ValueError(f"{name} does not support differentiable=True (param_groups[{gi}])")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # During construction torch's own checks run first; the constructor checks every group afterwards.
        if getattr(self, "_constructed", False):
            try:
                self._check_group(len(self.param_groups) - 1)
            except ValueError:
                self.param_groups.pop()
                raise

    def _validated_mask(self, mask: Any, gi: int, j: int) -> Tensor:
        p = self.param_groups[gi]["params"][j]
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask for {self._describe(gi, j)} must be a Tensor, got {type(mask).__name__}")
        if mask.shape != p.shape:
            raise ValueError(
                f"mask for {self._describe(gi, j)} has shape {tuple(mask.shape)}, the parameter has {tuple(p.shape)}"
            )
        if mask.dtype not in MASK_DTYPES:
            # int8 is what ops.hard_mask(layout="bits") returns: packed bits, ceil(n / 8) bytes, not one M per element.
            hint = " (packed bits of ops.hard_mask(layout='bits')? use 'bool')" if mask.dtype == torch.int8 else ""
            raise ValueError(
                f"mask for {self._describe(gi, j)} has dtype {mask.dtype}{hint}; supported: float32, bfloat16, "
                "float16, uint8 (a soft mask quantised as round(255 M)) or bool (a hard mask)"
            )
        mask = mask.detach()
        # The fused kernels walk a parameter and its mask in one flat order, so the mask takes the parameter's
        # device and memory layout; a mask that already has them is used as is, without a copy. A copy that fails (a
        # meta mask, which has no values, for a real parameter) is reported with the parameter's name.
        if mask.device != p.device or mask.stride() != p.stride():
            try:
                mask = torch.empty_like(p, dtype=mask.dtype).copy_(mask)
            except (RuntimeError, NotImplementedError) as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(
                    f"mask for {self._describe(gi, j)} cannot be copied from {mask.device} to the parameter's "
                    f"device {p.device}: {reason}"
                ) from e
        return mask

    def _check_mask_values(self, masks: Sequence[tuple[int, int, Tensor]]) -> None:
        """Reject a float mask with NaN or a value outside [0, 1], naming its parameter (uint8 and bool masks are in
        [0, 1] by construction). A float mask is the factor M itself: M > 1 would amplify the step, M < 0 reverse it,
        NaN make the parameter NaN. One aminmax per mask and one host sync per device, so ``set_masks`` over the 161
        masks of a ResNet-50 reads each mask once and waits for the device once."""
        by_device: dict[torch.device, list[tuple[int, int, Tensor]]] = defaultdict(list)
        for gi, j, m in masks:
            # A meta mask has no values to check; it passed _validated_mask only as the mask of a meta parameter.
            if m.is_floating_point() and m.numel() > 0 and not m.is_meta:
                by_device[m.device].append((gi, j, m))
        for items in by_device.values():
            lows, highs = zip(*(torch.aminmax(m) for _, _, m in items), strict=True)
            lo, hi = torch.stack([t.float() for t in lows]), torch.stack([t.float() for t in highs])
            ok = (lo >= 0) & (hi <= 1)  # False where the mask has a NaN: aminmax propagates it
            if bool(ok.all()):
                continue
            k = int((~ok).nonzero()[0])
            gi, j, _ = items[k]
            low, high = float(lo[k]), float(hi[k])
            if math.isnan(low) or math.isnan(high):
                raise ValueError(f"mask for {self._describe(gi, j)} contains NaN")
            raise ValueError(
                f"mask for {self._describe(gi, j)} has values outside [0, 1] (min {low:g}, max {high:g}); a float mask "
                "is the factor M itself"
            )

    def _positions(self) -> list[tuple[int, int]]:
        return [(gi, j) for gi, group in enumerate(self.param_groups) for j in range(len(group["params"]))]

    # ---- public mask API --------------------------------------------------------------------------------------

    def set_masks(self, masks: Masks | None) -> None:
        """Replace every mask.

        Args:
            masks: None (no masks: plain torch steps); a Mapping from parameter tensor (or parameter name, when the
                optimizer was built from ``model.named_parameters()``) to mask, where parameters left out or mapped
                to None get no mask; or a list with one mask or None per parameter, over all param groups in order.
                A mask has the parameter's shape and dtype float32 / bfloat16 / float16 (M = value, which must lie
                in [0, 1]: NaN or a value outside is an error), uint8 (M = value / 255, a quantised soft mask) or
                bool (M = 0 or 1, a hard mask). It is copied to the parameter's device and memory layout here, once
                (a meta mask, which has no values, cannot be, unless the parameter is on meta too), and its values
                are checked here, in one pass over each float mask, not at every step.

        Every error is one line naming the parameter at fault (by name when the optimizer was built from
        ``model.named_parameters()``), and leaves the optimizer's masks as they were: every mask is checked before
        any is replaced.
        """
        valid: list[tuple[int, int, Tensor]] = []
        positions = self._positions()
        if masks is None:
            pass
        elif isinstance(masks, Mapping):
            by_tensor = {id(self.param_groups[gi]["params"][j]): (gi, j) for gi, j in positions}
            by_name = {
                self.param_groups[gi]["param_names"][j]: (gi, j)
                for gi, j in positions
                if "param_names" in self.param_groups[gi]
            }
            seen: set[tuple[int, int]] = set()
            for key, mask in masks.items():
                if isinstance(key, str):
                    if key not in by_name:
                        hint = "" if by_name else " (the optimizer was built without parameter names)"
                        raise KeyError(f"masks: no parameter named {key!r} in this optimizer{hint}")
                    gi, j = by_name[key]
                elif isinstance(key, Tensor):
                    if id(key) not in by_tensor:
                        raise KeyError(
                            f"masks: a key (tensor of shape {tuple(key.shape)}) is not a parameter of this optimizer"
                        )
                    gi, j = by_tensor[id(key)]
                else:
                    raise TypeError(f"masks: keys must be parameters or parameter names, got {type(key).__name__}")
                if (gi, j) in seen:
                    raise ValueError(f"masks: {self._describe(gi, j)} is given twice (by tensor and by name)")
                seen.add((gi, j))
                if mask is not None:
                    valid.append((gi, j, self._validated_mask(mask, gi, j)))
        else:
            if isinstance(masks, Tensor):
                raise TypeError("masks must be a Mapping or a list of masks, got a single Tensor")
            masks = list(masks)
            if len(masks) != len(positions):
                raise ValueError(f"masks: got {len(masks)} masks for {len(positions)} parameters")
            for (gi, j), mask in zip(positions, masks, strict=True):
                if mask is not None:
                    valid.append((gi, j, self._validated_mask(mask, gi, j)))
        self._check_mask_values(valid)
        self._masks = {self.param_groups[gi]["params"][j]: m for gi, j, m in valid}

    def masks(self) -> dict[Tensor, Tensor]:
        """The current masks, {parameter: mask}; parameters without a mask are absent."""
        return dict(self._masks)

    def mask_state_dict(self) -> dict[str, Any]:
        """The masks and mask mode, keyed like ``state_dict()['state']``: by the parameter's index over all param
        groups. ``{"mask_mode": str, "masks": {index: mask}}``; the mask tensors are not copied."""
        masks = {
            index: self._masks[self.param_groups[gi]["params"][j]]
            for index, (gi, j) in enumerate(self._positions())
            if self.param_groups[gi]["params"][j] in self._masks
        }
        return {"mask_mode": self.mask_mode, "masks": masks}

    def load_mask_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``mask_state_dict()`` saved (replacing every mask); masks are validated as in ``set_masks``."""
        missing = {"mask_mode", "masks"} - set(state_dict)
        if missing:
            raise KeyError(f"mask state dict lacks {sorted(missing)}")
        mode = state_dict["mask_mode"]
        if mode not in ops.MASK_MODES:
            raise ValueError(f"mask state dict: mask_mode must be one of {ops.MASK_MODES}, got {mode!r}")
        aligned: list[Tensor | None] = [None] * len(self._positions())
        for index, mask in state_dict["masks"].items():
            if not isinstance(index, int) or not 0 <= index < len(aligned):
                raise KeyError(f"mask state dict: index {index!r} is not a parameter index (0..{len(aligned) - 1})")
            aligned[index] = mask
        self.set_masks(aligned)
        self.mask_mode = mode

    # ---- step -------------------------------------------------------------------------------------------------

    def _index(self, group: dict[str, Any]) -> int:
        """The index of ``group`` in ``param_groups`` (by identity: dicts of tensors do not compare)."""
        return next(gi for gi, g in enumerate(self.param_groups) if g is group)

    # torch's own decorator rather than torch.no_grad(): besides disabling grad it places the two graph breaks
    # torch.optim's step has under torch.compile, so a compiled training step splits into the same graphs.
    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Iterated as torch.optim does (not enumerate()), so that Dynamo sees each group as an item of
        # ``param_groups`` and runs ``_init_group`` outside the trace, as it does for torch's optimizers.
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Gather ``group``'s tensors with torch's own ``_init_group`` and take its masked step."""
        raise NotImplementedError

    def _check_step(self, group: dict[str, Any], params: Sequence[Tensor], state_steps: Sequence[Tensor] = ()) -> None:
        """The per-step checks, before any tensor changes: differentiable=True (a loaded state dict may set it) and,
        with capturable=True, torch.optim.Adam's own device check (the same AssertionError and message), which torch
        skips under torch.compile, where Dynamo sets capturable=True in its traced copy of the groups."""
        if group.get("differentiable", False):
            self._check_group(self._index(group))
        if state_steps and group.get("capturable", False) and not torch.compiler.is_compiling():
            supported = torch_optimizer._get_capturable_supported_devices()
            for p, step in zip(params, state_steps, strict=True):
                if not (p.device.type == step.device.type and p.device.type in supported):
                    raise AssertionError(
                        f"If capturable=True, params and state_steps must be on supported devices: {supported}."
                    )

    def _masks_of(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        return [self._masks.get(p) for p in params]

    def _amp(self) -> dict[str, Tensor | None]:
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups; masks travel with the optimizer through
        # copy.deepcopy and pickle (keyed by the same parameter objects).
        state = super().__getstate__()
        state.update(mask_mode=self.mask_mode, backend=self.backend, _masks=self._masks, _constructed=True)
        return state


MASK_ARGS_DOC = """
        masks (Mapping or list, optional): a mask per parameter, see ``set_masks`` (default: None, no masks).
        mask_mode (str, optional): ``"grad"`` (g ← M ⊙ g, the papers') or ``"update"`` (θ ← θ + M ⊙ Δθ; entries with
            M = 0 keep parameter and state bit for bit) (default: "grad").
        backend (str, optional): ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``; None chooses as
            fastmask.ops.backend does (``FASTMASK_BACKEND``, then automatic) (default: None).

    Masks are kept out of ``state_dict()``, which is torch's (loadable by torch.optim and from it); save and restore
    them with ``mask_state_dict()`` / ``load_mask_state_dict()``."""
