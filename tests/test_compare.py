"""`fastmask compare`: the per-seed figures against an independent evaluation (sklearn AUC, hand-computed rates and
gaps), the mean ± std computed from the per-seed rows, every output written, fresh data and a fresh model copy per
method, the run's seed reaching each method, every method selected by the same rule on held-out data, argument
errors, and the command line on the demo benchmark. The end-to-end run on shards written by `fastmask shards` is in
test_cli.py."""

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.app import cli, compare, errors
from fastmask.methods import registry
from fastmask.methods.baselines.finetune import FullFTConfig
from fastmask.methods.configs import StepConfig
from fastmask.methods.state import Result

METRICS = ("auc", "acc", "positive_rate", "eodds_mean", "eodds_max", "eodds", "spd")
TABLE = ("auc", "acc", "positive_rate", "eodds_mean", "eodds_max", "eodds")


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    a = ((torch.arange(n) // 2) % 2).long()
    x = torch.randn(n, 6, generator=g) + y.view(-1, 1) + (1.0 + shift) * a.view(-1, 1)
    return TensorDataset(x, y, a)


def tiny_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))


class TinySource:
    """A synthetic data source: per seed a small untrained model, D_e, D_r and two test sets."""

    name = "tiny"
    description = "tiny synthetic data"
    preprocessing = None

    def __init__(self):
        self.loader_calls = 0
        self.models = {}

    def fold(self, seed, *, progress=False):
        model = tiny_model(seed)
        self.models[seed] = model

        def loaders(hold_out):
            self.loader_calls += 1
            val = DataLoader(data(32, 50 + seed), batch_size=16) if hold_out else None
            return DataLoader(data(32, 10 + seed), batch_size=16), DataLoader(data(32, 20 + seed), batch_size=16), val

        tests = {"in": DataLoader(data(40, 30 + seed), batch_size=16),
                 "shift": DataLoader(data(40, 40 + seed, shift=1.0), batch_size=16)}
        return compare.Fold(model, loaders, tests)

    def config(self, method):
        return {"fullft-rw": FullFTConfig(step=StepConfig(2, 0.05, "sgd", 0.0, 0.0))}.get(method)

    def skipped(self):
        return 0

    def reads(self):
        return {}


@pytest.fixture
def tiny():
    return TinySource()


def independent_metrics(model, ds, threshold=0.5):
    x, y, a = (t.numpy() for t in ds.tensors)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.as_tensor(x)).reshape(-1)).double().numpy()
    yhat = (p > threshold).astype(float)

    def rate(sel):
        return yhat[sel].mean() if sel.any() else 0.0

    d_tpr = rate((a == 0) & (y == 1)) - rate((a == 1) & (y == 1))
    d_fpr = rate((a == 0) & (y == 0)) - rate((a == 1) & (y == 0))
    return {"auc": roc_auc_score(y, p), "acc": (yhat == y).mean(), "positive_rate": yhat.mean(),
            "eodds_mean": 0.5 * (abs(d_tpr) + abs(d_fpr)), "eodds_max": max(abs(d_tpr), abs(d_fpr)),
            "eodds": 0.5 * abs(d_tpr + d_fpr), "spd": abs(rate(a == 0) - rate(a == 1))}


