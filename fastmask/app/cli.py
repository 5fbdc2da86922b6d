"""The ``fastmask`` command line: every subcommand (``demo``, ``shards``, ``debias``, ``evaluate``, ``compare``) and
its one error path.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function listed in ``COMMANDS``; it sets ``func``,
the handler that receives the parsed arguments and returns the exit code. The work is done below the app layer
(:func:`fastmask.data.shards.write_shards`, :mod:`fastmask.app.debias`, :mod:`fastmask.app.evaluate`,
:mod:`fastmask.app.compare`, :mod:`fastmask.app.demo`); heavy modules are imported inside the handlers so that
``fastmask --help`` stays fast.

Bad input ends with one line on stderr, ``fastmask <command>: error: <message>``, and exit status 1.
``fastmask debias`` exits with status 3 when no candidate configuration met the budgets on the validation part (the
model is written unchanged), with 4 when none did better than moving the decision threshold alone (the weights are
written unchanged, with the new threshold), and with 75 (EX_TEMPFAIL, "try again") when ``--stop-after-epochs N``
stopped it before the end, so a job script can loop on ``--resume``.

One module over 400 lines on purpose: every subcommand's options, the options debias and compare share and the one
error path, in one place, so that the command line reads as one reference (docs/cli.md is generated from it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main", "EXIT_STOPPED", "EXIT_UNCHANGED", "EXIT_THRESHOLD_ONLY"]

#: Exit status of a debias run stopped by --stop-after-epochs (sysexits.h EX_TEMPFAIL).
EXIT_STOPPED = 75
#: Exit status of a debias run whose selection found no candidate within the budgets (the model is unchanged).
EXIT_UNCHANGED = 3
#: Exit status of a debias run in which no candidate did better than moving the decision threshold alone (the weights
#: are written unchanged, with the new threshold).
EXIT_THRESHOLD_ONLY = 4
# The method names --help lists, written out so that `fastmask --help` needs no torch import (tests/test_compare.py
# checks them against fastmask.methods.registry.METHODS); COMPARE_DEFAULTS is fastmask.app.compare.DEFAULT_METHODS.
METHOD_NAMES = ("baseline", "threshold", "swift", "bmft", "fullft-rw", "fullft-reg", "fullft-fdr", "llft", "diffgda",
                "diffprune", "fairprune", "random-mask", "hard-0.1", "hard-0.3", "hard-0.5", "hard-0.7", "hard-0.9",
                "manual-bn", "manual-top")
COMPARE_DEFAULTS = ("baseline", "threshold", "swift", "bmft", "fullft-fdr", "llft", "diffgda", "random-mask",
                    "hard-0.5")
# The errors that a user's input causes (a bad file, column, option or value): one line, no traceback.
_USER_ERRORS = (ValueError, OSError, ImportError)


def _size(text: str) -> int:
    """A byte count such as 1000000, 256M, 1.5G (powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 512K, 256M, 2G)")
    scale = 1024 ** " kmgt".index(found.group(2).lower() or " ")
    return int(float(found.group(1)) * scale)


def _attr_pair(text: str) -> tuple[str, int]:
    value, sep, group = text.rpartition("=")
    if not sep or not value:
        raise argparse.ArgumentTypeError(f"expected VALUE=GROUP (e.g. female=1), got {text!r}")
    try:
        return value, int(group)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--attr-map {text!r}: group {group!r} is not an integer") from None


