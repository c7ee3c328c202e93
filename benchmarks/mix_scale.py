"""Stage ``mix`` at scale: detloop's image-path lists against a FiftyOne select-and-export of the same mix.

Generates a synthetic project in a work folder (tiny JPEGs with 1-3 YOLO boxes of 6 classes): an anchor
of ``--anchor`` train images plus small val/test splits, and a pool of ``--pool`` verified samples with a
valid manifest (splits fixed by ``detloop.data.manifest.split_for``, as ``detloop review`` stores them). Then:

* ``detloop.mix.build_mix`` (every pool train sample + a seeded random replay sample of anchor train by
  the ratio table, capped at ``mix.max_old``), repeated ``--repeats`` times; next to it the whole stage
  without MLflow (review check, trigger policy, build_mix, writing ``train.txt``/``val.txt``/``mix.json``);
* ``python -m detloop.mix`` end to end as DVC runs it (process start, Hydra, the registry read, the
  lists), on a SQLite store holding a base and ``--finetunes`` fine-tune versions; with ``--before-src``
  another checkout's stage is timed alternately on the same data and store (before/after side by side);
* the FiftyOne export route of the tutorial "Fine-tune YOLOv8 models for custom use cases with the help
  of FiftyOne", for the same selection, in a child process: import anchor train/val and the pool into a
  (non-persistent) dataset with ``fo.types.YOLOv5Dataset``, take the same number of anchor train samples
  with ``take(n, seed=...)`` plus the pool train samples (and anchor val + pool val), and ``export`` them
  as a YOLOv5 training set on disk. Start-up (start the bundled MongoDB, import fiftyone, connect) is
  timed apart; the MongoDB is the bundled ``mongod`` started on its own port and data folder.
  (A child process so that its start-up, memory and MongoDB are measured apart from the detloop side.)

Results go to ``build/benchmarks/mix_scale.json``; the load average is recorded next to every timing.

    .venv/bin/python benchmarks/mix_scale.py [--anchor 25000 --pool 500] [--workdir PATH] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETLOOP_ROOT", str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402
from shared import load_average  # noqa: E402

import detloop  # noqa: E402,F401  (offline environment)
from detloop.core.config import compose, resolve_path  # noqa: E402
from detloop.core.env import free_port  # noqa: E402
from detloop.core.stage import stage_dir, write_json  # noqa: E402
from detloop.data import pool  # noqa: E402
from detloop.data.demo import CLASSES  # noqa: E402
from detloop.data.manifest import manifest_line, read_manifest, sha256_bytes, split_for  # noqa: E402

SIZE = (64, 48)
DATA_VERSION = 1  # bump when the generated layout changes (a kept --workdir is then regenerated)
OUT = ROOT / "build" / "benchmarks" / "mix_scale.json"


# ------------------------------------------------------------------------------------------- data
def sample_bytes(tag: str, index: int) -> tuple[bytes, bytes]:
    """One tiny JPEG with 1-3 filled boxes and its YOLO label lines (deterministic per tag and index)."""
    rng = random.Random(f"{tag}:{index}")
    grey = rng.randint(200, 250)
    image = Image.new("RGB", SIZE, (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    lines = []
    for _ in range(rng.randint(1, 3)):
        w, h = rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5)
        xc, yc = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        box = ((xc - w / 2) * SIZE[0], (yc - h / 2) * SIZE[1], (xc + w / 2) * SIZE[0], (yc + h / 2) * SIZE[1])
        draw.rectangle(box, fill=tuple(rng.randint(0, 160) for _ in range(3)))
        lines.append(f"{rng.randrange(len(CLASSES))} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}\n")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue(), "".join(lines).encode("ascii")


def write_samples(folder: Path, tag: str, ids: list[str], sub: str = "") -> list[str]:
    """Write ``images/<sub>/<id>.jpg`` and ``labels/<sub>/<id>.txt`` for ``ids``; return the sha256s."""
    images, labels = folder / "images" / sub, folder / "labels" / sub
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> str:
        jpeg, text = sample_bytes(tag, index)
        (images / f"{ids[index]}.jpg").write_bytes(jpeg)
        (labels / f"{ids[index]}.txt").write_bytes(text)
        return sha256_bytes(jpeg)

    with ThreadPoolExecutor(max_workers=8) as workers:
        return list(workers.map(one, range(len(ids)), chunksize=256))


def write_data(cfg, counts: dict[str, int]) -> None:
    """The synthetic anchor (train | val | test, data.yaml, manifest) and the verified pool (manifest)."""
    anchor, pool_dir = resolve_path(cfg, "anchor"), resolve_path(cfg, "pool")
    for folder in (anchor, pool_dir):
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for split in ("train", "val", "test"):
        ids = [f"anchor-{split}-{i:05d}" for i in range(counts[split])]
        hashes = write_samples(anchor, f"anchor/{split}", ids, split)
        rows += [{"id": i, "split": split, "sha256": h, "source": "bench"} for i, h in zip(ids, hashes, strict=True)]
    (anchor / "manifest.jsonl").write_text("".join(manifest_line(r) for r in rows))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    splits = "train: images/train\nval: images/val\ntest: images/test\n"
    (anchor / "data.yaml").write_text(f"{splits}nc: {len(CLASSES)}\nnames:\n{names}")
    ids = [f"report-{i:05d}" for i in range(counts["pool"])]
    hashes = write_samples(pool_dir, "pool", ids)
    fractions = dict(cfg.pool.split)
    rows = [
        {
            "id": i,
            "sha256": h,
            "source": "bench",
            "reported_at": "2025-01-06T13:55:11Z",
            "reviewer": "bench",
            "verified_at": "2025-01-07T09:00:00Z",
            "split": split_for(i, fractions),
        }
        for i, h in zip(ids, hashes, strict=True)
    ]
    (pool_dir / "manifest.jsonl").write_text("".join(manifest_line(r) for r in rows))
    pool.check_reviewed(cfg)  # the pool is one the stage accepts


def ensure_data(cfg, workdir: Path, counts: dict[str, int]) -> dict:
    """Generate the data, or reuse what a kept ``--workdir`` holds for the same counts."""
    marker = workdir / "data" / "bench.json"
    wanted = {"version": DATA_VERSION, **counts}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return {"reused": True, "seconds": 0.0}
    start = time.perf_counter()
    write_data(cfg, counts)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(wanted))
    return {"reused": False, "seconds": round(seconds, 1)}


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def stage_without_mlflow(cfg) -> dict:
    """What ``detloop.mix.run`` does, minus MLflow: no registry queries (no fine-tune or base yet), same outputs."""
    from detloop.data.mixing import build_mix, relative_paths, retrain_key

    pool.check_reviewed(cfg)
    trigger = pool.trigger_status(cfg, None)
    mix = build_mix(cfg, trigger)
    train, val = relative_paths(mix["train"], ROOT), relative_paths(mix["val"], ROOT)
    out = stage_dir(cfg, "mix")
    (out / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (out / "val.txt").write_text("".join(f"{p}\n" for p in val))
    retrain = pool.retrain_status(cfg, None)
    write_json(out / "mix.json", mix["record"] | {"retrain": retrain["message"]})
    write_json(out / "retrain.json", retrain_key(cfg, retrain))
    return mix


def time_detloop(cfg, repeats: int) -> dict:
    from detloop.data.mixing import build_mix

    trigger = pool.trigger_status(cfg, None)
    build, stage, loads = [], [], []
    mix: dict = {}
    for _ in range(repeats):
        loads.append(load_average())
        seconds, mix = timed(lambda: build_mix(cfg, trigger))
        build.append(round(seconds, 3))
        seconds, _ = timed(lambda: stage_without_mlflow(cfg))
        stage.append(round(seconds, 3))
    train_txt = resolve_path(cfg, "build") / "mix" / "train.txt"
    return {
        "build_mix_s": build,
        "stage_without_mlflow_s": stage,
        "load": loads,
        "mix": mix,
        "train_txt_kb": round(train_txt.stat().st_size / 1e3, 1),
    }


def seed_registry(cfg, finetunes: int) -> None:
    """A registry as the loop leaves it: a base and ``finetunes`` fine-tunes (the last on 10 x finetunes samples)."""
    import mlflow

    from detloop.tracking import runs

    runs.setup(cfg)
    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    client.create_registered_model(name)
    client.create_model_version(name, "file:///nowhere", tags={"kind": "base"})
    for i in range(finetunes):
        client.create_model_version(name, "file:///nowhere", tags={"kind": "finetune", "pool.size": str(10 * (i + 1))})


def time_cli(overrides: list[str], workdir: Path, runs: int, before_src: Path | None) -> list[dict]:
    """``python -m detloop.mix`` as DVC runs it: a fresh process each time, on a store with registered versions.

    With ``before_src`` (another checkout's ``src``), its stage is timed too, alternating with this
    tree's, on the same data and store: a before/after pair measured side by side.
    """
    out = []
    trees = [("this tree", ROOT / "src")] + ([("before", before_src)] if before_src else [])
    for i in range(runs):
        for label, src in trees:
            env = {**os.environ, "DETLOOP_ROOT": str(ROOT), "PYTHONPATH": str(src)}
            before = load_average()
            cmd = [sys.executable, "-m", "detloop.mix", *overrides, f"hydra.run.dir={workdir / 'hydra' / str(i)}"]
            seconds, _ = timed(
                lambda cmd=cmd, env=env: subprocess.run(cmd, check=True, cwd=workdir, env=env, capture_output=True)
            )
            out.append({"seconds": round(seconds, 2), "tree": label, "src": str(src), "load": before})
    return out


# --------------------------------------------------------------------------------- FiftyOne route
def fiftyone_child(params: dict) -> dict:
    """The tutorial's route for the selection in ``params``; runs in its own process (own MongoDB)."""
    start = time.perf_counter()
    import fiftyone as fo
    from fiftyone import ViewField as F

    imported = time.perf_counter()
    fo.list_datasets()  # connects to the database (and checks its schema version)
    started = time.perf_counter()
    startup = {"import_fiftyone_s": round(imported - start, 2), "connect_s": round(started - imported, 2)}
    anchor, pool_dir, workdir = Path(params["anchor"]), Path(params["pool"]), Path(params["workdir"])
    pool_yaml = workdir / "fiftyone" / "pool.yaml"
    pool_yaml.parent.mkdir(parents=True, exist_ok=True)
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    pool_yaml.write_text(f"path: {pool_dir}\npool: images\nnames:\n{names}")
    runs = []
    for run in range(params["runs"]):
        export_dir = workdir / "fiftyone" / f"export-{run}"
        shutil.rmtree(export_dir, ignore_errors=True)
        row: dict = {"load": load_average()}
        t0 = time.perf_counter()
        dataset = fo.Dataset()  # non-persistent
        common = {"dataset_type": fo.types.YOLOv5Dataset, "label_field": "ground_truth"}
        for split in ("train", "val"):
            dataset.add_dir(yaml_path=str(anchor / "data.yaml"), split=split, tags=["anchor", split], **common)
        dataset.add_dir(yaml_path=str(pool_yaml), split="pool", tags=["pool"], **common)
        pool_view = dataset.match_tags("pool")
        split_of = {row_["id"]: row_["split"] for row_ in read_manifest(pool_dir / "manifest.jsonl")}
        pool_view.set_values("pool_split", [split_of[Path(p).stem] for p in pool_view.values("filepath")])
        t1 = time.perf_counter()
        replay = dataset.match_tags(["anchor", "train"], all=True).take(params["n_old"], seed=params["seed"])
        train_ids = pool_view.match(F("pool_split") == "train").values("id") + replay.values("id")
        val_ids = dataset.match_tags(["anchor", "val"], all=True).values("id")
        val_ids += pool_view.match(F("pool_split") == "val").values("id")
        views = {"train": dataset.select(train_ids), "val": dataset.select(val_ids)}
        t2 = time.perf_counter()
        for split, view in views.items():
            view.export(
                export_dir=str(export_dir),
                dataset_type=fo.types.YOLOv5Dataset,
                label_field="ground_truth",
                classes=list(CLASSES),
                split=split,
            )
        t3 = time.perf_counter()
        samples = len(dataset)
        dataset.delete()
        row |= {
            "import_s": round(t1 - t0, 2),
            "selection_s": round(t2 - t1, 2),
            "export_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2),
            "cleanup_s": round(time.perf_counter() - t3, 2),
            "samples_imported": samples,
            "export_mb": folder_mb(export_dir),
            "exported_train": len(list((export_dir / "images/train").iterdir())),
            "exported_val": len(list((export_dir / "images/val").iterdir())),
        }
        runs.append(row)
    return {"fiftyone_version": fo.__version__, "startup": startup, "runs": runs}


def time_fiftyone(params: dict, workdir: Path) -> dict:
    """Run :func:`fiftyone_child` in a child process against a MongoDB of its own in the work folder.

    FiftyOne's bundled database service attaches to any running FiftyOne database service of the same
    user, whatever ``FIFTYONE_DATABASE_DIR`` says; so the bundled ``mongod`` is started here, on a free
    port, and FiftyOne connects to it by ``FIFTYONE_DATABASE_URI`` (the start is timed like FiftyOne's).
    """
    db = workdir / "fiftyone" / "db"
    shutil.rmtree(db, ignore_errors=True)
    (db / "log").mkdir(parents=True)
    (workdir / "fiftyone" / "params.json").write_text(json.dumps(params))
    port = free_port()
    before = load_average()
    start = time.perf_counter()
    mongod = subprocess.Popen(
        [
            str(bundled_mongod()),
            "--dbpath",
            str(db),
            "--logpath",
            str(db / "log" / "mongo.log"),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--nounixsocket",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, mongod)
        mongod_start = time.perf_counter() - start
        env = {
            **os.environ,
            "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}",
            "FIFTYONE_DO_NOT_TRACK": "true",
            "FIFTYONE_SHOW_PROGRESS_BARS": "false",
            "FIFTYONE_DATABASE_VALIDATION": "false",
        }
        result = workdir / "fiftyone" / "result.json"
        cmd = [sys.executable, __file__, "--fiftyone-child", str(workdir / "fiftyone" / "params.json"), str(result)]
        subprocess.run(cmd, check=True, env=env)
    finally:
        mongod.terminate()
        mongod.wait(timeout=60)
    report = json.loads(result.read_text())
    report["startup"] |= {"mongod_start_s": round(mongod_start, 2), "load": before}
    return report | {"database_mb": folder_mb(db)}


def bundled_mongod() -> Path:
    """The ``mongod`` FiftyOne ships (found without importing fiftyone, which must not load after MLflow)."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or spec.origin is None:
        raise RuntimeError("fiftyone is not installed in this environment")
    return Path(spec.origin).parent / "db" / "bin" / "mongod"


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mongod exited with {process.returncode} before accepting connections")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"mongod did not accept connections on port {port} within {timeout:.0f} s")


# ------------------------------------------------------------------------------------------ report
def span(values: list[float], unit: str = "s") -> str:
    low, high = min(values), max(values)
    return f"{low:.3f} {unit}" if len(values) == 1 or low == high else f"{low:.3f}–{high:.3f} {unit}"


def print_table(report: dict) -> None:
    d, m = report["detloop"], report["detloop"]["mix"]
    rows = [
        (
            f"detloop build_mix ({m['new_train']} new + {m['old_train']} replayed, {len(d['build_mix_s'])} runs)",
            span(d["build_mix_s"]),
        ),
        (
            "detloop stage work in one process (review check, trigger, retrain check, writing the lists)",
            span(d["stage_without_mlflow_s"]),
        ),
    ]
    versions = report.get("registry", {}).get("versions", 0)
    for tree in dict.fromkeys(c["tree"] for c in report["cli"]):
        times = [c["seconds"] for c in report["cli"] if c["tree"] == tree]
        label = f"python -m detloop.mix end to end, {tree} ({len(times)} runs, store with {versions} versions)"
        rows.append((label, span(times)))
    fo_report = report.get("fiftyone")
    if fo_report:
        s = fo_report["startup"]
        rows.append(
            (
                "FiftyOne start-up: start MongoDB + import fiftyone + connect",
                f"{s['mongod_start_s']:.2f} + {s['import_fiftyone_s']:.2f} + {s['connect_s']:.2f} s",
            )
        )
        for key, label in (
            ("import_s", "import"),
            ("selection_s", "selection"),
            ("export_s", "export"),
            ("total_s", "total (without start-up)"),
        ):
            rows.append((f"FiftyOne {label}", span([r[key] for r in fo_report["runs"]], "s")))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", type=int, default=25000, help="anchor train images")
    parser.add_argument("--val", type=int, default=200, help="anchor val images")
    parser.add_argument("--test", type=int, default=200, help="anchor test images")
    parser.add_argument("--pool", type=int, default=500, help="verified pool samples (all splits)")
    parser.add_argument("--repeats", type=int, default=5, help="timed build_mix runs")
    parser.add_argument("--cli-runs", type=int, default=5, help="timed `python -m detloop.mix` runs")
    parser.add_argument("--finetunes", type=int, default=10, help="fine-tune versions in the timed store")
    parser.add_argument(
        "--before-src",
        type=Path,
        help="another checkout's src/ (e.g. `git worktree add /tmp/before HEAD~1`): its stage is timed alternately",
    )
    parser.add_argument("--fiftyone-runs", type=int, default=2, help="timed FiftyOne routes (0: skip)")
    parser.add_argument("--workdir", type=Path, help="work folder, kept (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="sanity run: 2,000 anchor images, 1 FiftyOne run")
    parser.add_argument("--fiftyone-child", nargs=2, metavar=("PARAMS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("detloop.mix").setLevel(logging.ERROR)  # --quick: a warning per run (anchor train is short)
    if args.fiftyone_child:
        params, result = (Path(p) for p in args.fiftyone_child)
        result.write_text(json.dumps(fiftyone_child(json.loads(params.read_text()))))
        return
    if args.quick:
        args.anchor, args.fiftyone_runs = 2000, min(args.fiftyone_runs, 1)
    keep = args.workdir is not None
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="detloop-mix-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = measure(args, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"written {OUT.relative_to(ROOT)}")


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    overrides = [
        f"paths.data={workdir / 'data'}",
        f"paths.build={workdir / 'build'}",
        f"mlflow.store_dir={workdir / 'mlruns'}",
        "mlflow.tracking_uri=null",
    ]
    cfg = compose(overrides)
    counts = {"train": args.anchor, "val": args.val, "test": args.test, "pool": args.pool}
    print(f"data: {counts} in {workdir / 'data'} (load {load_average()})", flush=True)
    generated = ensure_data(cfg, workdir, counts)
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {
            **counts,
            "image_size": list(SIZE),
            "anchor_mb": folder_mb(resolve_path(cfg, "anchor")),
            "pool_splits": pool.split_counts(cfg),
            "generation": generated,
        },
    }
    print(f"timing build_mix x{args.repeats} (load {load_average()})", flush=True)
    detloop_times = time_detloop(cfg, args.repeats)
    mix = detloop_times.pop("mix")
    detloop_times["mix"] = mix["record"]
    detloop_times["train_list"], detloop_times["val_list"] = len(mix["train"]), len(mix["val"])
    report["detloop"] = detloop_times
    print(f"timing python -m detloop.mix x{args.cli_runs} (load {load_average()})", flush=True)
    shutil.rmtree(workdir / "mlruns", ignore_errors=True)
    seed_registry(cfg, args.finetunes)
    report["cli"] = time_cli(overrides, workdir, args.cli_runs, args.before_src)
    report["registry"] = {"versions": 1 + args.finetunes}
    written = (resolve_path(cfg, "build") / "mix" / "train.txt").read_text().splitlines()
    assert len(written) == len(mix["train"]), (len(written), len(mix["train"]))
    if args.fiftyone_runs:
        print(f"timing the FiftyOne route x{args.fiftyone_runs} (load {load_average()})", flush=True)
        record = mix["record"]
        params = {
            "anchor": str(resolve_path(cfg, "anchor")),
            "pool": str(resolve_path(cfg, "pool")),
            "workdir": str(workdir),
            "n_old": record["old_train"],
            "seed": record["seed"],
            "runs": args.fiftyone_runs,
        }
        report["fiftyone"] = time_fiftyone(params, workdir)
        for run in report["fiftyone"]["runs"]:
            assert (run["exported_train"], run["exported_val"]) == (len(mix["train"]), len(mix["val"])), run
    report["load_end"] = load_average()
    return report


if __name__ == "__main__":
    main()