def test_table_csv_plot_and_json_from_the_per_seed_rows(tmp_path, tiny, capsys):
    out = tmp_path / "cmp"
    report = compare.main(tiny, methods=["baseline", "fullft-rw"], seeds=[0, 1], out=out, rule=None,
                          json_path=tmp_path / "r.json", progress=False)
    files = {name: out / name for name in ("table.md", "table.csv", "runs.csv", "scatter.png")}
    assert all(p.is_file() for p in files.values())
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file behind

    runs = pd.read_csv(files["runs.csv"])
    assert len(runs) == 2 * 2 * 2  # methods x seeds x test sets
    # the Baseline's per-seed figures are the unchanged model's, evaluated independently
    for seed in (0, 1):
        for test, ds in (("in", data(40, 30 + seed)), ("shift", data(40, 40 + seed, shift=1.0))):
            row = runs[(runs.method == "baseline") & (runs.seed == seed) & (runs.test_set == test)].iloc[0]
            expected = independent_metrics(tiny_model(seed), ds)
            for m in METRICS:
                assert row[m] == pytest.approx(expected[m], abs=1e-12), (seed, test, m)
    # FullFT-RW trained its own copy: its figures differ from the Baseline's
    assert not np.allclose(runs[runs.method == "fullft-rw"].auc.to_numpy(), runs[runs.method == "baseline"].auc)

    # table.csv: mean and sample std (ddof = 1) over the seeds, from runs.csv
    table = pd.read_csv(files["table.csv"])
    md = files["table.md"].read_text()
    assert md == capsys.readouterr().out.split("\nwrote ")[0]  # the table printed is the table written
    for (method, test), group in runs.groupby(["method", "test_set"]):
        row = table[(table.method == method) & (table.test_set == test)].iloc[0]
        assert row.n_seeds == 2
        for m in METRICS:
            values = group[m].to_numpy()
            mean, std = values.mean(), np.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1))
            assert row[f"{m}_mean"] == pytest.approx(mean, abs=1e-12)
            assert row[f"{m}_std"] == pytest.approx(std, abs=1e-12)
    # the markdown row of each method: the headline figures as "mean ± std" for "in" then "shift"; no seed left
    # unchanged (nothing was selected), no collapse
    for method, label in (("baseline", "Baseline"), ("fullft-rw", "FullFT-RW")):
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        want = []
        for test in ("in", "shift"):
            g = runs[(runs.method == method) & (runs.test_set == test)]
            want += [f"{g[m].mean():.4f} ± {g[m].std(ddof=1):.4f}" for m in TABLE]
        assert cells[1:13] == want
        assert cells[13:15] == ["0/2", "0/2"]
    assert ("| Method | AUC (in) | ACC (in) | positive share (in) | EOdds (mean) (in) | EOdds (max) (in) | "
            "EOdds (code, signed sum) (in) | AUC (shift) |") in md

    png = files["scatter.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(io.BytesIO(png)).size
    assert width > 500 and height > 500

    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["methods"] == ["baseline", "fullft-rw"]
    assert len(saved["rows"]) == 8 and len(saved["summary"]) == 4
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))


@dataclass
class SpyConfig:
    seed: int | None = 42


def test_each_method_gets_the_run_seed_fresh_loaders_and_its_own_model_copy(tmp_path, tiny, monkeypatch):
    seen = []

    def spy(model, mask_loader, train_loader, *, config=None, progress=False, on_epoch=None):
        seen.append((config.seed, len(list(mask_loader)), len(list(train_loader))))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # a method that wrecks its copy must not affect the next method
        return Result("spy", config, {})

    monkeypatch.setitem(registry.METHODS, "spy", registry.Method("spy", "Spy", spy, SpyConfig))
    compare.main(tiny, methods=["spy", "baseline"], seeds=[3, 5], out=tmp_path, rule=None, progress=False)
    assert seen == [(3, 2, 2), (5, 2, 2)]  # the default config's seed 42 replaced by the run's seed
    assert tiny.loader_calls == 4  # once per method and seed
    runs = pd.read_csv(tmp_path / "runs.csv")
    row = runs[(runs.method == "baseline") & (runs.seed == 3) & (runs.test_set == "in")].iloc[0]
    assert row.auc == pytest.approx(independent_metrics(tiny_model(3), data(40, 33))["auc"], abs=1e-12)
    spy_rows = runs[runs.method == "spy"]
    assert (spy_rows.auc == 0.5).all()  # the zeroed copy predicts 0.5 everywhere


def test_one_seed_prints_means_without_std(tmp_path, tiny):
    compare.main(tiny, methods=["baseline"], seeds=[0], out=tmp_path, rule=None, progress=False)
    line = next(x for x in (tmp_path / "table.md").read_text().splitlines() if x.startswith("| Baseline |"))
    assert "±" not in line
    table = pd.read_csv(tmp_path / "table.csv")
    assert table.auc_std.isna().all() and (table.n_seeds == 1).all()


