"""The configurations a selection tries (docs/algorithm.md §10): :class:`Candidate`, a change of a method's
configuration, :func:`grid`, every combination of a few values, and the default grid of every method.

A candidate names its settings by their path in the configuration, ``"step1.lr"`` being ``config.step1.lr``, so one
type serves every method: SWiFT's two learning rates and β, a pruning ratio, a number of units per step. Every
method that can be tuned gets a grid of the same size, :data:`GRID_SIZE`, so that in a comparison each has the same
tuning budget; a method with nothing to tune (the unchanged Baseline) has an empty grid and runs once, as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

__all__ = ["Candidate", "grid", "two_step_grid", "GRID_SIZE", "DEFAULT_GRIDS"]


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: ``settings``, (path, value) pairs such as ``("step1.lr", 1e-4)``."""

    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> Candidate:
        """The candidate of a {path: value} mapping, in its order."""
        return cls(tuple(settings.items()))

    def as_dict(self) -> dict[str, Any]:
        """{path: value}."""
        return dict(self.settings)

    def describe(self) -> str:
        """``step1.lr=0.0001, beta=0.1`` (``default`` for no settings)."""
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.settings) or "default"

    def apply(self, config: Any) -> Any:
        """A copy of the dataclass ``config`` with these settings; an unknown path is an error naming it."""
        for path, value in self.settings:
            config = _set(config, path.split("."), value, path)
        return config


def _set(obj: Any, keys: list[str], value: Any, path: str) -> Any:
    if not is_dataclass(obj) or keys[0] not in {f.name for f in fields(obj)}:
        raise ValueError(f"candidate setting {path!r}: {type(obj).__name__} has no field {keys[0]!r}")
    inner = value if len(keys) == 1 else _set(getattr(obj, keys[0]), keys[1:], value, path)
    return replace(obj, **{keys[0]: inner})


def grid(axes: Mapping[str, Sequence[Any]]) -> tuple[Candidate, ...]:
    """Every combination of the ``axes`` ({path: values}), the first axis slowest, so that candidates sharing the
    values of the leading axes are neighbours (a selection runs a shared first step once for them)."""
    for path, values in axes.items():
        if not values:
            raise ValueError(f"grid: no value for {path!r}")
    keys = list(axes)
    return tuple(Candidate(tuple(zip(keys, combo, strict=True))) for combo in itertools.product(*axes.values()))


def two_step_grid(steps: tuple[str, str], lr1: Sequence[float], beta: Sequence[float],
                  lr2: Sequence[float]) -> tuple[Candidate, ...]:
    """The grid of a two-step method (SWiFT's ``step1`` / ``step2``, BMFT's ``impair`` / ``repair``): the first
    step's learning rate, β and the second step's learning rate."""
    return grid({f"{steps[0]}.lr": lr1, "beta": beta, f"{steps[1]}.lr": lr2})


#: Candidates per tunable method.
GRID_SIZE = 8

_SWIFT_STEPS, _BMFT_STEPS = ("step1", "step2"), ("impair", "repair")

#: The default grids by method name (:data:`fastmask.methods.registry.METHODS`), each of :data:`GRID_SIZE`
#: candidates around the method's published settings:
#:
#: - SWiFT and its mask ablations, BMFT and its manual masks: the authors' learning rates (first step 10⁻⁴, second
#:   10⁻³) and one decade up, β at the authors' 0.1 and at 0.5;
#: - FullFT-RW (the task loss alone): the learning rate from 10⁻⁵ to 3·10⁻² in half decades;
#: - FullFT-Reg, FullFT-FDR, LLFT: four learning rates in half decades around the default, β 0.1 and 0.5;
#: - DiffGda: the learning rate from 10⁻⁶ to 3·10⁻³ in half decades (Marcinkevics et al. use 10⁻⁵);
#: - DiffPrune: 1, 2, 4 or 8 units per step, 10 or 20 steps;
#: - FairPrune: pruning ratios 1-10 %, β 0.5 and 1 (the two settings Wu et al. tune).
DEFAULT_GRIDS: dict[str, tuple[Candidate, ...]] = {
    "swift": two_step_grid(_SWIFT_STEPS, lr1=(1e-4, 1e-3), beta=(0.1, 0.5), lr2=(1e-3, 1e-2)),
    "bmft": two_step_grid(_BMFT_STEPS, lr1=(1e-4, 1e-3), beta=(0.1, 0.5), lr2=(1e-3, 1e-2)),
    "fullft-rw": grid({"step.lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}),
    "fullft-reg": grid({"step.lr": (1e-4, 3e-4, 1e-3, 3e-3), "beta": (0.1, 0.5)}),
    "fullft-fdr": grid({"step.lr": (1e-4, 3e-4, 1e-3, 3e-3), "beta": (0.1, 0.5)}),
    "llft": grid({"step.lr": (1e-3, 3e-3, 1e-2, 3e-2), "beta": (0.1, 0.5)}),
    "diffgda": grid({"step.lr": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)}),
    "diffprune": grid({"units_per_step": (1, 2, 4, 8), "max_steps": (10, 20)}),
    "fairprune": grid({"ratio": (0.01, 0.02, 0.05, 0.1), "beta": (0.5, 1.0)}),
}
