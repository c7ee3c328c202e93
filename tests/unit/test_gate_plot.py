"""The gate's per-class plot: a PNG whose bars are the measured figures, drawn without a plotting library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from detloop.evaluation.report import PANEL_SIZE, PLOT_COLORS, per_class_plot


def _record(pool_objects: int = 4) -> dict:
    classes = ["title", "date", "amount"]
    return {
        "decision": "pass",
        "candidate": {"version": "2"},
        "production": {"version": "1"},
        "gates": {"new_samples": {"pass_above": 0.8}},
        "measured": {
            "candidate": {
                "anchor_test": {"ap50": dict(zip(classes, [1.0, 0.5, 0.0], strict=True))},
                "pool_holdout": {
                    "objects": pool_objects,
                    "detection_rate_per_class": dict(zip(classes, [0.9, 1.0, 0.25], strict=True)),
                },
            },
            "reference": {
                "anchor_test": {"ap50": dict(zip(classes, [0.0, 0.5, 1.0], strict=True))},
                "pool_holdout": {"detection_rate_per_class": dict(zip(classes, [0.1, 0.0, 0.25], strict=True))},
            },
        },
    }


def _bar_heights(image: Image.Image, panel: int, colour: tuple[int, int, int]) -> list[int]:
    """Heights in pixels of the bars of ``colour`` in ``panel``, left to right (below the title and legend)."""
    width, _ = PANEL_SIZE
    pixels = image.load()
    heights, inside = [], False
    for x in range(panel * width, (panel + 1) * width):
        column = sum(1 for y in range(60, image.height) if pixels[x, y] == colour)
        if column and not inside:
            heights.append(column)
        inside = bool(column)
    return heights


def test_the_bars_are_the_measured_figures(tmp_path):
    path = tmp_path / "per_class.png"
    per_class_plot(_record(), path)
    image = Image.open(path).convert("RGB")
    assert image.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])
    full = max(_bar_heights(image, 0, PLOT_COLORS["candidate"]))  # the candidate's AP50 of 1.0
    for panel, role, values in (
        (0, "candidate", [1.0, 0.5, 0.0]),
        (0, "reference", [0.0, 0.5, 1.0]),
        (1, "candidate", [0.9, 1.0, 0.25]),
        (1, "reference", [0.1, 0.0, 0.25]),
    ):
        heights = _bar_heights(image, panel, PLOT_COLORS[role])
        expected = [round(v * full) for v in values if round(v * full) > 0]  # a bar of 0 has no height
        assert len(heights) == len(expected), (panel, role, heights)
        for got, want in zip(heights, expected, strict=True):
            assert abs(got - want) <= 2, (panel, role, heights, expected)


def test_without_pool_holdout_objects_there_is_one_panel(tmp_path):
    path = tmp_path / "per_class.png"
    per_class_plot(_record(pool_objects=0), path)
    assert Image.open(path).size == PANEL_SIZE


def test_drawing_the_plot_does_not_import_matplotlib(tmp_path):
    """The gate runs in every ``dvc repro``; importing a plotting library would cost it more than the drawing."""
    record = tmp_path / "record.json"
    record.write_text(json.dumps(_record()))
    code = (
        "import json, sys; from detloop.evaluation.report import per_class_plot; "
        f"per_class_plot(json.load(open({str(record)!r})), {str(tmp_path / 'p.png')!r}); "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert Path(tmp_path / "p.png").stat().st_size > 1000
