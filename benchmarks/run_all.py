"""Re-measure every figure of benchmarks/README.md and print the recorded figure beside the new one.

Runs each benchmark script as its own process (with the arguments that produced the README's figures),
reads its JSON report, takes the figures listed in ``benchmarks/figures.json`` out of it and prints one
table: benchmark, figure, old (the README's figure, the committed baseline), new, the change and a mark:

* ``ok``: within the figure's tolerance (``"20%"`` of the old figure, or an absolute amount in its unit);
* ``better`` / ``REGRESSED``: beyond it, in the figure's good (``lower`` / ``higher``) or bad direction;
* ``CHANGED``: a figure that must stay the same (``equal``: decisions, counts, deterministic quality) differs.

    .venv/bin/python benchmarks/run_all.py [--only NAME,...] [--skip NAME,...] [--project PATH]
        [--no-run] [--update] [--json OUT] [--list] [--extra NAME=ARGS] [--results DIR]

``make bench`` runs it (``BENCH_ARGS="..."``). ``--no-run`` only compares the reports already in
``build/benchmarks/``; a benchmark whose prerequisites are missing (a project after ``make demo``, the
team stack's PostgreSQL and SLURM, ...) is reported as skipped with the reason. ``--update`` writes the
new figures into figures.json as the new baseline.

Exit code: 0 every figure within its tolerance; 1 a figure regressed or changed; 2 a benchmark failed to
run, wrote no report, or its report lacks a figure (2 wins over 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from shared import BIN, bin_env, load_average, write_report

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
FIGURES = HERE / "figures.json"
RESULTS = ROOT / "build" / "benchmarks"
DIRECTIONS = ("lower", "higher", "equal")
REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "min": min,
    "max": max,
    "mean": statistics.fmean,
    "sum": math.fsum,
}
TAIL_LINES = 15

# Benchmark scripts in this folder that run_all does not run, with the reason (shared.py and run_all.py
# are not benchmarks). Every other script must have figures in figures.json.
EXCLUDED: dict[str, str] = {}


# ------------------------------------------------------------------------------------------ key paths
class FigureMissing(Exception):
    """A figure's key is not in the report; the message names the key and what the report has there."""


_SELECTOR = re.compile(r"\[([^\[\]]*)\]")


def split_key(key: str) -> list[str]:
    """``a.b[x=1.5].c`` -> ``["a", "b[x=1.5]", "c"]``: dots inside brackets do not separate."""
    parts, depth, current = [], 0, ""
    for char in key:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_key(key: str) -> list[tuple[str, object]]:
    """The steps of a key path: ``("key", name)``, ``("index", i)``, ``("all", None)``, ``("match", (k, v))``.

    Syntax: names separated by dots; after a name, ``[3]`` / ``[-1]`` (list index), ``[*]`` (every item)
    or ``[field=value]`` (the items whose ``field`` reads ``value``), e.g. ``rows[key=base].holdout_detection``.
    """
    steps: list[tuple[str, object]] = []
    for part in split_key(key):
        name = part.split("[", 1)[0]
        selectors = part[len(name) :]
        if not part or "]" in name or _SELECTOR.sub("", selectors):
            raise ValueError(f"bad key path {key!r}: cannot read {part!r}")
        if name:
            steps.append(("key", name))
        for selector in _SELECTOR.findall(selectors):
            if selector == "*":
                steps.append(("all", None))
            elif re.fullmatch(r"-?\d+", selector):
                steps.append(("index", int(selector)))
            elif "=" in selector:
                steps.append(("match", tuple(selector.split("=", 1))))
            else:
                raise ValueError(f"bad key path {key!r}: selector [{selector}] is not [N], [*] or [field=value]")
    return steps


def leaf_name(key: str) -> str:
    """The last name of a key path (``rows[key=base].anchor_test_map50`` -> ``anchor_test_map50``)."""
    names = [arg for kind, arg in parse_key(key) if kind == "key"]
    if not names:
        raise ValueError(f"bad key path {key!r}: no name in it")
    return str(names[-1])


def _listed(value: object) -> str:
    if isinstance(value, dict):
        shown = ", ".join(list(map(str, value))[:12])
        return f"it has: {shown}" + (", ..." if len(value) > 12 else "")
    return f"it is a {type(value).__name__}"


