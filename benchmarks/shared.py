"""What several benchmark scripts need: the machine load, a free port, `detloop serve` in a subprocess,
the JSON report, and the start and end of the demo drills (`demo_gates.py`, `demo_serve.py`).

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``import shared``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def bin_env() -> dict[str, str]:
    """The environment with this interpreter's ``bin/`` first on PATH (``detloop``, ``dvc``, ``mlflow``)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def load_average() -> float:
    """The 1-minute load average (the machine is shared: recorded next to every timing)."""
    return round(os.getloadavg()[0], 2)


def start_serve(overrides: list[str], log: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``detloop serve`` on a free loopback port, its output in ``log``; returns once ``/health`` answers."""
    import requests

    from detloop.core.env import free_port

    port = free_port()
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(BIN / "detloop"), "serve", "--port", str(port), *overrides], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"detloop serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if _all_workers_up(url):
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"detloop serve did not answer /health within {timeout:.0f} s (log: {log})")


def _all_workers_up(url: str, tries: int = 40) -> bool:
    """``/health`` answers, from each of the server's ``serve.workers`` processes (new connections land on
    any worker that listens, so a few tries see them all)."""
    import requests

    health = requests.get(f"{url}/health", timeout=2)
    if not health.ok:
        return False
    seen, workers = {health.json().get("worker")}, int(health.json().get("workers") or 1)
    for _ in range(tries if workers > len(seen) else 0):
        seen.add(requests.get(f"{url}/health", timeout=2).json().get("worker"))
        if len(seen) >= workers:
            break
    return len(seen) >= workers


def write_report(path: Path, result: dict) -> None:
    """The benchmark's JSON report, written and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def drill_start(doc: str):
    """Parse ``--check``, point MLflow at the project's store; returns ``(args, cfg, production version)``."""
    from detloop.core.config import compose
    from detloop.tracking import registry, runs

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when an expectation fails")
    args = parser.parse_args()
    cfg = compose([])
    runs.setup(cfg)
    production = registry.alias_holder(cfg.mlflow.registered_model, "production")
    if production is None:
        raise SystemExit("no production version: run `make demo` first")
    return args, cfg, production


def drill_finish(cfg, name: str, result: dict, failures: list[str], check: bool) -> int:
    """Write ``build/benchmarks/<name>.json``, print each failure; the exit code (1 on failure with ``check``)."""
    from detloop.core.config import resolve_path

    write_report(resolve_path(cfg, "build") / "benchmarks" / f"{name}.json", {**result, "failures": failures})
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures and check else 0