def shortcut_data(n, seed, agreement):
    """y depends on the first 3 features; the group a agrees with y for ``agreement`` of the rows and is the last
    feature (the shortcut a model trained where it agrees learns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3].sum(1) + 0.5 * torch.randn(n, generator=g) > 0).float()
    agree = torch.rand(n, generator=g) < agreement
    a = torch.where(agree, y, (torch.rand(n, generator=g) < 0.5).float()).long()
    return TensorDataset(torch.cat([x[:, :5], a.float().unsqueeze(1) * 2 - 1], 1), y, a)


class ShortcutSource(TinySource):
    """A model trained on the shortcut (agreement 95 %), then D_e, the validation part and the test set where the
    group is independent of the label: the model is unfair there, and fine-tuning on D_r makes it fairer."""

    def fold(self, seed, *, progress=False):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        x, y, _ = shortcut_data(400, 100 + seed, 0.95).tensors
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y).backward()
            opt.step()
        self.models[seed] = model

        def loaders(hold_out):
            self.loader_calls += 1
            val = DataLoader(shortcut_data(200, 50 + seed, 0.5), batch_size=64) if hold_out else None
            return (DataLoader(shortcut_data(200, 10 + seed, 0.5), batch_size=32),
                    DataLoader(shortcut_data(200, 20 + seed, 0.5), batch_size=32), val)

        return compare.Fold(model, loaders, {"in": DataLoader(shortcut_data(300, 30 + seed, 0.5), batch_size=64)})


def test_every_method_is_selected_by_the_same_rule_on_held_out_data(tmp_path):
    """With a rule each method tries its own grid on the validation loader and the model it delivers is scored on
    the test sets at its selected threshold: the rows equal an independent evaluation of the model that the same
    selection, repeated alone, leaves behind (or of the original model at 0.5 when no candidate was admissible)."""
    from fastmask.methods.selection import SelectionRule, select

    rule = SelectionRule(max_auc_drop=0.05, max_acc_drop=0.05, share_tolerance=0.2)
    source = ShortcutSource()
    rows = compare.compare(source, ["baseline", "fullft-rw", "fairprune"], [0], rule=rule)
    for method in ("fullft-rw", "fairprune"):
        fold = ShortcutSource().fold(0)
        model = fold.model
        mask, train, val = fold.loaders(True)
        config = compare._with_seed(source.config(method) or registry.METHODS[method].config(), 0)
        sel = select(model, method, mask, train, val, config=config, rule=rule)
        row = next(r for r in rows if r["method"] == method)
        x, y, a = shortcut_data(300, 30, 0.5).tensors
        with torch.no_grad():
            p = torch.sigmoid(model(x).reshape(-1)).double().numpy()
        yhat = (p > sel.threshold).astype(float)
        y, a = y.numpy(), a.numpy()
        d_tpr, d_fpr = (yhat[(a == 0) & (y == c)].mean() - yhat[(a == 1) & (y == c)].mean() for c in (1, 0))
        assert row["threshold"] == sel.threshold
        assert row["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert row["acc"] == pytest.approx((yhat == y).mean(), abs=1e-12)
        assert row["eodds_mean"] == pytest.approx(0.5 * (abs(d_tpr) + abs(d_fpr)), abs=1e-12)
        assert row["unchanged"] is (sel.chosen is None)
        if sel.chosen is None:
            assert row["chosen"] == "none (unchanged)"
        else:
            assert row["chosen"].startswith(sel.candidates[sel.chosen["candidate"]].describe())
    assert any(not r["unchanged"] for r in rows if r["method"] != "baseline"), "the test needs a selected method"
    assert source.loader_calls == 3  # once per method, with a validation part for the two that are tuned
    assert next(r for r in rows if r["method"] == "baseline")["chosen"] == "fixed"


def test_argument_errors_name_the_culprit(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        compare.check_methods(["swift", "nope"], [0])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare.check_methods(None, [1, 1])
    with pytest.raises(ValueError, match="at least one seed"):
        compare.check_methods(None, [])
    assert compare.check_methods(["all"], [0]) == list(registry.METHODS) == list(cli.METHOD_NAMES)
    assert compare.check_methods(None, [0]) == list(compare.DEFAULT_METHODS)
    for argv, message in (
            (["--methods", "nope"], "unknown method 'nope'"),
            (["--model", "m:f"], "--model goes with --shards"),
            (["--normalize", "none"], "--normalize goes with --shards"),
            (["--shards", str(tmp_path)], "--shards needs --model, --weights, --attr"),
            (["--select", "none", "--gap", "spd"], "--gap sets how a configuration is selected"),
            (["--select", "none", "--threshold", "rate"], "--threshold rate is chosen on the validation part")):
        assert cli.main(["compare", *argv, "--out", str(tmp_path)]) == errors.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith(f"fastmask compare: error: {message}") and err.count("\n") == 1, err


def test_cli_on_the_demo_benchmark(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["compare", "--methods", "baseline", "llft", "--seeds", "0", "--select", "none", "--out",
                     str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Baseline |" in printed and "| LLFT |" in printed
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.method) == ["baseline", "llft"] and set(runs.test_set) == {"test"}
    assert all((out / f).is_file() for f in ("table.md", "table.csv", "scatter.png"))
