"""`fastmask debias --profile DIR`: the Chrome trace of a short run holds every phase range and every fused op's
range (fastmask.util.profiling.PHASES and the op table's ranges), by name, as recorded by torch.profiler; the
ranges nest as the pipeline runs them (the importance pass reads its data inside its own range, the fused optimizer
step inside step 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import TinyCNN, make_dataset, tiny_weights

from fastmask.app.cli import main

PHASE_NAMES = ("fastmask.data", "fastmask.importance", "fastmask.mask", "fastmask.step1", "fastmask.head_reinit",
               "fastmask.step2", "fastmask.evaluate")
# the op each run's configuration exercises: SWiFT SGD (soft mask), BMFT Adam (percentile + hard mask)
OP_NAMES = {"swift": ("fastmask.fisher_accumulate", "fastmask.soft_mask", "fastmask.masked_sgd"),
            "bmft": ("fastmask.fisher_accumulate", "fastmask.percentile", "fastmask.hard_mask",
                     "fastmask.masked_adam")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profile")
    make_dataset(root, n=48, n_test=16)
    tiny_weights(root / "weights.pt", seed=0)
    assert main(["shards", str(root / "meta.csv"), "--image-root", str(root / "images"), "--out",
                 str(root / "shards"), "--attr", "tint", "--fold-col", "fold"]) == 0
    return root


def spans(trace: Path) -> dict[str, list[tuple[float, float]]]:
    """name -> [(start, end)] of the complete ("X") events whose name starts with fastmask."""
    events = json.loads(trace.read_text())["traceEvents"]
    out: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("fastmask."):
            out.setdefault(e["name"], []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return out


def inside(inner: list[tuple[float, float]], outer: list[tuple[float, float]]) -> bool:
    return any(o0 <= i0 and i1 <= o1 for i0, i1 in inner for o0, o1 in outer)


@pytest.mark.parametrize("method", ["swift", "bmft"])
def test_trace_has_every_phase_and_op(data: Path, tmp_path: Path, method: str, capsys) -> None:
    torch.set_num_threads(1)
    extra = ["--rate", "60", "--optimizer", "adam"] if method == "bmft" else []
    argv = ["debias", "--model", "cli_helpers:TinyCNN", "--weights", str(data / "weights.pt"), "--shards",
            str(data / "shards"), "--attr", "tint", "--test-fold", "test", "--method", method, "--epochs1", "1",
            "--epochs2", "1", "--batch-size", "16", "--image-size", "12", "--no-progress", "--no-epoch-eval",
            "--out", str(tmp_path / "out"), "--profile", str(tmp_path / "prof"), *extra]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    mem = report["memory"]
    assert mem["parameter_bytes"] == 4 * sum(p.numel() for p in TinyCNN().parameters())
    assert set(mem["steps"]) == ({"step1", "step2"} if method == "swift" else {"impair", "repair"})
    for lap in (mem["mask_generation"], *mem["steps"].values()):
        assert lap["peak_bytes"] >= lap["baseline_bytes"] > 0
        assert lap["extra_over_parameter_bytes"] == lap["extra_bytes"] / mem["parameter_bytes"]
    trace = tmp_path / "prof" / "trace.json"
    assert str(trace) in capsys.readouterr().out
    found = spans(trace)
    missing = [n for n in (*PHASE_NAMES, *OP_NAMES[method]) if n not in found]
    assert not missing, f"ranges missing from the trace: {missing}; found {sorted(found)}"
    assert inside(found["fastmask.data"], found["fastmask.importance"])
    assert inside(found["fastmask.fisher_accumulate"], found["fastmask.importance"])
    optim = "fastmask.masked_sgd" if method == "swift" else "fastmask.masked_adam"
    assert inside(found[optim], found["fastmask.step1"])
    # the phases run in the pipeline's order
    first = {n: min(s for s, _ in found[n]) for n in PHASE_NAMES[1:6]}
    assert sorted(first, key=first.get) == list(PHASE_NAMES[1:6])


def test_profile_module_lists_the_same_names() -> None:
    from fastmask.ops.table import OPS
    from fastmask.util.profiling import PHASES

    assert PHASES == PHASE_NAMES
    # every op's range is a debias run's, but radix_histogram's: the percentile runs its passes inside its own range
    ranges = {op.profile_range for op in OPS.values()}
    assert ranges == {n for names in OP_NAMES.values() for n in names} | {"fastmask.radix_histogram"}
