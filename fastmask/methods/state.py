"""What a SWiFT / BMFT run produces and where it stands: :class:`Result`, :class:`RunState` (with one
``to_state`` / ``from_state`` pair each, the plain-data form a checkpoint stores), the guard's :class:`GuardWarning`,
and the global RNG states a resumed run restores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class GuardWarning:
    """One firing of the guard (:mod:`fastmask.methods.engine`): after ``step``, ``positive_share`` of the
    predictions were positive while ``label_positive_rate`` of the labels were, at accuracy ``acc``. ``kind``:
    ``"collapse"`` (one class took nearly every prediction), ``"share"`` (the positive share parted from the label
    rate) or ``"accuracy"`` (accuracy fell below the original model's beyond the budget)."""

    kind: str
    step: str
    positive_share: float
    label_positive_rate: float
    acc: float
    message: str

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GuardWarning:
        return cls(**state)


@dataclass
class Result:
    """What a debiasing run produced. The model itself is modified in place.

    Attributes:
        method: ``"swift"`` or ``"bmft"``.
        config: the resolved configuration.
        masks: the mask of every parameter, keyed by ``model.named_parameters()`` names.
        history: one dict per epoch: ``step``, ``epoch``, ``loss`` (mean over batches) and ``positive_share`` (share
            of the step's training predictions with p > 0.5).
        checks: what the guard looked at: one dict per step and before training (``step`` ``"original"``): ``step``,
            ``data`` (which data), ``positive_share``, ``label_positive_rate`` and ``acc`` in eval mode.
        guard_warnings: the guard's findings (empty when healthy).
        n_importance_batches: batches seen by the importance pass (0 when masks were given).
        head_reset_fraction: share of the head's elements set to 0 by the re-initialisation.
        details: what a baseline decided (the selected checkpoint or pruning step and its validation trajectory,
            the privileged group, the mask fraction, ...); empty for SWiFT and BMFT.
    """

    method: str
    config: Any
    masks: dict[str, Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    guard_warnings: list[GuardWarning] = field(default_factory=list)
    n_importance_batches: int = 0
    head_reset_fraction: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def config_dict(self) -> dict[str, Any]:
        """The configuration as plain data (nested settings such as the steps and the bias function expanded)."""
        return asdict(self.config)

    def to_state(self) -> dict[str, Any]:
        """Everything but the configuration as plain data and CPU tensors (``torch.load(weights_only=True)`` reads
        it back)."""
        return {"method": self.method, "masks": {n: m.detach().to("cpu", copy=True) for n, m in self.masks.items()},
                "history": self.history, "checks": self.checks,
                "guard_warnings": [w.to_state() for w in self.guard_warnings],
                "n_importance_batches": self.n_importance_batches, "head_reset_fraction": self.head_reset_fraction,
                "details": self.details}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: Any) -> Result:
        """The result :meth:`to_state` saved, with ``config`` (the caller checks it is the run's); masks on the CPU."""
        return cls(state["method"], config, dict(state["masks"]), history=list(state["history"]),
                   checks=list(state["checks"]),
                   guard_warnings=[GuardWarning.from_state(w) for w in state["guard_warnings"]],
                   n_importance_batches=state["n_importance_batches"],
                   head_reset_fraction=state["head_reset_fraction"], details=dict(state.get("details", {})))


@dataclass
class RunState:
    """Where a run stands: given to ``on_epoch`` once the masks are ready (``epoch=0``) and after every finished
    epoch; given back as ``resume=`` it continues the run from there. The caller saves the model's ``state_dict()``
    beside it (and, if its loaders depend on how often they were iterated, their positions).

    The tensors are the live ones (``optimizer`` is ``optimizer.state_dict()``): serialise them in the callback.

    Attributes:
        step: the step in progress (SWiFT ``"step1"`` / ``"step2"``, BMFT ``"impair"`` / ``"repair"``).
        epoch: epochs of ``step`` finished.
        result: the result so far (masks, history, checks, guard warnings, head_reset_fraction).
        optimizer: the step's optimizer state (None when no epoch of the step has run).
        rng: the global RNG states (``random``, ``numpy``, ``torch``, and ``cuda`` when CUDA is initialised).
    """

    step: str
    epoch: int
    result: Result
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]

    def to_state(self) -> dict[str, Any]:
        """Plain data and CPU tensors only (``torch.load(weights_only=True)`` reads it back): the RNG states as
        tensors and lists, the optimizer state and the result (:meth:`Result.to_state`)."""
        return {"step": self.step, "epoch": self.epoch, "optimizer": self.optimizer, "rng": _rng_to_state(self.rng),
                "result": self.result.to_state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: Any) -> RunState:
        """The run state :meth:`to_state` saved; ``config`` is the run's configuration."""
        return cls(state["step"], state["epoch"], Result.from_state(state["result"], config), state["optimizer"],
                   _rng_from_state(state["rng"]))


OnEpoch = Callable[[RunState], None]


def rng_state() -> dict[str, Any]:
    """The global RNG states that a run draws from (dropout, DataLoader seeds, user code)."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`rng_state`."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_state(rng: Mapping[str, Any]) -> dict[str, Any]:
    # Plain types and tensors only, so the state loads with torch.load(weights_only=True).
    version, internal, gauss = rng["random"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out = {"random": [version, torch.tensor(internal, dtype=torch.int64), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
           "torch": rng["torch"].clone()}
    if "cuda" in rng:
        out["cuda"] = [s.clone() for s in rng["cuda"]]
    return out


def _rng_from_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    version, internal, gauss = saved["random"]
    name, keys, pos, has_gauss, cached = saved["numpy"]
    out = {"random": (version, tuple(internal.tolist()), gauss),
           "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
           "torch": saved["torch"]}
    if "cuda" in saved:
        out["cuda"] = saved["cuda"]
    return out
