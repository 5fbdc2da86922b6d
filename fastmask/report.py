"""What ``fastmask debias`` and ``fastmask evaluate`` write: JSON, markdown, CSV and plots, each file atomically.

- :func:`write_debias_report`: ``report.json`` (everything, machine-readable) and ``report.md`` (before / after
  metrics overall and per group, per-epoch fairness and AUC, mask summary, training history, data and skipped
  samples, configuration).
- :func:`plot_mask_layers`: the mask distribution per layer, like SWiFT's Fig. 8: one box per layer (module) over
  its parameters' mask values -- box = quartiles, line = median, whiskers = 5th and 95th percentiles, dot = mean --
  or, for a hard (BMFT) mask, the fraction of each layer selected for fine-tuning.
- :func:`plot_epochs`: AUC and fairness gaps on the evaluation set after every epoch, like SWiFT's Fig. 4.
- :func:`write_evaluation`: per-group metrics tables as ``metrics.md``, ``groups.csv`` and ``metrics.json``.

JSON never holds NaN: an undefined value (a group's AUC without both classes) is ``null``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from fastmask.data import atomic_write_bytes

__all__ = [
    "jsonable",
    "write_json",
    "write_text",
    "markdown_table",
    "group_rows",
    "mask_layer_stats",
    "plot_mask_layers",
    "plot_epochs",
    "render_debias_markdown",
    "write_debias_report",
    "render_evaluation_markdown",
    "write_evaluation",
]

# The scalar metrics of fastmask.metrics.evaluate in report order, with their table names.
METRIC_NAMES = {
    "auc": "AUC",
    "acc": "ACC",
    "spd": "SPD",
    "eopp": "EOpp",
    "eodds": "EOdds (code)",
    "eodds_max": "EOdds (max)",
    "eodds_mean": "EOdds (mean)",
    "worst_group_auc": "worst-group AUC",
    "auc_gap": "AUC gap",
    "positive_rate": "positive rate",
    "label_positive_rate": "label positive rate",
}
GROUP_COLUMNS = ("n", "positives", "auc", "acc", "tpr", "fpr", "positive_rate")


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: NaN / inf -> None, numpy scalars and arrays -> Python, tuples -> lists,
    paths -> str, mapping keys -> str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` (through :func:`jsonable`) as indented JSON, atomically."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub markdown table; floats with ``digits`` decimals, missing values as an en dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def group_rows(table: pd.DataFrame, labels: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """Rows of :func:`fastmask.metrics.group_table` as dicts with a ``group`` entry (and ``label`` if named)."""
    rows = []
    for i, group in enumerate(table.index):
        rec: dict[str, Any] = {"group": jsonable(group)}
        if labels and group in labels:
            rec["label"] = labels[group]
        # Column by column (iterrows would turn the integer counts into floats).
        rec.update({c: jsonable(table[c].iloc[i]) for c in GROUP_COLUMNS})
        rows.append(rec)
    return rows


# ---- the mask per layer -------------------------------------------------------------------------------------------


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


def _figure(width: float, height: float):
    # matplotlib.figure.Figure directly (no pyplot): no global figure registry, no GUI backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def plot_mask_layers(stats: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, hard: bool,
                     title: str = "") -> None:
    """The mask per layer (SWiFT Fig. 8): boxes of the soft-mask values, or bars of a hard mask's selected
    fraction; head layers in orange."""
    n = len(stats)
    fig = _figure(max(7.0, 0.18 * n + 2.0), 4.5)
    ax = fig.add_subplot()
    colours = ["tab:orange" if s["head"] else "tab:blue" for s in stats]
    x = np.arange(1, n + 1)
    if hard:
        ax.bar(x, [s["mean"] for s in stats], color=colours)
        ax.set_ylabel("fraction selected (M = 1)")
    else:
        boxes = [{"label": s["layer"], "med": s["median"], "q1": s["q25"], "q3": s["q75"], "whislo": s["q05"],
                  "whishi": s["q95"], "mean": s["mean"]} for s in stats]
        art = ax.bxp(boxes, positions=x, showfliers=False, showmeans=True, patch_artist=True, widths=0.6,
                     meanprops={"marker": ".", "markerfacecolor": "black", "markeredgecolor": "black"},
                     medianprops={"color": "black"})
        for patch, colour in zip(art["boxes"], colours, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        ax.set_ylabel("soft mask M = tanh(R)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x, [s["layer"] for s in stats], rotation=90, fontsize=7)
    ax.set_xlim(0.3, n + 0.7)
    ax.set_xlabel("layer (head in orange)")
    ax.set_title(title or ("hard mask per layer" if hard else
                           "soft mask per layer (box: quartiles, whiskers: 5th-95th percentile, dot: mean)"))
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path)


def plot_epochs(epochs: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """AUC (overall, worst group) and fairness gaps (EOdds code, SPD, EOpp) on the evaluation set after each epoch
    (SWiFT Fig. 4); ``epochs`` starts with the model before debiasing (``step == "before"``)."""
    labels = ["before" if e["step"] == "before" else f"{e['step']}:{e['epoch']}" for e in epochs]
    x = np.arange(len(epochs))
    fig = _figure(max(6.0, 0.35 * len(epochs) + 3.0), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, keys in ((top, ("auc", "worst_group_auc")), (bottom, ("eodds", "spd", "eopp"))):
        for key in keys:
            ax.plot(x, [e.get(key, math.nan) if e.get(key) is not None else math.nan for e in epochs],
                    marker="o", ms=3, label=METRIC_NAMES[key])
        # A dashed line where a new step starts.
        for i in range(1, len(epochs)):
            if epochs[i]["step"] != epochs[i - 1]["step"] and epochs[i - 1]["step"] != "before":
                ax.axvline(i - 0.5, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("AUC")
    bottom.set_ylabel("fairness gap")
    bottom.set_xticks(x, labels, rotation=90, fontsize=7)
    bottom.set_xlabel("after epoch (step:epoch)")
    top.set_title(title or "evaluation set after each epoch")
    _save_png(fig, path)


# ---- debias report ------------------------------------------------------------------------------------------------


def _group_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["group", "n", "positives", "AUC", "ACC", "TPR", "FPR", "positive rate"]
    return markdown_table(headers, ([f"{r['group']} ({r['label']})" if r.get("label") else r["group"],
                                     *(r[c] for c in GROUP_COLUMNS)] for r in rows))


def render_debias_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` from the ``report.json`` content written by :func:`fastmask.workflow.debias`."""
    data, model = report["data"], report["model"]
    before, after = report["before"], report["after"]
    out = [
        f"# fastmask debias: {report['method'].upper()}",
        "",
        f"- model: `{model['spec']}`, weights `{model['weights']}` ({model['parameters']:,} parameters, head "
        f"`{model['head']}`)",
        f"- shards: `{data['shards']}`; attribute `{data['attr']}`"
        + (f" (groups {data['attr_map']})" if data.get("attr_map") else ""),
        f"- evaluation set: {data['sets']['test']['description']}, {data['sets']['test']['samples']} samples",
        f"- run time: {report['seconds']:.1f} s",
        "",
        "## Before and after",
        "",
        markdown_table(["metric", "before", "after", "change"],
                       ([METRIC_NAMES[k], before["overall"][k], after["overall"][k], report["change"][k]]
                        for k in METRIC_NAMES)),
        "",
        f"EOdds (code) = ½·|ΔFPR + ΔTPR| between the groups of `{data['attr']}`; SPD, EOpp and both other EOdds "
        "forms as in `fastmask.metrics`.",
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
    if report["collapse_warnings"]:
        out += ["## Collapse guard", ""] + [f"- **warning**: {w['message']}" for w in report["collapse_warnings"]]
        out.append("")
    plots = report["outputs"]["plots"]
    if report["epochs"]:
        out += ["## Fairness and AUC per epoch", ""]
        if plots.get("epochs"):
            out += [f"![fairness and AUC per epoch]({plots['epochs']})", ""]
        out += [markdown_table(["step", "epoch", "AUC", "worst-group AUC", "EOdds (code)", "SPD", "EOpp", "ACC"],
                               ([e["step"], e["epoch"], e["auc"], e["worst_group_auc"], e["eodds"], e["spd"],
                                 e["eopp"], e["acc"]] for e in report["epochs"])), ""]
    mask = report["mask"]
    out += ["## Mask", "", f"![mask per layer]({plots['mask']})", ""]
    if mask["kind"] == "hard":
        out.append(f"Hard mask: {mask['fraction_selected']:.1%} of the feature extractor selected for fine-tuning.")
    else:
        out.append(f"Soft mask: mean {mask['mean_features']:.4f} over the feature extractor, "
                   f"{mask['mean_head']:.4f} over the head.")
    out += [f"Head re-initialisation set {report['head_reset_fraction']:.1%} of the head's elements to 0; the "
            f"importance pass read {report['n_importance_batches']} batches.", ""]
    out += ["## Training", "",
            markdown_table(["step", "epoch", "loss", "positive share"],
                           ([h["step"], h["epoch"], h["loss"], h["positive_share"]] for h in report["history"])),
            "", "Collapse-guard checks (eval mode, on each step's data):", "",
            markdown_table(["step", "positive share", "label positive rate"],
                           ([c["step"], c["positive_share"], c["label_positive_rate"]] for c in report["checks"])),
            ""]
    sets = data["sets"]
    out += ["## Data", "",
            markdown_table(["set", "samples", "description"],
                           ([name, s["samples"], s["description"]] for name, s in sets.items())), ""]
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
    """``metrics.md`` from the ``metrics.json`` content written by :func:`fastmask.workflow.evaluate`."""
    overall = evaluation["overall"]
    out = [
        "# fastmask evaluate",
        "",
        f"- model: `{evaluation['model']}`, weights `{evaluation['weights']}`",
        f"- data: {evaluation['description']}, {overall['n']} samples ({overall['positives']} positive)",
        "",
        "## Overall",
        "",
        markdown_table(["AUC", "ACC", "positive rate", "label positive rate"],
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
            extra.append(f"between groups {res['gap_groups'][0]} and {res['gap_groups'][1]}: SPD {g['spd']:.4f}, "
                         f"EOpp {g['eopp']:.4f}, EOdds code {g['eodds']:.4f} / max {g['eodds_max']:.4f} / mean "
                         f"{g['eodds_mean']:.4f}")
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
