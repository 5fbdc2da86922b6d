"""Every debiasing method by its command-line name: one registry that ``fastmask debias``, ``fastmask compare``
and the demo read.

An entry is a :class:`Method`: its name, the label tables print, the function that runs it and the factory of its
default configuration. Calling the entry runs the function with that default when no configuration is given::

    result = METHODS["hard-0.3"](model, mask_loader, train_loader, config=None, progress=False)

Every function has the call shape ``fn(model, mask_loader, train_loader, *, config, progress) -> Result``
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
from fastmask.methods.bmft import bmft
from fastmask.methods.configs import BmftConfig, SwiftConfig
from fastmask.methods.state import Result
from fastmask.methods.swift import swift

__all__ = ["Method", "METHODS", "HARD_FRACTIONS"]


@dataclass(frozen=True)
class Method:
    """A debiasing method: ``name`` (command line), ``label`` (tables), ``run`` (the function) and ``config`` (the
    factory of its default configuration)."""

    name: str
    label: str
    run: Callable[..., Result]
    config: Callable[[], Any]

    def __call__(self, model: nn.Module, mask_loader: Iterable, train_loader: Iterable, *, config: Any | None = None,
                 progress: bool = False) -> Result:
        """Run the method on ``model`` (in place) with ``config``, or its default configuration."""
        return self.run(model, mask_loader, train_loader, config=config or self.config(), progress=progress)


#: The fractions r of the hard-mask ablation ([PS] §5).
HARD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("baseline", "Baseline", baseline, BaselineConfig),
        Method("swift", "SWiFT", swift, SwiftConfig),
        Method("bmft", "BMFT", bmft, BmftConfig),
        Method("fullft-rw", "FullFT-RW", fullft_rw, FullFTConfig),
        Method("fullft-reg", "FullFT-Reg", fullft_reg, FullFTConfig),
        Method("fullft-fdr", "FullFT-FDR", fullft_fdr, FullFTConfig),
        Method("llft", "LLFT", llft, LLFTConfig),
        Method("diffgda", "DiffGda", diffgda, DiffGdaConfig),
        Method("diffprune", "DiffPrune", diffprune, DiffPruneConfig),
        Method("fairprune", "FairPrune", fairprune, FairPruneConfig),
        Method("random-mask", "Random mask", random_mask_swift, RandomMaskConfig),
        *(Method(f"hard-{r:g}", f"Hard mask r={r:g}", hard_mask_swift, partial(HardMaskConfig, fraction=r))
          for r in HARD_FRACTIONS),
        Method("manual-bn", "BMFT manual BN", manual_mask_bmft, partial(ManualMaskConfig, kind="bn")),
        Method("manual-top", "BMFT manual Top", manual_mask_bmft, partial(ManualMaskConfig, kind="shallow_conv")),
    )
}