def _common_model(p: argparse.ArgumentParser, required: bool = True, title: str = "model") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--model", required=required, metavar="SPEC",
                   help="'module:callable' (or 'file.py:callable') returning the nn.Module, or a torchvision / timm "
                   "architecture name (built with one output logit and no pretrained weights; nothing is downloaded)")
    g.add_argument("--weights", required=required, metavar="PATH",
                   help="the model's state dict: safetensors, or a torch.save file read with weights_only=True")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled checkpoint that needs torch.load(weights_only=False); this runs code stored "
                   "in the file, so only for files from a trusted source")
    g.add_argument("--arch-library", choices=("auto", "torchvision", "timm"), default="auto",
                   help="where to look up an architecture name (default: torchvision, then timm)")
    g.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def _common_loader(p: argparse.ArgumentParser, g: argparse._ArgumentGroup) -> None:
    g.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    g.add_argument("--image-size", type=int, default=256, help="images are resized to this square (default 256)")
    g.add_argument("--center-crop", type=int, metavar="PIXELS", help="centre crop of the original image first")
    g.add_argument("--workers", type=int, default=0, help="loader worker processes (default 0)")
    g.add_argument("--strict", action="store_true", help="fail on a damaged sample instead of skipping and counting it")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


# ---- shards -------------------------------------------------------------------------------------------------------


def _run_shards(args: argparse.Namespace) -> int:
    from fastmask.data.shards import write_shards

    index = write_shards(args.table, args.image_root, args.out, image_col=args.image_col, label_col=args.label_col,
                         attr_cols=args.attr, fold_col=args.fold_col, key_col=args.key_col, maxcount=args.maxcount,
                         maxsize=args.maxsize, prefix=args.prefix, overwrite=args.overwrite,
                         verify_images=not args.no_verify)
    size = sum(s.bytes for s in index.shards)
    print(f"wrote {len(index)} samples in {len(index.shards)} shard(s), {size / 2**20:.1f} MiB, to {args.out} "
          f"(index {args.prefix}-index.json)")
    return 0


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write a metadata table and its images as WebDataset tar shards",
        description="Write the images listed in a metadata table (CSV or parquet: image path, binary label, one or "
        "more attribute columns, optional fold) as deterministic WebDataset tar shards (image bytes unchanged, "
        "metadata as JSON) with an index of key -> shard, for `fastmask debias` and `fastmask evaluate`.",
    )
    p.add_argument("table", metavar="TABLE", help="metadata table: .csv, .csv.gz, .tsv, .parquet or .pq")
    p.add_argument("--image-root", required=True, metavar="DIR", help="relative image paths are resolved here")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the shards and the index")
    p.add_argument("--attr", required=True, action="append", metavar="COL",
                   help="a sensitive-attribute column (repeat for several)")
    p.add_argument("--image-col", default="filepath", metavar="COL", help="image path column (default filepath)")
    p.add_argument("--label-col", default="target", metavar="COL", help="binary label column (default target)")
    p.add_argument("--fold-col", metavar="COL", help="fold / split column, kept for --test-fold")
    p.add_argument("--key-col", metavar="COL", help="unique sample keys (default: the row number)")
    p.add_argument("--maxcount", type=int, default=1000, help="most samples per shard (default 1000)")
    p.add_argument("--maxsize", type=_size, default=256 * 2**20, metavar="SIZE",
                   help="most bytes per shard, e.g. 256M (default 256M)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default shard)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set with this prefix in --out")
    p.add_argument("--no-verify", action="store_true", help="do not open every image with PIL while writing")
    p.set_defaults(func=_run_shards)


# ---- debias and compare: shared options ----------------------------------------------------------------------------


def _external_data(p: argparse.ArgumentParser, required: bool = True, title: str = "data") -> None:
    """The data options of ``debias`` and ``compare``: the shards, the attribute, the evaluation and external sets."""
    g = p.add_argument_group(title)
    g.add_argument("--shards", required=required, metavar="DIR", help="shards written by `fastmask shards`")
    g.add_argument("--attr", required=required, metavar="COL", help="the sensitive attribute to debias")
    g.add_argument("--attr-map", type=_attr_pair, action="append", metavar="VALUE=GROUP",
                   help="map an attribute value to group 0 or 1 (repeat for each value; default: values are 0/1)")
    g.add_argument("--test-fold", metavar="FOLD",
                   help="evaluate on this fold (of --eval-shards if given, else of --shards, and then left out of "
                   "the external set)")
    g.add_argument("--eval-shards", metavar="DIR", help="evaluate on these shards")
    g.add_argument("--external-fold", action="append", metavar="FOLD",
                   help="draw the external set from this fold only (repeatable; default: all not evaluated on)")
    g.add_argument("--balance-replace", choices=("auto", "true", "false"), default="auto",
                   help="group balancing draws with replacement: auto (only where needed, default), true (the "
                   "the authors' code), false")
    _common_loader(p, g)


