"""The ``fastmask`` command line: every subcommand (``demo``, ``shards``, ``debias``, ``evaluate``, ``compare``) and
its one error path.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function listed in ``COMMANDS``; it sets ``func``,
the handler that receives the parsed arguments and returns the exit code. The work is done below the app layer
(:func:`fastmask.data.shards.write_shards`, :mod:`fastmask.app.debias`, :mod:`fastmask.app.evaluate`,
:mod:`fastmask.app.compare`, :mod:`fastmask.app.demo`); heavy modules are imported inside the handlers so that
``fastmask --help`` stays fast.

Every error ends the same way (:func:`main`): one line on stderr, ``fastmask <command>: error: <message>``, naming
the flag, file, column, shard or key at fault, and an exit status per kind of failure; ``--debug`` adds the
traceback. The statuses and the translation of an exception into that line are :mod:`fastmask.app.errors`. Ctrl-C
ends with status 130 and, for ``debias``, the exact ``--resume`` command that continues from the state saved after
the last finished epoch.

One module over 400 lines on purpose: every subcommand's options and handler and the options debias and compare
share, in one place, so that the command line reads as one reference (docs/cli.md is generated from it).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from fastmask.app.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    EXIT_THRESHOLD_ONLY,
    EXIT_UNCHANGED,
    DeviceError,
    UsageError,
    exit_epilog,
    flag_names,
    one_line,
    status_of,
)
from fastmask.data.budget import CACHE_MIB
from fastmask.data.stats import MAX_SKIP_FRACTION

__all__ = ["build_parser", "main", "METHOD_NAMES", "COMPARE_DEFAULTS"]

# The method names --help lists, written out so that `fastmask --help` needs no torch import (tests/test_compare.py
# checks them against fastmask.methods.registry.METHODS); COMPARE_DEFAULTS is fastmask.app.compare.DEFAULT_METHODS.
METHOD_NAMES = ("baseline", "threshold", "swift", "bmft", "fullft-rw", "fullft-reg", "fullft-fdr", "llft", "diffgda",
                "diffprune", "fairprune", "random-mask", "hard-0.1", "hard-0.3", "hard-0.5", "hard-0.7", "hard-0.9",
                "manual-bn", "manual-top")
COMPARE_DEFAULTS = ("baseline", "threshold", "swift", "bmft", "fullft-fdr", "llft", "diffgda", "random-mask",
                    "hard-0.5")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a description or epilog keeps its line breaks (the exit-status table);
    each line is still wrapped to the terminal, its continuation indented under the text."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.splitlines():
            lead = len(line) - len(line.lstrip())
            hang = line.find("  ", lead) + 2 if line.find("  ", lead) > 0 else lead
            out.append(textwrap.fill(line.strip(), width, initial_indent=indent + " " * lead,
                                     subsequent_indent=indent + " " * hang))
        return "\n".join(out)


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
    demo = "" if required else " (default: the demo's)"
    g.add_argument("--model", required=required, metavar="SPEC",
                   help="'module:callable' (or 'file.py:callable') returning the nn.Module, or a torchvision / timm "
                   "architecture name (built with one output logit and no pretrained weights; nothing is downloaded)"
                   + demo)
    g.add_argument("--weights", required=required, metavar="PATH",
                   help="the model's state dict: safetensors, or a torch.save file read with weights_only=True" + demo)
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled checkpoint that needs torch.load(weights_only=False); this runs code stored "
                   "in the file, so only for files from a trusted source")
    g.add_argument("--arch-library", choices=("auto", "torchvision", "timm"), default="auto",
                   help="where to look up an architecture name (default: torchvision, then timm)")
    g.add_argument("--device", help="torch device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def _device(text: str | None) -> str | None:
    """``--device`` checked here, so that a device this machine lacks is one line and not a failure deep in torch."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {text}: CUDA is not available ({why}; torch {torch.__version__}); "
                              "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {text}: MPS is not available here; use --device cpu")
    return text


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, refused by argparse (naming the flag) otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _fraction_in(closed: bool) -> Callable[[str], float]:
    """An argparse type for a share: in [0, 1] (``closed``), or strictly between 0 and 1 (a part held out: neither
    nothing nor everything)."""
    interval = "[0, 1]" if closed else "(0, 1)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 <= value <= 1 if closed else 0 < value < 1):
            raise argparse.ArgumentTypeError(f"expected a fraction in {interval}, got {text!r}")
        return value

    return parse


