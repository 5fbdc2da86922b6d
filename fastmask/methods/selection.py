"""Debiasing without hand tuning: a handful of configurations tried on held-out external data, chosen by a stated
rule (docs/algorithm.md §10). One function, :func:`select`, for every method of the registry
(:data:`fastmask.methods.registry.METHODS`), so that in a comparison each gets the same rule and the same budget.

The papers tuned their learning rates and β per data set by looking at the results; :func:`select` does that on a
validation part of the external set, which the caller holds out (:func:`fastmask.data.splits.stratified_split`):

1. Every candidate of the grid (:class:`~fastmask.methods.grids.Candidate`, a change of the method's
   configuration; by default the method's grid, :data:`~fastmask.methods.grids.DEFAULT_GRIDS`) starts from the
   original weights and runs the method on the fitting part. For SWiFT and BMFT the mask is computed once (it
   depends on neither the learning rates, β nor the epochs), and candidates whose first steps are the same share
   it: their second steps branch off the run state saved after it (the same weights, optimizer state and
   random-number state), as a resumed run would continue.
2. After every epoch the validation part is scored (after the run, for a method without epochs): a global
   decision threshold is chosen on it (``rule.threshold``; one for everyone, so no attribute is needed at
   inference), then AUC, accuracy, the share of positive predictions and the fairness gap in every form.
3. The rule (:class:`SelectionRule`): an epoch is *admissible* when its validation AUC is at most
   ``max_auc_drop`` below the original model's, its accuracy at most ``max_acc_drop`` below the original's (at the
   original's threshold, 0.5), its positive share within ``share_tolerance`` of the label rate (the guard,
   relative; a collapse to one class is far outside it), and its gap below the original's (a debiased model that is
   less fair than the original is no result). Among all admissible epochs of all candidates the smallest
   gap wins (``rule.gap``, by default the mean of |ΔTPR| and |ΔFPR|; never the signed sum, in which opposite gaps
   cancel); ties go to the higher AUC. Every epoch is a model the method passed through, and the chosen row says
   which (an epoch of SWiFT's first step is a model whose head was not re-initialised yet). A candidate whose
   validation AUC is more than ``stop_auc_drop`` below the original's after an epoch of its last step is hopeless
   and stops; so does one whose own best admissible epoch lies ``patience`` epochs of its last step behind (it has
   converged, or moves away from its best). Both from the second epoch of the last step on, since after the first
   the head may be fresh, and never in a first step, which may cost accuracy by design (BMFT's impair step
   minimises the bias alone) and is shared by other candidates.
4. Candidate zero is the original model itself at the rule's threshold (a row with ``candidate`` None): a method
   is chosen only where it does better than moving the decision threshold alone, and when candidate zero wins the
   weights stay as they were and only the threshold moves (:attr:`Selection.threshold_only`). When no row at all
   is admissible the model is left as it was, at 0.5, and the selection says so (``chosen`` is None).

Every candidate and epoch is a row of :attr:`Selection.rows`; the report shows them all. The guard's findings on the
candidates' training data are recorded in their results rather than logged one by one (the rule judges every epoch
on the validation part); the chosen result holds the run as it stood at the chosen epoch.

One module over 400 lines because it is one algorithm: the rule, the search state and :func:`select`'s branching
belong together (the candidates themselves are in :mod:`fastmask.methods.grids`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from fastmask.fairness.metrics import THRESHOLD_RULES, auc_standard_error, choose_threshold, evaluate
from fastmask.methods.engine import checked_masks, seed_everything
from fastmask.methods.grids import Candidate
from fastmask.methods.registry import METHODS, Method
from fastmask.methods.state import Result, RunState
from fastmask.model.scoring import model_device, score

log = logging.getLogger(__name__)

#: The fairness gaps the rule may minimise (keys of :func:`fastmask.fairness.metrics.evaluate`).
GAPS = ("eodds_mean", "eodds_max", "eopp", "spd")


@dataclass(frozen=True)
class SelectionRule:
    """How the configuration is chosen on the validation part (module docstring, step 4).

    Args:
        gap: the fairness gap to minimise: ``"eodds_mean"`` (½(|ΔTPR| + |ΔFPR|), default), ``"eodds_max"``,
            ``"eopp"`` or ``"spd"``. The signed-sum EOdds is refused: opposite gaps cancel in it.
        max_auc_drop: largest admissible fall of validation AUC below the original model's.
        max_acc_drop: largest admissible fall of validation accuracy below the original model's.
        share_tolerance: largest admissible |share of positive predictions − label rate|.
        threshold: the decision threshold of each candidate epoch: ``"accuracy"`` (the one of the highest
            validation accuracy, default), ``"rate"`` (positive share equal to the label rate), or a number (0.5:
            the untuned threshold of the papers).
        stop_auc_drop: a candidate whose validation AUC fell further than this below the original's stops.
        patience: a candidate whose best admissible epoch lies this many epochs of its last step behind stops
            (it has converged, or is moving away from its best); None: every epoch runs.
    """

    gap: str = "eodds_mean"
    max_auc_drop: float = 0.01
    max_acc_drop: float = 0.02
    share_tolerance: float = 0.10
    threshold: str | float = "accuracy"
    stop_auc_drop: float = 0.05
    patience: int | None = 3

    def __post_init__(self) -> None:
        if self.gap == "eodds":
            raise ValueError("gap 'eodds' is the signed sum, in which opposite TPR and FPR gaps cancel: choose "
                             f"one of {list(GAPS)}")
        if self.gap not in GAPS:
            raise ValueError(f"gap must be one of {list(GAPS)}, got {self.gap!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        for name in ("max_auc_drop", "max_acc_drop", "share_tolerance", "stop_auc_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if isinstance(self.threshold, str):
            if self.threshold not in THRESHOLD_RULES:
                raise ValueError(f"threshold must be one of {list(THRESHOLD_RULES)} or a number, got "
                                 f"{self.threshold!r}")
        elif not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class Plan:
    """What to choose among and how: the ``candidates`` (None: the method's default grid) and the
    :class:`SelectionRule`."""

    candidates: tuple[Candidate, ...] | None = None
    rule: SelectionRule = SelectionRule()


@dataclass
class Selection:
    """What :func:`select` tried and chose.

    Attributes:
        method: the method's registry name.
        rule: the :class:`SelectionRule`.
        candidates: the grid, in the order tried.
        original: the original model's validation scores (at threshold 0.5), with ``n`` (samples) and ``auc_se``
            (the standard error of its AUC, :func:`~fastmask.fairness.metrics.auc_standard_error`).
        rows: one dict per candidate and epoch: ``candidate`` (index), ``settings`` (its {path: value}), ``step``,
            ``epoch`` (None for the final model of a method without epochs), ``threshold``, every metric of
            :func:`~fastmask.fairness.metrics.evaluate`, ``admissible`` and ``why`` (the budgets it broke).
        chosen: the chosen row, or None when no epoch was admissible (the model is then unchanged).
        result: the chosen candidate's run (masks, history, guard checks) as it stood at the chosen epoch, or None
            (no choice, or candidate zero).
        stopped: the indices of the candidates stopped early as hopeless.
        converged: the indices of the candidates stopped early by ``rule.patience``.
        masks: the masks every candidate used when they were computed once (SWiFT, BMFT), else empty.
        seconds: wall time of the selection.
    """

    method: str
    rule: SelectionRule
    candidates: tuple[Candidate, ...]
    original: dict[str, float]
    masks: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    result: Result | None = None
    stopped: list[int] = field(default_factory=list)
    converged: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def threshold_only(self) -> bool:
        """True when the chosen row is candidate zero, the original weights at a new decision threshold: no candidate
        did better than moving the threshold alone."""
        return self.chosen is not None and self.chosen["candidate"] is None

    def describe_choice(self) -> str:
        """What was chosen, in words: ``"<settings> after <step> epoch <n>"``, ``"threshold only"`` (candidate zero)
        or ``"none (unchanged)"``."""
        if self.chosen is None:
            return "none (unchanged)"
        if self.threshold_only:
            return "threshold only"
        c = self.chosen
        when = f" after {c['step']} epoch {c['epoch']}" if c["epoch"] is not None else ""
        return f"{self.candidates[c['candidate']].describe()}{when}"

    @property
    def threshold(self) -> float:
        """The decision threshold that goes with the selected model (0.5 when the model is unchanged)."""
        return float(self.chosen["threshold"]) if self.chosen is not None else 0.5

    def to_dict(self) -> dict[str, Any]:
        """Everything but the run result and the masks, as plain data (for report.json)."""
        return {"method": self.method, "rule": asdict(self.rule),
                "candidates": [c.as_dict() for c in self.candidates], "original": self.original, "rows": self.rows,
                "chosen": self.chosen, "threshold_only": self.threshold_only, "stopped": self.stopped,
                "converged": self.converged, "threshold": self.threshold, "seconds": self.seconds}


class _Hopeless(Exception):
    """Raised from the epoch callback to stop a candidate whose validation AUC fell beyond the stop margin."""


class _Converged(Exception):
    """Raised from the epoch callback to stop a candidate whose best admissible epoch is ``patience`` epochs old."""


def _val_scores(model: nn.Module, loader: Iterable, device: torch.device, threshold: str | float) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):  # scoring must not move the run's random numbers
        s = score(model, loader, device)
    t = choose_threshold(s.y, s.p, threshold) if isinstance(threshold, str) else float(threshold)
    return evaluate(s.y, s.p, s.a, threshold=t)


def _judge(row: dict[str, Any], original: dict[str, float], rule: SelectionRule) -> list[str]:
    """The budgets ``row`` breaks (empty: admissible)."""
    why = []
    if original["auc"] - row["auc"] > rule.max_auc_drop:
        why.append(f"AUC {row['auc']:.4f} more than {rule.max_auc_drop} below the original {original['auc']:.4f}")
    if original["acc"] - row["acc"] > rule.max_acc_drop:
        why.append(f"ACC {row['acc']:.4f} more than {rule.max_acc_drop} below the original {original['acc']:.4f}")
    if abs(row["positive_rate"] - row["label_positive_rate"]) > rule.share_tolerance:
        why.append(f"positive share {row['positive_rate']:.3f} more than {rule.share_tolerance} from the label rate "
                   f"{row['label_positive_rate']:.3f}")
    if not row[rule.gap] < original[rule.gap]:
        why.append(f"{rule.gap} {row[rule.gap]:.4f} not below the original's {original[rule.gap]:.4f}")
    return why


@contextlib.contextmanager
def _guard_recorded_only() -> Iterator[None]:
    """The engine's guard warnings are not logged while candidates run (each is in its run's result)."""
    engine_log = logging.getLogger("fastmask.methods.engine")

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("guard (")

    engine_log.addFilter(drop)
    try:
        yield
    finally:
        engine_log.removeFilter(drop)


def _shares_first_step(method: Method, candidate: Candidate) -> tuple:
    """What ``candidate`` sets that the first step reads: candidates equal in it share their first step."""
    def later(path: str) -> bool:
        return any(path == p or (p.endswith(".") and path.startswith(p)) for p in method.last_step_only)

    return tuple((k, v) for k, v in candidate.settings if not later(k))


class _Replayed:
    """The validation loader, read once and replayed: it is scored after every epoch of every candidate (a hundred
    passes or more), and decoding it again each time would cost more than the scoring. The batches are kept while
    they fit in ``max_bytes``; beyond that every pass streams from the loader as it would without the cache. The
    loader must yield the same batches on every pass (test transforms, no shuffling), as a validation set does."""

    def __init__(self, loader: Iterable, max_bytes: int) -> None:
        self.loader, self.max_bytes = loader, max_bytes
        self.batches: list[tuple] | None = None
        self.streaming = False

    def __iter__(self) -> Iterator[tuple]:
        if self.batches is not None:
            yield from self.batches
            return
        kept: list[tuple] = []
        size = 0
        for batch in self.loader:
            if not self.streaming:
                size += sum(t.nbytes for t in batch if isinstance(t, torch.Tensor))
                if size > self.max_bytes:
                    self.streaming, kept = True, []
                else:
                    kept.append(batch)
            yield batch
        if not self.streaming:
            self.batches = kept


def _positions(loaders: Sequence[Iterable]) -> list[int | None]:
    """Where each loader that counts its epochs stands (``loader.epoch``; its shuffle and augmentation depend on
    it), None for the others (a torch DataLoader draws from the global RNG, which a run state restores)."""
    return [getattr(loader, "epoch", None) for loader in loaders]


def _rewind(loaders: Sequence[Iterable], positions: Sequence[int | None]) -> None:
    for loader, epoch in zip(loaders, positions, strict=True):
        if epoch is not None:
            loader.set_epoch(epoch)


class _Search:
    """The state of one :func:`select` call: the rows, the best admissible epoch so far and its weights."""

    def __init__(self, model: nn.Module, method: Method, loaders: Sequence[Iterable], val_loader: Iterable,
                 selection: Selection) -> None:
        self.model, self.method, self.val_loader, self.selection = model, method, val_loader, selection
        self.loaders = loaders
        self.device = model_device(model)
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, Any] | None = None
        self.best_result: Result | None = None
        # per candidate: (its best admissible (gap, -AUC), the epoch of its last step that reached it; 0 before it)
        self.own_best: dict[int, tuple[tuple[float, float], int]] = {}

    def consider(self, index: int | None, step: str, epoch: int | None, result: Result | None) -> dict[str, Any]:
        """Score and judge the model as candidate ``index`` (None: candidate zero, the original weights) left it
        after ``epoch`` of ``step``; keep it (its weights and its ``result`` as it stands, the masks shared) when it
        is the best admissible so far."""
        sel, rule = self.selection, self.selection.rule
        settings = {} if index is None else sel.candidates[index].as_dict()
        row = {"candidate": index, "settings": settings, "step": step, "epoch": epoch,
               **_val_scores(self.model, self.val_loader, self.device, rule.threshold)}
        row["why"] = _judge(row, sel.original, rule)
        row["admissible"] = not row["why"]
        sel.rows.append(row)
        self.remember(row)
        if row["admissible"] and (self.best is None or (row[rule.gap], -row["auc"])
                                  < (self.best[rule.gap], -self.best["auc"])):
            self.best, self.best_weights = row, copy.deepcopy(self.model.state_dict())
            self.best_result = None if result is None else replace(
                result, history=list(result.history), checks=list(result.checks),
                guard_warnings=list(result.guard_warnings), details=dict(result.details))
        return row

    def remember(self, row: dict[str, Any]) -> None:
        """Keep ``row`` as its candidate's own best when it is admissible and better than what it had."""
        key = (row[self.selection.rule.gap], -row["auc"])
        mine = self.own_best.get(row["candidate"])
        if row["admissible"] and (mine is None or key < mine[0]):
            last = bool(self.method.steps) and row["step"] == self.method.steps[-1]
            self.own_best[row["candidate"]] = (key, row["epoch"] if last else 0)

    def watch(self, index: int, snapshot: dict[str, Any] | None, first_epochs: int):
        """The ``on_epoch`` callback of candidate ``index``: consider every epoch, stop the hopeless, and save the
        run state after the first step's last epoch into ``snapshot`` for the candidates that branch off it."""
        steps, rule, original = self.method.steps, self.selection.rule, self.selection.original

        def on_epoch(state: RunState) -> None:
            if snapshot is not None and state.step == steps[0] and state.epoch == first_epochs:
                snapshot["weights"] = copy.deepcopy(self.model.state_dict())
                snapshot["state"] = state.to_state()
                snapshot["loaders"] = _positions(self.loaders)
            if state.epoch == 0:
                return
            row = self.consider(index, state.step, state.epoch, state.result)
            if state.step != steps[-1] or state.epoch < 2:
                return
            if original["auc"] - row["auc"] > rule.stop_auc_drop:
                raise _Hopeless
            mine = self.own_best.get(index)
            if rule.patience is not None and mine is not None and state.epoch - mine[1] >= rule.patience:
                raise _Converged
        return on_epoch


