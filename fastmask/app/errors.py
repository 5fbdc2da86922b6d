"""The command line's one error path, below the parsers: the exit status of every kind of failure
(:data:`EXIT_STATUSES`, printed by every ``--help``), the exceptions for the kinds no Python exception names
(:class:`UsageError`, :class:`DeviceError`), and how an exception becomes one line that names flags
(:func:`flag_names`, :func:`one_line`, :func:`status_of`). :func:`fastmask.app.cli.main` applies them. Kept apart from
``cli.py`` so that the modules the command line runs (``debias.py``) raise these errors without importing the
command line, and so that the parsers and the error path can each be read alone."""

from __future__ import annotations

import re

__all__ = ["UsageError", "DeviceError", "EXIT_STATUSES", "EXIT_INPUT", "EXIT_USAGE", "EXIT_UNCHANGED",
           "EXIT_THRESHOLD_ONLY", "EXIT_DAMAGED", "EXIT_DEVICE", "EXIT_EXISTS", "EXIT_INTERNAL", "EXIT_STOPPED",
           "EXIT_INTERRUPTED", "exit_epilog", "flag_names", "one_line", "status_of"]

class UsageError(ValueError):
    """Options that contradict each other or a value out of range: exit status 2, as argparse's own refusals."""


class DeviceError(RuntimeError):
    """The ``--device`` asked for is not available on this machine."""


#: Bad input: a file, table column, sample key or value, or the weights.
EXIT_INPUT = 1
#: Bad command line: an unknown or conflicting option, or an option value out of range (argparse's own status).
EXIT_USAGE = 2
#: Exit status of a debias run whose selection found no candidate within the budgets (the model is unchanged).
EXIT_UNCHANGED = 3
#: Exit status of a debias run in which no candidate did better than moving the decision threshold alone (the weights
#: are written unchanged, with the new threshold).
EXIT_THRESHOLD_ONLY = 4
#: Damaged data: a split lost more than --max-skip-fraction of its samples, or --strict met a damaged one.
EXIT_DAMAGED = 5
#: The --device asked for is not available here.
EXIT_DEVICE = 6
#: --out already holds a finished run or a shard set, and --overwrite was not given.
EXIT_EXISTS = 7
#: An error that is not the input's: a bug in fastmask (sysexits.h EX_SOFTWARE).
EXIT_INTERNAL = 70
#: Exit status of a debias run stopped by --stop-after-epochs (sysexits.h EX_TEMPFAIL).
EXIT_STOPPED = 75
#: Interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
#: (status, the subcommands that can end with it (empty: all), meaning): the table every --help prints.
EXIT_STATUSES = (
    (0, (), "done"),
    (EXIT_INPUT, (), "bad input: a file, table column, sample key or value, or the weights"),
    (EXIT_USAGE, (), "bad command line: an unknown or conflicting option, or an option value out of range"),
    (EXIT_UNCHANGED, ("debias",), "no candidate within the budgets: the model written unchanged"),
    (EXIT_THRESHOLD_ONLY, ("debias",), "threshold only: the weights written unchanged, with the new threshold"),
    (EXIT_DAMAGED, ("debias", "evaluate", "compare"),
     "damaged data: a split lost more than --max-skip-fraction of its samples, or --strict met a damaged one"),
    (EXIT_DEVICE, ("debias", "evaluate", "compare"), "the --device asked for is not available"),
    (EXIT_EXISTS, ("shards", "debias"), "--out holds a finished run or shard set: pass --overwrite to replace it"),
    (EXIT_INTERNAL, (), "internal error (a bug): --debug shows the traceback for a report"),
    (EXIT_STOPPED, ("debias",), "stopped by --stop-after-epochs: continue with --resume"),
    (EXIT_INTERRUPTED, (), "interrupted (Ctrl-C); debias prints the --resume command that continues the run"),
)
# The errors that a user's input causes (a bad file, column, key or value): one line, exit status 1.
_USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def exit_epilog(command: str | None) -> str:
    """The exit statuses of ``command`` (None: of every command) as the --help epilog, one line each."""
    lines = ["exit status:"]
    for status, commands, meaning in EXIT_STATUSES:
        if command is None or not commands or command in commands:
            only = f" ({', '.join(commands)})" if command is None and commands else ""
            lines.append(f"{status:>5}  {meaning}{only}")
    return "\n".join(lines)


# Python names that messages from below the command line use, and the flags they stand for; names of the
# subcommand's own options (``rate must be``, ``mask_mode='grad'``) are mapped from its parser in flag_names.
_PYTHON_NAMES = (
    (r"\bStepConfig\.epochs\b", "--epochs1 / --epochs2"),
    (r"\bStepConfig\.lr\b", "--lr1 / --lr2"),
    (r"\bStepConfig\.optimizer\b", "--optimizer"),
    (r"\b(?:Swift|Bmft)Config\(faithful=True\)", "--faithful"),
    (r"\bSet faithful=False\b", "Leave out --faithful"),
    (r"\battr_cols\[\d+\]=", "--attr "),
    (r"\bimage_root\b", "--image-root"),
    (r"^model (?=')", "--model "),
    (r"\breplace=True or 'auto'", "--balance-replace true or auto"),
)


def flag_names(message: str, flags: dict[str, str]) -> str:
    """``message`` with the Python names of options replaced by the subcommand's flags (``flags``: dest -> flag):
    the one place where the layers below, which know nothing of the command line, are translated to it."""
    for pattern, flag in _PYTHON_NAMES:
        message = re.sub(pattern, flag, message)
    names = "|".join(re.escape(d) for d in sorted(flags, key=len, reverse=True))
    if names:
        # `overwrite=True` -> `--overwrite`; `mask_mode='grad'` -> `--mask-mode 'grad'`; `rate must` -> `--rate must`
        message = re.sub(rf"(?<![\w.-])({names})=True\b", lambda m: flags[m.group(1)], message)
        message = re.sub(rf"(?<![\w.-])({names})(=| must be\b)",
                         lambda m: flags[m.group(1)] + (" " if m.group(2) == "=" else m.group(2)), message)
    return message


def one_line(err: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker comes back with the worker's traceback
    in its message: its last line is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def status_of(err: Exception) -> int:
    """The exit status of ``err``'s kind (:data:`EXIT_STATUSES`); anything not the input's is internal."""
    from fastmask.data.stats import ShardReadError

    for kind, status in ((ShardReadError, EXIT_DAMAGED), (DeviceError, EXIT_DEVICE), (FileExistsError, EXIT_EXISTS),
                         (UsageError, EXIT_USAGE), (_USER_ERRORS, EXIT_INPUT)):
        if isinstance(err, kind):
            return status
    return EXIT_INTERNAL
