"""``fastmask debias``: shards in, debiased weights, mask, reports and plots out (docs/algorithm.md §1, §5).

1. The model: :func:`fastmask.model.weights.load_model` (an architecture or ``module:callable`` plus a state dict).
2. The data, all from shards written by ``fastmask shards`` (:mod:`fastmask.app.sets`): the evaluation set and the
   external set D_e, and the group-balanced D_r drawn from D_e by :func:`fastmask.data.balance.group_balance` on
   the shard index and applied to the stream by key. As in the authors' code (docs/algorithm.md §1) the mask is
   computed on the **unbalanced** D_e with test transforms, shuffled; both steps run on D_r with the training
   augmentation (BMFT's impair step on D_e, ``impair_data``).
3. The run: the method of :data:`fastmask.methods.registry.METHODS`, with an ``on_epoch`` callback that evaluates
   the model on the evaluation set after every epoch (for the per-epoch plot) and saves the run state
   (:mod:`fastmask.app.run_state`). ``resume=True`` continues from there and ends with the same weights as an
   uninterrupted run.
4. The outputs, each written atomically: ``weights.safetensors``, ``mask.safetensors``, ``report.json``,
   ``report.md``, ``mask_layers.png`` and ``epochs.png`` (:mod:`fastmask.app.report`).

One module over 400 lines on purpose: one debias run, from the sets to the report, whose phases share the run's
state (resume, selection, per-epoch evaluation) and read best in order.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

import fastmask
from fastmask.app.errors import UsageError
from fastmask.app.plots import plot_epochs, plot_mask_layers, plot_selection
from fastmask.app.report import evaluation_scores, mask_layer_stats, one_class_warning, write_debias_report
from fastmask.app.run_state import CHECKPOINT, SavedRun, file_sha256, index_digest
from fastmask.app.sets import (
    DataSpec,
    Tracked,
    decoded_caches,
    loader_summary,
    parts,
    read_counts,
    read_sets,
    set_summary,
)
from fastmask.fairness.losses import BiasSpec
from fastmask.masking.masks import load_masks, mask_fraction, save_masks
from fastmask.methods.configs import BmftConfig, SwiftConfig
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import Plan, Selection, select
from fastmask.methods.state import Result, RunState
from fastmask.model.head import find_head_name, split_head
from fastmask.model.scoring import score
from fastmask.model.weights import WEIGHTS_FORMAT, Library, load_model, save_weights
from fastmask.parallel import ddp
from fastmask.util.files import jsonable
from fastmask.util.memory import PeakMemory

OUTPUTS = {
    "weights": "weights.safetensors",
    "mask": "mask.safetensors",
    "report_json": "report.json",
    "report_md": "report.md",
}
PLOTS = {"mask": "mask_layers.png", "epochs": "epochs.png", "selection": "selection.png"}
#: Selection with the default grid and rule.
DEFAULT_PLAN = Plan()


class RunStopped(Exception):
    """``stop_after_epochs`` epochs ran in this invocation; the run state is saved, ``resume=True`` continues."""

    def __init__(self, step: str, epoch: int, epochs_run: int, checkpoint: Path) -> None:
        super().__init__(f"stopped after {epochs_run} epoch(s) in this invocation, at {step} epoch {epoch}; "
                         f"the run state is in {checkpoint}: run again with --resume to continue")
        self.step, self.epoch, self.epochs_run, self.checkpoint = step, epoch, epochs_run, checkpoint


def debias(
    *,
    model: str,
    weights: str | os.PathLike,
    data: DataSpec,
    out: str | os.PathLike,
    method: Literal["swift", "bmft"],
    config: SwiftConfig | BmftConfig,
    trust_pickle: bool = False,
    library: Library = "auto",
    device: str | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    epoch_eval: bool = True,
    keep_checkpoint: bool = False,
    progress: bool = True,
    selection: Plan | None = DEFAULT_PLAN,
    threshold: float = 0.5,
    overwrite: bool = False,
    mask: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Debias ``model`` (with ``weights``) on shards and write weights, mask, reports and plots to ``out``.

    Args:
        model: ``module:callable`` or a torchvision / timm architecture name (:mod:`fastmask.model.weights`).
        weights: its state dict (safetensors or torch.save; pickles only with ``trust_pickle``).
        data: :class:`~fastmask.app.sets.DataSpec`.
        out: output directory (created).
        method, config: ``"swift"`` with a :class:`SwiftConfig` or ``"bmft"`` with a :class:`BmftConfig`
            (:func:`fastmask.methods.configs.method_config` builds one from options).
        library: where architecture names are looked up.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        resume: continue the run saved in ``out/checkpoint`` (a fresh start when there is none).
        stop_after_epochs: stop (raising :class:`RunStopped`) once this many epochs ran in this call, unless none
            is left; the run state is saved, so a later call with ``resume=True`` continues.
        epoch_eval: evaluate on the evaluation set after every epoch (the per-epoch plot).
        keep_checkpoint: keep ``out/checkpoint`` after the run finished (by default it is removed).
        progress: show progress bars.
        selection: choose the configuration on a held-out part of D_e (``data.val_fraction``) among the plan's
            candidates, each a change of ``config`` (:mod:`fastmask.methods.selection`); None runs ``config``
            itself on all of D_e (then ``resume``, ``stop_after_epochs`` and ``epoch_eval`` apply).
        threshold: without selection, the decision threshold the debiased model is evaluated and saved with.
        overwrite: replace a finished run in ``out`` (its outputs and any saved run state); without it (and without
            ``resume``) an ``out`` holding ``report.json`` is refused with :class:`FileExistsError`.
        mask: reuse this saved mask (the ``mask.safetensors`` of an earlier run of ``method`` on this model) instead
            of computing it: no importance pass. Every parameter must have a mask of its shape, soft (float) for
            SWiFT and hard (bool) for BMFT.

    Returns:
        The content of ``report.json``; its ``selection`` entry says what was chosen, and is ``chosen: null`` when
        no candidate met the budgets (the model is then written unchanged, with threshold 0.5).

    Raises:
        ValueError / FileNotFoundError: bad inputs (:class:`~fastmask.app.errors.UsageError`: options that
            contradict each other); the message names the file, column, attribute value, group or
            option at fault. FileExistsError: ``out`` holds a finished run or a run state (see ``overwrite``,
            ``resume``). :class:`RunStopped`: see ``stop_after_epochs``.
    """
    if method not in ("swift", "bmft") or not isinstance(config, SwiftConfig if method == "swift" else BmftConfig):
        raise ValueError(f"method {method!r} needs a {'SwiftConfig' if method == 'swift' else 'BmftConfig'}")
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise UsageError(f"stop_after_epochs must be >= 1, got {stop_after_epochs}")
    if not isinstance(config.bias, BiasSpec):
        raise ValueError("debias records its configuration: config.bias must be a BiasSpec")
    if selection is not None and (resume or stop_after_epochs is not None):
        raise UsageError("--resume and --stop-after-epochs continue one fixed configuration (--select none); a "
                         "selection of the configuration starts afresh")
    run = _DebiasRun(model=model, weights=weights, data=data, out=Path(out), method=method, config=config,
                     trust_pickle=trust_pickle, library=library, device=device, resume=resume,
                     stop_after_epochs=stop_after_epochs, epoch_eval=epoch_eval and selection is None,
                     progress=progress, plan=selection, threshold=threshold, overwrite=overwrite, mask=mask)
    report = run.execute()
    if run.writer and not keep_checkpoint and run.state_path.exists():
        run.state_path.unlink()
        if not any(run.state_path.parent.iterdir()):
            run.state_path.parent.rmdir()
    return report


