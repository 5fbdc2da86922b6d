"""The ``fastmask`` command line: one subcommand per task (``fastmask demo``, ...).

Each subcommand is registered by a ``_add_<name>(subparsers)`` function listed in ``COMMANDS``; it sets ``func``, the
handler that receives the parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from fastmask.cli_debias import add_debias, add_evaluate, add_shards

__all__ = ["build_parser", "main"]


def _run_demo(args: argparse.Namespace) -> int:
    from fastmask import demo  # imported here so that `fastmask --help` stays fast

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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, add_shards, add_debias, add_evaluate]


def _run_compare(args: argparse.Namespace) -> int:
    from fastmask import compare  # imported here so that `fastmask --help` stays fast

    try:
        methods = compare.check_arguments(args.methods, args.seeds, args.data)
    except ValueError as exc:  # an unknown method or data source, repeated seeds
        raise SystemExit(f"fastmask compare: error: {exc}") from exc
    compare.main(methods=methods, seeds=args.seeds, out=args.out, data=args.data, json_path=args.json,
                 progress=not args.no_progress, threads=args.threads)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="SWiFT, BMFT and the baselines over several seeds: a mean ± std table (markdown, CSV) and a plot",
        description="Run the chosen methods (baselines of spec §9, SWiFT, BMFT) on a benchmark over several seeds and "
        "write table.md, table.csv, runs.csv and scatter.png (fairness against AUC) into --out.",
    )
    p.add_argument("--methods", nargs="+", metavar="M",
                   help="method names (default: baseline swift bmft fullft-fdr llft diffgda random-mask hard-0.5), or "
                   "'all': baseline swift bmft fullft-rw fullft-reg fullft-fdr llft diffgda diffprune fairprune "
                   "random-mask hard-0.1 hard-0.3 hard-0.5 hard-0.7 hard-0.9 manual-bn manual-top")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N", help="seeds (default 0 1 2)")
    p.add_argument("--out", metavar="DIR", default="fastmask-compare", help="output folder (default fastmask-compare)")
    p.add_argument("--data", default="demo", help="data source (default and, for now, only: demo)")
    p.add_argument("--json", metavar="PATH", help="also write every run's metrics and the summary as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as fastmask demo)")
    p.set_defaults(func=_run_compare)


COMMANDS.append(_add_compare)


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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
