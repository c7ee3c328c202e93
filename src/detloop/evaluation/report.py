"""The gate's report: markdown for the candidate's run and a per-class plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def report_markdown(record: dict) -> str:
    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    c, r = record["candidate"]["version"], record["production"]["version"]
    lines = [f"# Gate report: v{c} vs v{r}", "", f"**Decision: {record['decision'].upper()}**", ""]
    lines += [f"- {line}" for line in record["summary"].splitlines()[1:]] + [""]
    lines += [f"| anchor test, AP50 per class | v{r} | v{c} |", "|---|---|---|"]
    lines.append(
        f"| **mAP50 (all classes)** | {ref['anchor_test']['map50']:.4f} | {cand['anchor_test']['map50']:.4f} |"
    )
    for cls, value in ref["anchor_test"]["ap50"].items():
        lines.append(f"| {cls} | {value:.3f} | {cand['anchor_test']['ap50'].get(cls, float('nan')):.3f} |")
    for key, label in (
        ("pool_holdout", "pool holdout (never trained on)"),
        ("pool_trained_on", "pool train (trained on: not evidence of generalisation)"),
    ):
        if not cand[key].get("objects"):
            continue
        lines += ["", f"| detection rate, {label} | v{r} | v{c} |", "|---|---|---|"]
        lines.append(f"| all classes | {ref[key]['detection_rate']:.3f} | {cand[key]['detection_rate']:.3f} |")
        lines.append(
            f"| ignoring class (diagnostic) | {ref[key]['detection_rate_any_class']:.3f} | "
            f"{cand[key]['detection_rate_any_class']:.3f} |"
        )
        for cls, value in ref[key]["detection_rate_per_class"].items():
            theirs = cand[key]["detection_rate_per_class"].get(cls, float("nan"))
            lines.append(f"| {cls} | {value:.3f} | {theirs:.3f} |")
    lines += label_check_lines(record)
    return "\n".join(lines) + "\n"


def label_check_lines(record: dict) -> list[str]:
    """The "Label check" section when Gate 2 did not pass: the pool samples whose labels the models
    contradict most (``record["label_check"]``, :mod:`detloop.evaluation.label_check`) with the reasons, and
    the link to them in the FiftyOne App with the command that builds that view."""
    check = record.get("label_check")
    if not check or record.get("gates", {}).get("new_samples", {}).get("decision", "pass") == "pass":
        return []
    models = " and ".join(f"{m} ({what})" for m, what in check["models"].items())
    lines = [
        "",
        "## Label check",
        "",
        f"Gate 2 did not pass. Before training more, check the labels the models contradict most: "
        f"{check['flagged_total']} of {check['checked']} pool samples reach score {check['settings']['min_score']:g} "
        f"(a sample's strongest finding, averaged over {models}). A wrong label in the holdout lowers Gate 2; "
        "in the train split it teaches the error.",
        "",
    ]
    if check["flagged"]:
        lines += ["| # | sample | split | score | why |", "|---|---|---|---|---|"]
        for rank, entry in enumerate(check["flagged"], 1):
            why = "<br>".join(r.replace("|", "\\|") for r in entry["reasons"])
            lines.append(f"| {rank} | {entry['id']} | {entry['split']} | {entry['score']:.2f} | {why} |")
    else:
        lines.append("No sample reaches that score: the labels agree with the models; the recipe is the suspect.")
    app = check["app"]
    lines += [
        "",
        f"In the FiftyOne App: [{app['dataset']} / {app['view']}]({app['url']}), sorted by score, the suspect "
        f"labels tagged `label-check`. Build the view and serve the App with `{app['command']}`.",
    ]
    return lines


def per_class_plot(record: dict, path: Path) -> None:
    """Per-class comparison: anchor-test AP50 and pool-holdout detection rate, reference vs candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    c, r = record["candidate"]["version"], record["production"]["version"]
    threshold = float(record["gates"]["new_samples"].get("pass_above", 0.8))
    panels = [("anchor_test", "ap50", "anchor test: AP50 (Gate 1)")]
    if cand["pool_holdout"].get("objects"):
        panels.append(("pool_holdout", "detection_rate_per_class", "pool holdout: detection rate (Gate 2)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, field, title) in zip(axes[0], panels, strict=True):
        classes = list(ref[key][field])
        x = np.arange(len(classes))
        ax.bar(x - 0.2, [ref[key][field][k] for k in classes], 0.4, label=f"v{r} (reference)", color="#9aa5b1")
        ax.bar(
            x + 0.2, [cand[key][field].get(k, 0.0) for k in classes], 0.4, label=f"v{c} (candidate)", color="#2f6fdb"
        )
        ax.set_xticks(x, classes, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        if key == "pool_holdout":
            ax.axhline(threshold, color="#c0392b", linestyle="--", linewidth=1, label=f"Gate 2 pass > {threshold:.0%}")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=len(labels), frameon=False)
    fig.suptitle(f"v{c} vs v{r}: {record['decision'].upper()}", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
