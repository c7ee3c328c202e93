"""The gate's report: markdown for the candidate's run and a per-class plot."""

from __future__ import annotations

from pathlib import Path


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


PLOT_COLORS = {"reference": (154, 165, 177), "candidate": (47, 111, 219), "threshold": (192, 57, 43)}
PANEL_SIZE = (660, 396)  # pixels per panel


def per_class_plot(record: dict, path: Path) -> None:
    """Per-class comparison: anchor-test AP50 and pool-holdout detection rate, reference vs candidate.

    A grouped bar chart per panel, drawn with Pillow (the gate runs in every ``dvc repro``; a plotting
    library's import would cost it more than the drawing)."""
    from PIL import Image, ImageDraw

    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    c, r = record["candidate"]["version"], record["production"]["version"]
    threshold = float(record["gates"]["new_samples"].get("pass_above", 0.8))
    panels = [("anchor_test", "ap50", "anchor test: AP50 (Gate 1)")]
    if cand["pool_holdout"].get("objects"):
        panels.append(("pool_holdout", "detection_rate_per_class", "pool holdout: detection rate (Gate 2)"))
    width, height = PANEL_SIZE
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((26, 8), f"v{c} vs v{r}: {record['decision'].upper()}", font=_font(17), fill="black")
    legend = [("reference", f"v{r} (reference)"), ("candidate", f"v{c} (candidate)")]
    if len(panels) > 1:
        legend.insert(0, ("threshold", f"Gate 2 pass > {threshold:.0%}"))
    _legend(draw, legend, right=image.width - 12, top=10)
    for index, (key, field, title) in enumerate(panels):
        classes = list(ref[key][field])
        bars = {
            "reference": [ref[key][field][k] for k in classes],
            "candidate": [cand[key][field].get(k, 0.0) for k in classes],
        }
        line = threshold if key == "pool_holdout" else None
        _bar_panel(image, draw, (index * width, 0), title, classes, bars, line)
    image.save(path)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _legend(draw, entries: list[tuple[str, str]], *, right: int, top: int) -> None:
    """Legend entries (colour key, label) in one row ending at ``right``."""
    font = _font(12)
    x = right
    for key, label in reversed(entries):
        x -= int(font.getlength(label))
        draw.text((x, top), label, font=font, fill="black")
        x -= 30
        colour = PLOT_COLORS[key]
        if key == "threshold":
            for dash in range(x, x + 24, 8):
                draw.line([(dash, top + 7), (dash + 4, top + 7)], fill=colour, width=1)
        else:
            draw.rectangle([x, top + 2, x + 24, top + 11], fill=colour)
        x -= 28


def _bar_panel(image, draw, origin, title, classes, bars, threshold) -> None:
    """One panel: axes from 0 to 1.05, a pair of bars per class, the class names at 30 degrees."""
    ox, oy = origin
    left, right, top, bottom = ox + 52, ox + PANEL_SIZE[0] - 14, oy + 106, oy + 318
    scale = (bottom - top) / 1.05

    def y_of(value: float) -> int:
        return round(bottom - max(0.0, min(float(value), 1.05)) * scale)

    font = _font(13)
    draw.text(((left + right) // 2, top - 8), title, font=_font(15), fill="black", anchor="ms")
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = y_of(tick)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 7, y), f"{tick:.1f}", font=font, fill="black", anchor="rm")
    slot = (right - left) / max(1, len(classes))
    for k, name in enumerate(classes):
        centre = left + slot * (k + 0.5)
        for side, role in ((-1, "reference"), (0, "candidate")):
            x0 = round(centre + side * 0.4 * slot)
            draw.rectangle([x0, y_of(bars[role][k]), round(x0 + 0.4 * slot) - 1, bottom], fill=PLOT_COLORS[role])
        draw.line([(round(centre), bottom), (round(centre), bottom + 4)], fill="black")
        _rotated_label(image, name, font, anchor=(round(centre), bottom + 8))
    if threshold is not None:
        y = y_of(threshold)
        for dash in range(left, right, 8):
            draw.line([(dash, y), (min(dash + 4, right), y)], fill=PLOT_COLORS["threshold"])
    draw.rectangle([left, top, right, bottom], outline="black")


def _rotated_label(image, text: str, font, anchor: tuple[int, int]) -> None:
    """``text`` turned 30 degrees anticlockwise, its right end just below ``anchor``."""
    from PIL import Image, ImageDraw

    size = (int(font.getlength(text)) + 4, 18)
    label = Image.new("L", size, 0)
    ImageDraw.Draw(label).text((2, 1), text, font=font, fill=255)
    turned = label.rotate(30, expand=True, resample=Image.Resampling.BICUBIC)
    x, y = anchor[0] - turned.width, anchor[1]
    image.paste((0, 0, 0), (x, y, x + turned.width, y + turned.height), turned)