def _common_loader(p: argparse.ArgumentParser, g: argparse._ArgumentGroup, training: bool = False) -> None:
    """The loader options of ``debias``, ``evaluate`` and ``compare`` (``training``: the commands that fine-tune,
    which also take --augment)."""
    g.add_argument("--batch-size", type=_at_least(1), default=64, help="samples per batch (default 64)")
    _preprocess_options(p, training)
    g.add_argument("--workers", type=_at_least(0), default=0, help="loader worker processes (default 0)")
    g.add_argument("--strict", action="store_true",
                   help="fail on the first damaged sample, naming its shard and member (default: skip and count it)")
    g.add_argument("--max-skip-fraction", type=_fraction_in(closed=True), default=MAX_SKIP_FRACTION, metavar="F",
                   help="largest share of a split's samples that may be skipped as damaged before the run fails "
                   f"(default {MAX_SKIP_FRACTION:g}; 1 accepts any loss, which the reports then state)")
    _progress_option(p)


def _preprocess_options(p: argparse.ArgumentParser, training: bool) -> None:
    """The preprocessing options of ``debias``, ``evaluate`` and ``compare`` (:mod:`fastmask.app.preprocessing`);
    what is left unset comes from the model's own configuration (timm's pretrained_cfg), else the default."""
    g = p.add_argument_group(
        "preprocessing", "Unset options come from the model's own configuration where it has one (timm's "
        "pretrained_cfg, a torchvision architecture's default weights' transforms, or a pretrained_cfg / default_cfg "
        "attribute of a module:callable model), else the default; report.json and metrics.json record each setting "
        "and where it came from.")
    g.add_argument("--image-size", type=_at_least(1), metavar="N",
                   help="images are resized to this square (default: the model configuration's input size, resized to "
                   "size / crop_pct and centre-cropped to size when it has a crop_pct; else 256, no crop)")
    g.add_argument("--crop", type=_at_least(1), metavar="N",
                   help="then keep the central N x N of the resized image, what the model sees (resize-then-crop, as "
                   "timm and torchvision evaluate; default: no crop)")
    g.add_argument("--center-crop", type=_at_least(1), metavar="PIXELS",
                   help="centre crop of the original image before the resize (the CXR recipe; default: no crop)")
    g.add_argument("--normalize", choices=("imagenet", "none"),
                   help="x = (u8 / 255 - mean) / std with ImageNet's mean and std, or none: x = u8 / 255 (default: the "
                   "model configuration's mean and std, else imagenet)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel mean of the normalisation, with --std (default: see --normalize)")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel standard deviation of the normalisation, with --mean (default: see --normalize)")
    if training:
        g.add_argument("--augment", nargs="+", type=_augment, metavar="A",
                       help="the training augmentations, each with probability 0.5: any of hflip vflip transpose, or "
                       "none (default: hflip vflip transpose, the papers')")


#: The preprocessing options' argparse names (every one defaults to None: unset).
_PREPROCESS_DESTS = ("image_size", "crop", "center_crop", "normalize", "mean", "std", "augment")


