"""`dvc push` and `dvc pull` of the full demo data set against an S3 emulator (moto_server).

In a copy of the working tree under /tmp (its own git repository): `detloop demo-data` (default size),
`dvc add data`, a DVC remote on a fresh bucket of a moto_server started here (keys in
.dvc/config.local), then times, each `--repeat` times on a new bucket:

* `dvc push data.dvc`, the first push of every object, and again with nothing to upload;
* `detloop review accept ID` of one inbox sample, end to end (dvc add + the automatic push);
* `dvc pull` into a fresh `git clone` of the copy (same remote, its own keys), checked file by file;
* `dvc push data.dvc` with the server stopped (how long a failed push makes a command wait).

moto keeps the objects in memory on this machine: the figures are DVC's and the S3 protocol's cost,
not a network's. Writes build/benchmarks/dvc_remote.json.

    .venv/bin/python benchmarks/dvc_remote.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from shared import BIN, bin_env, load_average, write_report

ROOT = Path(__file__).resolve().parents[1]
KEY = "benchmark"


def run(cwd: Path, *cmd: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in bin_env().items() if k != "DETLOOP_ROOT"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 2)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done


def start_moto(port: int, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(150):
        try:
            requests.get(f"http://127.0.0.1:{port}", timeout=1)
            return proc
        except requests.RequestException:
            time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"moto_server did not answer on port {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def copy_project(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def git(cwd: Path, *args: str) -> None:
    run(cwd, "git", "-c", "user.name=bench", "-c", "user.email=bench@detloop.invalid", *args)


def set_remote(repo: Path, bucket: str, endpoint: str) -> None:
    run(repo, "dvc", "remote", "add", "-f", "-d", "team", f"s3://{bucket}/dvc")
    run(repo, "dvc", "remote", "modify", "team", "endpointurl", endpoint)
    run(repo, "dvc", "remote", "modify", "--local", "team", "access_key_id", KEY)
    run(repo, "dvc", "remote", "modify", "--local", "team", "secret_access_key", KEY)


def hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def inbox_ids(repo: Path) -> list[str]:
    import json

    lines = (repo / "data/inbox/manifest.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


def one_round(base: Path, repo: Path, endpoint: str, index: int) -> dict:
    import boto3

    bucket = f"bench-{index}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=KEY)
    s3.create_bucket(Bucket=bucket)
    set_remote(repo, bucket, endpoint)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"remote {bucket}", "--allow-empty")
    first, done = run(repo, "dvc", "push", "data.dvc")
    again, _ = run(repo, "dvc", "push", "data.dvc")
    accept, accepted = run(repo, "detloop", "review", "accept", inbox_ids(repo)[0], "--reviewer", "bench")
    status, _ = run(repo, "dvc", "status", "-c", "data.dvc")
    git(repo, "add", "data.dvc")
    git(repo, "commit", "-q", "-m", "accept")
    clone = base / f"clone-{index}"
    run(base, "git", "clone", "-q", str(repo), str(clone))
    set_remote(clone, bucket, endpoint)
    pull, _ = run(clone, "dvc", "pull", "-q")
    identical = hashes(clone / "data") == hashes(repo / "data")
    keys = sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket))
    shutil.rmtree(clone)
    return {
        "push_first_s": first,
        "push_first_output": done.stdout.strip(),
        "push_nothing_to_do_s": again,
        "review_accept_with_push_s": accept,
        "review_accept_push_line": next((x for x in accepted.stdout.splitlines() if "pushed data version" in x), ""),
        "status_cloud_s": status,
        "pull_fresh_clone_s": pull,
        "pulled_identical": identical,
        "objects_in_bucket": keys,
    }


def main() -> None:
    from detloop.core.env import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each on a new bucket")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="detloop-dvc-remote-") as tmp:
        base = Path(tmp)
        repo = copy_project(base / "repo")
        git(repo, "init", "-q", "-b", "main")
        demo, _ = run(repo, "detloop", "demo-data")
        add, _ = run(repo, "dvc", "add", "-q", "data")
        files = [p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file()]
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        moto = start_moto(port, base / "moto.log")
        try:
            rounds = []
            for index in range(args.repeat):
                rounds.append(one_round(base, repo, endpoint, index))
            stop(moto)
            refused, failed = run(repo, "dvc", "push", "data.dvc", check=False)  # boto's default retries
        finally:
            stop(moto)
    keys = [k for k in rounds[0] if k.endswith("_s")]
    result = {
        "data": {"files": len(files), "mb": round(sum(files) / 1e6, 1)},
        "demo_data_s": demo,
        "dvc_add_s": add,
        "rounds": rounds,
        "median": {k: statistics.median(r[k] for r in rounds) for k in keys},
        "min": {k: min(r[k] for r in rounds) for k in keys},
        "push_to_stopped_server_s": refused,
        "push_to_stopped_server_exit": failed.returncode,
        "load_average": load_average(),
    }
    write_report(ROOT / "build" / "benchmarks" / "dvc_remote.json", result)


if __name__ == "__main__":
    main()
