"""bench/gpu_check.py, the check for the day a GPU is lent, in the mode CI can run: no CUDA device, so the C++
backend and the Triton kernels in the interpreter against the reference, torch.optim and torch's fused optimizers,
2 gloo processes, and the CUDA-only checks reported as skipped. A wrong or crashing kernel, injected into the op
dispatch of a fresh process, must turn its own check into a failure and the exit status non-zero: the check cannot
pass silently. No timing is asserted (benchmarks measure, tests check behaviour)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmask.ops.table import OPS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CPU_BACKENDS = ("cpp", "triton")
OPTIMIZERS = ("MaskedAdam", "MaskedAdamW", "MaskedSGD")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode's test; on a GPU run the check itself")


def run_check(tmp_path: Path, *args: str, inject: str = "") -> tuple[subprocess.CompletedProcess, dict | None]:
    """``gpu_check.py --quick --json ... args`` in a fresh process (``inject``: Python run first, in that process);
    the process and the JSON it wrote (None if none)."""
    out = tmp_path / "check.json"
    argv = [str(SCRIPT), "--quick", "--json", str(out), *args]
    launch = (f"import runpy, sys\n{inject}\nsys.path.insert(0, {str(SCRIPT.parent)!r})\nsys.argv = {argv!r}\n"
              f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", launch] if inject else [sys.executable, *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_cpu_quick_run_passes_every_op_and_optimizer_and_skips_the_cuda_checks(tmp_path: Path) -> None:
    proc, report = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["device"]["type"] == "cpu" and report["device"]["triton_interpreter"]
    checks = report["checks"]
    assert {c["device"] for c in checks} == {"cpu"}, "a figure labelled with a device that did not produce it"
    assert not [c for c in checks if c["result"] == "fail"]
    for op, entry in OPS.items():
        for backend in (b for b in CPU_BACKENDS if b in entry.backends):
            rows = [c for c in checks if c["name"].startswith(f"op {op} ") and c["backend"] == backend]
            assert rows and all(c["result"] == "pass" for c in rows), (op, backend, rows)
    for name in OPTIMIZERS:
        for backend in CPU_BACKENDS:
            rows = {c["name"] for c in checks if c["name"].startswith(f"optim {name} ") and c["backend"] == backend
                    and c["result"] == "pass"}
            assert rows == {f"optim {name} {mask} vs {oracle}" for mask in ("no mask", "soft mask")
                            for oracle in ("torch.optim", "torch fused")}, (name, backend, rows)
    graph = [c for c in checks if c["name"].startswith("graph ")]
    assert graph and all(c["result"] == "skip" and "no CUDA" in c["detail"] for c in graph), graph
    assert [c["result"] for c in checks if c["name"].startswith("distributed ")] == ["pass"]
    timed = {c["name"].removeprefix("speed ") for c in checks if c["name"].startswith("speed ")
             and c["backend"] == "cpp" and c["result"] == "pass" and "roofline" in c["figure"]}
    assert timed == {op for op in OPS if op != "soft_mask"}, timed
    assert all(c["result"] == "skip" and "interpreter" in c["detail"] for c in checks
               if c["name"].startswith("speed ") and c["backend"] == "triton")
    rows = report["rows"]
    for case in timed:
        providers = {r["provider"]: r for r in rows if r["case"] == case}
        assert set(providers) == {"reference", "cpp", "roofline"}, providers
        assert providers["roofline"]["bandwidth_gbps"] > 0 and providers["cpp"]["of_roofline"] > 0
    assert report["counts"] == {r: sum(c["result"] == r for c in checks) for r in ("pass", "fail", "skip")}
    assert "every figure below is a CPU figure" in proc.stdout


# Wraps fastmask.ops.implementation (which every public op asks for its backend's callable) so that one op on one
# backend misbehaves: "perturb" changes the largest element of each output tensor by a relative 1e-5 (above every
# float tolerance of the check), "raise" makes it fail.
INJECT = """
import fastmask.ops as _ops
_real = _ops.implementation

def _implementation(op, name):
    fn = _real(op, name)
    if (op, name) != ({op!r}, "cpp"):
        return fn
    def wrong(*args, **kwargs):
        if {how!r} == "raise":
            raise RuntimeError("injected failure")
        out = fn(*args, **kwargs)
        for t in out if out is not None else args[0]:  # an in-place op: what it wrote into its first argument
            if t.numel():
                t.view(-1)[t.abs().argmax()] *= 1 + 1e-5
        return out
    return wrong

_ops.implementation = _implementation
"""


@pytest.mark.parametrize(("op", "how", "checks", "failing"), [
    ("soft_mask", "perturb", "ops", "op soft_mask float32"),
    ("hard_mask", "raise", "ops", "op hard_mask float32"),
    ("masked_sgd_", "perturb", "optim", "optim MaskedSGD"),
])
def test_a_wrong_kernel_fails_its_check_and_the_exit_status(tmp_path: Path, op: str, how: str, checks: str,
                                                             failing: str) -> None:
    proc, report = run_check(tmp_path, "--checks", checks, "--ops", op, inject=INJECT.format(op=op, how=how))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report["checks"]
    bad = [c for c in rows if c["result"] == "fail"]
    assert bad and all(c["backend"] == "cpp" and c["name"].startswith(failing) for c in bad), bad
    assert all(c["result"] == "pass" for c in rows if c["backend"] == "triton"), rows  # the others still judged
    if how == "raise":
        assert all("injected failure" in c["detail"] for c in bad), bad
    else:
        assert all(" elements differ" in c["detail"] for c in bad), bad


def test_bad_arguments_give_one_line_and_status_2(tmp_path: Path) -> None:
    proc, report = run_check(tmp_path, "--checks", "ops,speling")
    assert proc.returncode == 2 and report is None
    assert proc.stderr.strip().splitlines()[-1].endswith("--checks: unknown ['speling']; choose from "
                                                         "build,ops,optim,graph,distributed,speed")