def lookup(report: object, key: str) -> tuple[list[object], bool]:
    """The values at ``key`` in ``report`` and whether the path selected several items."""
    values: list[tuple[object, str]] = [(report, "")]
    many = False
    for kind, arg in parse_key(key):
        following: list[tuple[object, str]] = []
        for value, where in values:
            here = repr(where) if where else "the top level"
            if kind == "key":
                if not isinstance(value, dict) or arg not in value:
                    raise FigureMissing(f"no {arg!r} under {here} ({_listed(value)})")
                following.append((value[arg], f"{where}.{arg}" if where else str(arg)))
                continue
            if not isinstance(value, list):
                raise FigureMissing(f"{here} is not a list ({_listed(value)})")
            if kind == "index":
                if not -len(value) <= arg < len(value):
                    raise FigureMissing(f"{here} has {len(value)} items, no item [{arg}]")
                following.append((value[arg], f"{where}[{arg}]"))
            elif kind == "all":
                many = True
                following.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
            else:
                name, wanted = arg
                found = [item for item in value if isinstance(item, dict) and str(item.get(name)) == wanted]
                if not found:
                    seen = sorted({str(item.get(name)) for item in value if isinstance(item, dict)})
                    raise FigureMissing(f"no item of {here} with {name}={wanted} ({name} values: {', '.join(seen)})")
                many = many or len(found) > 1
                following.extend((item, f"{where}[{name}={wanted}]") for item in found)
        values = following
    return [value for value, _ in values], many


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def figure_value(report: object, entry: dict) -> object:
    """The figure ``entry`` names in ``report``: one value, or several reduced by ``entry["reduce"]``
    (default median; a list of numbers at the key counts as several values)."""
    keys = entry["key"] if isinstance(entry["key"], list) else [entry["key"]]
    collected: list[object] = []
    several = len(keys) > 1
    for key in keys:
        values, many = lookup(report, key)
        several = several or many
        for value in values:
            if isinstance(value, list) and value and all(map(is_number, value)):
                collected.extend(value)
                several = True
            else:
                collected.append(value)
    if not several:
        return collected[0]
    if not collected or not all(map(is_number, collected)):
        return collected
    reduce = entry.get("reduce", "median")
    if reduce not in REDUCERS:
        raise ValueError(f"figure {entry['label']!r}: reduce {reduce!r} is not one of {', '.join(REDUCERS)}")
    return REDUCERS[reduce](collected)


# ----------------------------------------------------------------------------------------- judging
def cpu_name() -> str:
    """This machine's CPU model (``model name`` in /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def baseline_key(entry: dict, cpu: str) -> str:
    """Where the old figure of ``entry`` is for this CPU: ``old``, or ``old_by_cpu.<part of the CPU name>``
    (quality figures are deterministic per CPU family, not across families)."""
    for part in entry.get("old_by_cpu", {}):
        if part.lower() in cpu.lower():
            return part
    return ""


def old_value(entry: dict, cpu: str) -> object:
    part = baseline_key(entry, cpu)
    return entry["old_by_cpu"][part] if part else entry["old"]


def allowed(entry: dict, old: float) -> float:
    """The tolerance in the figure's unit: ``"20%"`` of the old figure, or an absolute amount."""
    tolerance = entry.get("tolerance", 0)
    if isinstance(tolerance, str):
        if not tolerance.endswith("%"):
            raise ValueError(f"figure {entry['label']!r}: tolerance {tolerance!r} is not a number or 'N%'")
        return abs(old) * float(tolerance[:-1]) / 100
    return float(tolerance)


