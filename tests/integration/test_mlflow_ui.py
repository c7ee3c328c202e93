"""What users see in the MLflow UI: the registered model with its aliases, and base vs fine-tune compared.

A real `mlflow server` over the tiny project's store, rendered by headless Chromium (`make test`
installs Debian's chromium when it is missing). The screenshots are kept under the test's tmp folder
(printed) to look at; the checks read the rendered DOM, so a loading splash fails them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from PIL import Image
from tests.conftest import mlflow_server, tiny_overrides

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.finetune import run as run_finetune
from detloop.gate import run as run_gate
from detloop.mix import run as run_mix
from detloop.tracking import registry

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=25000",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("headless Chromium is needed for the UI tests: run `make chromium` (Debian package chromium)")
    return found


def render(url: str, png: Path, size: str, profile: Path) -> str:
    """Screenshot ``url`` into ``png`` and return the rendered DOM."""
    base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """A tiny project: base v1 (base, production), a gated fine-tune v2 that has taken production."""
    base = tmp_path_factory.mktemp("ui")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    run_base(compose(overrides))
    forced = compose([*overrides, "trigger.force=true"])
    run_mix(forced)
    run_finetune(forced)
    run_gate(compose(overrides))
    cfg = compose(overrides)
    registry.move_alias(cfg, "production", "2", why="ui test: the gated fine-tune", decision="pass")
    return cfg, base


@pytest.fixture(scope="module")
def ui(project):
    """``mlflow server`` over the project's SQLite store on a free loopback port."""
    _, base = project
    store = base / "mlruns"
    with mlflow_server(store / "mlflow.db", store / "artifacts", base / "ui-server.log", proxied=False) as url:
        yield url


def assert_not_blank(png: Path) -> None:
    image = Image.open(png).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200, f"{png}: looks blank ({len(colors or [])} colours)"


def test_the_registered_model_page_shows_the_versions_and_their_aliases(project, ui, tmp_path):
    cfg, _ = project
    png = tmp_path / "registered_model.png"
    dom = render(f"{ui}/#/models/{cfg.mlflow.registered_model}", png, "1600,1400", tmp_path / "profile")
    print(f"screenshot: {png}")
    assert_not_blank(png)
    assert cfg.mlflow.registered_model in dom and "Version 2" in dom and "Version 1" in dom
    for alias in ("production", "base"):
        assert f">{alias}<" in dom or f"@ {alias}" in dom or alias in dom


def test_the_compare_view_lines_up_base_and_fine_tune(project, ui, tmp_path):
    cfg, _ = project
    client = mlflow.MlflowClient()
    runs = [client.get_model_version(cfg.mlflow.registered_model, v).run_id for v in ("1", "2")]
    experiment = mlflow.get_run(runs[0]).info.experiment_id
    url = f'{ui}/#/compare-runs?runs=["{runs[0]}","{runs[1]}"]&experiments=["{experiment}"]'
    png = tmp_path / "compare.png"
    dom = render(url, png, "1600,2600", tmp_path / "profile")
    print(f"screenshot: {png}")
    assert_not_blank(png)
    assert "Comparing 2 Runs" in dom
    assert "base" in dom and "finetune from v1" in dom
    # the metrics table (virtualised: its first rows) lines up the two runs' training figures
    assert "final/metrics/mAP50B" in dom and "Run details" in dom and "Parameters" in dom


def test_a_version_page_reads_at_a_glance(project, ui, tmp_path):
    """Kind, decision and the headline gate figures are in the first screen; the version carries few tags."""
    cfg, _ = project
    tags = mlflow.MlflowClient().get_model_version(cfg.mlflow.registered_model, "2").tags
    assert len(tags) <= 16, sorted(tags)
    assert {
        "kind",
        "decision",
        "gate.regression.drop",
        "gate.new_samples.detection_rate",
        "lineage.data_dvc_md5",
    } <= set(tags)
    png = tmp_path / "version.png"
    dom = render(f"{ui}/#/models/{cfg.mlflow.registered_model}/versions/2", png, "1400,900", tmp_path / "profile")
    print(f"screenshot: {png}")
    assert_not_blank(png)
    decision = tags["decision"].upper()
    headline = f"finetune v2: gate {decision} vs v1"
    assert headline in dom, "the description's first line names kind and decision"
    assert "anchor-test mAP50" in dom and "new-failure detection" in dom
    assert dom.index(headline) < dom.index("gate.regression.drop"), "the headline comes before the tags"
