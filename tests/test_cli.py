"""End to end through the command line, in process: `fastmask shards` -> `debias` -> `evaluate` on generated PNGs.

Oracles: predictions recomputed here from the written weights and the PNG files (PIL + the ImageNet normalisation
written out), scored with sklearn's roc_auc_score and docs/algorithm.md §6 formulas coded below; an uninterrupted run
for the resumed ones; tarfile for the corrupted member's place.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import tarfile
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import CONFIG, TinyCNN, make_dataset, tiny_weights
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from fastmask.app.cli import main
from fastmask.data.shards import ShardIndex
from fastmask.masking.masks import load_masks
from fastmask.methods.configs import BmftConfig, method_config
from fastmask.model.weights import build_model, load_weights

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
EXIT_STOPPED = 75


@dataclass
class Data:
    root: Path
    table: pd.DataFrame
    shards: Path
    weights: Path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("cli")
    table = make_dataset(root)
    tiny_weights(root / "weights.pt", seed=0)
    argv = ["shards", str(root / "meta.csv"), "--image-root", str(root / "images"), "--out", str(root / "shards"),
            "--attr", "tint", "--attr", "sex", "--fold-col", "fold", "--maxcount", "20"]
    assert main(argv) == 0
    return Data(root, table, root / "shards", root / "weights.pt")


def debias_argv(data: Data, out: Path, method: str = "swift", *extra: str, attr: str = "tint",
                test_fold: str | None = "test") -> list[str]:
    fold = ["--test-fold", test_fold] if test_fold else []
    return ["debias", "--model", "cli_helpers:TinyCNN", "--weights", str(data.weights), "--shards", str(data.shards),
            "--attr", attr, *fold, "--method", method, "--epochs1", "2", "--epochs2", "2",
            "--lr1", "1e-2", "--lr2", "1e-2", "--batch-size", "16", "--image-size", "12", "--seed", "3",
            "--no-progress", "--select", "none", "--out", str(out), *BY_METHOD[method], *extra]


# BMFT runs with a loader worker process: each pass then draws a DataLoader seed from torch's RNG, which the resumed
# run must replay (and the per-epoch evaluation must not disturb).
BY_METHOD = {"swift": (), "bmft": ("--rate", "60", "--workers", "1")}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted debias run per method (the end-to-end outputs, and the reference of the resumed runs)."""
    out = {}
    for method in ("swift", "bmft"):
        out[method] = tmp_path_factory.mktemp(f"run-{method}")
        assert main(debias_argv(data, out[method], method)) == 0
    return out


def oracle_probs(weights: Path, data: Data, rows: pd.DataFrame, resize: int | None = None, crop: int | None = None,
                 mean: np.ndarray = MEAN, std: np.ndarray = STD) -> np.ndarray:
    """σ(f(x)) for the rows' PNGs, decoded and normalised here (12 px images at --image-size 12: no resize; else a
    bilinear ``resize``, then the central ``crop`` x ``crop``)."""
    model = TinyCNN()
    state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    model.load_state_dict(state)
    model.eval()

    def pixels(name: str) -> np.ndarray:
        img = Image.open(data.root / "images" / name).convert("RGB")
        arr = np.asarray(img.resize((resize, resize), Image.BILINEAR) if resize else img, dtype=np.float32) / 255
        lo = (len(arr) - crop) // 2 if crop else 0
        return arr[lo:lo + crop, lo:lo + crop] if crop else arr

    images = [(pixels(f) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32) for f in rows["filepath"]]
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return torch.sigmoid(model(x).reshape(-1)).numpy().astype(np.float64)


def spec_metrics(y: np.ndarray, p: np.ndarray, a: np.ndarray) -> dict[str, float]:
    """Spec §6: ŷ = 1 iff p > 0.5; empty cells give rate 0; EOdds (code) = ½·|ΔFPR + ΔTPR|."""
    yhat = (p > 0.5).astype(float)

    def rate(mask):
        return yhat[mask].mean() if mask.any() else 0.0

    tpr = [rate((a == g) & (y == 1)) for g in (0, 1)]
    fpr = [rate((a == g) & (y == 0)) for g in (0, 1)]
    return {"auc": roc_auc_score(y, p), "acc": float((yhat == y).mean()),
            "spd": abs(rate(a == 0) - rate(a == 1)), "eodds": 0.5 * abs((fpr[0] - fpr[1]) + (tpr[0] - tpr[1]))}


# ---- shards -------------------------------------------------------------------------------------------------------


def test_shards_command_writes_counted_shards_and_index(data):
    index = ShardIndex.load(data.shards)
    assert [s.count for s in index.shards] == [20, 20, 20, 4]  # --maxcount 20 over 64 rows
    assert index.attr_cols == ["tint", "sex"]
    assert len(index) == len(data.table)
    rec = index.samples["00000005"]
    row = data.table.iloc[5]
    assert (rec["label"], rec["attrs"], rec["fold"]) == (row["target"], {"tint": row["tint"], "sex": row["sex"]},
                                                         row["fold"])
    with tarfile.open(data.shards / rec["shard"]) as tar:
        assert tar.extractfile("00000005.png").read() == (data.root / "images" / row["filepath"]).read_bytes()


