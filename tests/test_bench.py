"""Every bench script runs its providers with --quick and writes the documented JSON (no timing is asserted here:
benchmarks measure, tests check behaviour)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastmask.ops.table import OPS

BENCH = sorted((Path(__file__).parent.parent / "bench").glob("bench_*.py"))


def test_every_op_has_one_bench() -> None:
    """One bench per op stem (``bench/bench_<stem>.py``, the name the op table gives it in every folder)."""
    missing = sorted({op.stem for op in OPS.values()} - {p.stem.removeprefix("bench_") for p in BENCH})
    assert not missing, f"ops without a bench/bench_<stem>.py: {missing}"


@pytest.mark.parametrize("script", BENCH, ids=[p.stem for p in BENCH])
def test_bench_quick_writes_rows(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows, f"{script.name} wrote no rows"
    for row in rows:
        assert isinstance(row["case"], str) and isinstance(row["provider"], str), row
        assert isinstance(row["ms"], float) and row["ms"] >= 0, row
    providers = {r["provider"] for r in rows}
    assert "fastmask" in providers and providers & {"reference", "peer"}, providers
    for case in {r["case"] for r in rows}:
        names = [r["provider"] for r in rows if r["case"] == case]
        assert len(names) == len(set(names)), f"{script.name}: duplicate provider rows in case {case}"
