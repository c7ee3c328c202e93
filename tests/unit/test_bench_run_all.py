"""benchmarks/run_all.py: figures out of real report files, old against new, the command line, and the baseline
(benchmarks/figures.json) against the benchmark scripts, so it cannot silently rot."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
RUN_ALL = BENCH / "run_all.py"


def _load_run_all():
    sys.path.insert(0, str(BENCH))  # run_all imports shared, as the benchmark scripts do
    spec = importlib.util.spec_from_file_location("bench_run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ra = _load_run_all()

SERVE_REPORT = {
    "images": 40,
    "median": {"direct_p50_ms": 8.0, "server_p50_ms": 12.0, "overhead_ratio_p50": 1.5},
    "direct_batched": {"images_per_s": 300.0},
    "server_concurrent": {"requests_per_s": 150.0, "p50_ms": 50.0, "errors": 0},
    "log": {"sent": 1600, "logged": 1600, "lost": 0},
}
MIX_REPORT = {
    "detloop": {"build_mix_s": [0.09, 0.08, 0.30, 0.085, 0.1], "stage_without_mlflow_s": [0.2]},
    "cli": [
        {"seconds": 0.7, "tree": "this tree"},
        {"seconds": 2.8, "tree": "before"},
        {"seconds": 0.5, "tree": "this tree"},
    ],
    "fiftyone": {"runs": [{"total_s": 20.0}, {"total_s": 30.0}]},
    "rows": [{"key": "base", "map": 0.9}, {"key": "detloop", "map": 0.8}],
}


def entry(key, old, direction="lower", tolerance="20%", **extra) -> dict:
    return {"benchmark": "serve_load", "key": key, "label": key, "unit": "", "old": old, "direction": direction,
            "tolerance": tolerance, **extra}  # fmt: skip


def written(tmp_path: Path, name: str, report: dict) -> dict:
    """``report`` through a real file, as run_all reads it."""
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ extraction
def test_key_paths_select_items_lists_and_reduce(tmp_path):
    report = written(tmp_path, "mix_scale.json", MIX_REPORT)
    assert ra.figure_value(report, entry("detloop.build_mix_s", 0)) == 0.09  # median of the list
    assert ra.figure_value(report, entry("detloop.build_mix_s", 0, reduce="min")) == 0.08
    assert ra.figure_value(report, entry("cli[tree=this tree].seconds", 0)) == pytest.approx(0.6)
    assert ra.figure_value(report, entry("cli[1].seconds", 0)) == 2.8
    assert ra.figure_value(report, entry("cli[-1].tree", "")) == "this tree"
    assert ra.figure_value(report, entry("fiftyone.runs[*].total_s", 0)) == 25.0
    assert ra.figure_value(report, entry("rows[key=detloop].map", 0)) == 0.8
    both = entry(["rows[key=base].map", "rows[key=detloop].map"], 0, reduce="sum")
    assert ra.figure_value(report, both) == pytest.approx(1.7)
    assert ra.figure_value(report, entry("detloop.stage_without_mlflow_s[0]", 0)) == 0.2


def test_dots_inside_a_selector_do_not_split_the_key():
    assert ra.split_key("steps[step=dvc commit data.dvc].seconds") == ["steps[step=dvc commit data.dvc]", "seconds"]
    assert ra.leaf_name("steps[step=dvc commit data.dvc].seconds") == "seconds"
    with pytest.raises(ValueError, match="selector"):
        ra.parse_key("rows[oops].map")
    with pytest.raises(ValueError, match="cannot read"):
        ra.parse_key("a..b")


def test_a_missing_key_names_the_key_and_what_is_there(tmp_path):
    report = written(tmp_path, "serve_load.json", SERVE_REPORT)
    with pytest.raises(ra.FigureMissing) as missing:
        ra.figure_value(report, entry("median.server_p95_ms", 0))
    assert "'server_p95_ms'" in str(missing.value) and "'median'" in str(missing.value)
    assert "server_p50_ms" in str(missing.value)  # what the report has instead
    mix = written(tmp_path, "mix_scale.json", MIX_REPORT)
    with pytest.raises(ra.FigureMissing, match=r"tree=after \(tree values: before, this tree\)"):
        ra.figure_value(mix, entry("cli[tree=after].seconds", 0))
    with pytest.raises(ra.FigureMissing, match=r"has 3 items, no item \[5\]"):
        ra.figure_value(mix, entry("cli[5].seconds", 0))


# ------------------------------------------------------------------------------------------ judging
@pytest.mark.parametrize(
    ("direction", "tolerance", "old", "new", "mark"),
    [
        ("lower", "20%", 10.0, 11.9, "ok"),
        ("lower", "20%", 10.0, 12.1, "REGRESSED"),
        ("lower", "20%", 10.0, 7.9, "better"),
        ("higher", "20%", 100.0, 79.0, "REGRESSED"),
        ("higher", "20%", 100.0, 121.0, "better"),
        ("higher", 0.001, 0.9316, 0.9310, "ok"),
        ("higher", 0.001, 0.9316, 0.9300, "REGRESSED"),
        ("equal", 0.001, 0.478, 0.480, "CHANGED"),
        ("equal", 0, 680, 680, "ok"),
        ("equal", 0, "reject", "review", "CHANGED"),
        ("equal", 0, ["stamp"], ["stamp"], "ok"),
        ("lower", "20%", 10.0, math.nan, "REGRESSED"),
    ],
)
def test_marks_follow_direction_and_tolerance(direction, tolerance, old, new, mark):
    assert ra.judge(entry("k", old, direction, tolerance), old, new)[0] == mark


def test_change_is_a_ratio_for_relative_and_a_difference_for_absolute_tolerances():
    assert ra.judge(entry("k", 10.0), 10.0, 12.5)[1] == "1.25x"
    assert ra.judge(entry("k", 0.9316, "higher", 0.001), 0.9316, 0.9356)[1] == "+0.0040"


def test_the_old_figure_follows_the_cpu_family():
    figure = entry("k", 0.9316, "higher", 0.001, old_by_cpu={"Intel": 0.9461})
    assert ra.old_value(figure, "Intel(R) Xeon(R) Processor") == 0.9461
    assert ra.old_value(figure, "AMD EPYC 7B13") == 0.9316


# ------------------------------------------------------------------------------------- command line
def run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_ALL), *args], capture_output=True, text=True, timeout=60)


def baseline(tmp_path: Path, figures: list[dict]) -> Path:
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({"machine": "test", "figures": figures}))
    return path


def test_no_run_compares_existing_reports(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "serve_load.json").write_text(json.dumps(SERVE_REPORT))
    figures = baseline(
        tmp_path,
        [
            entry("median.direct_p50_ms", 8.3),  # ok
            entry("median.server_p50_ms", 9.1),  # 12.0: regressed
            entry("direct_batched.images_per_s", 213.2, "higher"),  # 300: better
            entry("log.lost", 0, "equal", 0),  # ok
        ],
    )
    done = run_all("--no-run", "--only", "serve_load", "--results", str(results), "--figures", str(figures))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("serve_load ")}
    assert lines["median.direct_p50_ms"].endswith("ok")
    assert lines["median.server_p50_ms"].endswith("REGRESSED") and "1.32x" in lines["median.server_p50_ms"]
    assert lines["direct_batched.images_per_s"].endswith("better")
    assert "2 ok, 1 better, 1 regressed" in done.stdout
    assert "Traceback" not in done.stderr

    out = tmp_path / "comparison.json"
    ok = baseline(tmp_path, [entry("median.direct_p50_ms", 8.3)])
    done = run_all(
        "--no-run", "--only", "serve_load", "--results", str(results), "--figures", str(ok), "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(out.read_text())["figures"][0]["mark"] == "ok"


def test_no_run_reports_a_missing_figure_and_a_missing_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "serve_load.json").write_text(json.dumps(SERVE_REPORT))
    figures = baseline(tmp_path, [entry("median.server_p99_ms", 9.1), {**entry("total_s", 1.0), "benchmark": "team"}])
    done = run_all("--no-run", "--only", "serve_load,team", "--results", str(results), "--figures", str(figures))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"missing figure: {results / 'serve_load.json'}: figure 'median.server_p99_ms'" in done.stdout
    assert "no 'server_p99_ms' under 'median'" in done.stdout
    assert f"team: skipped: no report at {results / 'team.json'}" in done.stdout
    assert "Traceback" not in done.stderr


def test_update_writes_the_new_figures_as_the_baseline(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "serve_load.json").write_text(json.dumps(SERVE_REPORT))
    figures = baseline(tmp_path, [entry("median.server_p50_ms", 9.1), entry("median.direct_p50_ms", 8.3)])
    args = ("--no-run", "--only", "serve_load", "--results", str(results), "--figures", str(figures))
    done = run_all(*args, "--update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [f["old"] for f in json.loads(figures.read_text())["figures"]] == [12.0, 8.0]
    assert run_all(*args).returncode == 0


def test_list_and_bad_options(tmp_path):
    done = run_all("--list")
    assert done.returncode == 0, done.stderr
    for bench in ra.BENCHMARKS:
        assert re.search(rf"^{bench.name}  \(.+ figures?\)  benchmarks/{bench.script}", done.stdout, re.M), bench.name
    assert "needs --project PATH" in done.stdout  # loop_overhead without --project
    done = run_all("--only", "nonsense", "--no-run")
    assert done.returncode != 0 and "unknown benchmark nonsense" in done.stderr


# ----------------------------------------------------------------------------------------------- runs
def test_a_failing_benchmark_is_reported_with_its_exit_code_and_stderr(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("import sys\nprint('working')\nsys.exit('cannot reach the database at db:5432')\n")
    bench = ra.Benchmark("boom", str(script), "1 s", "nothing")
    outcome = ra.run_one(bench, ra.Context(results=tmp_path / "results"), [])
    assert outcome.status == "failed"
    assert "exit 1" in outcome.why and "cannot reach the database at db:5432" in outcome.why

    quiet = tmp_path / "quiet.py"
    quiet.write_text("print('done')\n")
    outcome = ra.run_one(ra.Benchmark("quiet", str(quiet), "1 s", "nothing"), ra.Context(results=tmp_path), [])
    assert outcome.status == "failed" and "wrote no new report" in outcome.why


def test_printed_rates_become_a_report(tmp_path):
    script = tmp_path / "rates.py"
    script.write_text(
        "print('batch: 10 JPEGs of 8x8 px, 0.0 MB')\n"
        "print(f\"{'inbox add (all accepted)':<44} {10:>6} images  {0.5:7.2f} s  {20:8.0f} images/s\")\n"
    )
    bench = ra.Benchmark("rates", str(script), "1 s", "nothing", produced="", parse=ra.parse_rates)
    outcome = ra.run_one(bench, ra.Context(results=tmp_path), [])
    assert outcome.status == "measured"
    report = json.loads((tmp_path / "rates.json").read_text())
    assert report["images_per_s"] == {"inbox add (all accepted)": 20.0}


def test_missing_prerequisites_skip_with_the_reason(tmp_path):
    ctx = ra.Context(project=tmp_path, results=tmp_path)
    assert "needs --project PATH" in ra.BY_NAME["loop_overhead"].why_not(ctx)
    ctx.project_given = True
    assert "build/gate/decision.json is missing" in ra.BY_NAME["loop_overhead"].why_not(ctx)
    outcome = ra.run_one(ra.BY_NAME["demo_serve"], ctx, [])
    assert outcome.status == "skipped" and "make demo" in outcome.why


# ------------------------------------------------------------------------------------------- baseline
def test_every_figure_names_a_script_and_a_key_it_writes():
    figures = ra.load_figures(ra.FIGURES)["figures"]
    assert figures
    for figure in figures:
        bench = ra.BY_NAME[figure["benchmark"]]
        source = (BENCH / bench.script).read_text()
        keys = figure["key"] if isinstance(figure["key"], list) else [figure["key"]]
        for key in keys:
            leaf = ra.leaf_name(key)
            assert f'"{leaf}"' in source or f"'{leaf}'" in source, f"{bench.script} never writes {leaf!r} ({key})"
        assert ra.judge(figure, figure["old"], figure["old"])[0] == "ok", figure["label"]


def test_every_benchmark_script_is_covered_or_excluded_with_a_reason():
    scripts = {p.name for p in BENCH.glob("*.py")} - {"shared.py", "run_all.py"}
    run = {b.script for b in ra.BENCHMARKS}
    assert all(reason.strip() for reason in ra.EXCLUDED.values())
    assert scripts - run - set(ra.EXCLUDED) == set(), "benchmark scripts neither run nor excluded"
    assert run <= scripts
    with_figures = {f["benchmark"] for f in ra.load_figures(ra.FIGURES)["figures"]}
    assert {b.name for b in ra.BENCHMARKS} - with_figures == set(), "benchmarks without figures in figures.json"