def test_shards_maxsize_accepts_units(data, tmp_path):
    assert main(["shards", str(data.root / "meta.csv"), "--image-root", str(data.root / "images"), "--out",
                 str(tmp_path), "--attr", "tint", "--maxsize", "2K"]) == 0
    index = ShardIndex.load(tmp_path)
    assert len(index) == len(data.table) and len(index.shards) > 1
    for shard in index.shards:
        with tarfile.open(tmp_path / shard.name) as tar:
            payload = sum(m.size for m in tar.getmembers())
        assert payload <= 2048 or shard.count == 1, shard  # 2K = 2048 bytes of image + JSON per shard


# ---- --help and progress bars -----------------------------------------------------------------------------------


def test_help_shows_every_default_and_the_methods_epochs():
    from fastmask.app.cli import build_parser
    from fastmask.app.errors import EXIT_STATUSES
    from fastmask.methods.configs import SwiftConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            takes_value = action.nargs != 0 and not isinstance(action, argparse._HelpAction)
            if action.option_strings and takes_value and not action.required:
                assert "default" in (action.help or ""), f"fastmask {name} {action.option_strings[0]}"
        epilog = parser.format_help().split("exit status:")[1]
        statuses = {int(m) for m in re.findall(r"^\s*(\d+)  ", epilog, flags=re.MULTILINE)}
        assert {0, 1, 2, 70, 130} <= statuses and (3 in statuses) == (name == "debias"), name
    assert len({status for status, _, _ in EXIT_STATUSES}) == len(EXIT_STATUSES)
    swift, bmft, faithful = SwiftConfig(), BmftConfig(), BmftConfig(faithful=True)
    words = " ".join(sub.choices["debias"].format_help().split())
    for swift_step, bmft_step in (("step1", "impair"), ("step2", "repair")):
        swift_epochs, bmft_epochs = getattr(swift, swift_step).epochs, getattr(bmft, bmft_step).epochs
        assert f"(default: SWiFT {swift_epochs}, BMFT {bmft_epochs}; BMFT --faithful {faithful.impair.epochs})" in words


def test_progress_bars_only_on_a_terminal_unless_forced(data, tmp_path, capsys):
    argv = ["evaluate", "--model", "cli_helpers:TinyCNN", "--weights", str(data.weights), "--shards",
            str(data.shards), "--fold", "test", "--image-size", "12", "--out", str(tmp_path)]
    assert main(argv) == 0  # pytest's stderr is no terminal
    assert "evaluate" not in capsys.readouterr().err
    assert main([*argv, "--progress"]) == 0
    assert "evaluate:" in capsys.readouterr().err


