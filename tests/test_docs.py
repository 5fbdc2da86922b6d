"""docs/ stays true: the command-line reference (docs/cli.md) holds every subcommand's current --help, and no file of
the package, its docs or its README points outside the repository. `python tests/test_docs.py` regenerates the
--help part of docs/cli.md."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
BEGIN, END = "<!-- BEGIN generated: fastmask --help -->", "<!-- END generated -->"
COMMANDS = ("demo", "shards", "debias", "evaluate", "compare")


def help_text(command: str | None) -> str:
    """``fastmask [command] --help`` as printed at 100 columns."""
    from fastmask.app.cli import main

    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*([command] if command else []), "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue().rstrip()


def generated() -> str:
    parts = [BEGIN, "", "## `fastmask --help`", "", "```text", help_text(None), "```"]
    for command in COMMANDS:
        parts += ["", f"## `fastmask {command}`", "", "```text", help_text(command), "```"]
    return "\n".join([*parts, "", END])


def test_cli_reference_is_current():
    text = CLI_DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == generated(), "docs/cli.md is stale: run `python tests/test_docs.py`"


# What a pointer outside the repository looks like (written in pieces, so that this file does not match itself).
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "ALGORITHM" + r"\.md", "STYLE" + r"\.md", r"\bspec" + " §"]))


def test_nothing_points_outside_the_repository():
    files = [*ROOT.joinpath("fastmask").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py"),
             *ROOT.joinpath("docs").rglob("*.md"), ROOT / "README.md", *ROOT.joinpath("csrc").rglob("*.*"),
             *ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py"), ROOT / "pyproject.toml",
             ROOT / "setup.py"]
    bad = {str(f.relative_to(ROOT)): m.group(0) for f in files
           for m in [OUTSIDE.search(f.read_text(errors="replace"))] if m}
    assert not bad, bad


if __name__ == "__main__":
    text = CLI_DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    CLI_DOC.write_text(text[:start] + generated() + text[end:])
    print(f"rewrote the generated part of {CLI_DOC}", file=sys.stderr)
