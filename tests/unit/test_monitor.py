"""``detloop monitor`` on seeded prediction logs: each alert trips on its own, a healthy log trips none.

The log spans four weeks of version 1 (baseline: its first week); the window is the last week. Version 1
has no predecessor here, so the comparisons with the previous production version are skipped (and say
so); tests/unit/test_monitor_baselines.py covers them, test_monitor_fields.py the expected fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from PIL import Image
from tests.serving_helpers import DAY, seed_log, write_reports

from detloop.cli.main import main
from detloop.core.config import compose, resolve_path
from detloop.core.errors import BadInput
from detloop.data import pool
from detloop.production import monitor, monitor_rules, predlog

UNTIL = 1_767_225_600.0  # 2026-01-01T00:00:00Z
START = UNTIL - 28 * DAY
PER_DAY = 40


@pytest.fixture
def overrides(registry_overrides, tmp_path) -> list[str]:
    """A prediction log and data folder in tmp_path, the shared MLflow store, two expected classes."""
    return [
        *registry_overrides,
        f"serve.predlog=sqlite:///{tmp_path / 'predlog.db'}",
        "monitor.expected_classes=[title,date]",
        f"monitor.mlflow.experiment=monitor-{tmp_path.name}",
        f"trigger.performance_flag={tmp_path / 'flag.json'}",
    ]


def seeded(overrides, last_week: dict | None = None, weekly_reports=(2, 2, 2, 2)):
    """Given three healthy weeks, then a last week with ``last_week`` (seed_log arguments) and the reports."""
    cfg = compose(overrides)
    store = predlog.open_log(cfg)
    seed_log(store, START, 21, PER_DAY)
    seed_log(store, START + 21 * DAY, 7, PER_DAY, **(last_week or {}))
    store.close()
    write_reports(resolve_path(cfg, "inbox"), list(weekly_reports), UNTIL)
    return cfg


def run(cfg, **kwargs) -> dict:
    return monitor.run(cfg, monitor_rules.Window(UNTIL - 7 * DAY, UNTIL), to_mlflow=False, **kwargs)


def kinds(result: dict) -> list[str]:
    return [a["kind"] for a in result["alerts"]]


def test_a_healthy_log_trips_no_alert(overrides):
    result = run(seeded(overrides))
    assert result["alerts"] == []
    # the only checks skipped are those against a previous production version, which v1 does not have
    assert len(result["skipped"]) == 2 and all("previous production version" in s for s in result["skipped"])
    assert result["images"] == 7 * PER_DAY and result["detection_rate"] == {"title": 1.0, "date": 1.0}
    assert result["expected_images"] == {"title": 7 * PER_DAY, "date": 7 * PER_DAY}
    own = result["baselines"]["own"]
    assert own["images"] == 7 * PER_DAY and own["version"] == "1" and result["baselines"]["previous"]["version"] is None
    assert [(c["rule"], c["baseline"], c["alert"]) for c in result["comparisons"]] == [
        ("confidence", "own", False),
        ("latency", "own", False),
    ]
    assert result["version_confidence"] == pytest.approx(0.9) and result["latency_ms"] == pytest.approx(20.0)
    assert result["reports_per_week"] == [2, 2, 2, 2]


def test_a_class_detected_in_fewer_than_90_percent_of_images_alerts(overrides):
    # given a last week where every 5th image lacks a title (80 %) and every 20th lacks a date (95 %)
    result = run(seeded(overrides, {"missing": {"title": 5, "date": 20}}))
    assert kinds(result) == ["detection_rate"]
    alert = result["alerts"][0]
    assert alert["metric"] == "detection_rate/title" and alert["value"] == pytest.approx(0.8)
    assert result["detection_rate"]["date"] == pytest.approx(0.95)


@pytest.mark.parametrize(("confidence", "alerts"), [(0.84, ["confidence"]), (0.86, [])])
def test_average_confidence_alerts_on_a_drop_above_5_percent_of_the_baseline(overrides, confidence, alerts):
    # 0.9 -> 0.84 is a 6.7 % drop; 0.9 -> 0.86 is 4.4 %
    result = run(seeded(overrides, {"confidence": confidence}))
    assert kinds(result) == alerts
    assert result["metrics"]["confidence/drop/own"] == pytest.approx((0.9 - confidence) / 0.9)


@pytest.mark.parametrize(("latency", "alerts"), [(45.0, ["latency"]), (39.0, [])])
def test_latency_alerts_above_twice_the_baseline(overrides, latency, alerts):
    result = run(seeded(overrides, {"latency_ms": latency}))
    assert kinds(result) == alerts
    assert result["metrics"]["latency/ratio/own"] == pytest.approx(latency / 20.0)


@pytest.mark.parametrize(("weekly", "alerts"), [((1, 2, 3, 5), ["reports"]), ((1, 3, 3, 5), []), ((5, 4, 3, 2), [])])
def test_failure_reports_rising_three_weeks_in_a_row_alert(overrides, weekly, alerts):
    result = run(seeded(overrides, weekly_reports=weekly))
    assert result["reports_per_week"] == list(weekly)
    assert kinds(result) == alerts


def test_the_pool_and_rejected_reports_count_once_each(overrides, tmp_path):
    # given the same report in the inbox and (after review) in the pool, and one rejected report
    cfg = seeded(overrides, weekly_reports=(0, 0, 0, 1))
    inbox_row = json.loads((tmp_path / "data/inbox/manifest.jsonl").read_text())
    (tmp_path / "data/pool").mkdir(parents=True)
    (tmp_path / "data/pool/manifest.jsonl").write_text(json.dumps(inbox_row) + "\n")
    rejected = {**inbox_row, "id": "report-rejected000", "sha256": "f" * 64}
    (tmp_path / "data/inbox/rejected.jsonl").write_text(json.dumps(rejected) + "\n")
    assert run(cfg)["reports_per_week"] == [0, 0, 0, 2]
    # and monitor.reports.sources keeps only reports from the named sources
    cfg = compose([*overrides, "monitor.reports.sources=[/elsewhere]"])
    assert run(cfg)["reports_per_week"] == [0, 0, 0, 0]


def test_a_new_version_is_compared_with_its_own_baseline_and_the_previous_versions(overrides):
    # Changed with issue 11 part 4: this test used to assert that v2 at 0.8 raised no alert (its own first
    # week is its baseline), the blind spot the previous production version's baseline now closes.
    # given v1 for three weeks at confidence 0.9, then v2 promoted, answering at 0.8 for a whole week
    cfg = compose(overrides)
    store = predlog.open_log(cfg)
    seed_log(store, START, 21, PER_DAY)
    seed_log(store, START + 21 * DAY, 7, PER_DAY, version="2", confidence=0.8)
    store.close()
    result = run(cfg)
    # then against its own first week v2 is steady, against v1 (found in the log) it dropped 11 %
    assert result["version"] == "2" and result["baselines"]["own"]["version"] == "2"
    assert result["baselines"]["own"]["confidence"] == pytest.approx(0.8)
    assert result["baselines"]["previous"]["version"] == "1"
    assert result["baselines"]["previous"]["found_by"].startswith("prediction log: v1 answered before v2")
    assert [a["metric"] for a in result["alerts"]] == ["confidence/drop/previous"]
    assert "below the previous production version v1's baseline 0.900" in result["alerts"][0]["message"]
    # and with the own baseline only (the rule before), nothing alerts
    assert run(compose([*overrides, "monitor.confidence.baselines=[own]"]))["alerts"] == []
    # and a fixed own baseline in the config is compared with instead of v2's first week
    result = run(compose([*overrides, "monitor.baseline.confidence=0.9", "monitor.confidence.baselines=[own]"]))
    assert [a["metric"] for a in result["alerts"]] == ["confidence/drop/own"]
    assert "its fixed baseline 0.900 (monitor.baseline.confidence)" in result["alerts"][0]["message"]


def test_too_little_traffic_skips_the_checks_instead_of_alerting(overrides):
    cfg = compose(overrides)
    store = predlog.open_log(cfg)
    seed_log(store, UNTIL - 2 * DAY, 1, 5, missing={"title": 1}, confidence=0.1, latency_ms=500.0)
    store.close()
    result = run(cfg)
    assert result["alerts"] == [] and result["images"] == 5
    assert any("detection rate: 5 scored images < monitor.min_images=20" in s for s in result["skipped"])
    assert any("confidence, latency" in s for s in result["skipped"])


def test_raise_trigger_writes_the_flag_the_pool_policy_reads(overrides, tmp_path):
    cfg = seeded(overrides, {"missing": {"title": 4}, "latency_ms": 60.0})
    result = run(cfg, raise_flag=True)
    assert sorted(kinds(result)) == ["detection_rate", "latency"]
    flag = tmp_path / "flag.json"
    assert result["trigger"] == str(flag)
    record = json.loads(flag.read_text())
    assert "title detected in 75.00% of 280 images expected to show it" in record["reason"]
    assert "latency" not in record["reason"]  # not a kind in monitor.trigger.alerts: fine-tuning does not fix it
    on, reason = pool.performance_trigger(flag, new=1)
    assert on and "title detected in 75.00%" in reason
    # and without --raise-trigger (monitor.trigger.raise=false) no flag is written
    flag.unlink()
    assert run(cfg)["trigger"] is None and not flag.exists()


def test_a_run_is_logged_to_mlflow_with_its_window_alerts_and_plot(overrides, tmp_path):
    cfg = seeded(overrides, {"confidence": 0.8})
    result = monitor.run(cfg, monitor_rules.Window(UNTIL - 7 * DAY, UNTIL))
    run_ = mlflow.get_run(result["mlflow_run_id"])
    assert run_.data.tags["monitor.status"] == "alert" and "average confidence" in run_.data.tags["monitor.alerts"]
    assert run_.data.metrics["detection_rate/title"] == 1.0
    assert run_.data.metrics["confidence/drop/own"] == pytest.approx(1 / 9)
    assert run_.data.params["monitor.confidence.max_drop"] == "0.05"
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "reports/per_week")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [2, 2, 2, 2]
    assert max(m.timestamp for m in history) == int(UNTIL * 1000)
    experiment = mlflow.get_experiment(run_.info.experiment_id)
    assert experiment.name == f"monitor-{tmp_path.name}"
    # and the figures over time: one point per day of the window, and monitor.png in the run, a valid PNG
    assert len(result["series"]["since"]) == 7 and result["series"]["confidence"]["1"] == [pytest.approx(0.8)] * 7
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_.info.run_id)}
    assert names == {"monitor.json", "monitor.png"} and "monitor.plot" not in run_.data.tags
    png = Path(mlflow.artifacts.download_artifacts(run_id=run_.info.run_id, artifact_path="monitor.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (1000, 1100)


def test_the_command_exits_1_on_an_alert_0_without_and_2_on_bad_input(overrides, capsys):
    seeded(overrides, {"missing": {"date": 2}})
    args = ["monitor", "--since", "2025-12-25", "--until", "2026-01-01T00:00:00Z", "--no-mlflow", *overrides]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "ALERT [detection_rate] date detected in 50.00% of 280 images expected to show it (< 90%)" in out
    assert main([*args, "monitor.expected_classes=[title]"]) == 0
    assert "no alerts" in capsys.readouterr().out
    assert main(["monitor", "--since", "yesterday", "--no-mlflow", *overrides]) == 2
    assert "--since 'yesterday': not an ISO date" in capsys.readouterr().err
    assert main(["monitor", "--since", "2026-01-02", "--until", "2026-01-01", "--no-mlflow", *overrides]) == 2


def test_the_window_defaults_to_the_last_window_days():
    cfg = compose(["monitor.window_days=3"])
    window = monitor_rules.resolve_window(cfg, until="2026-01-01")
    assert window == monitor_rules.Window(UNTIL - 3 * DAY, UNTIL)
    assert monitor_rules.resolve_window(cfg, window_days=1, now=UNTIL) == monitor_rules.Window(UNTIL - DAY, UNTIL)
    with pytest.raises(BadInput, match="not both"):
        monitor_rules.resolve_window(cfg, since="2025-12-01", window_days=1)


def test_the_plot_bins_cut_the_window_and_stay_few():
    window = monitor_rules.Window(UNTIL - 2.5 * DAY, UNTIL)
    cuts = monitor_rules.bins(window, 24)
    assert [c.until - c.since for c in cuts] == [DAY, DAY, DAY / 2] and cuts[-1].until == UNTIL
    year = monitor_rules.Window(UNTIL - 365 * DAY, UNTIL)
    assert len(monitor_rules.bins(year, 1)) == monitor_rules.MAX_BINS