# ---- debias -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["swift", "bmft"])
def test_debias_outputs_present_loadable_and_scored_right(data, runs, method):
    out = runs[method]
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith(f"# fastmask debias: {method.upper()}")
    for png in ("mask_layers.png", "epochs.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    assert not (out / "checkpoint").exists()

    weights = load_file(out / "weights.safetensors")
    reference = TinyCNN().state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    model = load_weights(TinyCNN(), out / "weights.safetensors")
    masks = load_masks(out / "mask.safetensors", model)
    if method == "swift":
        assert all(m.dtype == torch.float32 and m.min() >= 0 and m.max() <= 1 for m in masks.values())
    else:
        assert all(m.dtype == torch.bool for m in masks.values())
        assert not masks["head.1.weight"].any() and not masks["head.1.bias"].any()  # BMFT: head mask 0

    test = data.table[data.table["fold"] == "test"]
    y, a = test["target"].to_numpy(), test["tint"].to_numpy()
    for when, weights_path in (("before", data.weights), ("after", out / "weights.safetensors")):
        p = oracle_probs(weights_path, data, test)
        expected = spec_metrics(y, p, a)
        got = report[when]["overall"]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (when, key)
        for row in report[when]["groups"]:
            g = row["group"]
            assert row["n"] == int((a == g).sum()) and row["positives"] == int(y[a == g].sum())
            assert row["auc"] == pytest.approx(roc_auc_score(y[a == g], p[a == g]), abs=1e-6)

    sets = report["data"]["sets"]
    assert sets["external"]["samples"] == int((data.table["fold"] == "ext").sum())
    assert sets["test"]["samples"] == len(test)
    bal = sets["balanced"]["groups"]
    assert bal["0"] == bal["1"]  # group balancing: identical per-label counts in both groups (docs/algorithm.md §1)
    epochs = report["epochs"]
    assert [(e["step"], e["epoch"]) for e in epochs][0] == ("before", 0)
    assert len(epochs) == 1 + 2 + 2 and len(report["history"]) == 4
    assert epochs[-1]["auc"] == pytest.approx(report["after"]["overall"]["auc"])  # last epoch = final weights
    assert report["loader"]["skipped"] == 0
    assert [layer["layer"] for layer in report["mask"]["layers"]] == ["features.0", "features.1", "features.4",
                                                                      "head.1"]


def test_evaluate_tables_match_sklearn(data, runs, tmp_path):
    weights = runs["swift"] / "weights.safetensors"
    assert main(["evaluate", "--model", "cli_helpers:TinyCNN", "--weights", str(weights), "--shards",
                 str(data.shards), "--fold", "test", "--image-size", "12", "--no-progress", "--out",
                 str(tmp_path)]) == 0
    res = json.loads((tmp_path / "metrics.json").read_text())
    assert "## Attribute `sex`" in (tmp_path / "metrics.md").read_text()
    csv = pd.read_csv(tmp_path / "groups.csv")
    assert csv["attribute"].tolist() == ["tint", "tint", "sex", "sex"]
    assert csv["group"].astype(str).tolist() == ["0", "1", "F", "M"]
    test = data.table[data.table["fold"] == "test"]
    y = test["target"].to_numpy()
    p = oracle_probs(weights, data, test)
    assert res["overall"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    for attr in ("tint", "sex"):
        values = test[attr].to_numpy()
        for row in res["attributes"][attr]["groups"]:
            m = values == row["group"]
            assert row["n"] == int(m.sum())
            assert row["auc"] == pytest.approx(roc_auc_score(y[m], p[m]), abs=1e-6)
            assert csv[(csv["attribute"] == attr) & (csv["group"].astype(str) == str(row["group"]))]["n"].item() == \
                row["n"]
    sex = (test["sex"] == "M").to_numpy().astype(int)
    assert res["attributes"]["sex"]["gaps"]["eodds"] == pytest.approx(spec_metrics(y, p, sex)["eodds"], abs=1e-9)


# ---- preprocessing ------------------------------------------------------------------------------------------------


def evaluate_argv(model: str, weights: Path, data: Data, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", model, "--weights", str(weights), "--shards", str(data.shards), "--fold", "test",
            "--no-progress", "--out", str(out), *extra]


def test_evaluate_takes_the_model_configuration_records_it_and_warns_on_another_size(data, tmp_path, capsys):
    assert main(evaluate_argv("cli_helpers:configured_cnn", data.weights, data, tmp_path / "cfg")) == 0
    res = json.loads((tmp_path / "cfg" / "metrics.json").read_text())
    prep = res["preprocessing"]
    # pretrained_cfg: 12 px seen, crop_pct 0.75 -> resize to floor(12 / 0.75) = 16, centre crop 12
    assert (prep["image_size"], prep["crop"], prep["mean"], prep["std"]) == (16, 12, list(CONFIG["mean"]),
                                                                             list(CONFIG["std"]))
    assert prep["sources"] == {"image_size": "model config", "crop": "model config", "center_crop": "default",
                               "mean": "model config", "std": "model config", "augment": "default"}
    test = data.table[data.table["fold"] == "test"]
    p = oracle_probs(data.weights, data, test, resize=16, crop=12, mean=CONFIG["mean"], std=CONFIG["std"])
    assert res["overall"]["auc"] == pytest.approx(roc_auc_score(test["target"], p), abs=1e-6)
    md = (tmp_path / "cfg" / "metrics.md").read_text()
    assert "resize to 16 px (model config), centre crop 12 (model config)" in md
    capsys.readouterr()
    assert main(evaluate_argv("cli_helpers:configured_cnn", data.weights, data, tmp_path / "other", "--image-size",
                              "24", "--normalize", "imagenet")) == 0
    warning = ("--image-size 24: the model sees 24 px images, but its configuration (pretrained_cfg input_size) "
               "expects 12 px")
    assert f"WARNING: {warning}" in capsys.readouterr().out
    res = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert warning in res["warnings"] and res["preprocessing"]["sources"]["mean"] == "flag"
    p = oracle_probs(data.weights, data, test, resize=24)
    assert res["overall"]["auc"] == pytest.approx(roc_auc_score(test["target"], p), abs=1e-6)


def test_evaluate_warns_when_the_model_predicts_one_class_for_nearly_everyone(data, tmp_path, capsys):
    state = torch.load(data.weights, weights_only=True)
    state["head.1.bias"] = torch.tensor([50.0])  # every logit far above 0: everyone positive
    torch.save(state, tmp_path / "collapsed.pt")
    assert main(evaluate_argv("cli_helpers:TinyCNN", tmp_path / "collapsed.pt", data, tmp_path / "out",
                              "--image-size", "12")) == 0
    warning = ("the model: 100.0% of the predictions are positive while 50.0% of the labels are; the model may have "
               "collapsed to one class, so its fairness gaps (EOdds, SPD) are meaningless")
    printed = capsys.readouterr().out
    assert "EOdds mean 0.0000" in printed and f"WARNING: {warning}" in printed
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith(warning)
    assert f"**Warning:** {warning}" in (tmp_path / "out" / "metrics.md").read_text()


def test_report_records_the_preprocessing_and_a_resume_with_other_preprocessing_is_refused(data, runs, tmp_path,
                                                                                           capsys):
    report = json.loads((runs["swift"] / "report.json").read_text())
    prep = report["preprocessing"]
    assert (prep["image_size"], prep["crop"], prep["mean"], prep["std"], prep["augment"]) == (
        12, None, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], ["hflip", "vflip", "transpose"])
    assert prep["sources"] == {"image_size": "flag", "crop": "default", "center_crop": "default", "mean": "default",
                               "std": "default", "augment": "default"}
    assert prep["model_config"] is None
    assert "resize to 12 px (flag)" in (runs["swift"] / "report.md").read_text()
    # The seeded tiny model predicts negative for everyone before debiasing: the summary says so.
    assert report["warnings"] == ["before debiasing, on the evaluation set: 100.0% of the predictions are negative "
                                  "while 50.0% of the labels are; the model may have collapsed to one class, so its "
                                  "fairness gaps (EOdds, SPD) are meaningless; check the preprocessing (--image-size, "
                                  "--normalize) and the threshold"]
    out = tmp_path / "run"
    argv = debias_argv(data, out, "swift", "--normalize", "none", "--augment", "vflip")
    assert main([*argv, "--stop-after-epochs", "1"]) == EXIT_STOPPED
    capsys.readouterr()
    assert main([*debias_argv(data, out, "swift", "--augment", "vflip"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "other inputs or options" in err and "data.mean: [0.0, 0.0, 0.0] in the checkpoint" in err
    assert main([*argv, "--resume"]) == 0
    prep = json.loads((out / "report.json").read_text())["preprocessing"]
    assert (prep["mean"], prep["std"], prep["augment"]) == ([0.0] * 3, [1.0] * 3, ["vflip"])
    assert prep["sources"]["mean"] == prep["sources"]["augment"] == "flag"


# ---- resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["swift", "bmft"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(data, runs, tmp_path, method, capsys):
    out = tmp_path / "resumed"
    argv = debias_argv(data, out, method, "--stop-after-epochs", "1")
    assert main(argv) == EXIT_STOPPED
    # the printed command continues the run to its end: --resume, without --stop-after-epochs
    assert capsys.readouterr().out.rstrip().endswith(shlex.join(["fastmask", *argv[:-2], "--resume"]))
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / "weights.safetensors").exists()
    # Two more epochs: the last of step 1 and the first of step 2, across the head re-initialisation.
    assert main(debias_argv(data, out, method, "--resume", "--stop-after-epochs", "2")) == EXIT_STOPPED
    assert main(debias_argv(data, out, method, "--resume")) == 0
    ref = runs[method]
    for name in ("weights.safetensors", "mask.safetensors"):
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rep_a, rep_b = (json.loads((d / "report.json").read_text()) for d in (ref, out))
    for key in ("history", "checks", "epochs", "before", "after", "head_reset_fraction"):
        assert rep_a[key] == rep_b[key], key
    assert not (out / "checkpoint").exists()


def test_ctrl_c_inside_the_first_epoch_prints_the_resume_command_which_finishes_the_run(data, runs, tmp_path,
                                                                                       monkeypatch, capsys):
    from fastmask.app.sets import Tracked

    real_iter = Tracked.__iter__
    passes = []

    def crash_in_training(self):
        if self.name == "train":
            passes.append(1)
            if len(passes) == 2:  # the first pass is the guard's score of the original model, before the mask is saved
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of step 1, epoch 1
        return real_iter(self)

    out = tmp_path / "crashed"
    monkeypatch.setattr(Tracked, "__iter__", crash_in_training)
    assert main(debias_argv(data, out, "swift")) == 130  # 128 + SIGINT, and no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "after step1 epoch 0" in err
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert (state["run"]["step"], state["run"]["epoch"], state["run"]["optimizer"]) == ("step1", 0, None)
    monkeypatch.setattr(Tracked, "__iter__", real_iter)
    # The printed command, as the user would paste it, continues the run.
    command = shlex.split(err.partition("continue with: ")[2])
    assert command[0] == "fastmask" and command[-1] == "--resume"
    assert main(command[1:]) == 0
    a, b = load_file(runs["swift"] / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "report.json").read_text())
    assert report["n_importance_batches"] > 0  # the importance pass of the first invocation, kept


def test_a_saved_mask_is_reused_without_an_importance_pass(data, runs, tmp_path):
    # SWiFT reads the mask loader only for its importance pass: given the mask that pass produced, the run ends with
    # the same weights, bit for bit, having read none of it.
    out = tmp_path / "reused"
    mask = runs["swift"] / "mask.safetensors"
    assert main(debias_argv(data, out, "swift", "--mask", str(mask))) == 0
    a, b = load_file(runs["swift"] / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    given, written = load_file(mask), load_file(out / "mask.safetensors")
    assert all(torch.equal(given[k], written[k]) for k in given)
    report = json.loads((out / "report.json").read_text())
    assert report["n_importance_batches"] == 0 and report["mask"]["source"] == str(mask)
    assert "mask" not in report["loader"]["splits"]  # the external set was never read
    assert f"the mask was read from `{mask}`" in (out / "report.md").read_text()


@pytest.mark.parametrize("method", ["swift", "bmft"])
def test_the_decoded_cache_changes_no_result(data, runs, tmp_path, method):
    """The runs of the fixture decode each set once into memory (the default budget); streamed instead
    (--cache-mib 0), the same run gives the same mask bit for bit, the same weights and the same counts."""
    out = tmp_path / "streamed"
    assert main(debias_argv(data, out, method, "--cache-mib", "0")) == 0
    for name in ("mask.safetensors", "weights.safetensors"):
        a, b = load_file(runs[method] / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            if name == "mask.safetensors":
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    cached, streamed = (json.loads((d / "report.json").read_text()) for d in (runs[method], out))
    assert cached["loader"]["splits"] == streamed["loader"]["splits"]
    assert cached["after"] == streamed["after"] and cached["epochs"] == streamed["epochs"]
    assert {k: v["cached"] for k, v in cached["data"]["cache"]["sets"].items()} == {"external": True,
                                                                                    "evaluation": True}
    assert not any(v["cached"] for v in streamed["data"]["cache"]["sets"].values())
    assert "Decoding: external set decoded once" in (runs[method] / "report.md").read_text()
    assert "streamed every pass (caching off (--cache-mib 0))" in (out / "report.md").read_text()


def test_a_set_over_the_cache_budget_is_streamed(data):
    """At 110 px the external set (40 images, 1.38 MiB decoded) exceeds a 1 MiB budget and is streamed; the
    evaluation set (24 images, 0.83 MiB) fits and is cached. The budget is shared: 2 MiB holds only the first."""
    from fastmask.app.sets import DataSpec, decoded_caches, parts, read_sets

    spec, _ = DataSpec(shards=str(data.shards), attr="tint", test_fold="test", image_size=110,
                       cache_mib=1).resolve(torch.nn.Identity())  # a model without a configuration: the defaults
    sets = read_sets(spec)
    caches = decoded_caches(sets, spec)
    run = parts(sets, spec, hold_out=True, caches=caches)
    assert run.mask.cache is run.train.cache is run.validation.cache is None
    assert run.evaluation.cache is caches.evaluation is not None and len(caches.evaluation.keys) == 24
    assert caches.evaluation.nbytes == 24 * 110 * 110 * 3
    assert "evaluation set decoded once" in caches.describe() and "external set streamed" in caches.describe()
    two = decoded_caches(sets, replace(spec, cache_mib=2))
    assert two.external is not None and two.evaluation is None
    off = decoded_caches(sets, replace(spec, cache_mib=0))
    assert off.external is off.evaluation is None and "--cache-mib 0" in off.describe()


def test_eval_shards_external_folds_and_attribute_map(data, tmp_path):
    test_rows = data.table[data.table["fold"] == "test"]
    test_rows.to_csv(tmp_path / "test.csv", index=False)
    assert main(["shards", str(tmp_path / "test.csv"), "--image-root", str(data.root / "images"), "--out",
                 str(tmp_path / "test-shards"), "--attr", "sex"]) == 0
    out = tmp_path / "out"
    argv = debias_argv(data, out, "swift", "--epochs1", "1", "--epochs2", "1", "--no-epoch-eval", "--eval-shards",
                       str(tmp_path / "test-shards"), "--external-fold", "ext", "--attr-map", "F=1",
                       "--attr-map", "M=0", attr="sex", test_fold=None)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    ext = data.table[data.table["fold"] == "ext"]
    sets = report["data"]["sets"]
    assert sets["external"]["samples"] == len(ext)
    assert sets["external"]["groups"]["1"]["n"] == int((ext["sex"] == "F").sum())
    assert sets["test"]["samples"] == len(test_rows)
    groups = {r["group"]: (r["label"], r["n"]) for r in report["after"]["groups"]}
    assert groups == {0: ("M", int((test_rows["sex"] == "M").sum())), 1: ("F", int((test_rows["sex"] == "F").sum()))}
    assert "| 1 (F) |" in (out / "report.md").read_text()


def test_a_many_valued_attribute_is_reduced_to_its_extreme_groups(data, tmp_path):
    # SWiFT's multi-attribute reduction: the original model's AUC per value on the external set (recomputed here from
    # the PNG files and sklearn) picks the values kept as group 0 (highest) and group 1 (lowest).
    table = data.table.assign(age=[("young", "mid", "old")[i % 3] for i in range(len(data.table))])
    table.to_csv(tmp_path / "age.csv", index=False)
    assert main(["shards", str(tmp_path / "age.csv"), "--image-root", str(data.root / "images"), "--out",
                 str(tmp_path / "shards"), "--attr", "age", "--fold-col", "fold"]) == 0
    out = tmp_path / "out"
    argv = debias_argv(data, out, "swift", "--epochs1", "1", "--epochs2", "1", "--no-epoch-eval", "--attr-groups",
                       "extremes", attr="age")
    argv[argv.index("--shards") + 1] = str(tmp_path / "shards")
    assert main(argv) == 0
    ext, test = table[table["fold"] == "ext"], table[table["fold"] == "test"]
    p, y = oracle_probs(data.weights, data, ext), ext["target"].to_numpy()
    aucs = {v: roc_auc_score(y[ext["age"] == v], p[(ext["age"] == v).to_numpy()]) for v in sorted(set(ext["age"]))}
    g_max, g_min = max(aucs, key=aucs.get), min(aucs, key=aucs.get)
    report = json.loads((out / "report.json").read_text())
    reduction = report["attribute_reduction"]
    assert (reduction["g_max"], reduction["g_min"]) == (g_max, g_min)
    assert reduction["auc_by_value"] == pytest.approx(aucs, abs=1e-9)
    kept = [g_max, g_min]
    assert report["data"]["sets"]["external"]["samples"] == int(ext["age"].isin(kept).sum())
    assert report["data"]["sets"]["test"]["samples"] == int(test["age"].isin(kept).sum())
    groups = {r["group"]: (r["label"], r["n"]) for r in report["after"]["groups"]}
    assert groups == {0: (g_max, int((test["age"] == g_max).sum())), 1: (g_min, int((test["age"] == g_min).sum()))}
    assert f"group 0 = {g_max!r} (the highest)" in (out / "report.md").read_text()


def test_stop_after_the_last_epoch_finishes_the_run(data, tmp_path):
    # 1 + 1 epochs with at most 2 per invocation: nothing is left after the second, so the run completes.
    out = tmp_path / "out"
    argv = debias_argv(data, out, "swift", "--epochs1", "1", "--epochs2", "1", "--no-epoch-eval")
    assert main([*argv, "--stop-after-epochs", "2"]) == 0
    assert (out / "weights.safetensors").is_file() and not (out / "checkpoint").exists()


def test_method_config_changes_only_the_given_options():
    cfg = method_config("bmft", epochs1=3, lr2=0.5, optimizer="adam", bias_form="eopp", rate=70.0, seed=None)
    defaults = BmftConfig()
    assert (cfg.impair.epochs, cfg.impair.lr, cfg.impair.optimizer) == (3, defaults.impair.lr, "adam")
    assert (cfg.repair.epochs, cfg.repair.lr, cfg.repair.optimizer) == (defaults.repair.epochs, 0.5, "adam")
    assert (cfg.bias.space, cfg.bias.form, cfg.rate) == (defaults.bias.space, "eopp", 70.0)
    assert cfg.seed == defaults.seed and cfg.beta == defaults.beta
    swift_cfg = method_config("swift", task="cxr", epochs2=4)
    assert (swift_cfg.step1.optimizer, swift_cfg.step2.optimizer, swift_cfg.step2.epochs) == ("adam", "adam", 4)
    with pytest.raises(ValueError, match="mask_mode"):
        method_config("swift", faithful=True, mask_mode="update")


# ---- damaged data -------------------------------------------------------------------------------------------------


def corrupt_member(shard: Path, member: str) -> None:
    """Overwrite a member's bytes in place (same length, so the tar structure and the index stay valid)."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"\x00" * info.size)


def test_corrupted_member_is_skipped_and_counted(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data.shards, shards)
    index = ShardIndex.load(shards)
    ext_key = next(k for k, r in index.samples.items() if r["fold"] == "ext")
    test_key = next(k for k, r in index.samples.items() if r["fold"] == "test")
    for key in (ext_key, test_key):
        corrupt_member(shards / index.shard_of(key), f"{key}.png")
    out = tmp_path / "out"
    # One damaged sample of 24 is more than the default 1 % limit: raised to 10 % here.
    argv = debias_argv(data, out, "swift", "--epochs1", "1", "--epochs2", "1", "--no-epoch-eval",
                       "--max-skip-fraction", "0.1")
    argv[argv.index("--shards") + 1] = str(shards)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert {k: report["data"]["sets"]["test"][k] for k in ("samples", "read", "skipped")} == {
        "samples": 24, "read": 23, "skipped": 1}
    loader = report["loader"]
    damaged = {(d["loader"], d["key"], d["reason"]) for d in loader["damaged"]}
    assert ("mask", ext_key, "decode") in damaged and ("evaluation", test_key, "decode") in damaged
    # D_e holds every external key once: each pass of the mask loader skips exactly one sample.
    assert loader["by_loader"]["mask"]["skipped"] == loader["by_loader"]["mask"]["passes"] >= 1
    # Each evaluation pass (before, after) skips the damaged test sample once.
    assert loader["by_loader"]["evaluation"] == {"passes": 2, "samples": 2 * 23, "skipped": 2}
    assert sum(r["n"] for r in report["after"]["groups"]) == 23
    assert loader["skipped"] == sum(v["skipped"] for v in loader["by_loader"].values()) > 0
    md = (out / "report.md").read_text()
    assert ext_key in md and test_key in md


def truncate_before(shard: Path, key: str) -> int:
    """Cut ``shard`` where the first member of ``key`` starts (as a copy interrupted mid-way would); returns how many
    keys of the shard come before it (they stay readable)."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = min(m.offset for m in members if m.name.split(".")[0] == key)
    with open(shard, "r+b") as f:
        f.truncate(cut)
    return len({m.name.split(".")[0] for m in members if m.offset < cut})


@pytest.fixture
def truncated(data, tmp_path) -> tuple[Path, int]:
    """The shards with the one holding most of the test fold cut short; the number of test samples still readable."""
    shards = tmp_path / "truncated"
    shutil.copytree(data.shards, shards)
    index = ShardIndex.load(shards)
    test_keys = [k for k, r in index.samples.items() if r["fold"] == "test"]
    shard = index.shard_of(test_keys[0])
    kept = truncate_before(shards / shard, test_keys[10])
    readable = sum(1 for k in test_keys if index.shard_of(k) != shard) + kept
    assert 0 < readable < len(test_keys) == 24
    return shards, readable


def test_a_truncated_shard_fails_the_run_unless_allowed_and_the_reports_count_what_was_read(data, truncated, tmp_path,
                                                                                           capsys):
    shards, readable = truncated
    lost = 24 - readable
    argv = debias_argv(data, tmp_path / "run", "swift", "--epochs1", "1", "--epochs2", "1", "--no-epoch-eval")
    argv[argv.index("--shards") + 1] = str(shards)
    assert main(argv) == 5  # the default limit, 1 %: the evaluation set lost far more
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-000002.tar" in err
    assert f"the evaluation set: {lost} of 24 sample reads skipped" in err and "--max-skip-fraction" in err
    assert not (tmp_path / "run" / "report.json").exists()

    assert main([*argv, "--max-skip-fraction", "0.9"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    test = report["data"]["sets"]["test"]
    assert (test["samples"], test["read"], test["skipped"]) == (24, readable, lost)
    assert sum(r["n"] for r in report["after"]["groups"]) == readable  # the metrics' own sample count
    assert sum(r["n"] for r in report["before"]["groups"]) == readable
    assert f"{readable} of 24 samples read ({lost} skipped as damaged)" in (tmp_path / "run" / "report.md").read_text()
    ext = report["data"]["sets"]["external"]
    assert ext["read"] == ext["samples"] == 40 and ext["skipped"] == 0  # the cut shard holds test samples only

    evaluate = ["evaluate", "--model", "cli_helpers:TinyCNN", "--weights", str(data.weights), "--shards", str(shards),
                "--fold", "test", "--image-size", "12", "--no-progress", "--out", str(tmp_path / "eval")]
    assert main(evaluate) == 5
    assert f"{lost} of 24 sample reads skipped" in capsys.readouterr().err
    assert main([*evaluate, "--max-skip-fraction", "1"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["data"] == {"samples": 24, "read": readable, "skipped": lost}
    assert sum(r["n"] for r in metrics["attributes"]["tint"]["groups"]) == readable
    assert f"{readable} of 24 samples read" in (tmp_path / "eval" / "metrics.md").read_text()


def test_strict_names_the_shard_and_member_in_one_line(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(data.shards, shards)
    index = ShardIndex.load(shards)
    key = next(k for k, r in index.samples.items() if r["fold"] == "test")
    corrupt_member(shards / index.shard_of(key), f"{key}.png")
    argv = debias_argv(data, tmp_path / "out", "swift", "--strict", "--no-epoch-eval")
    argv[argv.index("--shards") + 1] = str(shards)
    assert main(argv) == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"shard {index.shard_of(key)} key {key}" in err and f"member {key}.png" in err


# ---- model loading ------------------------------------------------------------------------------------------------


def test_architecture_names_build_without_weights_or_downloads(monkeypatch):
    calls = []

    def get_model(name, **kwargs):
        calls.append(("torchvision", name, kwargs))
        return TinyCNN()

    models = types.SimpleNamespace(list_models=lambda: ["resnet50"], get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)

    def create_model(name, **kwargs):
        calls.append(("timm", name, kwargs))
        return TinyCNN()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(is_model=lambda n: n == "vit_tiny",
                                                                    create_model=create_model))
    assert isinstance(build_model("resnet50"), TinyCNN)
    assert isinstance(build_model("vit_tiny"), TinyCNN)  # not in torchvision: timm is tried next
    assert calls == [("torchvision", "resnet50", {"weights": None, "num_classes": 1}),
                     ("timm", "vit_tiny", {"pretrained": False, "num_classes": 1})]
    with pytest.raises(ValueError, match="timm has no architecture 'resnet50'"):
        build_model("resnet50", library="timm")


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    torch.manual_seed(1)
    source = TinyCNN()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DDP prefix
    torch.save({"state_dict": state, "epoch": 7, "best_auc": 0.9}, tmp_path / "ckpt.pt")
    model = load_weights(TinyCNN(), tmp_path / "ckpt.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_file_py_callable(tmp_path):
    (tmp_path / "netdef.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 1)\n")
    model = build_model(f"{tmp_path / 'netdef.py'}:make")
    assert isinstance(model, torch.nn.Linear) and model.out_features == 1


# ---- selection (the default of debias) ------------------------------------------------------------------------------


def selection_argv(data: Data, out: Path, *extra: str) -> list[str]:
    return ["debias", "--model", "cli_helpers:TinyCNN", "--weights", str(data.weights), "--shards", str(data.shards),
            "--attr", "tint", "--test-fold", "test", "--method", "swift", "--epochs1", "2", "--epochs2", "2",
            "--batch-size", "16", "--image-size", "12", "--seed", "3", "--no-progress", "--grid-lr1", "1e-3", "1e-2",
            "--grid-lr2", "1e-2", "--grid-beta", "0.1", "--out", str(out), *extra]


def test_debias_selects_on_held_out_data_and_evaluate_uses_the_saved_threshold(data, tmp_path, capsys):
    out = tmp_path / "sel"
    code = main(selection_argv(data, out))
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    sel = report["selection"]
    assert code == (3 if sel["chosen"] is None else 4 if sel["threshold_only"] else 0)
    assert sel["rows"][0]["candidate"] is None and sel["rows"][0]["step"] == "original"  # candidate zero
    # the validation part: ~25 % of each (group, label) cell of the external set, never trained on
    ext = data.table[data.table["fold"] == "ext"]
    cells = ext.groupby(["tint", "target"]).size()
    assert report["data"]["sets"]["validation"]["samples"] == sum(min(n - 1, max(1, round(0.25 * n))) for n in cells)
    assert report["data"]["sets"]["external"]["samples"] == len(ext)
    assert {r["candidate"] for r in sel["rows"]} | set(sel["stopped"]) == {None, 0, 1}
    assert all(len(r["why"]) == (not r["admissible"]) or r["why"] for r in sel["rows"])
    # the threshold saved with the weights is the report's, and the report's test figures are computed at it
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        t = float(f.metadata()["threshold"])
    assert t == report["threshold"] == (sel["chosen"]["threshold"] if sel["chosen"] else 0.5)
    test = data.table[data.table["fold"] == "test"]
    y = test["target"].to_numpy()
    p = oracle_probs(out / "weights.safetensors", data, test)
    yhat = (p > t).astype(float)
    after = report["after"]["overall"]
    assert after["acc"] == pytest.approx((yhat == y).mean()) and after["auc"] == pytest.approx(roc_auc_score(y, p))
    assert after["positive_rate"] == pytest.approx(yhat.mean())
    # every summary shows AUC, ACC, the positive share and the gap in its mean and max forms beside the signed sum
    for text in ("AUC", "ACC", "positive share", "EOdds mean", "max", "code (signed sum)"):
        assert text in printed
    md = (out / "report.md").read_text()
    assert "## Selection" in md and "EOdds (mean)" in md and (out / "selection.png").stat().st_size > 0
    # `fastmask evaluate` scores at the saved threshold unless told otherwise
    assert main(["evaluate", "--model", "cli_helpers:TinyCNN", "--weights", str(out / "weights.safetensors"),
                 "--shards", str(data.shards), "--fold", "test", "--attr", "tint", "--image-size", "12",
                 "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["threshold"] == t and metrics["overall"]["acc"] == pytest.approx((yhat == y).mean())
    assert main(["evaluate", "--model", "cli_helpers:TinyCNN", "--weights", str(out / "weights.safetensors"),
                 "--shards", str(data.shards), "--fold", "test", "--image-size", "12", "--no-progress",
                 "--threshold", "0.5", "--out", str(tmp_path / "eval05")]) == 0
    assert json.loads((tmp_path / "eval05" / "metrics.json").read_text())["overall"]["acc"] == pytest.approx(
        ((p > 0.5) == y).mean())


def test_no_admissible_candidate_leaves_the_model_unchanged_with_its_own_exit_status(data, tmp_path, capsys):
    out = tmp_path / "none"
    code = main(selection_argv(data, out, "--max-auc-drop", "0", "--max-acc-drop", "0", "--share-tolerance", "0"))
    assert code == 3
    assert "the model is unchanged" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["chosen"] is None and report["threshold"] == 0.5
    written, original = load_file(out / "weights.safetensors"), torch.load(data.weights, weights_only=True)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in written)


# ---- compare on the user's model and shards ---------------------------------------------------------------------


def test_compare_on_shards_selects_every_method_and_scores_it_right(data, tmp_path, capsys):
    """`fastmask compare` on the shards written by `fastmask shards` and the TinyCNN weights: every method (SWiFT,
    a baseline, the Baseline) selected from its own grid on held-out data, per seed; the rows are the written models'
    scores on the test fold at their thresholds (the Baseline's recomputed here from the PNG files), the table is
    the mean ± std of the rows, every output is written."""
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "cli_helpers:TinyCNN", "--weights", str(data.weights), "--shards", str(data.shards),
            "--attr", "tint", "--test-fold", "test", "--methods", "baseline", "swift", "llft", "--seeds", "0", "1",
            "--batch-size", "16", "--image-size", "12", "--no-progress", "--out", str(out), "--json",
            str(tmp_path / "cmp.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.method) == ["baseline", "swift", "llft"] * 2 and set(runs.test_set) == {"test"}
    assert list(runs.seed) == [0, 0, 0, 1, 1, 1]
    # the Baseline is the original model at its threshold (selected on validation, or 0.5 when left unchanged)
    test = data.table[data.table["fold"] == "test"]
    y, a = test["target"].to_numpy(), test["tint"].to_numpy()
    p = oracle_probs(data.weights, data, test)
    for _, row in runs[runs.method == "baseline"].iterrows():
        yhat = (p > row.threshold).astype(float)
        assert row.auc == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert row.acc == pytest.approx((yhat == y).mean(), abs=1e-12)
        assert row.positive_rate == pytest.approx(yhat.mean(), abs=1e-12)
        d_tpr, d_fpr = (yhat[(a == 0) & (y == c)].mean() - yhat[(a == 1) & (y == c)].mean() for c in (1, 0))
        assert row.eodds_mean == pytest.approx(0.5 * (abs(d_tpr) + abs(d_fpr)), abs=1e-12)
        assert row.eodds_max == pytest.approx(max(abs(d_tpr), abs(d_fpr)), abs=1e-12)
        assert row.unchanged == (row.chosen == "none (unchanged)")
    # each method's chosen candidate is one of its own grid (or none), with the step and epoch it was taken after
    from fastmask.methods.registry import METHODS

    for method in ("swift", "llft"):
        described = {c.describe() for c in METHODS[method].grid}
        for chosen in runs[runs.method == method].chosen:
            assert chosen == "none (unchanged)" or chosen.split(" after ")[0] in described, chosen
    # the table: mean ± std over the two seeds of the rows, for the headline figures
    table = pd.read_csv(out / "table.csv")
    for method, group in runs.groupby("method"):
        row = table[table.method == method].iloc[0]
        for m in ("auc", "acc", "positive_rate", "eodds_mean", "eodds_max", "eodds"):
            assert row[f"{m}_mean"] == pytest.approx(group[m].mean(), abs=1e-12)
            assert row[f"{m}_std"] == pytest.approx(group[m].std(ddof=1), abs=1e-12, nan_ok=True)
    assert (out / "table.md").read_text() in printed and (out / "scatter.png").stat().st_size > 0
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["data"] == "shards" and saved["rule"]["gap"] == "eodds_mean" and saved["skipped"] == 0
    # what each split really had, in the JSON and in table.md
    ext = data.table[data.table["fold"] == "ext"]
    assert {k: saved["reads"]["evaluation"][k] for k in ("read", "skipped")} == {"read": len(test), "skipped": 0}
    assert saved["reads"]["mask"]["read"] + saved["reads"]["validation"]["read"] == len(ext)
    assert f"evaluation set {len(test)} (0 skipped as damaged)" in (out / "table.md").read_text()


def test_the_verdict_of_a_collapsed_fixed_run_says_so_before_any_figure():
    """A fixed run that collapses the model has gaps of 0: the first line of the summary says the model collapsed."""
    from fastmask.app.report import verdict

    report = {"method": "swift", "selection": None,
              "after": {"overall": {"positive_rate": 1.0, "label_positive_rate": 0.5}}}
    assert verdict(report) == ("SWIFT with one fixed configuration. The debiased model may have collapsed (100.0% of "
                               "the predictions are positive while 50.0% of the labels are): its fairness gaps mean "
                               "nothing.")
    report["after"]["overall"]["positive_rate"] = 0.55
    assert verdict(report) == "SWIFT with one fixed configuration."