class _DebiasRun:
    """One invocation of :func:`debias`: the model and loaders it reads, the run state it saves after every epoch
    (and reads back on ``--resume``), the per-epoch evaluations, the memory account, and the report it writes."""

    def __init__(self, *, model: str, weights: str | os.PathLike, data: DataSpec, out: Path, method: str,
                 config: SwiftConfig | BmftConfig, trust_pickle: bool, library: Library, device: str | None,
                 resume: bool, stop_after_epochs: int | None, epoch_eval: bool, progress: bool,
                 plan: Plan | None, threshold: float, overwrite: bool, mask: str | os.PathLike | None) -> None:
        self.started = time.perf_counter()
        self.threshold = threshold
        self.model_spec, self.weights, self.data, self.out = model, weights, data, out
        self.method, self.config, self.plan = method, config, plan
        self.stop_after_epochs, self.epoch_eval, self.progress = stop_after_epochs, epoch_eval, progress
        self.writer = ddp.is_writer()
        self.state_path = out / CHECKPOINT
        _claim_out(out, resume=resume, overwrite=overwrite, writer=self.writer)
        out.mkdir(parents=True, exist_ok=True)
        self.saved = SavedRun.load(self.state_path) if self.state_path.is_file() else None
        if self.saved is not None and not resume:
            run = self.saved.run
            raise FileExistsError(f"{self.state_path} holds the state of a run (after {run['step']} epoch "
                                  f"{run['epoch']}); pass --resume to continue it, or --overwrite to start over")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = load_model(model, weights, trust_pickle=trust_pickle, library=library).to(self.device)
        # Every preprocessing setting decided now (flag, model config, default): the run state records them.
        data, self.preprocessing = data.resolve(self.net)
        self.data = data
        self.mask_path = mask
        self.given_masks = None if mask is None else _read_mask(mask, self.net, method)
        self.head_name = config.head or find_head_name(self.net)
        _, self.head_params, self.feat_params = split_head(self.net, self.head_name)
        self.sets = read_sets(data, self.net, self.device, progress)
        self.caches = decoded_caches(self.sets, data)
        run_parts = parts(self.sets, data, hold_out=plan is not None, caches=self.caches)
        self.fit, self.val, self.balanced = run_parts.fit, run_parts.val, run_parts.balanced
        self.mask_loader, self.train_loader = run_parts.mask, run_parts.train
        self.loader_log: list[dict[str, Any]] = []
        limit = data.max_skip_fraction
        self.eval_loader = Tracked(run_parts.evaluation, "evaluation", self.loader_log, limit)
        self.val_loader = None if run_parts.validation is None else Tracked(run_parts.validation, "validation",
                                                                             self.loader_log, limit)
        # What the run depends on: the shard paths may change between invocations, their content (the index) may
        # not.
        self.spec = jsonable({
            "method": method, "config": asdict(config), "model": model,
            "data": {k: v for k, v in asdict(data).items()
                     if k not in ("shards", "eval_shards", "max_skip_fraction", "cache_mib")},
            "weights_sha256": file_sha256(weights), "shards_index": index_digest(self.sets.index),
            "eval_index": index_digest(self.sets.eval_index), "epoch_eval": epoch_eval,
            "selection": None if plan is None else asdict(plan),
            # only when given, so that the run states of runs without --mask stay resumable
            **({"mask_sha256": file_sha256(mask)} if mask is not None else {}),
        })
        self.epochs_run = 0
        # Memory account: one stretch for the mask generation (importance pass + mask), one per epoch of each step;
        # the per-epoch evaluation and the checkpoint are left out (the watch restarts after them).
        self.meter = PeakMemory(self.device)
        self.memory_laps: dict[str, Any] = {"mask_generation": None, "epochs": []}

    def evaluate(self, desc: str, threshold: float = 0.5) -> dict[str, Any]:
        """Overall and per-group scores of the model on the evaluation set at the decision ``threshold``."""
        y, p, a, _ = score(self.net, self.eval_loader, self.device, progress=self.progress, desc=desc)
        return evaluation_scores(y, p, a, self.sets.attr_map, threshold)

    def _resume_state(self) -> RunState | None:
        if self.saved is None:
            self.before = self.evaluate("evaluate before")
            self.epochs = [{"step": "before", "epoch": 0, **self.before["overall"]}] if self.epoch_eval else []
            self.elapsed = 0.0
            return None
        saved = self.saved
        saved.check_same_run(self.spec, self.state_path)
        self.net.load_state_dict(saved.model)
        self.mask_loader.set_epoch(saved.loaders["mask"])
        self.train_loader.set_epoch(saved.loaders["train"])
        self.before, self.epochs = saved.before, list(saved.epochs)
        self.loader_log.extend(saved.loader_log)
        self.elapsed = saved.seconds
        return RunState.from_state(saved.run, self.config)

    def _epochs_left(self, state: RunState) -> int:
        steps = METHODS[self.method].steps
        later = steps[steps.index(state.step) + 1:]
        return (getattr(self.config, state.step).epochs - state.epoch
                + sum(getattr(self.config, name).epochs for name in later))

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def on_epoch(self, state: RunState) -> None:
        """After the masks (epoch 0) and after every epoch: the memory lap, the per-epoch evaluation, the run
        state saved; then stop if this invocation's epoch budget is spent."""
        lap = self.meter.lap()
        if state.epoch == 0:
            self.memory_laps["mask_generation"] = lap
        else:
            self.memory_laps["epochs"].append((state.step, state.epoch, lap))
            self.epochs_run += 1
            if self.epoch_eval:
                # Forked so that the evaluation (DataLoader workers draw a seed) leaves the run's RNG untouched.
                with torch.random.fork_rng(devices=[]):
                    scores = self.evaluate(f"evaluate {state.step} epoch {state.epoch}")
                self.epochs.append({"step": state.step, "epoch": state.epoch, **scores["overall"]})
        if self.writer:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
            SavedRun(spec=self.spec, model=weights, run=state.to_state(),
                     loaders={"mask": self.mask_loader.epoch, "train": self.train_loader.epoch}, before=self.before,
                     epochs=self.epochs, loader_log=self.loader_log, seconds=self.seconds()).save(self.state_path)
        if (self.stop_after_epochs is not None and state.epoch > 0 and self.epochs_run >= self.stop_after_epochs
                and self._epochs_left(state) > 0):
            raise RunStopped(state.step, state.epoch, self.epochs_run, self.state_path)

    def execute(self) -> dict[str, Any]:
        """Run the method (or resume it) or select its configuration, evaluate, write the outputs; the content of
        ``report.json``."""
        resume = self._resume_state()
        mask_loader = Tracked(self.mask_loader, "mask", self.loader_log, self.data.max_skip_fraction)
        train_loader = Tracked(self.train_loader, "train", self.loader_log, self.data.max_skip_fraction)
        self.meter.start()
        selection = None
        try:
            if self.plan is None:
                # a resumed run has its masks in its state
                given = {"masks": self.given_masks} if resume is None and self.given_masks is not None else {}
                result = METHODS[self.method].run(self.net, mask_loader, train_loader, config=self.config,
                                                  progress=self.progress, on_epoch=self.on_epoch, resume=resume,
                                                  **given)
            else:
                selection = select(self.net, self.method, mask_loader, train_loader, self.val_loader,
                                   config=self.config, candidates=self.plan.candidates, rule=self.plan.rule,
                                   progress=self.progress, masks=self.given_masks)
                result = selection.result or Result(self.method, self.config, selection.masks)
        finally:
            lap = self.meter.stop()
        if selection is not None:
            self.memory_laps["selection"] = lap
        threshold = selection.threshold if selection is not None else self.threshold
        after = self.evaluate("evaluate after", threshold)
        report = self._report(result, after, selection)
        if self.writer:
            save_weights(self.net, self.out / OUTPUTS["weights"],
                         metadata={"format": WEIGHTS_FORMAT, "method": self.method, "threshold": repr(threshold)})
            save_masks(result.masks, self.out / OUTPUTS["mask"])
            plot_mask_layers(report["mask"]["layers"], self.out / PLOTS["mask"], hard=report["mask"]["kind"] == "hard")
            if report["outputs"]["plots"]["epochs"]:
                plot_epochs(self.epochs, self.out / PLOTS["epochs"],
                            title=f"{self.method.upper()} on {self.sets.descriptions['test']}")
            if selection is not None:
                plot_selection(selection.to_dict(), self.out / PLOTS["selection"],
                               title=f"{self.method.upper()}: every candidate and epoch on the validation part")
            write_debias_report(self.out, report)
        return jsonable(report)

    def _report(self, result: Result, after: dict[str, Any], selection: Selection | None) -> dict[str, Any]:
        hard = all(m.dtype == torch.bool for m in result.masks.values())
        mask: dict[str, Any] = {"kind": "hard" if hard else "soft",
                                "source": None if self.mask_path is None else os.fspath(self.mask_path),
                                "layers": mask_layer_stats(result.masks, self.head_params)}
        if hard:
            mask["fraction_selected"] = mask_fraction(result.masks, self.feat_params)
        else:
            mask["mean_features"] = mask_fraction(result.masks, self.feat_params)
            mask["mean_head"] = mask_fraction(result.masks, self.head_params)
        sets, before = self.sets, self.before
        bal_groups = self.balanced.assign(a=self.balanced["a"].astype(int))
        loader = loader_summary(self.loader_log)
        # What each set really had in the last epoch over it (the external set: the fitting and validation parts).
        reads = {"external": ("mask", "validation"), "balanced": ("train",), "validation": ("validation",),
                 "test": ("evaluation",)}
        counts = {name: read_counts(loader["splits"], splits) for name, splits in reads.items()}
        return {
            "fastmask": fastmask.__version__,
            "method": self.method,
            "seconds": self.seconds(),
            "model": {"spec": self.model_spec, "weights": os.fspath(self.weights),
                      "weights_sha256": self.spec["weights_sha256"],
                      "parameters": sum(p.numel() for p in self.net.parameters()), "head": self.head_name,
                      "head_parameters": list(self.head_params)},
            "config": result.config_dict(),
            "data": {**asdict(self.data), "sets": {
                "external": {**set_summary(sets.external, sets.descriptions["external"]), **counts["external"]},
                "balanced": {**set_summary(bal_groups, "group-balanced from the external set (docs/algorithm.md §1)"),
                             "with_replacement": self.balanced.attrs.get("replace"), **counts["balanced"]},
                "validation": None if self.val is None else {**set_summary(
                    self.val, f"held out of the external set ({self.data.val_fraction:.0%}, stratified by group and "
                    "label) to choose the configuration"), **counts["validation"]},
                "test": {**set_summary(sets.test, sets.descriptions["test"]), **counts["test"]},
            }, "cache": self.caches.to_dict()},
            "preprocessing": self.preprocessing.record(),
            "warnings": [*self.preprocessing.warnings,
                         *one_class_warning(before["overall"], "before debiasing, on the evaluation set"),
                         *one_class_warning(after["overall"], "after debiasing, on the evaluation set")],
            "selection": None if selection is None else selection.to_dict(),
            "attribute_reduction": sets.reduction,
            "threshold": after["overall"]["threshold"],
            "loader": loader,
            "before": before,
            "after": after,
            "change": {k: _diff(after["overall"][k], before["overall"][k]) for k in before["overall"]},
            "epochs": self.epochs,
            "history": result.history,
            "checks": result.checks,
            "guard_warnings": [w.to_state() for w in result.guard_warnings],
            "head_reset_fraction": result.head_reset_fraction,
            "n_importance_batches": result.n_importance_batches,
            "mask": mask,
            "memory": _memory_account(self.net, self.memory_laps),
            "outputs": {**OUTPUTS, "plots": {"mask": PLOTS["mask"],
                                             "epochs": PLOTS["epochs"] if len(self.epochs) > 1 else None,
                                             "selection": PLOTS["selection"] if selection is not None else None}},
        }


