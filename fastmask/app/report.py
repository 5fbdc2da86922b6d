"""What ``fastmask debias`` and ``fastmask evaluate`` write: JSON, markdown and CSV, each file atomically.

- :func:`write_debias_report`: ``report.json`` (everything, machine-readable) and ``report.md`` (before / after
  metrics overall and per group, per-epoch fairness and AUC, mask summary, training history, data and skipped
  samples, configuration).
- :func:`write_evaluation`: per-group metrics tables as ``metrics.md``, ``groups.csv`` and ``metrics.json``.

JSON never holds NaN: an undefined value (a group's AUC without both classes) is ``null``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from fastmask.app.tables import GROUP_COLUMNS, METRIC_NAMES, group_rows, headline, markdown_table
from fastmask.fairness.metrics import evaluate, group_table
from fastmask.methods.engine import one_class_warnings
from fastmask.methods.grids import Candidate
from fastmask.util.files import jsonable, write_json, write_text


def evaluation_scores(y: np.ndarray, p: np.ndarray, a: np.ndarray, attr_map: Mapping[str, int] | None,
                      threshold: float = 0.5) -> dict[str, Any]:
    """The scores a debias report shows for one evaluation at the decision ``threshold``: every scalar metric of
    :func:`fastmask.fairness.metrics.evaluate` (``overall``) and the per-group table (``groups``, labelled with the
    attribute values mapped to each group)."""
    labels = {g: ", ".join(v for v, c in attr_map.items() if c == g) for g in (0, 1)} if attr_map else None
    return {"overall": evaluate(y, p, a, threshold=threshold),
            "groups": group_rows(group_table(y, p, a, threshold=threshold), labels)}


def one_class_warning(overall: Mapping[str, Any], what: str) -> list[str]:
    """A warning when the model predicted one class for nearly everyone in ``overall`` (the guard's collapse
    threshold, :data:`fastmask.methods.engine.COLLAPSE_THRESHOLD`): its gaps are then near 0 and say nothing of
    fairness."""
    return [f"{what}: {m}, so its fairness gaps (EOdds, SPD) are meaningless; check the preprocessing (--image-size, "
            "--normalize) and the threshold"
            for m in one_class_warnings(overall["positive_rate"], overall["label_positive_rate"])]


def mask_layer_stats(masks: Mapping[str, Tensor], head: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Per layer (the module owning the parameters, in model order): element count, mean, min, max and the
    5 / 25 / 50 / 75 / 95th percentiles of the mask values over the layer's parameters, and whether it is the head.
    For a bool (hard) mask the mean is the fraction selected."""
    head = set(head)
    layers: dict[str, list[str]] = {}
    for name in masks:
        layers.setdefault(name.rpartition(".")[0] or name, []).append(name)
    out = []
    for layer, names in layers.items():
        values = np.concatenate([masks[n].detach().float().cpu().numpy().ravel() for n in names])
        q = np.percentile(values, [5, 25, 50, 75, 95])
        out.append({
            "layer": layer,
            "parameters": names,
            "head": any(n in head for n in names),
            "numel": int(values.size),
            "mean": float(values.mean()),
            "min": float(values.min()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
            "max": float(values.max()),
        })
    return out


def _group_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["group", "n", "positives", "AUC", "ACC", "TPR", "FPR", "positive rate"]
    return markdown_table(headers, ([f"{r['group']} ({r['label']})" if r.get("label") else r["group"],
                                     *(r[c] for c in GROUP_COLUMNS)] for r in rows))


def read_text(counts: Mapping[str, Any]) -> str:
    """How many samples a set really had: "600 samples" when all were read, else "200 of 600 samples read (400
    skipped as damaged)"; ``counts`` holds ``samples`` (planned) and the ``read`` / ``skipped`` of the last epoch."""
    planned, read = counts["samples"], counts.get("read")
    if read is None or (read == planned and not counts.get("skipped")):
        return f"{planned} samples"
    return f"{read} of {planned} samples read ({counts['skipped']} skipped as damaged)"


def preprocessing_text(record: Mapping[str, Any]) -> str:
    """The preprocessing of a report's ``preprocessing`` record in one line, each setting with its source."""
    src = record["sources"]
    crop = f", centre crop {record['crop']} ({src['crop']})" if record["crop"] is not None else ""
    first = f"centre crop {record['center_crop']} of the original, then " if record["center_crop"] else ""
    flips = ", ".join(record["augment"]) or "none"
    return (f"{first}resize to {record['image_size']} px ({src['image_size']}){crop}; mean {list(record['mean'])} "
            f"({src['mean']}), std {list(record['std'])} ({src['std']}); training augmentations: {flips} "
            f"({src['augment']})")


def verdict(report: Mapping[str, Any]) -> str:
    """What happened, in one sentence."""
    selection = report.get("selection")
    if selection is None:
        # A collapsed model's gaps are 0: the verdict says so before any figure does.
        collapsed = one_class_warnings(report["after"]["overall"]["positive_rate"],
                                       report["after"]["overall"]["label_positive_rate"])
        damage = (f" The debiased model may have collapsed ({collapsed[0].split(';')[0]}): its fairness gaps "
                  "mean nothing." if collapsed else "")
        return f"{report['method'].upper()} with one fixed configuration.{damage}"
    if selection["chosen"] is None:
        return (f"No candidate of {report['method'].upper()} met the budgets on the validation part: the model is "
                "unchanged.")
    c = selection["chosen"]
    if selection["threshold_only"]:
        return (f"No candidate of {report['method'].upper()} did better on the validation part than moving the "
                f"decision threshold alone: the weights are unchanged, the threshold is {c['threshold']:.4f}.")
    when = f"after {c['step']} epoch {c['epoch']}" if c["epoch"] is not None else "as the run left it"
    return (f"{report['method'].upper()} selected on the validation part: candidate {c['candidate']} "
            f"({Candidate.of(c['settings']).describe()}) {when}, decision threshold {c['threshold']:.4f}.")


def _value(v: Any) -> Any:
    """A setting as tables show it: a float in its shortest form (a learning rate of 3e-05 stays readable)."""
    return f"{v:g}" if isinstance(v, float) else v



def selection_caveat(selection: Mapping[str, Any] | None) -> str | None:
    """A warning when the validation part is too small for the AUC budget: its AUC's standard error exceeds it, so
    budgets are judged within the noise and the test AUC of the chosen model may fall further."""
    if selection is None or selection["original"].get("auc_se") is None:
        return None
    se, budget = selection["original"]["auc_se"], selection["rule"]["max_auc_drop"]
    if se <= budget:
        return None
    return (f"the validation part ({selection['original']['n']} samples) measures AUC to about ±{se:.3f} (standard "
            f"error), more than the AUC budget {budget}: the choice may not keep the test AUC within it; a larger "
            "--val-fraction or external set measures it better")


def _selection_md(selection: Mapping[str, Any], plot: str | None) -> list[str]:
    rule, original = selection["rule"], selection["original"]
    out = ["## Selection", "",
           f"Every candidate started from the original weights and was scored on the validation part after every "
           f"epoch, at the decision threshold chosen there ({rule['threshold']!r}); so was candidate zero (cand. "
           f"–), the original weights at that threshold. A row is admissible when its AUC is at most "
           f"{rule['max_auc_drop']} and its ACC at most {rule['max_acc_drop']} below the original model's (AUC "
           f"{original['auc']:.4f}, ACC {original['acc']:.4f} at 0.5), its positive share within "
           f"{rule['share_tolerance']} of the label rate and its {rule['gap']} below the original's "
           f"({original[rule['gap']]:.4f}); the admissible row with the smallest {rule['gap']} was chosen. "
           f"Candidates stopped as hopeless (AUC more than {rule['stop_auc_drop']} below the original's): "
           f"{selection['stopped'] or 'none'}; stopped {rule['patience']} epochs after their best: "
           f"{selection['converged'] or 'none'}. Selection took {selection['seconds']:.1f} s.", ""]
    caveat = selection_caveat(selection)
    if caveat:
        out += [f"**Warning:** {caveat}.", ""]
    if plot:
        out += [f"![every candidate and epoch: gap against AUC, with the budgets]({plot})", ""]

    def verdict(r: Mapping[str, Any]) -> str:
        return "chosen" if r == selection["chosen"] else ("yes" if r["admissible"] else "no")

    paths = list(dict.fromkeys(k for c in selection["candidates"] for k in c))
    rows = ([r["candidate"], *(_value(r["settings"].get(k)) for k in paths), r["step"], r["epoch"], r["threshold"],
             r["auc"], r["acc"], r["positive_rate"], r["label_positive_rate"], r["eodds_mean"], r["eodds_max"],
             r["eodds"], verdict(r), "; ".join(r["why"])] for r in selection["rows"])
    out += [markdown_table(["cand.", *paths, "step", "epoch", "threshold", "AUC", "ACC", "positive share",
                            "label rate", "EOdds (mean)", "EOdds (max)", "EOdds (code)", "admissible",
                            "budgets broken"], rows), ""]
    return out


def _reduction_md(report: Mapping[str, Any]) -> str:
    """What SWiFT's multi-attribute reduction kept, as the end of the attribute's line (empty without it)."""
    r = report.get("attribute_reduction")
    if not r:
        return ""
    aucs = ", ".join(f"{v} {a:.4f}" for v, a in r["auc_by_value"].items())
    left = [v for v in r["values"] if v not in (r["g_max"], r["g_min"])]
    return (f", reduced to its extreme values by the original model's AUC on the external set (AUC {aucs}): group 0 "
            f"= {r['g_max']!r} (the highest), group 1 = {r['g_min']!r} (the lowest); the samples of "
            f"{left or 'no other value'} are left out of every set")


def render_debias_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` from the ``report.json`` content written by :func:`fastmask.app.debias.debias`."""
    data, model = report["data"], report["model"]
    before, after = report["before"], report["after"]
    out = [
        f"# fastmask debias: {report['method'].upper()}",
        "",
        f"- model: `{model['spec']}`, weights `{model['weights']}` ({model['parameters']:,} parameters, head "
        f"`{model['head']}`)",
        f"- shards: `{data['shards']}`; attribute `{data['attr']}`"
        + (f" (groups {data['attr_map']})" if data.get("attr_map") else "") + _reduction_md(report),
        f"- evaluation set: {data['sets']['test']['description']}, {read_text(data['sets']['test'])}",
        f"- preprocessing: {preprocessing_text(report['preprocessing'])}",
        f"- run time: {report['seconds']:.1f} s",
        "",
        f"**{verdict(report)}** On the evaluation set: {headline(before['overall'], after['overall'])}.",
        "",
        "## Before and after",
        "",
        markdown_table(["metric", "before", "after", "change"],
                       ([METRIC_NAMES[k], before["overall"][k], after["overall"][k], report["change"][k]]
                        for k in METRIC_NAMES)),
        "",
        f"Between the groups of `{data['attr']}`, with ŷ = 1[p > decision threshold]: EOdds (mean) = ½·(|ΔTPR| + "
        "|ΔFPR|), EOdds (max) = max(|ΔTPR|, |ΔFPR|), EOdds (code) = ½·|ΔFPR + ΔTPR|, the signed sum the authors' "
        "code reports, in which opposite gaps cancel (docs/algorithm.md §6).",
        "",
        f"### Per group of `{data['attr']}`, before",
        "",
        _group_table_md(before["groups"]),
        "",
        f"### Per group of `{data['attr']}`, after",
        "",
        _group_table_md(after["groups"]),
        "",
    ]
    if report["warnings"]:
        out += ["## Warnings", ""] + [f"- **warning**: {w}" for w in report["warnings"]] + [""]
    if report["guard_warnings"]:
        out += ["## Guard", ""] + [f"- **warning**: {w['message']}" for w in report["guard_warnings"]]
        out.append("")
    plots = report["outputs"]["plots"]
    if report.get("selection"):
        out += _selection_md(report["selection"], plots.get("selection"))
    if report["epochs"]:
        out += ["## Fairness and AUC per epoch", ""]
        if plots.get("epochs"):
            out += [f"![fairness and AUC per epoch]({plots['epochs']})", ""]
        out += [markdown_table(["step", "epoch", "AUC", "ACC", "positive share", "EOdds (mean)", "EOdds (max)",
                                "EOdds (code)", "worst-group AUC"],
                               ([e["step"], e["epoch"], e["auc"], e["acc"], e["positive_rate"], e["eodds_mean"],
                                 e["eodds_max"], e["eodds"], e["worst_group_auc"]] for e in report["epochs"])), ""]
    mask = report["mask"]
    out += ["## Mask", "", f"![mask per layer]({plots['mask']})", ""]
    if mask["kind"] == "hard":
        out.append(f"Hard mask: {mask['fraction_selected']:.1%} of the feature extractor selected for fine-tuning.")
    else:
        out.append(f"Soft mask: mean {mask['mean_features']:.4f} over the feature extractor, "
                   f"{mask['mean_head']:.4f} over the head.")
    source = (f"the mask was read from `{mask['source']}` (no importance pass)" if mask.get("source") else
              f"the importance pass read {report['n_importance_batches']} batches")
    out += [f"Head re-initialisation set {report['head_reset_fraction']:.1%} of the head's elements to 0; "
            f"{source}.", ""]
    out += ["## Training", "",
            markdown_table(["step", "epoch", "loss", "positive share"],
                           ([h["step"], h["epoch"], h["loss"], h["positive_share"]] for h in report["history"])),
            "", "The guard's checks (eval mode, p > 0.5; the original model first):", "",
            markdown_table(["step", "data", "positive share", "label rate", "ACC"],
                           ([c["step"], c.get("data"), c["positive_share"], c["label_positive_rate"], c.get("acc")]
                            for c in report["checks"])),
            ""]
    sets = data["sets"]
    out += ["## Data", "",
            markdown_table(["set", "samples", "read (last epoch)", "skipped (last epoch)", "description"],
                           ([name, s["samples"], s.get("read"), s.get("skipped"), s["description"]]
                            for name, s in sets.items() if s is not None)), "",
            "Read and skipped: the sample reads of the last epoch over each set, delivered and lost to damage (a "
            "training epoch may read its set more than once, to fill its batches).", "",
            f"Decoding: {data['cache']['describe']}.", ""]
    loader = report["loader"]
    if loader["skipped"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(loader["by_reason"].items()))
        out += [f"**{loader['skipped']} sample reads were skipped** ({reasons}) over all passes; damaged samples:", "",
                markdown_table(["loader", "shard", "key", "reason", "times", "detail"],
                               ([d["loader"], d["shard"], d["key"], d["reason"], d["samples"], d["detail"]]
                                for d in loader["damaged"])), ""]
    else:
        out += ["Every planned sample was read; nothing was skipped.", ""]
    out += ["## Configuration", "", "```json", json.dumps(jsonable(report["config"]), indent=2), "```", "",
            "## Files", ""]
    out += [f"- {name}: `{value}`" for name, value in report["outputs"].items() if name != "plots"]
    out += [f"- plot {name}: `{value}`" for name, value in plots.items() if value]
    return "\n".join(out) + "\n"


def write_debias_report(out_dir: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    write_json(out_dir / report["outputs"]["report_json"], report)
    write_text(out_dir / report["outputs"]["report_md"], render_debias_markdown(jsonable(report)))


# ---- evaluation tables --------------------------------------------------------------------------------------------


def render_evaluation_markdown(evaluation: Mapping[str, Any]) -> str:
    """``metrics.md`` from the ``metrics.json`` content written by :func:`fastmask.app.evaluate.evaluate`."""
    overall = evaluation["overall"]
    out = [
        "# fastmask evaluate",
        "",
        f"- model: `{evaluation['model']}`, weights `{evaluation['weights']}`",
        f"- data: {evaluation['description']}, {read_text(evaluation['data'])} ({overall['positives']} of the "
        f"{overall['n']} read positive)",
        f"- decision threshold: ŷ = 1[p > {evaluation['threshold']:.4f}]",
        f"- preprocessing: {preprocessing_text(evaluation['preprocessing'])}",
        "",
        *(f"**Warning:** {w}.\n" for w in evaluation["warnings"]),
        "## Overall",
        "",
        markdown_table(["AUC", "ACC", "positive share", "label rate"],
                       [[overall["auc"], overall["acc"], overall["positive_rate"], overall["label_positive_rate"]]]),
        "",
    ]
    for attr, res in evaluation["attributes"].items():
        out += [f"## Attribute `{attr}`", "", _group_table_md(res["groups"]), ""]
        extra = []
        if res.get("worst_group_auc") is not None:
            extra.append(f"worst-group AUC {res['worst_group_auc']:.4f}, AUC gap {res['auc_gap']:.4f}")
        if res.get("gaps"):
            g = res["gaps"]
            extra.append(f"between groups {res['gap_groups'][0]} and {res['gap_groups'][1]}: EOdds mean "
                         f"{g['eodds_mean']:.4f}, max {g['eodds_max']:.4f}, code (signed sum, opposite gaps cancel) "
                         f"{g['eodds']:.4f}; SPD {g['spd']:.4f}, EOpp {g['eopp']:.4f}")
        out += [f"- {e}" for e in extra] + ([""] if extra else [])
    skipped = evaluation["loader"]["skipped"]
    if skipped:
        records = evaluation["loader"]["records"]
        out += [f"{skipped} samples could not be read and were skipped:", "",
                markdown_table(["shard", "key", "reason", "detail"],
                               ([d["shard"], d["key"], d["reason"], d["detail"]] for d in records)), ""]
    return "\n".join(out) + "\n"


def write_evaluation(out_dir: str | os.PathLike, evaluation: Mapping[str, Any]) -> dict[str, str]:
    """``metrics.json``, ``metrics.md`` and ``groups.csv`` (one row per attribute and group) in ``out_dir``;
    returns the file names."""
    out_dir = Path(out_dir)
    files = {"json": "metrics.json", "markdown": "metrics.md", "csv": "groups.csv"}
    rows = [{"attribute": attr, **{k: v for k, v in r.items()}}
            for attr, res in evaluation["attributes"].items() for r in res["groups"]]
    columns = ["attribute", "group", "label", *GROUP_COLUMNS]
    frame = pd.DataFrame(rows).reindex(columns=[c for c in columns if any(c in r for r in rows)])
    write_text(out_dir / files["csv"], frame.to_csv(index=False))
    write_json(out_dir / files["json"], evaluation)
    write_text(out_dir / files["markdown"], render_evaluation_markdown(jsonable(evaluation)))
    return files
