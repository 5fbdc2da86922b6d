"""Every debiasing method by its command-line name: one registry that ``fastmask debias``, ``fastmask compare``,
the demo and :func:`fastmask.methods.selection.select` read.

An entry is a :class:`Method`: its name, the label tables print, the function that runs it, the factory of its
default configuration, and what a selection needs to tune it (its grid, its steps). Calling the entry runs the
function with that default when no configuration is given::

    result = METHODS["hard-0.3"](model, mask_loader, train_loader, config=None, progress=False)

Every function has the call shape ``fn(model, mask_loader, train_loader, *, config, progress, on_epoch) -> Result``;
``on_epoch`` receives a :class:`~fastmask.methods.state.RunState` after every epoch of a method that trains
(:mod:`fastmask.methods.baselines` describes what each method reads and changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from fastmask.methods.baselines.ablations import (
    HardMaskConfig,
    ManualMaskConfig,
    RandomMaskConfig,
    hard_mask_swift,
    manual_mask_bmft,
    random_mask_swift,
)
from fastmask.methods.baselines.bias_proxy import DiffGdaConfig, DiffPruneConfig, diffgda, diffprune
from fastmask.methods.baselines.fairprune import FairPruneConfig, fairprune
from fastmask.methods.baselines.finetune import (
    BaselineConfig,
    FullFTConfig,
    LLFTConfig,
    baseline,
    fullft_fdr,
    fullft_reg,
    fullft_rw,
    llft,
)
from fastmask.methods.bmft import bmft, bmft_masks
from fastmask.methods.configs import BmftConfig, SwiftConfig
from fastmask.methods.grids import DEFAULT_GRIDS, Candidate
from fastmask.methods.state import OnEpoch, Result
from fastmask.methods.swift import swift, swift_masks

__all__ = ["Method", "METHODS", "HARD_FRACTIONS"]


@dataclass(frozen=True)
class Method:
    """A debiasing method.

    Attributes:
        name: its command-line name.
        label: its name in tables.
        run: the function (module docstring).
        config: the factory of its default configuration.
        grid: the candidates a selection tries (:mod:`fastmask.methods.grids`); empty: nothing to tune.
        steps: the names of its training steps in order, as its ``on_epoch`` reports give them; the epochs of the
            last one are what a run delivers (before it, SWiFT's head is still to be re-initialised, BMFT's to be
            zeroed). Empty for a method without epochs (it delivers its final model).
        masks: for a method that takes ``masks=`` and ``resume=`` (SWiFT, BMFT), the function that builds its masks,
            ``masks(model, mask_loader, config, progress) -> (masks, batches read)``: a selection builds them once,
            and runs a first step shared by several candidates once.
        last_step_only: the candidate settings that only the last step reads (paths, or prefixes ending in
            ``.``): candidates that differ in nothing else share their first step (with ``masks``).
        reference: the untouched model tables compare against (the Baseline): run as it is, never selected.
    """

    name: str
    label: str
    run: Callable[..., Result]
    config: Callable[[], Any]
    grid: tuple[Candidate, ...] = ()
    steps: tuple[str, ...] = ()
    masks: Callable[..., tuple[dict, int]] | None = None
    last_step_only: tuple[str, ...] = ()
    reference: bool = False

    def __call__(self, model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: Any | None = None,
                 progress: bool = False, on_epoch: OnEpoch | None = None) -> Result:
        """Run the method on ``model`` (in place) with ``config``, or its default configuration."""
        return self.run(model, mask_loader, train_loader, config=config or self.config(), progress=progress,
                        on_epoch=on_epoch)


#: The fractions r of the hard-mask ablation ([PS] §5).
HARD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)

_SWIFT = {"grid": DEFAULT_GRIDS["swift"], "steps": ("step1", "step2")}
_BMFT = {"grid": DEFAULT_GRIDS["bmft"], "steps": ("impair", "repair")}


def _finetune(name: str) -> dict[str, Any]:
    """A one-step fine-tuning baseline: its grid, and its step, named after it."""
    return {"grid": DEFAULT_GRIDS[name], "steps": (name,)}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("baseline", "Baseline", baseline, BaselineConfig, reference=True),
        # the original weights at a decision threshold chosen on the validation part: what moving the threshold
        # alone does, the row every method has to beat (in a selection it is candidate zero)
        Method("threshold", "Threshold only", baseline, BaselineConfig),
        Method("swift", "SWiFT", swift, SwiftConfig, **_SWIFT, masks=swift_masks, last_step_only=("step2.",)),
        Method("bmft", "BMFT", bmft, BmftConfig, **_BMFT, masks=bmft_masks,
               last_step_only=("repair.", "beta")),
        Method("fullft-rw", "FullFT-RW", fullft_rw, FullFTConfig, **_finetune("fullft-rw")),
        Method("fullft-reg", "FullFT-Reg", fullft_reg, FullFTConfig, **_finetune("fullft-reg")),
        Method("fullft-fdr", "FullFT-FDR", fullft_fdr, FullFTConfig, **_finetune("fullft-fdr")),
        Method("llft", "LLFT", llft, LLFTConfig, **_finetune("llft")),
        Method("diffgda", "DiffGda", diffgda, DiffGdaConfig, **_finetune("diffgda")),
        Method("diffprune", "DiffPrune", diffprune, DiffPruneConfig, grid=DEFAULT_GRIDS["diffprune"]),
        Method("fairprune", "FairPrune", fairprune, FairPruneConfig, grid=DEFAULT_GRIDS["fairprune"]),
        Method("random-mask", "Random mask", random_mask_swift, RandomMaskConfig, **_SWIFT),
        *(Method(f"hard-{r:g}", f"Hard mask r={r:g}", hard_mask_swift, partial(HardMaskConfig, fraction=r), **_SWIFT)
          for r in HARD_FRACTIONS),
        Method("manual-bn", "BMFT manual BN", manual_mask_bmft, partial(ManualMaskConfig, kind="bn"), **_BMFT),
        Method("manual-top", "BMFT manual Top", manual_mask_bmft, partial(ManualMaskConfig, kind="shallow_conv"),
               **_BMFT),
    )
}