def judge(entry: dict, old: object, new: object) -> tuple[str, str]:
    """``(mark, change)`` of ``new`` against ``old``: mark ok / better / REGRESSED / CHANGED."""
    direction = entry.get("direction", "equal")
    if direction not in DIRECTIONS:
        raise ValueError(f"figure {entry['label']!r}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if not (is_number(old) and is_number(new)):
        return ("ok", "") if new == old else ("CHANGED", "differs")
    if math.isnan(new):
        return "REGRESSED", "not a number"
    slack = allowed(entry, old)
    if isinstance(entry.get("tolerance"), str) and old:
        change = f"{new / old:.2f}x"
    elif slack:
        change = f"{new - old:+.{max(0, math.ceil(-math.log10(slack))) + 1}f}"
    else:
        change = f"{new - old:+.6g}"
    if abs(new - old) <= slack + 1e-12:
        return "ok", change
    if direction == "equal":
        return "CHANGED", change
    worse = new > old if direction == "lower" else new < old
    return ("REGRESSED" if worse else "better"), change


# ------------------------------------------------------------------------------------ the benchmarks
@dataclass
class Context:
    project: Path = ROOT
    project_given: bool = False
    results: Path = RESULTS


def _demo_done(ctx: Context) -> str | None:
    if not (ctx.project / "build" / "gate" / "decision.json").is_file():
        missing = ctx.project / "build" / "gate" / "decision.json"
        return f"needs a project where `make demo` has run ({missing} is missing; --project)"
    return None


def _base_weights(ctx: Context) -> str | None:
    if not any((ctx.project / "build" / "base" / "runs").glob("*/weights/best.pt")):
        return f"needs the demo base weights ({ctx.project}/build/base/runs/*/weights/best.pt): `make demo` first"
    return _demo_done(ctx)


def _empty_store(ctx: Context) -> str | None:
    if not (ctx.project / "dvc.yaml").is_file():
        return f"{ctx.project} is not a detloop project (no dvc.yaml)"
    store = ctx.project / "mlruns" / "mlflow.db"
    if store.exists():
        return f"times `make demo` from an empty MLflow store, {store} exists (--project of a fresh clone)"
    return None


def _scratch_project(ctx: Context) -> str | None:
    if not ctx.project_given:
        return "needs --project PATH: a scratch clone where `make demo` has run (it re-records that registry)"
    return _demo_done(ctx)


def _module(name: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec(name) else f"needs the Python package {name} (make install)"

    return check


def _tools(*names: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        missing = [n for n in names if not ((BIN / n).is_file() or shutil.which(n))]
        return f"needs {', '.join(missing)} (not beside {sys.executable} nor on PATH)" if missing else None

    return check


def _team_deps(ctx: Context) -> str | None:
    settings = ROOT / "conf" / "team" / "default.yaml"
    found = re.search(r"^postgres_bin:\s*(\S+)", settings.read_text(), re.M) if settings.is_file() else None
    initdb = Path(found.group(1) if found else "/usr/lib/postgresql/15/bin") / "initdb"
    missing = [] if initdb.is_file() else [str(initdb)]
    missing += [n for n in ("munged", "slurmctld", "slurmd", "sinfo", "srun", "sbatch") if not shutil.which(n)]
    return f"needs the team stack deps (`make team-deps`): {', '.join(missing)} missing" if missing else None


def _git_checkout(ctx: Context) -> str | None:
    if not shutil.which("git") or not (ROOT / ".git").exists():
        return f"needs git and {ROOT} as a git checkout (it clones it)"
    return None


def _all(*checks: Callable[[Context], str | None]) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        return next((why for c in checks if (why := c(ctx))), None)

    return check


RATE_LINE = re.compile(r"^(?P<label>\S.*?)\s+(?P<n>\d+) images\s+(?P<s>[\d.]+) s\s+(?P<rate>[\d.]+) images/s$")


def parse_rates(stdout: str) -> dict:
    """``inbox_add.py``'s printed lines (``label  N images  S s  R images/s``) as a report."""
    found = [m for line in stdout.splitlines() if (m := RATE_LINE.match(line.strip()))]
    if not found:
        raise ValueError("no `... images  ... s  ... images/s` line in its output")
    return {
        "images_per_s": {m["label"]: float(m["rate"]) for m in found},
        "seconds": {m["label"]: float(m["s"]) for m in found},
        "images": {m["label"]: int(m["n"]) for m in found},
    }


@dataclass(frozen=True)
class Benchmark:
    """One benchmark run. ``args`` and ``produced`` may name ``{results}``, ``{project}``, ``{workdir}``
    (a temporary folder, removed after the run) and ``{root}``; ``produced`` is where the script writes
    its report, copied to ``<results>/<name>.json`` (default: the value of its ``--out`` / ``--output``
    argument, else ``build/benchmarks/<name>.json``). ``in_project``: run in the project (``--project``)."""

    name: str
    script: str
    duration: str
    needs: str
    args: tuple[str, ...] = ()
    produced: str | None = None
    in_project: bool = False
    check: Callable[[Context], str | None] | None = None
    parse: Callable[[str], dict] | None = None
    uses_workdir: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.produced is None:
            flags = [i for i, a in enumerate(self.args[:-1]) if a in ("--out", "--output")]
            written = self.args[flags[0] + 1] if flags else "{root}/build/benchmarks/{name}.json"
            object.__setattr__(self, "produced", written)
        object.__setattr__(self, "uses_workdir", any("{workdir}" in a for a in (*self.args, self.produced)))

    def why_not(self, ctx: Context) -> str | None:
        return self.check(ctx) if self.check else None


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "demo_run",
        "demo_run.py",
        "7-9 min",
        "a project with the environment installed and an empty MLflow store: runs `make demo`'s steps there",
        ("--out", "{results}/demo_run.json"),
        in_project=True,
        check=_empty_store,
    ),
    Benchmark(
        "demo_gates",
        "demo_gates.py",
        "2-3 min",
        "a project where `make demo` has run (the drill moves production and gives it back)",
        ("--check",),
        produced="{project}/build/benchmarks/demo_gates.json",
        in_project=True,
        check=_demo_done,
    ),
    Benchmark(
        "demo_serve",
        "demo_serve.py",
        "1-2 min",
        "a project where `make demo` and the gate drill have run",
        ("--check",),
        produced="{project}/build/benchmarks/demo_serve.json",
        in_project=True,
        check=_demo_done,
    ),
    Benchmark(
        "gate_metrics",
        "gate_metrics.py",
        "3-5 min",
        "a project where `make demo` has run (the base weights and the anchor-test pages)",
        ("--skip-fiftyone", "--out", "{results}/gate_metrics.json"),
        in_project=True,
        check=_base_weights,
    ),
    Benchmark(
        "gate_metrics_fiftyone",
        "gate_metrics.py",
        "5-8 min",
        "a project where `make demo` has run; FiftyOne",
        ("--images", "500", "--skip-inference", "--out", "{results}/gate_metrics_fiftyone.json"),
        in_project=True,
        check=_all(_module("fiftyone"), _base_weights),
    ),
    Benchmark(
        "loop_overhead",
        "loop_overhead.py",
        "2-3 min",
        "--project: a scratch clone where `make demo` has run",
        ("--project", "{project}", "--out", "{results}/loop_overhead.json"),
        check=_scratch_project,
    ),
    Benchmark(
        "demo_learnability",
        "demo_learnability.py",
        "8-12 min",
        "nothing (trains the base and the fine-tune in a temporary folder)",
        ("--workdir", "{workdir}", "--finetune"),
        produced="{workdir}/report.json",
    ),
    Benchmark(
        "forgetting",
        "forgetting.py",
        "about 21 min",
        "nothing (trains the base and 7 fine-tunes in a temporary folder)",
        ("--workdir", "{workdir}", "--output", "{results}/forgetting.json"),
    ),
    Benchmark(
        "demo_search",
        "demo_search.py",
        "13-15 min",
        "git (clones this checkout's HEAD and runs `dvc repro` on the strong-shift data)",
        ("--workdir", "{workdir}", "--check", "--output", "{results}/demo_search.json"),
        check=_git_checkout,
    ),
    Benchmark(
        "review_queue",
        "review_queue.py",
        "3-5 min",
        "nothing (trains a 5-epoch base in a temporary folder)",
        ("--inbox", "1000", "--epochs", "5", "--imgsz", "160", "320", "--output", "{results}/review_queue.json"),
    ),
    Benchmark(
        "mix_scale",
        "mix_scale.py",
        "2-5 min",
        "FiftyOne (its bundled mongod, for the FiftyOne route)",
        check=_module("fiftyone"),
    ),
    Benchmark("serve_load", "serve_load.py", "about 2 min", "nothing", ("--requests", "1000")),
    Benchmark(
        "serve_load_workers",
        "serve_load.py",
        "about 2 min",
        "nothing",
        ("--requests", "1000", "--workers", "2", "--out", "{root}/build/benchmarks/serve_load_workers.json"),
    ),
    Benchmark("monitor_scale", "monitor_scale.py", "about 3 min", "nothing (a 525 MB log in a temporary folder)"),
    Benchmark(
        "fiftyone_load",
        "fiftyone_load.py",
        "2-4 min",
        "FiftyOne (a private mongod)",
        ("--samples", "5000"),
        check=_module("fiftyone"),
    ),
    Benchmark(
        "inbox_add",
        "inbox_add.py",
        "under 1 min",
        "nothing (its printed lines are the report)",
        ("--n", "1000"),
        produced="",
        parse=parse_rates,
    ),
    Benchmark(
        "inbox_add_pages",
        "inbox_add.py",
        "under 1 min",
        "nothing (its printed lines are the report)",
        ("--n", "1000", "--width", "256", "--height", "320"),
        produced="",
        parse=parse_rates,
    ),
    Benchmark(
        "dvc_remote",
        "dvc_remote.py",
        "1-3 min",
        "moto_server (the project's extras) and git",
        ("--repeat", "3"),
        check=_tools("moto_server", "git"),
    ),
    Benchmark(
        "team",
        "team.py",
        "5-8 min",
        "the team stack deps: PostgreSQL 15 and SLURM (`make team-deps`)",
        check=_team_deps,
    ),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


# -------------------------------------------------------------------------------------------- runs
@dataclass
class Outcome:
    """What became of one benchmark: ``measured`` (its report is read), ``skipped`` or ``failed``."""

    name: str
    status: str
    why: str = ""
    report: Path | None = None
    seconds: float | None = None
    extra: list[str] = field(default_factory=list)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace").rstrip() if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_one(bench: Benchmark, ctx: Context, extra: list[str]) -> Outcome:
    """Run ``bench`` as its own process; its report ends up in ``<results>/<name>.json``."""
    why = bench.why_not(ctx)
    if why:
        return Outcome(bench.name, "skipped", why)
    stored = ctx.results / f"{bench.name}.json"
    logs = ctx.results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / f"{bench.name}.log", logs / f"{bench.name}.err.log"
    workdir = Path(tempfile.mkdtemp(prefix=f"detloop-bench-{bench.name}-")) if bench.uses_workdir else None
    names = {"results": ctx.results, "project": ctx.project, "workdir": workdir, "root": ROOT, "name": bench.name}
    cwd = ctx.project if bench.in_project else ROOT
    cmd = [sys.executable, str(HERE / bench.script), *(a.format(**names) for a in bench.args), *extra]
    env = {
        **bin_env(),
        "DETLOOP_ROOT": str(cwd),
        "YOLO_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    print(f"{bench.name}: running ({bench.duration}): {shlex.join(cmd[1:])}  [log {out_log}]", flush=True)
    started = time.time()
    try:
        with out_log.open("w") as out, err_log.open("w") as err:
            code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=err, check=False).returncode
        seconds = round(time.time() - started, 1)
        if code != 0:
            detail = tail(err_log) or tail(out_log)
            return Outcome(bench.name, "failed", f"exit {code} after {seconds:.0f} s; stderr:\n{detail}", None, seconds)
        if bench.parse is not None:
            try:
                write_report(stored, bench.parse(out_log.read_text(errors="replace")))
            except ValueError as error:
                return Outcome(bench.name, "failed", f"exit 0, but its output gives no report: {error}", None, seconds)
        else:
            produced = Path(bench.produced.format(**names))
            if not produced.is_file() or produced.stat().st_mtime < started - 1:
                return Outcome(bench.name, "failed", f"exit 0, but it wrote no new report at {produced}", None, seconds)
            if produced.resolve() != stored.resolve():
                stored.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(produced, stored)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{bench.name}: done in {seconds:.0f} s", flush=True)
    return Outcome(bench.name, "measured", report=stored, seconds=seconds, extra=extra)


def read_existing(bench: Benchmark, ctx: Context) -> Outcome:
    stored = ctx.results / f"{bench.name}.json"
    if not stored.is_file():
        return Outcome(bench.name, "skipped", f"no report at {stored} (run it without --no-run)")
    return Outcome(bench.name, "measured", report=stored)


# -------------------------------------------------------------------------------------- comparison
@dataclass
class Row:
    benchmark: str
    label: str
    unit: str
    old: object = None
    new: object = None
    change: str = ""
    mark: str = ""


def compare(outcome: Outcome, entries: list[dict], cpu: str) -> tuple[list[Row], list[str]]:
    """The table rows of one benchmark's figures, and what went wrong reading them (missing keys)."""
    rows, problems = [], []
    if outcome.status != "measured":
        return [Row(outcome.name, f"({len(entries)} figures)", "", mark=f"{outcome.status}")], problems
    try:
        report = json.loads(outcome.report.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [Row(outcome.name, f"({len(entries)} figures)", "", mark="unreadable")], [f"{outcome.report}: {error}"]
    for entry in entries:
        old = old_value(entry, cpu)
        row = Row(outcome.name, entry["label"], entry.get("unit", ""), old=old)
        try:
            row.new = figure_value(report, entry)
        except FigureMissing as error:
            row.mark = "missing"
            problems.append(f"{outcome.report}: figure {entry['label']!r}, key {entry['key']!r}: {error}")
        else:
            row.mark, row.change = judge(entry, old, row.new)
        rows.append(row)
    return rows, problems


def show(value: object) -> str:
    if value is None:
        return "-"
    if is_number(value):
        if isinstance(value, int) or abs(value) >= 1e5:
            return f"{value:,.0f}" if abs(value) >= 1e4 else str(round(value))
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value


def table(rows: list[Row], width: int = 72) -> str:
    head = ("benchmark", "figure", "old", "new", "change", "mark")
    cells = []
    for r in rows:
        label = r.label if len(r.label) <= width else r.label[: width - 1] + "…"
        unit = f" {r.unit}" if r.unit and r.old is not None and is_number(r.old) else ""
        new_unit = unit if r.new is not None and is_number(r.new) else ""
        old = show(r.old) + unit if r.old is not None else ""
        new = show(r.new) + new_unit if r.new is not None else ""
        cells.append((r.benchmark, label, old, new, r.change, r.mark))
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) for i in range(len(head))).rstrip() for c in [head, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- baseline
def load_figures(path: Path) -> dict:
    """figures.json, checked: every entry names a known benchmark, a readable key path and a direction."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: cannot read the baseline: {error}") from error
    for i, entry in enumerate(data.get("figures", [])):
        where = f"{path}: figures[{i}] ({entry.get('label', '?')!r})"
        missing = [k for k in ("benchmark", "key", "label", "old", "direction") if k not in entry]
        if missing:
            raise SystemExit(f"{where}: no {', '.join(missing)}")
        if entry["benchmark"] not in BY_NAME:
            raise SystemExit(f"{where}: unknown benchmark {entry['benchmark']!r} (known: {', '.join(BY_NAME)})")
        if entry["direction"] not in DIRECTIONS:
            raise SystemExit(f"{where}: direction {entry['direction']!r} is not one of {', '.join(DIRECTIONS)}")
        if entry.get("reduce", "median") not in REDUCERS:
            raise SystemExit(f"{where}: reduce {entry['reduce']!r} is not one of {', '.join(REDUCERS)}")
        try:
            for key in entry["key"] if isinstance(entry["key"], list) else [entry["key"]]:
                parse_key(key)
            allowed(entry, 1.0)
        except ValueError as error:
            raise SystemExit(f"{where}: {error}") from error
    return data


def update_baseline(path: Path, data: dict, outcomes: dict[str, Outcome], values: dict[int, object], cpu: str) -> int:
    """Write the new figures of the benchmarks measured with their reference arguments; how many changed."""
    changed = 0
    for i, entry in enumerate(data["figures"]):
        outcome = outcomes.get(entry["benchmark"])
        if outcome is None or outcome.status != "measured" or outcome.extra or i not in values:
            continue
        new = values[i]
        new = round(new, 6) if isinstance(new, float) else new
        part = baseline_key(entry, cpu)
        if part:
            changed += entry["old_by_cpu"][part] != new
            entry["old_by_cpu"][part] = new
        else:
            changed += entry["old"] != new
            entry["old"] = new
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return changed


# -------------------------------------------------------------------------------------------- main
def names_option(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    return names


def extra_option(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, args = item.partition("=")
        if not sep:
            raise SystemExit(f"--extra {item!r}: expected NAME=ARGS, e.g. mix_scale=--quick")
        names_option(name)
        out.setdefault(name, []).extend(shlex.split(args))
    return out


def list_benchmarks(figures: dict, ctx: Context) -> None:
    counts = {b.name: sum(e["benchmark"] == b.name for e in figures["figures"]) for b in BENCHMARKS}
    for bench in BENCHMARKS:
        why = bench.why_not(ctx)
        args = " ".join(bench.args)
        print(f"{bench.name}  ({bench.duration}, {counts[bench.name]} figures)  benchmarks/{bench.script} {args}")
        print(f"    needs: {bench.needs}")
        print(f"    {'ready' if why is None else 'not ready now: ' + why}")
    print(
        "\nThey run in this order, each checked just before it runs: after demo_run's `make demo` steps the"
        " project is ready for demo_gates, demo_serve and gate_metrics."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these benchmarks")
    parser.add_argument("--skip", metavar="NAME[,NAME]", help="leave these benchmarks out")
    parser.add_argument("--project", type=Path, help="a project after `make demo` for the benchmarks that need one")
    parser.add_argument("--no-run", action="store_true", help="only compare the reports already in --results")
    parser.add_argument("--update", action="store_true", help="write the new figures into figures.json")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the comparison as JSON to OUT")
    parser.add_argument("--list", action="store_true", help="list the benchmarks, durations and prerequisites")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="more arguments for one benchmark, e.g. mix_scale=--quick (not the reference run: --update leaves it)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"the reports' folder (default {RESULTS})")
    parser.add_argument("--figures", type=Path, default=FIGURES, help=f"the baseline (default {FIGURES})")
    args = parser.parse_args(argv)
    ctx = Context(
        project=(args.project or ROOT).resolve(), project_given=args.project is not None, results=args.results.resolve()
    )
    figures = load_figures(args.figures)
    if args.list:
        list_benchmarks(figures, ctx)
        return 0
    only, skip, extra = names_option(args.only), names_option(args.skip), extra_option(args.extra)
    chosen = [b for b in BENCHMARKS if (not only or b.name in only) and b.name not in skip]
    cpu, load_start = cpu_name(), load_average()
    outcomes: dict[str, Outcome] = {}
    for bench in chosen:
        if args.no_run:
            outcomes[bench.name] = read_existing(bench, ctx)
        else:
            outcomes[bench.name] = run_one(bench, ctx, extra.get(bench.name, []))
    rows: list[Row] = []
    problems: list[str] = []
    values: dict[int, object] = {}
    for bench in chosen:
        indexed = [(i, e) for i, e in enumerate(figures["figures"]) if e["benchmark"] == bench.name]
        got, missing = compare(outcomes[bench.name], [e for _, e in indexed], cpu)
        rows += got
        problems += missing
        if outcomes[bench.name].status == "measured":
            values.update({i: r.new for (i, _), r in zip(indexed, got, strict=True) if r.mark != "missing"})

    print()
    print(f"old: {args.figures.name} (README figures; {figures.get('machine', 'reference machine')})")
    print(f"new: {ctx.results} on {cpu}, {os.cpu_count()} cores, load average {load_start} -> {load_average()}")
    print()
    print(table(rows))
    failed = [o for o in outcomes.values() if o.status == "failed"]
    notes = []
    for outcome in outcomes.values():
        if outcome.status == "skipped":
            notes.append(f"{outcome.name}: skipped: {outcome.why}")
        elif outcome.status == "failed":
            notes.append(f"{outcome.name}: FAILED: {outcome.why}")
        elif outcome.extra:
            notes.append(f"{outcome.name}: run with extra arguments {shlex.join(outcome.extra)}: not the reference run")
        elif args.no_run and outcome.report:
            stamp = datetime.fromtimestamp(outcome.report.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            notes.append(f"{outcome.name}: report of {stamp}")
    notes += [f"missing figure: {problem}" for problem in problems]
    if notes:
        print("\n" + "\n".join(notes))
    marks = [r.mark for r in rows]
    regressed = sum(m in ("REGRESSED", "CHANGED") for m in marks)
    print(
        f"\n{sum(m == 'ok' for m in marks)} ok, {sum(m == 'better' for m in marks)} better, {regressed} regressed or "
        f"changed, {len(problems)} missing; {len(failed)} benchmark(s) failed, "
        f"{sum(o.status == 'skipped' for o in outcomes.values())} skipped"
    )
    code = 2 if failed or problems else 1 if regressed else 0
    if args.update:
        changed = update_baseline(args.figures, figures, outcomes, values, cpu)
        print(f"updated {args.figures}: {changed} figure(s) changed")
        code = 2 if failed or problems else 0
    if args.json:
        result = {
            "cpu": cpu,
            "load_average": [load_start, load_average()],
            "benchmarks": {
                o.name: {"status": o.status, "why": o.why, "seconds": o.seconds, "extra": o.extra}
                for o in outcomes.values()
            },
            "figures": [r.__dict__ for r in rows],
            "problems": problems,
            "exit": code,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
