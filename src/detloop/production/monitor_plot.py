"""``monitor.png``: a monitor run's figures across its window (per bin of ``monitor.mlflow.plot_bin_hours``),
with the alert thresholds drawn, for the run's MLflow artifacts.

Four panels, one per rule of the guide's section 7: detection rate per field (of the images expected to
show it) under the ``detection_rate.alert_below`` line; average confidence and latency of each version
that answered, under or over the line of every baseline compared with (own, previous); failure reports
per bin, with the weekly counts the ``reports`` rule reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from omegaconf import DictConfig

BASELINE_STYLE = {"own": ":", "previous": "--"}


def draw(cfg: DictConfig, result: dict, path: Path) -> Path:
    """Write the PNG of ``result`` (from :func:`detloop.production.monitor.run`) to ``path``."""
    from matplotlib.figure import Figure

    series = result["series"]
    starts = [datetime.fromisoformat(s.replace("Z", "+00:00")) for s in series["since"]]
    width = series["hours"] / 24.0  # bar width in days (matplotlib date units)
    x = [s.timestamp() / 86400.0 + width / 2 for s in starts]  # bin centres as days since the epoch
    fig = Figure(figsize=(10, 11), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    _detection_rate(axes[0], cfg, result, x)
    _per_version(axes[1], result, x, "confidence", "average confidence")
    _per_version(axes[2], result, x, "latency_ms", f"latency q{result['latency_quantile']:g} (ms per image)")
    axes[3].bar(x, series["reports"], width=width * 0.8, color="#7f8c8d", label="failure reports")
    weekly = " -> ".join(map(str, result["reports_per_week"]))
    weeks = int(cfg.monitor.reports.rising_weeks)
    axes[3].set_title(f"failure reports per bin; per week {weekly} (alert when rising {weeks} weeks in a row)")
    axes[3].set_ylabel("reports")
    _date_axis(axes[3], x, width)
    status = f"{len(result['alerts'])} alert(s)" if result["alerts"] else "no alerts"
    fig.suptitle(
        f"detloop monitor {result['window']['since']} .. {result['window']['until']}: "
        f"v{result['version']}, {result['images']} images, {status}"
    )
    fig.savefig(path, dpi=100)
    return path


def _detection_rate(ax, cfg: DictConfig, result: dict, x: list[float]) -> None:
    floor = float(cfg.monitor.detection_rate.alert_below)
    for name, rates in result["series"]["detection_rate"].items():
        total = result["detection_rate"][name]
        label = f"{name} ({total:.1%} of {result['expected_images'][name]})" if total is not None else f"{name} (-)"
        ax.plot(x, _nan(rates), marker="o", markersize=3, label=label)
    ax.axhline(floor, color="#c0392b", linestyle="--", linewidth=1, label=f"alert below {floor:.0%}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("detection rate")
    ax.set_title("detection rate per field, of the images expected to show it")
    ax.legend(fontsize=7, ncol=4, loc="lower left")


def _per_version(ax, result: dict, x: list[float], key: str, title: str) -> None:
    """One line per version that answered, and each compared baseline's alert line."""
    for version, values in result["series"][key].items():
        ax.plot(x, _nan(values), marker="o", markersize=3, label=f"v{version}")
    rule = "confidence" if key == "confidence" else "latency"
    for c in result["comparisons"]:
        if c["rule"] != rule:
            continue
        if rule == "confidence":
            line, words = c["reference"] * (1 - c["limit"]), f"alert below {c['reference'] * (1 - c['limit']):.3f}"
        else:
            line, words = c["reference"] * c["limit"], f"alert above {c['reference'] * c['limit']:.1f} ms"
        whose = f"v{c['baseline_version']}" if c["baseline_version"] else "fixed"
        ax.axhline(
            line,
            color="#c0392b" if c["alert"] else "#95a5a6",
            linestyle=BASELINE_STYLE[c["baseline"]],
            linewidth=1,
            label=f"{words} ({c['baseline']} baseline, {whose})",
        )
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{title} per version; alert lines of the baselines compared with")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _date_axis(ax, x: list[float], width: float) -> None:
    from matplotlib.dates import AutoDateFormatter, AutoDateLocator

    locator = AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(AutoDateFormatter(locator, tz=UTC))
    if x:
        ax.set_xlim(x[0] - width / 2, x[-1] + width / 2)
    ax.set_xlabel("UTC")


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]
