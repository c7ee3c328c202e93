"""The team stack's cost against the project's SQLite store: stage overhead, service memory, sweeps.

Starts the local team stack (`detloop.team.stack.TeamStack`: PostgreSQL 15, moto S3, `mlflow server
--app-name basic-auth` with artifacts proxied to S3, and a single-node SLURM unless `--no-slurm`) in a
temporary folder, makes tiny copies of the working tree (`tests.e2e.test_pipeline.copy_working_tree`:
the tiny demo data, base 1 epoch at 64 px) and measures, SQLite and server runs interleaved:

* start-up: the wall time of one process that composes the config, runs `runs.setup(cfg)` and opens and
  closes one stage run (`runs.stage_run`), with its phases timed inside; the first one on a new store
  apart from the `--repeat` ones after it;
* per-epoch logging: `--calls` `MlflowClient().log_batch` calls of 20 metrics into one run, with one
  client (and with a new client per call, as `EpochLogger` does), per call in ms;
* the tiny base stage end to end (`python -m detloop.base`; on the server the model goes through the
  proxy into S3), and the part of its run after training (training files, model logging, registration);
* RSS and PSS of every service after the base runs, and again after the sweeps;
* a 2-job sweep of the tiny base (`base.train.lr0=0.01,0.02`) against the server with Hydra's basic
  launcher (sequential), `submitit_local` and `submitit_slurm`, each launcher in its own tiny copy.

Writes build/benchmarks/team.json and prints the tables (5-8 min on 2 cores). Every process it starts
stops with the stack (the sweeps run in their own session and are killed by group if they outlive a
timeout).

    .venv/bin/python benchmarks/team.py [--repeat 3] [--base-repeat 3] [--sweep-repeat 3] [--no-slurm]
                                        [--workdir EMPTY_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared import load_average, write_report

ROOT = Path(__file__).resolve().parents[1]
ENV0 = dict(os.environ)  # before `import detloop` adds its own variables (YOLO_CONFIG_DIR of this checkout)
MARK = "BENCH-RESULT "
CLIENT_VARS = ("DETLOOP_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
METRICS = [  # what one epoch of EpochLogger logs (losses, val metrics, learning rates), padded to 20
    *(f"train/{k}_loss" for k in ("box", "cls", "dfl")),
    *(f"val/{k}_loss" for k in ("box", "cls", "dfl")),
    *(f"metrics/{k}B" for k in ("precision", "recall", "mAP50", "mAP50-95")),
    *(f"lr/pg{i}" for i in range(3)),
    *(f"extra/m{i}" for i in range(7)),
]
SWEEP = "base.train.lr0=0.01,0.02"


# --------------------------------------------------------------------------- the probe (a child process)


def probe(kind: str, overrides: list[str], calls: int) -> None:
    """Run in a tiny copy: ``startup`` (setup + one stage run) or ``log-batch``; prints its timings."""
    t0 = time.perf_counter()
    import mlflow
    import torch  # noqa: F401  (stage_run's device tags import it: a cost of any stage, not of the store)

    from detloop.core.config import compose
    from detloop.tracking import runs

    t1 = time.perf_counter()
    cfg = compose(overrides)
    t2 = time.perf_counter()
    experiment_id = runs.setup(cfg)
    t3 = time.perf_counter()
    if kind == "startup":
        with runs.stage_run(cfg, "evaluate", experiment_id, run_name="bench start-up"):
            pass
        t4 = time.perf_counter()
        out = {"imports_s": t1 - t0, "compose_s": t2 - t1, "setup_s": t3 - t2, "stage_run_s": t4 - t3}
    else:
        from mlflow.entities import Metric

        client = mlflow.MlflowClient()
        run_id = client.create_run(experiment_id, run_name="bench log_batch").info.run_id
        uri = mlflow.get_tracking_uri()
        out = {"one_client": [], "client_per_call": []}
        for step in range(calls):  # the two ways alternate, so both see the same server and machine state
            for variant, times in out.items():
                now = int(time.time() * 1000)
                batch = [Metric(key, 0.5 + step / 100 + i / 1000, now, step) for i, key in enumerate(METRICS)]
                start = time.perf_counter()
                (client if variant == "one_client" else mlflow.MlflowClient(tracking_uri=uri)).log_batch(
                    run_id, metrics=batch
                )
                times.append((time.perf_counter() - start) * 1000)
        client.set_terminated(run_id)
    print(MARK + json.dumps({k: v if isinstance(v, list) else round(v, 3) for k, v in out.items()}))


# --------------------------------------------------------------------------- helpers


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's environment before detloop touched it, without any store or login, plus ``extra``."""
    env = {k: v for k, v in ENV0.items() if k not in CLIENT_VARS and not k.startswith(("AWS_", "SLURM_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra or {})
    return env


def run(cwd: Path, cmd: list[str], env: dict[str, str], timeout: float = 1800.0) -> tuple[float, str]:
    """Run ``cmd`` in its own session; its wall time (s) and stdout. Killed by group after ``timeout``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} exited {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}")
    return round(seconds, 2), out


def tiny_copy(dest: Path) -> Path:
    """A tiny copy of the working tree as its own git repository, with the tiny demo data."""
    sys.path.insert(0, str(ROOT))
    from tests.e2e.test_pipeline import copy_working_tree

    copy_working_tree(dest)
    env = child_env()
    run(dest, ["git", "init", "-q", "-b", "main"], env)
    run(dest, ["detloop", "demo-data"], env)
    return dest


def probe_once(repo: Path, kind: str, store: dict, calls: int) -> tuple[float, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", kind, "--calls", str(calls), *store["overrides"]]
    seconds, out = run(repo, cmd, store["env"], timeout=600)
    line = next(x for x in out.splitlines() if x.startswith(MARK))
    return seconds, json.loads(line.removeprefix(MARK))


def span(values: list[float], digits: int = 2) -> dict:
    return {k: round(f(values), digits) for k, f in (("min", min), ("median", statistics.median), ("max", max))}


def base_run(repo: Path, store: dict) -> dict:
    """``python -m detloop.base`` end to end; the run's own duration and its part after training, from the store."""
    import mlflow

    seconds, _ = run(repo, [sys.executable, "-m", "detloop.base", *store["overrides"]], store["env"])
    model = json.loads((repo / "build" / "base" / "model.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=store["uri"])
    info = client.get_run(model["run_id"]).info
    final = client.get_metric_history(model["run_id"], "final/metrics/mAP50B")
    trained = max(m.timestamp for m in final)  # the final validation of best.pt: training ends here
    return {
        "wall_s": seconds,
        "run_s": round((info.end_time - info.start_time) / 1000, 2),
        "after_training_s": round((info.end_time - trained) / 1000, 2),
        "version": model["version"],
    }


def sweep_run(repo: Path, launcher: str, stack, env: dict) -> dict:
    """One 2-job sweep of the tiny base against the server; its wall time and the jobs' runs."""
    import mlflow

    args = ["mlflow=server", SWEEP]
    if launcher == "submitit_local":
        args = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", *args]
    elif launcher == "submitit_slurm":
        partition = stack.state["settings"]["slurm"]["partition"]
        args = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}"]
        args += ["hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "mlflow=server", SWEEP]
    started = int(time.time() * 1000)
    seconds, _ = run(repo, [sys.executable, "-m", "detloop.base", "-m", *args], env, timeout=2400)
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("detloop").experiment_id
    found = client.search_runs(
        [experiment], filter_string=f"tags.stage = 'base' and attributes.start_time >= {started}"
    )
    jobs = [r.info for r in found if r.data.tags.get("mlflow.parentRunId")]
    if len(jobs) != 2 or any(j.status != "FINISHED" for j in jobs):
        raise SystemExit(f"{launcher}: expected 2 finished job runs, found {[(j.run_id, j.status) for j in jobs]}")
    jobs.sort(key=lambda j: j.start_time)
    first, last = jobs[0].start_time, max(j.end_time for j in jobs)
    return {
        "wall_s": seconds,
        "job_run_s": [round((j.end_time - j.start_time) / 1000, 1) for j in jobs],  # in start order
        "start_to_first_job_s": round((first - started) / 1000, 1),  # launch to the first job's run start
        "jobs_span_s": round((last - first) / 1000, 1),  # first job run start to last job run end
        "after_last_job_s": round(seconds - (last - started) / 1000, 1),  # last run end to the launcher's exit
        "overlap_s": round(max(0, min(j.end_time for j in jobs) - max(j.start_time for j in jobs)) / 1000, 1),
    }


def memory(stack) -> dict:
    rss, pss = stack.rss_mb("Rss"), stack.rss_mb("Pss")
    return {name: {"rss_mb": rss[name], "pss_mb": pss[name]} for name in rss}


# --------------------------------------------------------------------------- the benchmark


def measure(work: Path, args) -> dict:
    from detloop.team.stack import TeamStack

    load = {"start": load_average()}
    copies = {name: tiny_copy(work / name) for name in ("stages", "sweep-basic", "sweep-submitit_local")}
    if not args.no_slurm:
        copies["sweep-submitit_slurm"] = tiny_copy(work / "sweep-submitit_slurm")
    repo = copies["stages"]
    start = time.perf_counter()
    with TeamStack.up(work / "stack", slurm=not args.no_slurm) as stack:
        up_s = round(time.perf_counter() - start, 1)
        os.environ["MLFLOW_TRACKING_USERNAME"] = stack.env["MLFLOW_TRACKING_USERNAME"]  # this process's reads
        os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.env["MLFLOW_TRACKING_PASSWORD"]
        stores = {
            "sqlite": {"uri": f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}", "overrides": [], "env": child_env()},
            "server": {"uri": stack.mlflow_uri, "overrides": ["mlflow=server"], "env": child_env(stack.env)},
        }
        result = {
            "stack_up_s": up_s,
            "service_startup_s": {p["name"]: p["extra"].get("startup_s") for p in stack.state["services"]},
        }
        startup = {name: {"first": None, "repeats": []} for name in stores}
        logging_ms = {name: [] for name in stores}
        for index in range(args.repeat + 1):
            for name, store in stores.items():
                seconds, phases = probe_once(repo, "startup", store, args.calls)
                row = {"wall_s": seconds, **phases}
                if index == 0:
                    startup[name]["first"] = row
                else:
                    startup[name]["repeats"].append(row)
        for _ in range(args.repeat):
            for name, store in stores.items():
                _, calls = probe_once(repo, "log-batch", store, args.calls)
                logging_ms[name].append(calls)
        load["probes"] = load_average()
        base = {name: [] for name in stores}
        for _ in range(args.base_repeat):
            for name, store in stores.items():
                base[name].append(base_run(repo, store))
        load["base"] = load_average()
        result["memory_after_base"] = memory(stack)
        sweeps = {}
        launchers = ["basic", "submitit_local"] + ([] if args.no_slurm else ["submitit_slurm"])
        for _ in range(args.sweep_repeat):
            for launcher in launchers:
                row = sweep_run(copies[f"sweep-{launcher}"], launcher, stack, stores["server"]["env"])
                row["load_after"] = load_average()
                sweeps.setdefault(launcher, []).append(row)
        result["memory_after_sweeps"] = memory(stack)
        load["sweeps"] = load_average()
    result["startup"] = {
        name: {
            "first": rows["first"],
            "repeats": rows["repeats"],
            **{k: span([r[k] for r in rows["repeats"]]) for k in ("wall_s", "setup_s", "stage_run_s")},
        }
        for name, rows in startup.items()
    }
    result["log_batch_ms"] = {
        name: {
            variant: {
                "per_round_mean": [round(statistics.mean(r[variant]), 2) for r in rounds],
                "per_round_p50": [round(statistics.median(r[variant]), 2) for r in rounds],
                "max": round(max(max(r[variant]) for r in rounds), 2),
                "calls": [[round(ms, 1) for ms in r[variant]] for r in rounds],
            }
            for variant in ("one_client", "client_per_call")
        }
        for name, rounds in logging_ms.items()
    }
    result["base"] = {
        name: {"runs": rows, **{k: span([r[k] for r in rows]) for k in ("wall_s", "run_s", "after_training_s")}}
        for name, rows in base.items()
    }
    result["sweeps"] = {
        name: {"runs": rows, "wall_s": span([r["wall_s"] for r in rows], 1)} for name, rows in sweeps.items()
    }
    result["load_average"] = load
    result["calls"] = args.calls
    return result


def fmt(s: dict, unit: str = " s", digits: int = 1) -> str:
    lo, hi = round(s["min"], digits), round(s["max"], digits)
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def table(result: dict) -> str:
    rows = [("measurement", "SQLite (project store)", "team server (PostgreSQL + S3, basic auth)")]
    st = result["startup"]
    first = [f"{st[name]['first']['wall_s']} s" for name in ("sqlite", "server")]
    rows.append(("start-up, first process on a new store", *first))
    for key, label in (
        ("wall_s", "start-up process (setup + one stage run)"),
        ("setup_s", "  of it runs.setup"),
        ("stage_run_s", "  of it stage_run open + close"),
    ):
        digits = 1 if key == "wall_s" else 2
        rows.append((label, fmt(st["sqlite"][key], digits=digits), fmt(st["server"][key], digits=digits)))
    lb = result["log_batch_ms"]
    for variant, label in (
        ("one_client", "log_batch of 20 metrics, one client: p50 (mean) per call"),
        ("client_per_call", "  a new client per call, as EpochLogger"),
    ):
        cells = []
        for name in ("sqlite", "server"):
            p50, mean = lb[name][variant]["per_round_p50"], lb[name][variant]["per_round_mean"]
            cells.append(f"{fmt(span(p50), ' ms')} ({fmt(span(mean), ' ms')})")
        rows.append((label, *cells))
    base = result["base"]
    for key, label in (
        ("wall_s", "tiny base stage end to end"),
        ("run_s", "  its MLflow run"),
        ("after_training_s", "  after training: files, model, registration"),
    ):
        rows.append((label, fmt(base["sqlite"][key]), fmt(base["server"][key])))
    out = ["| " + " | ".join(r) + " |" for r in rows]
    out.insert(1, "|---|---|---|")
    out.append("")
    out.append("| service | RSS after base / after sweeps | PSS after base / after sweeps |")
    out.append("|---|---|---|")
    mb, ms = result["memory_after_base"], result["memory_after_sweeps"]
    for name in mb:
        rss = f"{mb[name]['rss_mb']:.0f} / {ms[name]['rss_mb']:.0f} MB"
        out.append(f"| {name} | {rss} | {mb[name]['pss_mb']:.0f} / {ms[name]['pss_mb']:.0f} MB |")
    out.append("")
    out.append("| 2-job sweep of the tiny base | wall time | launch to 1st job run | job runs | overlap | after |")
    out.append("|---|---|---|---|---|---|")
    for name, sweep in result["sweeps"].items():
        done = sweep["runs"]
        jobs = ", ".join(f"{r['job_run_s'][0]} + {r['job_run_s'][1]}" for r in done)
        cells = [fmt(span([r[k] for r in done])) for k in ("start_to_first_job_s", "overlap_s", "after_last_job_s")]
        out.append(f"| {name} | {fmt(sweep['wall_s'])} | {cells[0]} | {jobs} s | {cells[1]} | {cells[2]} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="start-up and log_batch rounds per store")
    parser.add_argument("--calls", type=int, default=30, help="log_batch calls per round (one per epoch)")
    parser.add_argument("--base-repeat", type=int, default=3, help="tiny base runs per store")
    parser.add_argument("--sweep-repeat", type=int, default=3, help="sweeps per launcher")
    parser.add_argument("--no-slurm", action="store_true", help="no SLURM in the stack, no submitit_slurm sweep")
    parser.add_argument(
        "--workdir", type=Path, help="an empty folder for the copies and the stack, kept (default: a temp dir)"
    )
    parser.add_argument("--probe", choices=["startup", "log-batch"], help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.probe:
        probe(args.probe, overrides, args.calls)
        return
    start = time.perf_counter()
    if args.workdir:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            raise SystemExit(f"--workdir {args.workdir} is not empty (the first start-up needs a new store)")
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = measure(args.workdir.resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="detloop-team-bench-") as tmp:
            result = measure(Path(tmp), args)
    result["benchmark_s"] = round(time.perf_counter() - start)
    write_report(ROOT / "build" / "benchmarks" / "team.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