def select(
    model: nn.Module,
    method: str,
    mask_loader: Iterable,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    config: Any | None = None,
    candidates: Sequence[Candidate] | None = None,
    rule: SelectionRule | None = None,
    progress: bool = False,
    cache_bytes: int = 2 << 30,
    masks: Mapping[str, Tensor] | None = None,
) -> Selection:
    """Debias ``model`` in place with the configuration of ``candidates`` (default: the method's grid) that the
    ``rule`` chooses on ``val_loader`` (module docstring), or leave it unchanged when none is admissible.

    Args:
        model: the classifier (one logit per sample).
        method: a name of :data:`fastmask.methods.registry.METHODS` (``"swift"``, ``"bmft"``, a baseline).
        mask_loader: the fitting part of the external set, unbalanced (the mask, BMFT's impair step, the baselines
            that read D_e).
        train_loader: the fitting part, group-balanced (the fine-tuning steps).
        val_loader: the validation part, unbalanced, every (group, label) cell present; never trained on.
        config: the method's settings (default: its default configuration); each candidate changes some of them.
        candidates: the grid (default: the method's; a method with an empty grid is not run, and only candidate
            zero, the original model at a chosen threshold, is judged).
        rule: :class:`SelectionRule`.
        progress: progress bars.
        cache_bytes: the validation batches are read once and kept in memory up to this size (they are scored
            after every epoch); a larger validation part is streamed every time.
        masks: for a method that builds masks (SWiFT, BMFT), use these (a saved mask, reused) instead of computing
            them; keyed by parameter name, every parameter present.

    Every candidate sees its data as if it ran alone: loaders that count their epochs (``epoch`` /
    ``set_epoch``, as :class:`fastmask.data.loader.ShardLoader`) are rewound to where they stood after the mask
    pass before each candidate, and to where they stood after the shared first step before a branch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    m = METHODS[method]
    config = config if config is not None else m.config()
    rule = rule or SelectionRule()
    if candidates is not None and not candidates:
        raise ValueError("select: the grid holds no candidate")
    candidates = tuple(candidates if candidates is not None else m.grid)
    configs = [c.apply(config) for c in candidates]  # an unknown setting fails here, before any work
    started = time.perf_counter()
    original_weights = copy.deepcopy(model.state_dict())
    val_loader = _Replayed(val_loader, cache_bytes)
    with torch.random.fork_rng(devices=[]):
        s = score(model, val_loader, model_device(model))
    original = evaluate(s.y, s.p, s.a)
    # what the validation AUC is worth: budgets far below its standard error are judged within its noise
    original["auc_se"] = auc_standard_error(s.y, s.p)
    original["n"] = len(s.y)
    selection = Selection(method, rule, candidates, original)
    loaders = (mask_loader, train_loader)
    search = _Search(model, m, loaders, val_loader, selection)
    search.consider(None, "original", 0, None)  # candidate zero: the original weights at the rule's threshold
    n_batches = 0
    if m.masks is not None:  # the mask once; candidates sharing a first step branch off it
        seed_everything(config.seed)  # as a run seeds before its importance pass
        if masks is None:
            selection.masks, n_batches = m.masks(model, mask_loader, config, progress)
        else:
            selection.masks = dict(checked_masks(masks, model))
    start = _positions(loaders)
    branches: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        key = _shares_first_step(m, c) if m.masks is not None else (i,)
        branches.setdefault(key, []).append(i)
    for members in branches.values():
        snapshot: dict[str, Any] = {}
        for k, i in enumerate(members):
            run: dict[str, Any] = {}
            if m.masks is not None and k == 0:
                run = {"masks": selection.masks}
            elif m.masks is not None:  # the first step is never stopped, so its state was saved
                model.load_state_dict(snapshot["weights"])
                _rewind(loaders, snapshot["loaders"])
                run = {"resume": RunState.from_state(snapshot["state"], configs[i])}
                shared = [r for r in selection.rows if r["candidate"] == members[0] and r["step"] == m.steps[0]]
                for r in shared:
                    selection.rows.append({**r, "candidate": i, "settings": candidates[i].as_dict()})
                    search.remember(selection.rows[-1])
            if "resume" not in run:
                model.load_state_dict(original_weights)
                _rewind(loaders, start)
            first_epochs = getattr(configs[i], m.steps[0]).epochs if m.masks is not None else 0
            before = len(selection.rows)
            try:
                with _guard_recorded_only():
                    result = m.run(model, mask_loader, train_loader, config=configs[i], progress=progress,
                                   on_epoch=search.watch(i, snapshot if m.masks else None, first_epochs), **run)
            except _Hopeless:
                selection.stopped.append(i)
                log.info("selection: candidate %d (%s) stopped: validation AUC more than %s below the original's",
                         i, candidates[i].describe(), rule.stop_auc_drop)
                continue
            except _Converged:
                selection.converged.append(i)
                continue
            if len(selection.rows) == before:
                search.consider(i, "final", None, result)  # no epoch reported: the run's final model
    if search.best is None:
        model.load_state_dict(original_weights)
        log.warning("selection: no candidate of %s met the budgets on the validation part; the model is left "
                    "unchanged", method)
    else:
        model.load_state_dict(search.best_weights)
        selection.chosen = search.best
        selection.result = search.best_result
        if selection.result is not None and n_batches:
            selection.result.n_importance_batches = n_batches
        if selection.threshold_only:
            log.warning("selection: no candidate of %s did better on the validation part than moving the decision "
                        "threshold alone: the weights are unchanged, the threshold is %.4f", method,
                        selection.threshold)
    selection.seconds = time.perf_counter() - started
    return selection
