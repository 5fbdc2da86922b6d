"""Every way `fastmask shards / debias / evaluate` refuses bad input: exit status 1 and one message on stderr that
names the thing at fault (column, attribute value, group, fold, file, option)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import TinyCNN, make_dataset, tiny_weights

from fastmask.app.cli import main
from fastmask.masking.masks import save_masks


@dataclass
class Env:
    root: Path
    shards: Path
    weights: Path


pytestmark = pytest.mark.usefixtures("one_thread")


def write_shards(root: Path, table: pd.DataFrame, name: str) -> Path:
    table.to_csv(root / f"{name}.csv", index=False)
    assert main(["shards", str(root / f"{name}.csv"), "--image-root", str(root / "images"), "--out",
                 str(root / name), "--attr", "tint", "--attr", "sex", "--fold-col", "fold"]) == 0
    return root / name


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("errors")
    table = make_dataset(root, n=40, n_test=16)
    tiny_weights(root / "weights.pt")
    # Variants of the data: external rows of one class only; a test fold without tint group 1.
    write_shards(root, table[(table["fold"] == "test") | (table["target"] == 0)], "oneclass")
    write_shards(root, table.assign(tint=table["tint"].where(table["fold"] == "ext", 0)), "nogroup")
    # an external (group 1, label 0) cell of one sample: too small to split into fitting and validation parts
    cell = table.index[(table["fold"] == "ext") & (table["tint"] == 1) & (table["target"] == 0)]
    write_shards(root, table.drop(cell[1:]), "tiny")
    # Bad tables and checkpoints.
    bad = table.copy()
    bad.loc[3, "target"] = 2
    bad.to_csv(root / "badlabel.csv", index=False)
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    broken = table.copy()
    broken.loc[5, "filepath"] = "broken.png"
    broken.to_csv(root / "badimage.csv", index=False)
    (root / "garbage.pt").write_bytes(b"\x00\x01 this is no checkpoint" * 20)
    torch.save(TinyCNN(), root / "pickled.pt")  # a whole nn.Module: needs weights_only=False
    torch.save(torch.nn.Linear(3, 1).state_dict(), root / "other.pt")
    save_masks({n: torch.full_like(p, 0.5) for n, p in TinyCNN().named_parameters()}, root / "soft-mask.safetensors")
    save_masks({"weight": torch.ones(1, 3)}, root / "other-mask.safetensors")
    return Env(root, write_shards(root, table, "shards"), root / "weights.pt")


def shards_argv(env: Env, table: str, *extra: str) -> list[str]:
    return ["shards", str(env.root / table), "--image-root", str(env.root / "images"), "--out",
            str(env.root / "out-shards"), "--attr", "tint", "--overwrite", *extra]


def debias_argv(env: Env, *extra: str, shards: str = "shards", weights: str | None = None,
                model: str = "cli_helpers:TinyCNN", out: str = "out", method: str = "swift") -> list[str]:
    argv = ["debias", "--model", model, "--weights", str(env.root / weights) if weights else str(env.weights),
            "--shards", str(env.root / shards), "--method", method, "--epochs1", "1", "--epochs2", "1",
            "--batch-size", "8", "--image-size", "12", "--no-progress", "--no-epoch-eval", "--select", "none",
            "--out", str(env.root / out)]
    if "--attr" not in extra:
        argv += ["--attr", "tint"]
    if "--test-fold" not in extra and "--no-test-fold" not in extra:
        argv += ["--test-fold", "test"]
    return argv + [e for e in extra if e != "--no-test-fold"]


def evaluate_argv(env: Env, *extra: str, weights: str | None = None, shards: str = "shards") -> list[str]:
    return ["evaluate", "--model", "cli_helpers:TinyCNN", "--weights",
            str(env.root / weights) if weights else str(env.weights), "--shards", str(env.root / shards),
            "--image-size", "12", "--no-progress", "--out", str(env.root / "eval"), *extra]


# (case id, argv builder, substrings the message must hold)
CASES: list[tuple[str, Callable[[Env], list[str]], list[str]]] = [
    # metadata tables
    ("shards: missing column", lambda e: shards_argv(e, "meta.csv", "--attr", "race"),
     ["missing column", "--attr 'race'"]),
    ("shards: missing fold column", lambda e: shards_argv(e, "meta.csv", "--fold-col", "split"),
     ["missing column", "--fold-col 'split'"]),
    ("shards: non-binary label", lambda e: shards_argv(e, "badlabel.csv"), ["'target'", "row 3", "not binary"]),
    ("shards: unreadable image", lambda e: shards_argv(e, "badimage.csv"), ["row 5", "broken.png", "unreadable"]),
    ("shards: missing table", lambda e: shards_argv(e, "nope.csv"), ["nope.csv", "not found"]),
    # attributes and groups
    ("debias: missing attribute column", lambda e: debias_argv(e, "--attr", "race"),
     ["--attr 'race'", "attribute columns", "'tint'"]),
    ("debias: unknown attribute value (not 0/1)", lambda e: debias_argv(e, "--attr", "sex"),
     ["attribute 'sex'", "value 'M'", "key 00000000", "--attr-map"]),
    ("debias: unknown attribute value (not in the map)", lambda e: debias_argv(e, "--attr", "sex", "--attr-map",
                                                                             "F=1"),
     ["attribute 'sex'", "value 'M'", "not in attr_map"]),
    ("debias: attribute value mapped to a third group", lambda e: debias_argv(e, "--attr", "sex", "--attr-map",
                                                                            "F=1", "--attr-map", "M=2"),
     ["attribute 'sex'", "value 'M'", "group 2", "not 0 or 1"]),
    ("debias: attribute group with no samples (map)", lambda e: debias_argv(e, "--attr", "sex", "--attr-map", "F=1",
                                                                          "--attr-map", "M=1"),
     ["attribute 'sex'", "group 0", "no samples", "external set"]),
    ("debias: attribute group with no samples (test fold)", lambda e: debias_argv(e, shards="nogroup"),
     ["attribute 'tint'", "group 1", "no samples", "evaluation set", "fold 'test'"]),
    ("debias: single-class data", lambda e: debias_argv(e, shards="oneclass"),
     ["single-class data", "external set", "label 0"]),
    ("evaluate: single-class data", lambda e: evaluate_argv(e, "--fold", "ext", shards="oneclass"),
     ["single-class data", "fold 'ext'", "label 0"]),
    ("evaluate: missing attribute column", lambda e: evaluate_argv(e, "--attr", "race"), ["--attr 'race'"]),
    # evaluation set and folds
    ("debias: no evaluation set", lambda e: debias_argv(e, "--no-test-fold"), ["--test-fold", "--eval-shards"]),
    ("debias: unknown test fold", lambda e: debias_argv(e, "--test-fold", "holdout"),
     ["--test-fold 'holdout'", "'ext'", "'test'"]),
    ("debias: missing shards", lambda e: debias_argv(e, shards="nowhere"), ["--shards", "nowhere"]),
    # checkpoints and models
    ("debias: unreadable checkpoint", lambda e: debias_argv(e, weights="garbage.pt"),
     ["garbage.pt", "cannot be read"]),
    ("evaluate: unreadable checkpoint", lambda e: evaluate_argv(e, weights="garbage.pt"),
     ["garbage.pt", "cannot be read"]),
    ("debias: pickled checkpoint without the flag", lambda e: debias_argv(e, weights="pickled.pt"),
     ["pickled.pt", "pickled checkpoint", "weights_only=False", "--trust-pickle", "cli_helpers.TinyCNN"]),
    ("evaluate: pickled checkpoint without the flag", lambda e: evaluate_argv(e, weights="pickled.pt"),
     ["pickled.pt", "--trust-pickle"]),
    ("debias: checkpoint of another model", lambda e: debias_argv(e, weights="other.pt"),
     ["other.pt", "missing keys", "features.0.weight", "unexpected keys", "'weight'"]),
    ("debias: missing checkpoint", lambda e: debias_argv(e, weights="none.pt"), ["none.pt", "not found"]),
    ("debias: module not importable", lambda e: debias_argv(e, model="no_such_module:Net"),
     ["no_such_module"]),
    ("debias: callable missing", lambda e: debias_argv(e, model="cli_helpers:NoNet"), ["cli_helpers", "'NoNet'"]),
    ("evaluate: a mask file given as weights", lambda e: evaluate_argv(e, weights="soft-mask.safetensors"),
     ["soft-mask.safetensors", "fastmask-masks file", "not a model's weights"]),
    ("debias: a mask of another model", lambda e: debias_argv(e, "--mask", str(e.root / "other-mask.safetensors")),
     ["other-mask.safetensors", "mask 'weight' is not a parameter of TinyCNN"]),
    ("debias: a soft mask for BMFT", lambda e: debias_argv(e, "--mask", str(e.root / "soft-mask.safetensors"),
                                                          method="bmft"),
     ["--mask", "soft-mask.safetensors", "torch.float32", "BMFT", "hard (bool)"]),
    ("debias: a mask file that is no mask", lambda e: debias_argv(e, "--mask", str(e.root / "garbage.pt")),
     ["--mask", "garbage.pt", "cannot be read"]),
    ("debias: a validation part too small to split", lambda e: debias_argv(e, "--select", "grid", shards="tiny"),
     ["cell group", "too few to split", "--select none"]),
]

# Options that contradict each other or a value out of range: exit status 2, as argparse's own refusals; the message
# names the flags, never the Python field behind them.
USAGE_CASES: list[tuple[str, Callable[[Env], list[str]], list[str]]] = [
    ("debias: option of the other method", lambda e: debias_argv(e, "--rate", "70"), ["--rate", "BMFT"]),
    ("debias: faithful with a non-reference option", lambda e: debias_argv(e, "--faithful", "--mask-mode", "update"),
     ["--faithful", "--mask-mode 'grad'", "Leave out --faithful"]),
    # selection (debias_argv passes --select none; a later --select grid wins)
    ("debias: a fixed learning rate while selecting", lambda e: debias_argv(e, "--select", "grid", "--lr1", "1e-3"),
     ["--lr1", "--select none", "--grid-lr1"]),
    ("debias: a grid without selection", lambda e: debias_argv(e, "--grid-lr1", "1e-3"),
     ["--grid-lr1", "--select none"]),
    ("debias: a validation-chosen threshold without selection", lambda e: debias_argv(e, "--threshold", "accuracy"),
     ["--threshold accuracy", "validation", "--select none"]),
    ("debias: resume while selecting", lambda e: debias_argv(e, "--select", "grid", "--resume"),
     ["--resume", "--select none", "selection"]),
    ("debias: patience without selection", lambda e: debias_argv(e, "--patience", "2"),
     ["--patience", "--select none"]),
    ("debias: negative patience", lambda e: debias_argv(e, "--select", "grid", "--patience", "-1"),
     ["--patience", "expected an integer >= 0, got -1"]),
    ("debias: negative epochs", lambda e: debias_argv(e, "--epochs1", "-1"), ["--epochs1", ">= 0, got -1"]),
    ("debias: negative learning rate", lambda e: debias_argv(e, "--lr2", "-1"), ["--lr1 / --lr2 must be >= 0"]),
    ("debias: beta out of range", lambda e: debias_argv(e, "--beta", "2"), ["--beta must be in [0, 1]", "got 2"]),
    ("debias: --max-skip-fraction out of range", lambda e: debias_argv(e, "--max-skip-fraction", "1.5"),
     ["--max-skip-fraction", "'1.5'"]),
    ("debias: --val-fraction out of range", lambda e: debias_argv(e, "--val-fraction", "1.5"),
     ["--val-fraction", "(0, 1)", "'1.5'"]),
    ("debias: --val-fraction of everything", lambda e: debias_argv(e, "--val-fraction", "1"),
     ["--val-fraction", "(0, 1)", "'1'"]),
    ("debias: a reduction with a map", lambda e: debias_argv(e, "--attr", "sex", "--attr-groups", "extremes",
                                                            "--attr-map", "F=1"),
     ["--attr-groups extremes", "--attr-map"]),
    ("debias: an unknown device", lambda e: debias_argv(e, "--device", "gpu"), ["--device 'gpu'", "cuda:1"]),
]


@pytest.mark.parametrize("case, argv, expected, status", [(*c, 1) for c in CASES] + [(*c, 2) for c in USAGE_CASES],
                         ids=[c[0] for c in (*CASES, *USAGE_CASES)])
def test_bad_input_is_refused_with_a_message_naming_it(env, capsys, case, argv, expected, status):
    try:
        code = main(argv(env))
    except SystemExit as exit_:  # argparse's own refusals: its usage line, then one error line
        code = exit_.code
    assert code == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fastmask ") and "error:" in lines[-1]
    assert len(lines) == 1 or lines[0].startswith("usage: fastmask ")
    # a flag, never the Python field or keyword behind it
    assert "Config." not in err and "attr_cols[" not in err and not re.search(r"\b\w+=True\b", err)
    for text in expected:
        assert text in err, f"{case}: {text!r} not in {err!r}"


def test_architecture_name_without_torchvision_or_timm(env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(debias_argv(env, model="resnet50")) == 1
    err = capsys.readouterr().err
    for text in ("'resnet50'", "torchvision cannot be imported", "timm cannot be imported", "module:callable"):
        assert text in err


def test_trust_pickle_loads_the_pickled_checkpoint(env, capsys):
    # The positive control of the refusal above: the same file loads once the user vouches for it.
    assert main(evaluate_argv(env, "--trust-pickle", weights="pickled.pt")) == 0
    assert "AUC" in capsys.readouterr().out


def test_run_state_is_never_silently_overwritten_or_resumed_with_other_options(env, capsys):
    assert main(debias_argv(env, "--stop-after-epochs", "1", out="stopped")) == 75
    state = env.root / "stopped" / "checkpoint" / "state.pt"
    assert state.is_file()
    capsys.readouterr()
    assert main(debias_argv(env, out="stopped")) == 7  # EXIT_EXISTS
    err = capsys.readouterr().err
    assert str(state) in err and "--resume" in err and "after step1 epoch 1" in err and "--overwrite" in err
    assert main(debias_argv(env, "--resume", "--beta", "0.3", out="stopped")) == 1
    err = capsys.readouterr().err
    assert "config.beta: 0.1 in the checkpoint, 0.3 now" in err
    state.write_bytes(b"damaged")
    assert main(debias_argv(env, "--resume", out="stopped")) == 1
    assert "cannot be read" in capsys.readouterr().err


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_device_this_machine_lacks_is_one_line_with_its_own_status(env, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here: no GPU
    for argv in (debias_argv(env, "--device", "cuda"), evaluate_argv(env, "--device", "cuda:0")):
        assert main(argv) == 6
        err = one_line(capsys)
        assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err


def test_debug_adds_the_traceback_to_the_one_line(env, capsys):
    assert main(debias_argv(env, "--attr", "race", "--debug")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "--attr 'race'" in err[-1]


def test_an_internal_error_is_one_line_that_points_to_debug(env, capsys, monkeypatch):
    import fastmask.app.evaluate

    def broken(**kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(fastmask.app.evaluate, "evaluate", broken)
    assert main(evaluate_argv(env)) == 70
    err = one_line(capsys)
    assert "internal error (ZeroDivisionError: division by zero)" in err and "--debug" in err


def test_a_finished_out_is_refused_unless_overwrite(env, capsys):
    out = env.root / "finished"
    assert main(debias_argv(env, out="finished")) == 0
    stale = out / "selection.png"  # a file of an earlier run that this one (--select none) does not write
    stale.write_bytes(b"old")
    capsys.readouterr()
    assert main(debias_argv(env, "--beta", "0.3", out="finished")) == 7
    err = one_line(capsys)
    assert f"--out {out} holds a finished run (report.json)" in err and "--overwrite" in err
    assert main(debias_argv(env, "--beta", "0.3", "--overwrite", out="finished")) == 0
    assert not stale.exists() and (out / "report.json").is_file()


def test_shards_refusal_names_the_flag(env, capsys):
    argv = [a for a in shards_argv(env, "meta.csv") if a != "--overwrite"]
    argv[argv.index("--out") + 1] = str(env.root / "twice")
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 7
    err = one_line(capsys)
    assert "pass --overwrite" in err and "overwrite=True" not in err


def test_nan_or_inf_in_the_weights_names_the_parameter(env, capsys):
    for value, kind in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        state = TinyCNN().state_dict()
        state["features.4.weight"][0, 0, 1, 1] = value
        torch.save(state, env.root / "bad-values.pt")
        assert main(evaluate_argv(env, weights="bad-values.pt")) == 1
        err = one_line(capsys)
        assert "parameter 'features.4.weight' holds " + kind in err and "bad-values.pt" in err


def test_a_model_without_a_colon_is_told_the_expected_form(env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # whatever is installed, the message is about the form
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(debias_argv(env, model="cli_helpers.TinyCNN")) == 1
    err = one_line(capsys)
    assert "--model 'cli_helpers.TinyCNN': expected 'module:callable'" in err
    assert "did you mean 'cli_helpers:TinyCNN'?" in err and "cannot be imported" not in err