def _preprocessing(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing options given (None where unset), as :func:`fastmask.app.preprocessing.
    resolve_preprocessing` takes them; --normalize becomes its mean and std."""
    from fastmask.data.transforms import NORMALIZATIONS

    if args.normalize is not None and (args.mean is not None or args.std is not None):
        raise UsageError("--normalize and --mean / --std both set the normalisation: give one of them")
    if (args.mean is None) != (args.std is None):
        raise UsageError(f"{'--mean' if args.std is None else '--std'} needs "
                         f"{'--std' if args.std is None else '--mean'}: give both")
    mean, std = NORMALIZATIONS[args.normalize] if args.normalize else (args.mean, args.std)
    given = {"image_size": args.image_size, "crop": args.crop, "center_crop": args.center_crop,
             "mean": None if mean is None else tuple(mean), "std": None if std is None else tuple(std)}
    if getattr(args, "augment", None) is not None:
        if "none" in args.augment and len(args.augment) > 1:
            raise UsageError(f"--augment {' '.join(args.augment)}: none turns every augmentation off; give it alone")
        given["augment"] = () if args.augment == ["none"] else tuple(args.augment)
    return given


def _augment(text: str) -> str:
    from fastmask.data.transforms import AUGMENTATIONS

    if text not in (*AUGMENTATIONS, "none"):
        raise argparse.ArgumentTypeError(f"expected {', '.join(AUGMENTATIONS)} or none, got {text!r}")
    return text


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show the progress bars (default: only when stderr is a terminal, so that a redirected log "
                   "holds no escape codes)")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


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
    p.add_argument("--fold-col", metavar="COL", help="fold / split column, kept for --test-fold (default: none)")
    p.add_argument("--key-col", metavar="COL", help="unique sample keys (default: the row number)")
    p.add_argument("--maxcount", type=_at_least(1), default=1000, help="most samples per shard (default 1000)")
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
    demo = "" if required else " (default: the demo's)"
    g.add_argument("--shards", required=required, metavar="DIR", help="shards written by `fastmask shards`" + demo)
    g.add_argument("--attr", required=required, metavar="COL", help="the sensitive attribute to debias" + demo)
    g.add_argument("--attr-map", type=_attr_pair, action="append", metavar="VALUE=GROUP",
                   help="map an attribute value to group 0 or 1 (repeat for each value; default: values are 0/1)")
    g.add_argument("--attr-groups", choices=("binary", "extremes"), default="binary",
                   help="binary: the attribute's values are groups 0 and 1, or --attr-map makes them so (default); "
                   "extremes: an attribute with more values is reduced to the two whose AUC of the original model on "
                   "the external set is the highest (group 0) and the lowest (group 1), SWiFT's multi-attribute "
                   "reduction; the other values' samples are left out of every set")
    g.add_argument("--test-fold", metavar="FOLD",
                   help="evaluate on this fold (of --eval-shards if given, else of --shards, and then left out of "
                   "the external set; default: none, all of --eval-shards)")
    g.add_argument("--eval-shards", metavar="DIR", help="evaluate on these shards (default: --test-fold of --shards)")
    g.add_argument("--external-fold", action="append", metavar="FOLD",
                   help="draw the external set from this fold only (repeatable; default: all not evaluated on)")
    g.add_argument("--balance-replace", choices=("auto", "true", "false"), default="auto",
                   help="group balancing draws with replacement: auto (only where needed, default), true (the "
                   "the authors' code), false")
    g.add_argument("--cache-mib", type=_at_least(0), default=CACHE_MIB, metavar="MIB",
                   help="memory budget for decoding the external set, then the evaluation set, once into uint8 images "
                   "kept in memory instead of decoding them on every pass (only the random augmentation is applied "
                   f"per epoch); a set that does not fit is streamed (default {CACHE_MIB}; 0: stream every set)")
    _common_loader(p, g, training=True)


def _data_spec(args: argparse.Namespace, seed: int) -> Any:
    """The :class:`~fastmask.app.sets.DataSpec` of the data options."""
    from fastmask.app.sets import DataSpec

    replace = {"auto": "auto", "true": True, "false": False}[args.balance_replace]
    return DataSpec(shards=args.shards, attr=args.attr, attr_map=dict(args.attr_map) if args.attr_map else None,
                    test_fold=args.test_fold, eval_shards=args.eval_shards,
                    external_folds=tuple(args.external_fold or ()), batch_size=args.batch_size,
                    **_preprocessing(args), workers=args.workers, seed=seed,
                    balance_replace=replace, strict=args.strict, max_skip_fraction=args.max_skip_fraction,
                    attr_groups=args.attr_groups, cache_mib=args.cache_mib,
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
    g.add_argument("--val-fraction", type=_fraction_in(closed=False), metavar="F",
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
    g.add_argument("--patience", type=_at_least(0), metavar="N",
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
                raise UsageError(f"{_flag(name)} sets how a configuration is selected; it does nothing with "
                                 "--select none")
        if args.threshold is not None and not isinstance(args.threshold, float):
            raise UsageError(f"--threshold {args.threshold} is chosen on the validation part, which --select none "
                             "has not: give a number (default 0.5)")
        return None
    rule = {k: getattr(args, k) for k in _RULE_OPTIONS if getattr(args, k) is not None}
    if rule.get("patience") == 0:
        rule["patience"] = None
    try:
        return SelectionRule(**rule)
    except ValueError as err:  # a value out of range; flag_names maps the field to its flag
        raise UsageError(str(err)) from None


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
            raise UsageError(f"{_flag(name)} is a {other.upper()} option, not one of --method {args.method}")
    if args.select == "grid":
        for name, grid_flag in (("lr1", "--grid-lr1"), ("lr2", "--grid-lr2"), ("beta", "--grid-beta")):
            if getattr(args, name) is not None:
                raise UsageError(f"{_flag(name)} sets one fixed configuration: pass --select none with it, or give "
                                 f"the values to choose among with {grid_flag}")
    options = {name: getattr(args, name) for name in (
        "epochs1", "epochs2", "lr1", "lr2", "optimizer", "momentum", "weight_decay", "bias_space", "bias_form",
        "bias_empty", "beta", "mask_mode", "step2_feature_eval", "head", "collapse_threshold", "faithful",
        *_ONLY[args.method])}
    try:
        return method_config(args.method, seed=args.seed, **options)
    except ValueError as err:  # a value out of range; flag_names maps the field to its flag
        raise UsageError(str(err)) from None


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
    from fastmask.app.report import read_text, selection_caveat, verdict
    from fastmask.app.tables import headline

    b, a = report["before"]["overall"], report["after"]["overall"]
    print(verdict(report))
    caveat = selection_caveat(report["selection"])
    if caveat:
        print(f"WARNING: {caveat}")
    test = report["data"]["sets"]["test"]
    print(f"on {test['description']}, {read_text(test)}: {headline(b, a)}")
    print(f"data: {report['data']['cache']['describe']}")
    if report["loader"]["skipped"]:
        print(f"skipped {report['loader']['skipped']} damaged sample reads (see report.md)")
    for w in report["warnings"]:
        print(f"WARNING: {w}")
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

    device = _device(args.device)
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
                            progress=_progress(args), selection=_plan(args), overwrite=args.overwrite, mask=args.mask,
                            threshold=args.threshold if isinstance(args.threshold, float) else 0.5)
    except RunStopped as stop:
        if ddp.is_writer():
            print(f"fastmask debias: {stop}: {_resume_command(args.argv)}")
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
    g.add_argument("--mask", metavar="PATH",
                   help="reuse a saved mask (the mask.safetensors of an earlier run of this method on this model, "
                   "checked by parameter name and shape) instead of computing it (default: compute it)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the run and the data (default 42, as in the authors' code)")
    g.add_argument("--beta", type=float, help="β: SWiFT step 1 β·WBCE + (1-β)·B (default 0.1); BMFT repair "
                   "WBCE + β·B (default 0.1)")
    g.add_argument("--epochs1", type=_at_least(0),
                   help="epochs of step 1 / BMFT's impair step (default: SWiFT 10, BMFT 5; BMFT --faithful 10)")
    g.add_argument("--epochs2", type=_at_least(0),
                   help="epochs of step 2 / BMFT's repair step (default: SWiFT 10, BMFT 5; BMFT --faithful 10)")
    g.add_argument("--lr1", type=float, help="learning rate of step 1 / impair (default 1e-4)")
    g.add_argument("--lr2", type=float, help="learning rate of step 2 / repair (default 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"),
                   help="optimizer of both steps (default sgd; SWiFT --task cxr: adam)")
    g.add_argument("--momentum", type=float, help="SGD momentum of both steps (default 0.9; SWiFT --task cxr: 0)")
    g.add_argument("--weight-decay", type=float,
                   help="weight decay of both steps (default 5e-4; SWiFT --task cxr: 0)")
    g.add_argument("--mask-mode", choices=("grad", "update"),
                   help="mask the gradient (the authors' code, default) or the update")
    g.add_argument("--step2-feature-eval", action="store_true", default=None,
                   help="feature extractor in eval mode during step 2 (docs/algorithm.md §8.11)")
    g.add_argument("--head", metavar="MODULE", help="module path of the head (default: the last nn.Linear)")
    g.add_argument("--bias-space", choices=("log", "prob", "logit"),
                   help="bias function on log p, p or logits (default: SWiFT log, BMFT logit)")
    g.add_argument("--bias-form", choices=("eodds_abs", "eodds_sum", "eodds_avgodds", "eopp", "spd"),
                   help="form of the bias function (default: SWiFT eodds_abs, BMFT eodds_sum)")
    g.add_argument("--bias-empty", choices=("zero", "skip"),
                   help="empty group cells: zero-fill or skip the gap (default zero)")
    g.add_argument("--collapse-threshold", type=float, help="collapse guard threshold (default 0.95)")
    g.add_argument("--faithful", action="store_true", default=None,
                   help="reproduce the authors' code: every quirk option must keep the authors' value")
    g.add_argument("--task", choices=("skin", "cxr"),
                   help="SWiFT: the authors' optimiser (skin SGD, cxr Adam; default skin)")
    g.add_argument("--reinit-cmp", choices=("gt", "ge"),
                   help="SWiFT head re-initialisation θ[M > γ] or θ[M >= γ] (default gt)")
    g.add_argument("--reinit-scope", choices=("tensor", "head"),
                   help="SWiFT: γ per head tensor or over the head (default tensor)")
    g.add_argument("--rate", type=float, help="BMFT: percentile rate of the hard mask (default 50)")
    g.add_argument("--inclusive", action="store_true", default=None, help="BMFT: hard mask R >= α instead of R > α")
    g.add_argument("--impair-data", choices=("external", "balanced"),
                   help="BMFT: data of the impair step (default external, the authors' code)")

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
    g.add_argument("--overwrite", action="store_true",
                   help="replace the finished run in --out (without it, an --out holding report.json is refused)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/checkpoint (starts afresh when there is none; --select none)")
    g.add_argument("--stop-after-epochs", type=_at_least(1), metavar="N",
                   help=f"run at most N epochs in this invocation, then save and exit with status {EXIT_STOPPED} "
                   "(--select none; default: no limit)")
    g.add_argument("--no-epoch-eval", action="store_true",
                   help="do not evaluate after every epoch (no per-epoch plot; --select none)")
    g.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after the run finished")
    g.add_argument("--profile", metavar="DIR",
                   help="write a torch.profiler Chrome trace of the run to DIR/trace.json (trace-rank<R>.json per rank "
                   "under torchrun); its fastmask.* ranges "
                   "(data, importance, mask, step1, head_reinit, step2, evaluate and the fused ops) are the NVTX "
                   "ranges Nsight Systems shows (nsys profile -t nvtx,cuda fastmask debias ...; default: no trace)")
    p.set_defaults(func=_run_debias)


# ---- evaluate -----------------------------------------------------------------------------------------------------


def _run_evaluate(args: argparse.Namespace) -> int:
    from fastmask.app.evaluate import evaluate
    from fastmask.app.report import read_text

    res = evaluate(model=args.model, weights=args.weights, shards=args.shards, out=args.out, attrs=args.attr,
                   fold=args.fold, batch_size=args.batch_size, **_preprocessing(args), workers=args.workers,
                   trust_pickle=args.trust_pickle, library=args.arch_library, device=_device(args.device),
                   strict=args.strict, progress=_progress(args), threshold=args.threshold,
                   max_skip_fraction=args.max_skip_fraction)
    o = res["overall"]
    print(f"AUC {o['auc']:.4f}, ACC {o['acc']:.4f}, positive share {o['positive_rate']:.3f} (labels "
          f"{o['label_positive_rate']:.3f}) at decision threshold {res['threshold']:.4f} on {read_text(res['data'])}")
    for attr, r in res["attributes"].items():
        if r.get("gaps"):
            g = r["gaps"]
            print(f"{attr}: EOdds mean {g['eodds_mean']:.4f}, max {g['eodds_max']:.4f}, code (signed sum) "
                  f"{g['eodds']:.4f}")
    for w in res["warnings"]:
        print(f"WARNING: {w}")
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
    g.add_argument("--fold", metavar="FOLD", help="evaluate on this fold only (default: every sample)")
    _common_loader(p, g)
    p.add_argument("--threshold", type=float, metavar="T",
                   help="decision threshold, ŷ = 1[p > T] (default: the one `fastmask debias` saved with the weights, "
                   "else 0.5)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_run_evaluate)


# ---- demo and compare ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from fastmask.app import demo  # imported here so that `fastmask --help` stays fast

    demo.main(seed=args.seed, json_path=args.json, progress=_progress(args), threads=args.threads)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="spurious-correlation benchmark on scikit-learn's digits: Baseline vs BMFT vs SWiFT",
        description="Train a small CNN that learns a tint shortcut on scikit-learn's bundled digits, debias it with "
        "BMFT and SWiFT, and print AUC, ACC, SPD, EOdds and worst-group AUC on the test split.",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, the ERM model and both methods (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the test metrics as JSON to PATH (default: none)")
    _progress_option(p)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest for this tiny CNN; machine-independent numbers)")
    p.set_defaults(func=_run_demo)


def _run_compare(args: argparse.Namespace) -> int:
    from fastmask.app import compare  # imported here so that `fastmask --help` stays fast

    try:
        methods = compare.check_methods(args.methods, args.seeds)
    except ValueError as err:  # an unknown method name, a seed given twice
        raise UsageError(str(err)) from None
    rule = _rule(args)
    if args.shards is None:
        # the demo benchmark brings its own model and preprocessing: an option for the user's data would do nothing
        for name in ("model", "weights", "attr", *_PREPROCESS_DESTS):
            if getattr(args, name) is not None:
                raise UsageError(f"{_flag(name)} goes with --shards (the user's data); without --shards compare runs "
                                 "on the demo benchmark, which brings its own model")
        source: Any = compare.DemoSource(**({"val_fraction": args.val_fraction} if args.val_fraction else {}))
    else:
        missing = [_flag(n) for n in ("model", "weights", "attr") if getattr(args, n) is None]
        if missing:
            raise UsageError(f"--shards needs {', '.join(missing)}")
        source = compare.ShardSource(model=args.model, weights=args.weights, data=_data_spec(args, args.seeds[0]),
                                     trust_pickle=args.trust_pickle, library=args.arch_library,
                                     device=_device(args.device))
    threads = args.threads if args.threads is not None else (1 if args.shards is None else None)
    compare.main(source, methods=methods, seeds=args.seeds, out=args.out, rule=rule, json_path=args.json,
                 progress=_progress(args), threads=threads)
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
    p.add_argument("--json", metavar="PATH",
                   help="also write every run's metrics and the summary as JSON to PATH (default: none)")
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
    parser.formatter_class, parser.epilog = _HelpFormatter, exit_epilog(None)
    for name, p in sub.choices.items():
        p.add_argument("--debug", action="store_true",
                       help="on an error, show the Python traceback too (for a bug report)")
        p.formatter_class, p.epilog = _HelpFormatter, exit_epilog(name)
        p.set_defaults(flags={a.dest: next(o for o in a.option_strings if o.startswith("--"))
                              for a in p._actions if any(o.startswith("--") for o in a.option_strings)})
    return parser


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this debias run to its end: this one with --resume, without
    --stop-after-epochs (pasted as printed, it must not stop again after N epochs)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--stop-after-epochs":
            skip = True
        elif not arg.startswith("--stop-after-epochs="):
            kept.append(arg)
    return shlex.join(["fastmask", *kept, *([] if "--resume" in kept else ["--resume"])])


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind: for debias, the saved run state and the command that continues it."""
    if args.command != "debias":
        return "interrupted"
    from pathlib import Path

    from fastmask.app.run_state import CHECKPOINT, SavedRun

    state = Path(args.out) / CHECKPOINT
    if not state.is_file():
        return ("interrupted before a run state was saved (it is saved once the mask is ready and after every epoch "
                "of --select none); run the command again")
    try:
        run = SavedRun.load(state).run
        when = f"after {run['step']} epoch {run['epoch']}"
    except ValueError:
        when = "after the last finished epoch"
    return f"interrupted; the run state {when} is saved in {state}; continue with: {_resume_command(args.argv)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmask`` console script: parse, run the subcommand, and end every failure on the one
    error path (a one-line message and the exit status of its kind, :data:`EXIT_STATUSES`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"fastmask {args.command}: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # the one error path: every failure ends as one line and an exit status
        status = status_of(err)
        if args.debug:
            traceback.print_exc()
        message = flag_names(one_line(err), args.flags)
        if status == EXIT_INTERNAL:
            message = (f"internal error ({type(err).__name__}: {message}); this is a bug in fastmask: please report "
                       "it with the traceback that --debug shows")
        print(f"fastmask {args.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