def _data_spec(args: argparse.Namespace, seed: int) -> Any:
    """The :class:`~fastmask.app.sets.DataSpec` of the data options."""
    from fastmask.app.sets import DataSpec

    replace = {"auto": "auto", "true": True, "false": False}[args.balance_replace]
    return DataSpec(shards=args.shards, attr=args.attr, attr_map=dict(args.attr_map) if args.attr_map else None,
                    test_fold=args.test_fold, eval_shards=args.eval_shards,
                    external_folds=tuple(args.external_fold or ()), batch_size=args.batch_size,
                    image_size=args.image_size, center_crop=args.center_crop, workers=args.workers, seed=seed,
                    balance_replace=replace, strict=args.strict,
                    **({"val_fraction": args.val_fraction} if args.val_fraction is not None else {}))


def _selection_options(p: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """--select, --val-fraction and the rule's options of ``debias`` and ``compare``; ``what`` says what is
    selected."""
    g = p.add_argument_group(
        f"selection (the default: {what} chosen on a part of the external set held out for it, by the rule below; "
        "docs/algorithm.md §10)")
    g.add_argument("--select", choices=("grid", "none"), default="grid",
                   help="grid: choose the configuration on held-out data (default); none: run one fixed "
                   "configuration (the method's defaults and the options given) on all of the external set")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of the external set held out, stratified by group and label (default 0.25)")
    g.add_argument("--gap", choices=("eodds_mean", "eodds_max", "eopp", "spd"),
                   help="the fairness gap to minimise (default eodds_mean, ½(|ΔTPR| + |ΔFPR|))")
    g.add_argument("--max-auc-drop", type=float, metavar="D",
                   help="largest admissible fall of validation AUC below the original model's (default 0.01)")
    g.add_argument("--max-acc-drop", type=float, metavar="D",
                   help="largest admissible fall of validation accuracy below the original model's (default 0.02)")
    g.add_argument("--share-tolerance", type=float, metavar="D",
                   help="largest admissible distance of the positive-prediction share from the label rate "
                   "(default 0.10)")
    g.add_argument("--patience", type=int, metavar="N",
                   help="a candidate stops when its best admissible epoch is N epochs of its last step behind "
                   "(default 3; 0: run every epoch)")
    g.add_argument("--threshold", type=_threshold, metavar="T",
                   help="the decision threshold: accuracy (the one of the highest validation accuracy, the default "
                   "when selecting), rate (positive share = label rate), or a number (the default with --select "
                   "none: 0.5)")
    return g


_RULE_OPTIONS = ("gap", "max_auc_drop", "max_acc_drop", "share_tolerance", "threshold", "patience")


def _rule(args: argparse.Namespace) -> Any:
    """The selection rule of the command line, or None for --select none (after checking that no selection option
    was given with it)."""
    from fastmask.methods.selection import SelectionRule

    if args.select == "none":
        for name in (*_SELECTION_ONLY, *(n for n in ("grid_lr1", "grid_lr2", "grid_beta") if hasattr(args, n))):
            if getattr(args, name) is not None:
                raise ValueError(f"{_flag(name)} sets how a configuration is selected; it does nothing with "
                                 "--select none")
        if args.threshold is not None and not isinstance(args.threshold, float):
            raise ValueError(f"--threshold {args.threshold} is chosen on the validation part, which --select none "
                             "has not: give a number (default 0.5)")
        return None
    rule = {k: getattr(args, k) for k in _RULE_OPTIONS if getattr(args, k) is not None}
    if rule.get("patience") == 0:
        rule["patience"] = None
    return SelectionRule(**rule)


# ---- debias -------------------------------------------------------------------------------------------------------

# Options that only one method has; the pipeline configs reject the others.
_ONLY = {"swift": ("task", "reinit_cmp", "reinit_scope"), "bmft": ("rate", "inclusive", "impair_data")}


# Options that only a selection reads (the grid's of debias are added where present).
_SELECTION_ONLY = ("gap", "max_auc_drop", "max_acc_drop", "share_tolerance", "patience", "val_fraction")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config(args: argparse.Namespace) -> Any:
    from fastmask.methods.configs import method_config

    other = "bmft" if args.method == "swift" else "swift"
    for name in _ONLY[other]:
        if getattr(args, name) is not None:
            raise ValueError(f"{_flag(name)} is a {other.upper()} option, not one of --method {args.method}")
    if args.select == "grid":
        for name, grid_flag in (("lr1", "--grid-lr1"), ("lr2", "--grid-lr2"), ("beta", "--grid-beta")):
            if getattr(args, name) is not None:
                raise ValueError(f"{_flag(name)} sets one fixed configuration: pass --select none with it, or give "
                                 f"the values to choose among with {grid_flag}")
    options = {name: getattr(args, name) for name in (
        "epochs1", "epochs2", "lr1", "lr2", "optimizer", "momentum", "weight_decay", "bias_space", "bias_form",
        "bias_empty", "beta", "mask_mode", "step2_feature_eval", "head", "collapse_threshold", "faithful",
        *_ONLY[args.method])}
    return method_config(args.method, seed=args.seed, **options)


def _plan(args: argparse.Namespace) -> Any:
    """The selection plan of the command line, or None for --select none."""
    from fastmask.methods.grids import two_step_grid
    from fastmask.methods.registry import METHODS
    from fastmask.methods.selection import Plan

    rule = _rule(args)
    if rule is None:
        return None
    method = METHODS[args.method]
    defaults = [c.as_dict() for c in method.grid]

    def values(given: list[float] | None, path: str) -> list[float]:
        return given or sorted({d[path] for d in defaults})

    first, second = method.steps
    candidates = two_step_grid(method.steps, lr1=values(args.grid_lr1, f"{first}.lr"),
                               beta=values(args.grid_beta, "beta"), lr2=values(args.grid_lr2, f"{second}.lr"))
    return Plan(candidates=candidates, rule=rule)


def _threshold(text: str) -> float | str:
    if text in ("accuracy", "rate"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected accuracy, rate or a number in [0, 1], got {text!r}") from None


def _print_summary(args: argparse.Namespace, report: dict) -> None:
    from fastmask.app.report import selection_caveat, verdict
    from fastmask.app.tables import headline

    b, a = report["before"]["overall"], report["after"]["overall"]
    print(verdict(report))
    caveat = selection_caveat(report["selection"])
    if caveat:
        print(f"WARNING: {caveat}")
    print(f"on {report['data']['sets']['test']['description']}: {headline(b, a)}")
    if report["loader"]["skipped"]:
        print(f"skipped {report['loader']['skipped']} damaged sample reads (see report.md)")
    for w in report["guard_warnings"]:
        print(f"WARNING: {w['message']}")
    print(f"wrote {args.out}/report.md, report.json, weights.safetensors, mask.safetensors and the plots")
    gen = report["memory"]["mask_generation"]
    if gen is not None:
        print(f"mask generation: peak {gen['peak_bytes'] / 2**20:.1f} MiB, {gen['extra_bytes'] / 2**20:.1f} MiB above "
              f"its start ({gen['extra_over_parameter_bytes']:.2f}x the parameter bytes; report.json 'memory')")


def _run_debias(args: argparse.Namespace) -> int:
    from fastmask.app.debias import RunStopped, debias
    from fastmask.parallel import ddp
    from fastmask.util.profiling import trace

    device = args.device
    if ddp.init_from_env():  # under torchrun: one rank per process, rank 0 writes the outputs
        device = device or str(ddp.local_device())

    data = _data_spec(args, args.seed)
    try:
        # one trace per rank under torchrun (trace-rank<R>.json), else trace.json
        rank = f"-rank{ddp.dist.get_rank()}" if ddp.is_active() else ""
        with trace(args.profile, name=f"trace{rank}.json") as trace_path:
            report = debias(model=args.model, weights=args.weights, data=data, out=args.out, method=args.method,
                            config=_config(args), trust_pickle=args.trust_pickle, library=args.arch_library,
                            device=device, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                            epoch_eval=not args.no_epoch_eval, keep_checkpoint=args.keep_checkpoint,
                            progress=not args.no_progress, selection=_plan(args),
                            threshold=args.threshold if isinstance(args.threshold, float) else 0.5)
    except RunStopped as stop:
        if ddp.is_writer():
            print(f"fastmask debias: {stop}")
        return EXIT_STOPPED
    if ddp.is_writer():  # under torchrun every rank has the same numbers: rank 0 alone prints them
        _print_summary(args, report)
    if trace_path is not None:
        print(f"wrote the profiler trace {trace_path} (open it in chrome://tracing or ui.perfetto.dev)")
    selection = report["selection"]
    if selection is None:
        return 0
    if selection["chosen"] is None:
        return EXIT_UNCHANGED
    return EXIT_THRESHOLD_ONLY if selection["threshold_only"] else 0


def _add_debias(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "debias",
        help="debias a trained classifier on shards with SWiFT or BMFT; weights, mask, report and plots",
        description="Compute the Fisher-importance mask on the external data, fine-tune in two steps (SWiFT soft "
        "mask or BMFT hard mask), and write the debiased weights and the mask (safetensors), report.json, "
        "report.md and plots. The run state is saved after every epoch under OUT/checkpoint; --resume continues "
        "an interrupted run with the same result. Options left unset keep the method's defaults "
        "(docs/algorithm.md §7-8).",
    )
    _common_model(p)
    _external_data(p)

    g = p.add_argument_group("method (unset options keep the method's defaults)")
    g.add_argument("--method", required=True, choices=("swift", "bmft"))
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the run and the data (default 42, as in the authors' code)")
    g.add_argument("--beta", type=float, help="β: SWiFT step 1 β·WBCE + (1-β)·B (default 0.1); BMFT repair "
                   "WBCE + β·B (default 0.1)")
    g.add_argument("--epochs1", type=int, help="epochs of step 1 / BMFT's impair step")
    g.add_argument("--epochs2", type=int, help="epochs of step 2 / BMFT's repair step")
    g.add_argument("--lr1", type=float, help="learning rate of step 1 / impair (default 1e-4)")
    g.add_argument("--lr2", type=float, help="learning rate of step 2 / repair (default 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="optimizer of both steps")
    g.add_argument("--momentum", type=float, help="SGD momentum of both steps (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="weight decay of both steps")
    g.add_argument("--mask-mode", choices=("grad", "update"), help="mask the gradient (reference) or the update")
    g.add_argument("--step2-feature-eval", action="store_true", default=None,
                   help="feature extractor in eval mode during step 2 (docs/algorithm.md §8.11)")
    g.add_argument("--head", metavar="MODULE", help="module path of the head (default: the last nn.Linear)")
    g.add_argument("--bias-space", choices=("log", "prob", "logit"), help="bias function on log p, p or logits")
    g.add_argument("--bias-form", choices=("eodds_abs", "eodds_sum", "eodds_avgodds", "eopp", "spd"),
                   help="form of the bias function")
    g.add_argument("--bias-empty", choices=("zero", "skip"), help="empty group cells: zero-fill or skip the gap")
    g.add_argument("--collapse-threshold", type=float, help="collapse guard threshold (default 0.95)")
    g.add_argument("--faithful", action="store_true", default=None,
                   help="reproduce the authors' code: every quirk option must keep the authors' value")
    g.add_argument("--task", choices=("skin", "cxr"), help="SWiFT: the authors' optimiser (skin SGD, cxr Adam)")
    g.add_argument("--reinit-cmp", choices=("gt", "ge"), help="SWiFT head re-initialisation θ[M > γ] or θ[M >= γ]")
    g.add_argument("--reinit-scope", choices=("tensor", "head"), help="SWiFT: γ per head tensor or over the head")
    g.add_argument("--rate", type=float, help="BMFT: percentile rate of the hard mask (default 50)")
    g.add_argument("--inclusive", action="store_true", default=None, help="BMFT: hard mask R >= α instead of R > α")
    g.add_argument("--impair-data", choices=("external", "balanced"), help="BMFT: data of the impair step")

    g = _selection_options(p, "every candidate of a small grid of learning rates and β is tried,")
    g.add_argument("--grid-lr1", type=float, nargs="+", metavar="LR",
                   help="candidate learning rates of step 1 / impair (default 1e-4 1e-3)")
    g.add_argument("--grid-lr2", type=float, nargs="+", metavar="LR",
                   help="candidate learning rates of step 2 / repair (default 1e-3 1e-2)")
    g.add_argument("--grid-beta", type=float, nargs="+", metavar="B", help="candidate values of β (default 0.1 0.5)")
    g.description = (f"Candidate zero, the original weights at the chosen threshold, is judged too; when it wins, "
                     f"exit status {EXIT_THRESHOLD_ONLY} (the weights written unchanged, with the new threshold). "
                     f"No candidate within the budgets: exit status {EXIT_UNCHANGED}, the model written unchanged "
                     "(with threshold 0.5).")

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/checkpoint (starts afresh when there is none; --select none)")
    g.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help=f"run at most N epochs in this invocation, then save and exit with status {EXIT_STOPPED} "
                   "(--select none)")
    g.add_argument("--no-epoch-eval", action="store_true",
                   help="do not evaluate after every epoch (no per-epoch plot; --select none)")
    g.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after the run finished")
    g.add_argument("--profile", metavar="DIR",
                   help="write a torch.profiler Chrome trace of the run to DIR/trace.json (trace-rank<R>.json per rank "
                   "under torchrun); its fastmask.* ranges "
                   "(data, importance, mask, step1, head_reinit, step2, evaluate and the fused ops) are the NVTX "
                   "ranges Nsight Systems shows (nsys profile -t nvtx,cuda fastmask debias ...)")
    p.set_defaults(func=_run_debias)


# ---- evaluate -----------------------------------------------------------------------------------------------------


def _run_evaluate(args: argparse.Namespace) -> int:
    from fastmask.app.evaluate import evaluate

    res = evaluate(model=args.model, weights=args.weights, shards=args.shards, out=args.out, attrs=args.attr,
                   fold=args.fold, batch_size=args.batch_size, image_size=args.image_size,
                   center_crop=args.center_crop, workers=args.workers, trust_pickle=args.trust_pickle,
                   library=args.arch_library, device=args.device, strict=args.strict,
                   progress=not args.no_progress, threshold=args.threshold)
    o = res["overall"]
    print(f"AUC {o['auc']:.4f}, ACC {o['acc']:.4f}, positive share {o['positive_rate']:.3f} (labels "
          f"{o['label_positive_rate']:.3f}) at decision threshold {res['threshold']:.4f} on {o['n']} samples")
    for attr, r in res["attributes"].items():
        if r.get("gaps"):
            g = r["gaps"]
            print(f"{attr}: EOdds mean {g['eodds_mean']:.4f}, max {g['eodds_max']:.4f}, code (signed sum) "
                  f"{g['eodds']:.4f}")
    print("wrote " + ", ".join(f"{args.out}/{name}" for name in res["outputs"].values()))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-group metrics of a model on shards, as markdown, CSV and JSON",
        description="Predict on shards and write per-group metrics (n, positives, AUC, ACC, TPR, FPR, positive "
        "rate) for each attribute, with worst-group AUC, AUC gap and, for two-valued attributes, SPD, EOpp and "
        "EOdds, as metrics.md, groups.csv and metrics.json.",
    )
    _common_model(p)
    g = p.add_argument_group("data")
    g.add_argument("--shards", required=True, metavar="DIR", help="shards written by `fastmask shards`")
    g.add_argument("--attr", action="append", metavar="COL", help="attribute(s) to group by (default: all)")
    g.add_argument("--fold", metavar="FOLD", help="evaluate on this fold only")
    _common_loader(p, g)
    p.add_argument("--threshold", type=float, metavar="T",
                   help="decision threshold, ŷ = 1[p > T] (default: the one `fastmask debias` saved with the weights, "
                   "else 0.5)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_run_evaluate)


# ---- demo and compare ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from fastmask.app import demo  # imported here so that `fastmask --help` stays fast

    demo.main(seed=args.seed, json_path=args.json, progress=not args.no_progress, threads=args.threads)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="spurious-correlation benchmark on scikit-learn's digits: Baseline vs BMFT vs SWiFT",
        description="Train a small CNN that learns a tint shortcut on scikit-learn's bundled digits, debias it with "
        "BMFT and SWiFT, and print AUC, ACC, SPD, EOdds and worst-group AUC on the test split.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the ERM model and both methods")
    p.add_argument("--json", metavar="PATH", help="also write the test metrics as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest for this tiny CNN; machine-independent numbers)")
    p.set_defaults(func=_run_demo)


def _run_compare(args: argparse.Namespace) -> int:
    from fastmask.app import compare  # imported here so that `fastmask --help` stays fast

    methods = compare.check_methods(args.methods, args.seeds)
    rule = _rule(args)
    if args.shards is None:
        for name in ("model", "weights", "attr"):
            if getattr(args, name) is not None:
                raise ValueError(f"{_flag(name)} goes with --shards (the user's data); without --shards compare runs "
                                 "on the demo benchmark, which brings its own model")
        source: Any = compare.DemoSource(**({"val_fraction": args.val_fraction} if args.val_fraction else {}))
    else:
        missing = [_flag(n) for n in ("model", "weights", "attr") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"--shards needs {', '.join(missing)}")
        source = compare.ShardSource(model=args.model, weights=args.weights, data=_data_spec(args, args.seeds[0]),
                                     trust_pickle=args.trust_pickle, library=args.arch_library, device=args.device)
    threads = args.threads if args.threads is not None else (1 if args.shards is None else None)
    compare.main(source, methods=methods, seeds=args.seeds, out=args.out, rule=rule, json_path=args.json,
                 progress=not args.no_progress, threads=threads)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="SWiFT, BMFT and the baselines over several seeds, each tuned the same way: a mean ± std table and a "
        "plot",
        description="Run the chosen methods (SWiFT, BMFT, the baselines of docs/algorithm.md §9) over several seeds, "
        "each selected on a validation part of the external set from its own grid of the same size by the same "
        "rule, and write table.md, table.csv, runs.csv and scatter.png (the gap against AUC) into --out. The data: "
        "the demo benchmark by default, or your model and shards (--model, --weights, --shards, --attr and the "
        "evaluation set, as for `fastmask debias`).",
    )
    p.add_argument("--methods", nargs="+", metavar="M",
                   help=f"method names (default: {' '.join(COMPARE_DEFAULTS)}), or 'all': {' '.join(METHOD_NAMES)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N",
                   help="seeds (default 0 1 2): of the validation part, the balancing, the shuffling and the methods")
    p.add_argument("--out", metavar="DIR", default="fastmask-compare", help="output folder (default fastmask-compare)")
    p.add_argument("--json", metavar="PATH", help="also write every run's metrics and the summary as JSON to PATH")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: 1 on the demo, whose tiny CNN runs fastest so; torch's "
                   "own default on your data)")
    _common_model(p, required=False, title="model (with --shards; default: the demo's)")
    _external_data(p, required=False, title="data (default: the demo benchmark)")
    _selection_options(p, "each method's configuration (its own grid of the same size)")
    p.set_defaults(func=_run_compare)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_shards, _add_debias, _add_evaluate, _add_compare,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``fastmask`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fastmask", description="Fairness debiasing by Fisher-importance masking.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmask`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        print(f"fastmask {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
