"""Selection (fastmask.methods.selection): the chosen epoch is the admissible one of smallest gap and the model ends
holding it; candidates branch off a shared first step exactly as if each had run alone; hopeless candidates stop; with
no admissible candidate the model is unchanged; a partially collapsing candidate is flagged by the guard and rejected;
the baselines are selected by the same rule. On an imbalanced tabular set with an MLP (a spurious attribute feature),
every oracle recomputed independently."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.data.balance import group_balance
from fastmask.data.splits import stratified_split
from fastmask.fairness.losses import wbce
from fastmask.fairness.metrics import choose_threshold, evaluate
from fastmask.methods.baselines.fairprune import FairPruneConfig
from fastmask.methods.baselines.finetune import LLFTConfig
from fastmask.methods.configs import BmftConfig, StepConfig, SwiftConfig
from fastmask.methods.grids import Candidate, grid, two_step_grid
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import SelectionRule, select
from fastmask.model.scoring import score

pytestmark = pytest.mark.usefixtures("one_thread")


def tabular(n: int, seed: int, agreement: float) -> TensorDataset:
    """An imbalanced binary task (about 24 % positive) whose group a agrees with y for ``agreement`` of the rows and
    is visible to the model as the last feature (the shortcut a biased model learns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    logit = x[:, :3].sum(1) * 1.5 - 2.2
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    agree = torch.rand(n, generator=g) < agreement
    a = torch.where(agree, y, torch.randint(0, 2, (n,), generator=g).float()).long()
    x = torch.cat([x, a.float().unsqueeze(1) * 2 - 1], 1)
    return TensorDataset(x, y, a)


class MLP(nn.Module):
    """E: two hidden layers with BatchNorm; C: dropout + Linear(16, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(7, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def make_problem():
    """A biased MLP (trained where the group agrees with the label for 90 % of the rows), and the external set
    (group independent of the label) split into fit / validation parts with their loaders."""
    torch.manual_seed(0)
    train = tabular(3000, 0, agreement=0.9)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for x, y, _a in DataLoader(train, batch_size=256, shuffle=True):
            opt.zero_grad()
            wbce(model(x), y).backward()
            opt.step()
    model.eval()
    ext = tabular(1200, 1, agreement=0.5)
    y, a = ext.tensors[1].long().numpy(), ext.tensors[2].numpy()
    fit, val = stratified_split(y, a, 0.25, seed=0)
    import pandas as pd

    fit_frame = pd.DataFrame({"y": y[fit], "a": a[fit]}, index=fit)
    balanced = group_balance(fit_frame, "a", "y", seed=0)["source_index"].to_numpy()

    def loaders():
        sub = torch.utils.data.Subset
        return (DataLoader(sub(ext, fit), batch_size=64), DataLoader(sub(ext, balanced), batch_size=64),
                DataLoader(sub(ext, val), batch_size=256))
    return model, loaders, (y[val], a[val])


def swift_grid(lr1, lr2, beta) -> tuple[Candidate, ...]:
    return two_step_grid(("step1", "step2"), lr1=lr1, beta=beta, lr2=lr2)


def swift_candidate(lr1: float, lr2: float, beta: float) -> Candidate:
    return Candidate.of({"step1.lr": lr1, "beta": beta, "step2.lr": lr2})


def fast(**kw) -> SwiftConfig:
    return SwiftConfig(step1=StepConfig(3, 1e-3, "adam", weight_decay=0.0),
                       step2=StepConfig(3, 1e-2, "adam", weight_decay=0.0), step2_feature_eval=True, **kw)


def independent_scores(model: nn.Module, loader, threshold) -> dict:
    s = score(model, loader)
    t = choose_threshold(s.y, s.p, threshold) if isinstance(threshold, str) else threshold
    yhat = (s.p > t).astype(int)
    tpr = [yhat[(s.a == g) & (s.y == 1)].mean() for g in (0, 1)]
    fpr = [yhat[(s.a == g) & (s.y == 0)].mean() for g in (0, 1)]
    return {"auc": roc_auc_score(s.y, s.p), "acc": (yhat == s.y).mean(), "positive_rate": yhat.mean(),
            "eodds_mean": 0.5 * (abs(tpr[0] - tpr[1]) + abs(fpr[0] - fpr[1])), "threshold": t}


def test_the_chosen_epoch_is_the_admissible_one_of_smallest_gap_and_the_model_holds_it(problem):
    model, loaders, _ = problem
    original = copy.deepcopy(model)
    mask, train, val = loaders()
    cands = swift_grid(lr1=(1e-4, 1e-3), lr2=(1e-3, 1e-2), beta=(0.1,))
    sel = select(model, "swift", mask, train, val, config=fast(), candidates=cands,
                 rule=SelectionRule(stop_auc_drop=1.0, patience=None))
    assert len(sel.rows) == 1 + 4 * (3 + 3) and sel.stopped == [] and sel.converged == []
    # candidate zero: the original weights at the rule's threshold, judged like every epoch
    assert sel.rows[0]["candidate"] is None and sel.rows[0]["step"] == "original"
    zero = independent_scores(original, val, "accuracy")
    assert sel.rows[0]["eodds_mean"] == pytest.approx(zero["eodds_mean"], abs=1e-12)
    # every row judged by the stated budgets, against the original model's own validation scores at 0.5
    orig = independent_scores(original, val, 0.5)
    assert sel.original["auc"] == pytest.approx(orig["auc"]) and sel.original["acc"] == pytest.approx(orig["acc"])
    for r in sel.rows:
        ok = bool(orig["auc"] - r["auc"] <= 0.01 and orig["acc"] - r["acc"] <= 0.02
              and abs(r["positive_rate"] - r["label_positive_rate"]) <= 0.10 and r["eodds_mean"] < orig["eodds_mean"])
        assert r["admissible"] is ok and (r["why"] == []) is ok
    admissible = [r for r in sel.rows if r["admissible"]]
    assert admissible, "the test needs at least one admissible epoch"
    best = min(admissible, key=lambda r: (r["eodds_mean"], -r["auc"]))
    assert sel.chosen == best
    # the model ends holding the chosen epoch: its validation scores, recomputed, are the chosen row's
    again = independent_scores(model, val, "accuracy")
    for key in ("auc", "acc", "positive_rate", "eodds_mean", "threshold"):
        assert again[key] == pytest.approx(best[key], abs=1e-12), key
    assert sel.threshold == best["threshold"]
    assert best["candidate"] is not None and sel.result is not None and sel.result.masks


def test_branches_equal_candidates_run_alone(problem):
    """The second candidate of a branch resumes from the state after the shared first step: its rows equal those of
    a selection that runs it alone."""
    model, loaders, _ = problem
    pair = (swift_candidate(1e-3, 1e-2, 0.1), swift_candidate(1e-3, 3e-2, 0.1))
    rule = SelectionRule(patience=None)
    together = select(copy.deepcopy(model), "swift", *loaders(), config=fast(), candidates=pair, rule=rule)
    alone = select(copy.deepcopy(model), "swift", *loaders(), config=fast(), candidates=pair[1:], rule=rule)
    keys = ("step", "epoch", "auc", "acc", "eodds_mean", "eodds_max", "threshold")
    mine = [{k: r[k] for k in keys} for r in together.rows if r["candidate"] == 1]
    assert mine == [{k: r[k] for k in keys} for r in alone.rows if r["candidate"] == 0]
    # BMFT's first step does not depend on β: candidates differing in β alone share it
    bm = select(copy.deepcopy(model), "bmft", *loaders(),
                config=BmftConfig(impair=StepConfig(2, 1e-3, "adam", weight_decay=0.0),
                                  repair=StepConfig(2, 1e-2, "adam", weight_decay=0.0)),
                candidates=two_step_grid(("impair", "repair"), lr1=(1e-3,), beta=(0.1, 0.5), lr2=(1e-2,)))
    first = [r for r in bm.rows if r["step"] == "impair"]
    assert [r["candidate"] for r in first] == [0, 0, 1, 1]
    assert [r["auc"] for r in first[:2]] == [r["auc"] for r in first[2:]]


def test_a_hopeless_candidate_stops_and_with_no_admissible_row_the_model_is_unchanged(problem):
    model, loaders, _ = problem
    original = copy.deepcopy(model.state_dict())
    m = copy.deepcopy(model)
    wreck = swift_grid((3.0,), (1e-2, 3e-2), (0.1,))  # SWiFT step 1 at lr 3: the features are gone
    sel = select(m, "swift", *loaders(), config=fast(), candidates=wreck)
    # neither wrecked candidate can be chosen; what remains is candidate zero, the original weights at the
    # validation-chosen threshold (admissible on this set)
    assert sel.stopped == [0, 1] and sel.threshold_only and sel.result is None
    assert sel.chosen["candidate"] is None and sel.threshold == sel.rows[0]["threshold"] != 0.5
    assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())
    # each stopped after the second epoch of step 2 (after the first its head is fresh), candidate 1 after branching
    # off the shared first step
    judged = [(r["candidate"], r["epoch"]) for r in sel.rows if r["step"] == "step2"]
    assert judged == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert [r["candidate"] for r in sel.rows if r["step"] == "step1"] == [0, 0, 0, 1, 1, 1]
    # budgets nothing can meet: no choice, the model unchanged
    m = copy.deepcopy(model)
    sel = select(m, "swift", *loaders(), config=fast(), candidates=swift_grid((1e-3,), (1e-2,), (0.1,)),
                 rule=SelectionRule(share_tolerance=0.0, max_acc_drop=0.0, max_auc_drop=0.0))
    assert sel.chosen is None and all(not r["admissible"] for r in sel.rows)
    assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())


def test_a_partial_collapse_is_flagged_by_the_guard_and_rejected(problem):
    """A large step-1 learning rate on the imbalanced set (about 24 % positive): the model drifts to predicting positive
    far more often than the labels are. The guard flags the run, and the selection rejects every one of its epochs
    (at the untuned threshold 0.5 the share breaks the share budget)."""
    model, loaders, (y_val, _) = problem
    assert 0.2 < y_val.mean() < 0.3
    drift = SwiftConfig(step1=StepConfig(3, 3e-2, "sgd", momentum=0.9), step2=StepConfig(2, 1e-3, "sgd"),
                        beta=0.0)
    sel = select(copy.deepcopy(model), "swift", *loaders(), config=drift, candidates=(Candidate(),),
                 rule=SelectionRule(threshold=0.5, stop_auc_drop=1.0, patience=None))
    share_breaks = [r for r in sel.rows if any("positive share" in w for w in r["why"])]
    assert share_breaks and not any(r["admissible"] for r in sel.rows) and sel.chosen is None
    assert max(r["positive_rate"] for r in sel.rows) > y_val.mean() + 0.10
    # the same run with its guard: the positive share parted from the label rate after the last step
    from fastmask.methods.swift import swift

    mask, train, _ = loaders()
    res = swift(copy.deepcopy(model), mask, train, config=drift)
    kinds = {w.kind for w in res.guard_warnings}
    assert kinds & {"share", "collapse"}, res.checks


def test_the_signed_sum_cannot_be_the_rule():
    with pytest.raises(ValueError, match="signed sum"):
        SelectionRule(gap="eodds")
    with pytest.raises(ValueError, match="threshold must be one of"):
        SelectionRule(threshold="f1")
    with pytest.raises(ValueError, match="holds no candidate"):
        select(MLP(), "swift", [], [], [], candidates=())


def test_evaluate_at_the_chosen_threshold_matches_the_independent_oracle(problem):
    model, loaders, _ = problem
    _, _, val = loaders()
    s = score(model, val)
    t = choose_threshold(s.y, s.p)
    m = evaluate(s.y, s.p, s.a, threshold=t)
    assert m["acc"] == pytest.approx(independent_scores(model, val, t)["acc"])


def test_a_baseline_is_selected_by_the_same_rule_over_its_own_grid(problem):
    """LLFT (one step, epochs reported) and FairPrune (no epochs: its final model is scored) through the same
    :func:`select`: every row judged by the same budgets, the chosen one the admissible row of smallest gap, and the
    model holding it."""
    model, loaders, _ = problem
    mask, train, val = loaders()
    orig = independent_scores(model, val, 0.5)
    llft = LLFTConfig(step=StepConfig(3, 1e-2, "adam", weight_decay=0.0))
    for method, config, cands, n_rows in (
            ("llft", llft, grid({"step.lr": (3e-3, 3e-2), "beta": (0.1,)}), 1 + 2 * 3),
            ("fairprune", FairPruneConfig(), grid({"ratio": (0.0, 0.02, 0.3)}), 1 + 3)):
        m = copy.deepcopy(model)
        sel = select(m, method, mask, train, val, config=config, candidates=cands,
                     rule=SelectionRule(stop_auc_drop=1.0, patience=None))
        assert len(sel.rows) == n_rows
        for r in sel.rows:
            ok = bool(orig["auc"] - r["auc"] <= 0.01 and orig["acc"] - r["acc"] <= 0.02
                  and abs(r["positive_rate"] - r["label_positive_rate"]) <= 0.10
                  and r["eodds_mean"] < orig["eodds_mean"])
            assert r["admissible"] is ok, (method, r)
        if method == "fairprune":
            pruned = sel.rows[1:]
            assert [r["epoch"] for r in pruned] == [None] * 3 and pruned[0]["step"] == "final"
            assert pruned[0]["auc"] == pytest.approx(orig["auc"])  # ratio 0 prunes nothing
        admissible = [r for r in sel.rows if r["admissible"]]
        assert admissible, method
        best = min(admissible, key=lambda r: (r["eodds_mean"], -r["auc"]))
        assert sel.chosen == best
        again = independent_scores(m, val, "accuracy")
        assert again["eodds_mean"] == pytest.approx(best["eodds_mean"], abs=1e-12)
        assert again["auc"] == pytest.approx(best["auc"], abs=1e-12)


def test_every_tunable_method_has_a_grid_of_the_same_size_that_applies_to_its_configuration():
    """The same tuning budget for every method in a comparison: each grid has GRID_SIZE candidates, and every
    candidate changes fields its configuration has (an unknown one is an error naming it)."""
    from fastmask.methods.grids import GRID_SIZE

    for name, m in METHODS.items():
        if name in ("baseline", "threshold"):  # the untouched model, and the threshold alone: nothing to tune
            assert m.grid == ()
            continue
        assert len(m.grid) == GRID_SIZE, name
        config = m.config()
        for c in m.grid:
            changed = c.apply(config)
            for path, value in c.settings:
                obj = changed
                for key in path.split("."):
                    obj = getattr(obj, key)
                assert obj == value, (name, path)
    with pytest.raises(ValueError, match="'step3.lr'.*no field 'step3'"):
        Candidate.of({"step3.lr": 1e-3}).apply(SwiftConfig())


def test_patience_stops_a_candidate_whose_best_epoch_is_behind_it(problem):
    """With patience p, a candidate stops after the first epoch e of its last step (e >= 2) at which its own best
    admissible epoch is p epochs of that step old (0 when the best came from the first step); its rows up to there
    equal those of the run without patience."""
    model, loaders, _ = problem
    config = SwiftConfig(step1=StepConfig(2, 1e-3, "adam", weight_decay=0.0),
                         step2=StepConfig(8, 1e-2, "adam", weight_decay=0.0), step2_feature_eval=True)
    cands = swift_grid((1e-3,), (1e-2,), (0.5,))
    full = select(copy.deepcopy(model), "swift", *loaders(), config=config, candidates=cands,
                  rule=SelectionRule(stop_auc_drop=1.0, patience=None))
    early = select(copy.deepcopy(model), "swift", *loaders(), config=config, candidates=cands,
                   rule=SelectionRule(stop_auc_drop=1.0, patience=2))
    keys = ("step", "epoch", "auc", "eodds_mean", "admissible")
    def view(rows):
        return [{k: r[k] for k in keys} for r in rows]

    assert view(early.rows) == view(full.rows[:len(early.rows)])
    # the independent replay of the rule on the full run's rows: where it must have stopped
    best, stop = None, None
    for r in full.rows[1:]:  # candidate 0's rows (row 0 is candidate zero, the original weights)
        if r["admissible"] and (best is None or (r["eodds_mean"], -r["auc"]) < best[0]):
            best = ((r["eodds_mean"], -r["auc"]), r["epoch"] if r["step"] == "step2" else 0)
        if r["step"] == "step2" and r["epoch"] >= 2 and best is not None and r["epoch"] - best[1] >= 2:
            stop = r["epoch"]
            break
    assert stop is not None, "the test needs a run whose best lies behind it"
    assert early.converged == [0] and early.rows[-1]["step"] == "step2" and early.rows[-1]["epoch"] == stop
    with pytest.raises(ValueError, match="patience"):
        SelectionRule(patience=0)
