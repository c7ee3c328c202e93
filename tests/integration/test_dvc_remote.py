"""The verified pool does not live on one disk: every review pushes the new data version to DVC's
default remote, a second clone pulls exactly the same data, and a push that fails while the remote is
away is reported, owed and delivered by the next command; nothing local is ever rolled back.

Real DVC (dvc-s3) against a real S3 emulator: ``moto_server`` on a free loopback port, started by the
test and stopped by its process group. moto keeps buckets in memory, so a restarted server is empty:
the bucket is created again and the retry pushes every object of the owed versions again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from detloop.core.env import free_port
from detloop.data.manifest import read_manifest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY_ID = SECRET = "testing"  # moto accepts any keys; they go to .dvc/config.local, never into git
PENDING = Path(".dvc/tmp/detloop/push-pending.json")
INBOX = ["report-00012", "report-00013", "report-00014", "report-00015"]  # the tiny demo inbox
PUSH_FAILED = 4


# --------------------------------------------------------------------------- the S3 emulator


class Moto:
    """``moto_server`` on a loopback port (in memory: a restart loses every bucket)."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, bucket: str | None = None) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"moto_server exited {self.proc.returncode}: {self.log.read_text()}"
            try:
                requests.get(self.url, timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            pytest.fail(f"moto_server did not answer at {self.url}")
        if bucket:
            self.s3().create_bucket(Bucket=bucket)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )

    def keys(self, bucket: str) -> set[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture
def moto(tmp_path):
    server = Moto(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- a project copy under git and DVC


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command in ``cwd`` with this venv's ``bin`` first on PATH and no DETLOOP_ROOT (the copy is the project)."""
    full = {k: v for k, v in os.environ.items() if k not in {"DETLOOP_ROOT", "MLFLOW_TRACKING_URI"}}
    full["PATH"] = f"{BIN}{os.pathsep}{full['PATH']}"
    full["AWS_MAX_ATTEMPTS"] = "1"  # boto's retries make a refused connection take ~10 s; one attempt is enough here
    full.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def ok(cwd: Path, *cmd: str) -> str:
    done = sh(cwd, *cmd)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def git(cwd: Path, *args: str) -> str:
    return ok(cwd, "git", "-c", "user.name=detloop-test", "-c", "user.email=test@detloop.invalid", *args)


@pytest.fixture
def project(tmp_path, tiny_data) -> Path:
    """A copy of the working tree as its own git repository, the tiny demo data tracked by data.dvc."""
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(tiny_data, repo / "data")  # what `detloop demo-data experiment=tiny` writes
    git(repo, "init", "-q", "-b", "main")
    ok(repo, "dvc", "add", "-q", "data")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny project")
    return repo


def add_remote(repo: Path, moto: Moto, bucket: str, commit: bool = True) -> None:
    """The team's remote in DVC's config (committed) and the keys in .dvc/config.local (never committed)."""
    if commit:
        ok(repo, "dvc", "remote", "add", "-d", "team", f"s3://{bucket}/dvc")
        ok(repo, "dvc", "remote", "modify", "team", "endpointurl", moto.url)
        git(repo, "add", ".dvc/config")
        git(repo, "commit", "-q", "-m", "DVC remote")
    ok(repo, "dvc", "remote", "modify", "--local", "team", "access_key_id", KEY_ID)
    ok(repo, "dvc", "remote", "modify", "--local", "team", "secret_access_key", SECRET)


def detloop(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(repo, str(BIN / "detloop"), *args)


def version(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def object_key(md5: str) -> str:
    return f"dvc/files/md5/{md5[:2]}/{md5[2:]}"


def listing(repo: Path, md5: str) -> list[dict]:
    """The ``.dir`` listing of a data version in the local DVC cache: every file with its md5."""
    return json.loads((repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file DVC versions under ``folder`` (not the Ultralytics label caches .dvcignore leaves
    out: a training on the shared tiny data set earlier in the session writes them)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".cache"
    }


def pool_ids(repo: Path) -> list[str]:
    return [row["id"] for row in read_manifest(repo / "data/pool/manifest.jsonl")]


def assert_on_remote(moto: Moto, bucket: str, repo: Path, md5: str) -> None:
    """The version's listing and every file it lists are objects in the bucket."""
    keys = moto.keys(bucket)
    missing = [e["relpath"] for e in listing(repo, md5) if object_key(e["md5"]) not in keys]
    assert object_key(md5) in keys and not missing, (md5, missing[:5])


def new_report(folder: Path) -> Path:
    """A report image whose bytes no data set holds."""
    folder.mkdir(parents=True)
    path = folder / f"new-{uuid.uuid4().hex[:6]}.jpg"
    Image.frombytes("RGB", (64, 48), os.urandom(64 * 48 * 3)).save(path)
    return path


# --------------------------------------------------------------------------- tests


def test_a_review_pushes_the_pool_and_a_second_clone_pulls_exactly_the_same_data(project, moto, tmp_path):
    # given a project whose DVC default remote is a bucket on the S3 emulator
    bucket = "detloop-pool"
    moto.s3().create_bucket(Bucket=bucket)
    add_remote(project, moto, bucket)
    # when a reviewer accepts two inbox samples
    done = detloop(project, "review", "accept", *INBOX[:2], "--reviewer", "a.chen")
    # then the command pushed the new data version to the remote and said so
    assert done.returncode == 0, done.stderr[-3000:]
    md5 = version(project)
    assert f"pushed data version {md5} to DVC remote 'team' (s3://{bucket}/dvc)" in done.stdout
    assert_on_remote(moto, bucket, project, md5)
    assert "in sync" in ok(project, "dvc", "status", "-c", "data.dvc")
    assert not (project / PENDING).exists()
    assert json.loads((project / ".dvc/tmp/detloop/last-push.json").read_text())["version"] == md5
    # and no credential reached git
    assert SECRET not in (project / ".dvc/config").read_text()
    assert ".dvc/config.local" not in git(project, "ls-files", ".dvc")
    # when a second clone of the repository (same remote, its own keys) pulls
    git(project, "add", "data.dvc")
    git(project, "commit", "-q", "-m", "review: 2 samples accepted")
    clone = tmp_path / "clone"
    ok(tmp_path, "git", "clone", "-q", str(project), str(clone))
    add_remote(clone, moto, bucket, commit=False)
    ok(clone, "dvc", "pull", "-q")
    # then it holds exactly the anchor, the pool and the inbox of the first, file by file
    assert version(clone) == md5
    assert tree_hashes(clone / "data") == tree_hashes(project / "data")
    assert (clone / "data/pool/manifest.jsonl").read_bytes() == (project / "data/pool/manifest.jsonl").read_bytes()
    assert set(INBOX[:2]) <= set(pool_ids(clone))
    assert "up to date" in ok(clone, "dvc", "status", "data.dvc")


def test_a_push_to_a_stopped_remote_is_owed_never_rolled_back_and_the_next_command_delivers_it(project, moto):
    # given a project pushed to its remote
    bucket = "detloop-pool"
    moto.s3().create_bucket(Bucket=bucket)
    add_remote(project, moto, bucket)
    assert detloop(project, "review", "accept", INBOX[0], "--reviewer", "a.chen").returncode == 0
    # when the remote goes away and a reviewer accepts another sample
    moto.stop()
    done = detloop(project, "review", "accept", INBOX[1], "--reviewer", "a.chen")
    # then the command reports the failed push loudly, naming the remote and the reason, and exits 4
    assert done.returncode == PUSH_FAILED, done.stderr[-3000:]
    assert "WARNING" in done.stderr and "PUSH FAILED" in done.stderr
    assert f"'team' (s3://{bucket}/dvc)" in done.stderr and "Could not connect to the endpoint URL" in done.stderr
    assert "Traceback" not in done.stderr
    # and the sample is in the pool, its data version recorded: nothing was rolled back
    accepted = version(project)
    assert pool_ids(project)[-1] == INBOX[1] and "up to date" in ok(project, "dvc", "status", "data.dvc")
    pending = json.loads((project / PENDING).read_text())
    assert [v["version"] for v in pending["versions"]] == [accepted] and pending["remote"] == "team"
    # when a rejection follows while the remote is still away (its push is owed without a second wait)
    done = detloop(project, "review", "reject", INBOX[2], "--reviewer", "a.chen", "--reason", "not a page")
    assert done.returncode == PUSH_FAILED and "not attempted: the retry just before failed" in done.stdout
    rejected = version(project)
    assert [v["version"] for v in json.loads((project / PENDING).read_text())["versions"]] == [accepted, rejected]
    # and `detloop pool status` says what is owed, since when
    status = detloop(project, "pool", "status")
    assert status.returncode == 0, status.stderr[-3000:]
    assert f"pool NOT yet pushed to 'team' (s3://{bucket}/dvc) since {pending['since']}" in status.stdout
    # when the remote is back (moto is in memory: an empty server, the bucket created again)
    moto.start(bucket=bucket)
    # and the next command changes data (an inbox report: it retries first; its own change is not pushed)
    done = detloop(project, "inbox", "add", str(new_report(project.parent / "reports")))
    # then the owed versions are delivered, both complete, and the marker is gone
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"retry: pushed data version {rejected}" in done.stdout
    assert not (project / PENDING).exists()
    for md5 in (accepted, rejected):
        assert_on_remote(moto, bucket, project, md5)
    # and the inbox report waits for the next push, which `detloop pool status` shows and `pool push` makes
    reported = version(project)
    status = detloop(project, "pool", "status", "--json")
    remote = json.loads(status.stdout)["remote"]
    assert remote["current_version"] == reported and not remote["current_pushed"] and remote["pending"] is None
    done = detloop(project, "pool", "push")
    assert done.returncode == 0 and f"pushed data version {reported}" in done.stdout
    assert "in sync" in ok(project, "dvc", "status", "-c", "data.dvc")


def test_push_modes_always_refuses_without_a_remote_off_never_pushes(project, moto):
    data_dvc = (project / "data.dvc").read_text()
    before = tree_hashes(project / "data")
    # given no DVC remote: pool.push.mode=always refuses the review before anything changes
    done = detloop(project, "review", "accept", INBOX[0], "--reviewer", "a.chen", "pool.push.mode=always")
    assert done.returncode == 2 and "pool.push.mode=always needs a DVC default remote" in done.stderr
    assert "dvc remote add -d NAME" in done.stderr and "Traceback" not in done.stderr
    assert tree_hashes(project / "data") == before and (project / "data.dvc").read_text() == data_dvc
    # and `detloop pool push` has nowhere to push: bad input, nothing changed
    done = detloop(project, "pool", "push")
    assert done.returncode == 2 and "needs a DVC default remote" in done.stderr
    # and auto (the default) keeps the pool change local without a word of failure
    done = detloop(project, "review", "accept", INBOX[0], "--reviewer", "a.chen")
    assert done.returncode == 0 and "push" not in done.stdout and "WARNING" not in done.stderr
    # given a remote: off never pushes after a review ...
    bucket = "detloop-off"
    moto.s3().create_bucket(Bucket=bucket)
    add_remote(project, moto, bucket)
    done = detloop(project, "review", "accept", INBOX[1], "--reviewer", "a.chen", "pool.push.mode=off")
    assert done.returncode == 0 and "push" not in done.stdout and moto.keys(bucket) == set()
    # ... and `detloop pool push` still pushes on request
    done = detloop(project, "pool", "push", "pool.push.mode=off")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_on_remote(moto, bucket, project, version(project))
    # and a bad mode is bad input naming the key
    done = detloop(project, "review", "accept", INBOX[2], "--reviewer", "a.chen", "pool.push.mode=sometimes")
    assert done.returncode == 2 and "pool.push.mode='sometimes'" in done.stderr
    assert pool_ids(project)[-1] == INBOX[1]


def open_and_tag(overrides: list[str], verify: list[str], reject: list[str]) -> None:
    """``detloop review open`` without a model, then what a reviewer does in the App: tag samples.

    Runs in a process of its own (FiftyOne keeps the first database it connects to)."""
    from detloop.core.config import compose
    from detloop.fiftyone import review
    from detloop.fiftyone.db import connect

    cfg = compose(overrides)
    connect(cfg)
    _, dataset = review.open_review(cfg, [])
    r = cfg.fiftyone.review
    for sample in dataset:
        tag = r.verified_tag if sample.detloop_id in verify else r.rejected_tag if sample.detloop_id in reject else None
        if tag is not None:
            sample.tags.append(str(tag))
            sample.save()


def test_review_commit_from_the_app_pushes_once_after_the_whole_commit(project, moto, tmp_path):
    from detloop.fiftyone.db import start_mongod, stop_mongod

    # given a project with a remote and a review in the FiftyOne App: two samples verified, one rejected
    bucket = "detloop-app"
    moto.s3().create_bucket(Bucket=bucket)
    add_remote(project, moto, bucket)
    server = start_mongod(tmp_path / "fiftyone-db", detach=False)
    try:
        overrides = [f"fiftyone.database.uri={server.uri}", f"fiftyone.dataset_prefix=t{uuid.uuid4().hex[:8]}"]
        args = f"{overrides!r}, verify={INBOX[:2]!r}, reject={INBOX[2:3]!r}"
        call = f"from tests.integration.test_dvc_remote import open_and_tag; open_and_tag({args})"
        ok(project, sys.executable, "-c", call)
        # when the reviewer commits the App's decisions
        done = detloop(project, "review", "commit", "--reviewer", "a.chen", *overrides)
    finally:
        stop_mongod(server)
    # then the pool has the verified samples, and the resulting data version is on the remote, pushed once
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 sample(s) accepted into the pool and 1 rejected" in done.stdout
    assert set(INBOX[:2]) <= set(pool_ids(project))
    assert done.stdout.count("pushed data version") == 1 and f"pushed data version {version(project)}" in done.stdout
    assert_on_remote(moto, bucket, project, version(project))
    assert "in sync" in ok(project, "dvc", "status", "-c", "data.dvc")