def _read_mask(path: str | os.PathLike, net: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The mask saved in ``path``, checked against ``net`` (every parameter, by name and shape) and ``method`` (SWiFT
    fine-tunes with a soft mask, BMFT with a hard one); errors name the file and the parameter."""
    try:
        masks = load_masks(path, net)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--mask {path} cannot be read as a saved mask (a mask.safetensors of fastmask debias): "
                         f"{err}") from None
    want_hard = method == "bmft"
    wrong = next((n for n, m in masks.items() if (m.dtype == torch.bool) != want_hard), None)
    if wrong is not None:
        raise ValueError(f"--mask {path}: mask {wrong!r} is {masks[wrong].dtype}; {method.upper()} fine-tunes with "
                         f"a {'hard (bool)' if want_hard else 'soft (floating-point)'} mask, as its own runs save")
    return masks


def _claim_out(out: Path, *, resume: bool, overwrite: bool, writer: bool) -> None:
    """Refuse an ``out`` that holds a finished run (its report.json) unless ``overwrite`` or ``resume``; with
    ``overwrite`` (and no ``resume``) remove the old run's outputs and run state first, so that no file of the old
    run (a plot this run does not draw) passes for one of the new."""
    finished = out / OUTPUTS["report_json"]
    if finished.is_file() and not (overwrite or resume):
        raise FileExistsError(f"--out {out} holds a finished run ({finished.name}); pass --overwrite to replace it, "
                              "or choose another --out")
    if overwrite and not resume and writer:
        for name in (*OUTPUTS.values(), *PLOTS.values(), CHECKPOINT):
            (out / name).unlink(missing_ok=True)


def _memory_account(net: nn.Module, laps: Mapping[str, Any]) -> dict[str, Any]:
    """Peak memory of the mask generation and of each fine-tuning step (the largest of its epochs), or of the whole
    selection, against the parameter bytes (see :mod:`fastmask.util.memory` for what is measured and what is not)."""
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    selection = laps.get("selection")
    steps: dict[str, Any] = {}
    for step, epoch, lap in laps["epochs"]:
        if step not in steps or lap.peak_bytes > steps[step]["peak_bytes"]:
            steps[step] = {**lap.to_dict(param_bytes), "epoch": epoch}
    gen = laps["mask_generation"]
    return {"parameters": sum(p.numel() for p in net.parameters()), "parameter_bytes": param_bytes,
            "mask_generation": gen.to_dict(param_bytes) if gen is not None else None,
            "steps": steps,
            "epochs": [{"step": s, "epoch": e, **lap.to_dict(param_bytes)} for s, e, lap in laps["epochs"]],
            "selection": selection.to_dict(param_bytes) if selection is not None else None}


def _diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return a - b
