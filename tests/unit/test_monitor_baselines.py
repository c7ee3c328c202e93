"""Confidence and latency against the previous production version's baseline as well as the version's own.

A new version's own baseline is its first days, so in its first window it is compared with itself; only
the previous production version's baseline shows that it is slower or less sure than the one it replaced
(the guide's "ensure model size hasn't bloated"). The previous version comes from the registry audit
trail (real MLflow, SQLite) or, without a recorded move, from the prediction log.
"""

from __future__ import annotations

import time

import pytest
from tests.conftest import register_version
from tests.serving_helpers import DAY, seed_log

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.production import monitor, monitor_rules, predlog
from detloop.tracking import registry, runs

PER_DAY = 40


@pytest.fixture
def overrides(registry_overrides, tmp_path) -> list[str]:
    return [
        *registry_overrides,
        f"serve.predlog=sqlite:///{tmp_path / 'predlog.db'}",
        "monitor.expected_classes=[title,date]",
        f"trigger.performance_flag={tmp_path / 'flag.json'}",
    ]


def seed(cfg, until: float, weeks: list[dict]) -> None:
    """One week of the log per entry of ``weeks`` (seed_log arguments), the last one ending at ``until``."""
    store = predlog.open_log(cfg)
    for k, week in enumerate(weeks):
        seed_log(store, until - (len(weeks) - k) * 7 * DAY, 7, PER_DAY, **week)
    store.close()


def monitored(cfg, until: float) -> dict:
    return monitor.run(cfg, monitor_rules.Window(until - 7 * DAY, until), to_mlflow=False)


def compared(result: dict) -> dict[tuple[str, str], tuple[float, bool]]:
    return {(c["rule"], c["baseline"]): (round(c["figure"], 3), c["alert"]) for c in result["comparisons"]}


def test_a_slower_new_version_alerts_on_latency_in_its_first_window(overrides):
    # given production moved v1 -> v2 (recorded in the registry audit trail) and v2 answering 3x slower
    cfg = compose(overrides)
    runs.setup(cfg)
    v1, v2 = register_version(cfg), register_version(cfg)
    registry.move_alias(cfg, "production", v1, why="first production model", who="qa")
    registry.move_alias(cfg, "production", v2, why="fine-tune passed the gates", who="qa")
    until = time.time() + DAY  # the window holds the moves just recorded
    seed(cfg, until, [{"version": v1}] * 3 + [{"version": v2, "latency_ms": 60.0}])
    # when the monitor looks at v2's first week
    result = monitored(cfg, until)
    # then against its own baseline (that same week) v2 is fine, against v1's it is 3x slower: one alert
    previous = result["baselines"]["previous"]
    assert previous["version"] == v1 and previous["latency_ms"] == pytest.approx(20.0)
    assert previous["found_by"].startswith(f"registry audit trail: 'production' moved from v{v1} to v{v2}")
    assert compared(result) == {
        ("confidence", "own"): (0.0, False),
        ("confidence", "previous"): (0.0, False),
        ("latency", "own"): (1.0, False),
        ("latency", "previous"): (3.0, True),
    }
    assert [(a["kind"], a["metric"]) for a in result["alerts"]] == [("latency", "latency/ratio/previous")]
    assert result["metrics"]["latency/ratio/previous"] == pytest.approx(3.0)
    assert result["metrics"]["latency_ms/baseline/previous"] == pytest.approx(20.0)
    # and the report shows both comparisons
    text = monitor_rules.format_result(result)
    assert "latency vs own: 1.00x (alert above 2x) ok" in text
    assert "latency vs previous: 3.00x (alert above 2x) ALERT" in text
    assert f"previous production version's baseline: v{v1} (registry audit trail" in text


def test_a_less_confident_new_version_alerts_on_confidence_in_its_first_window(overrides):
    # given no recorded alias move: the log says v1 answered before v2 did; v2 answers at 0.8 instead of 0.9
    cfg = compose(overrides)
    until = 1_767_225_600.0  # 2026-01-01
    seed(cfg, until, [{}] * 3 + [{"version": "2", "confidence": 0.8}])
    result = monitored(cfg, until)
    assert result["baselines"]["previous"]["version"] == "1"
    assert compared(result)[("confidence", "previous")] == (0.111, True)
    assert compared(result)[("confidence", "own")] == (0.0, False)
    assert [a["metric"] for a in result["alerts"]] == ["confidence/drop/previous"]
    assert result["alerts"][0]["message"].startswith("average confidence 0.800 of v2 is 11.1% below the previous")
    # and with the previous production version left out of the rule, nothing alerts (the old blind spot)
    assert monitored(compose([*overrides, "monitor.confidence.baselines=[own]"]), until)["alerts"] == []


def test_the_registry_names_the_previous_production_version_not_a_canary_in_the_log(overrides):
    # given v2 answered in week 3 without ever holding production (a canary), then production moved v1 -> v3
    cfg = compose(overrides)
    runs.setup(cfg)
    v1, v2, v3 = (register_version(cfg) for _ in range(3))
    registry.move_alias(cfg, "production", v1, why="first", who="qa")
    registry.move_alias(cfg, "production", v3, why="better", who="qa")
    until = time.time() + DAY
    seed(cfg, until, [{"version": v1}, {"version": v1}, {"version": v2, "latency_ms": 5.0}, {"version": v3}])
    # then the registry's answer is v1; the log alone would say v2
    assert monitored(cfg, until)["baselines"]["previous"]["version"] == v1
    only_log = compose([*overrides, "monitor.baseline.previous.find=[log]"])
    result = monitored(only_log, until)
    assert result["baselines"]["previous"]["version"] == v2
    assert compared(result)[("latency", "previous")] == (4.0, True)


def test_the_previous_versions_last_days_can_be_the_baseline_instead_of_its_first(overrides):
    # given v1 at 20 ms in its first week, 35 ms in its last two, then v2 at 60 ms
    cfg = compose(overrides)
    until = 1_767_225_600.0
    seed(cfg, until, [{}, {"latency_ms": 35.0}, {"latency_ms": 35.0}, {"version": "2", "latency_ms": 60.0}])
    assert compared(monitored(cfg, until))[("latency", "previous")] == (3.0, True)
    last = monitored(compose([*overrides, "monitor.baseline.previous.period=last"]), until)
    assert last["baselines"]["previous"]["period"] == "last 7 days it served"
    assert compared(last)[("latency", "previous")] == (pytest.approx(60 / 35, abs=1e-3), False)


def test_a_configured_previous_version_and_a_version_without_predecessor(overrides):
    cfg = compose(overrides)
    until = 1_767_225_600.0
    seed(cfg, until, [{"version": "4"}, {"version": "4"}, {"version": "5"}, {"version": "7", "latency_ms": 50.0}])
    fixed = monitored(compose([*overrides, "monitor.baseline.previous.version=4"]), until)
    assert fixed["baselines"]["previous"]["found_by"] == "monitor.baseline.previous.version"
    assert compared(fixed)[("latency", "previous")] == (2.5, True)
    # the first version in the log has no predecessor: those comparisons are skipped, and say why
    first = monitored(compose([*overrides, "monitor.baseline.version=4"]), until - 14 * 86400.0)
    assert first["baselines"]["previous"]["version"] is None
    assert any(
        s.startswith("latency vs the previous production version's baseline: no previous") for s in first["skipped"]
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("monitor.latency.baselines=[own,yesterday]", "monitor.latency.baselines"),
        ("monitor.baseline.previous.find=[registry,gut]", "monitor.baseline.previous.find"),
        ("monitor.baseline.previous.period=middle", "monitor.baseline.previous.period"),
        ("monitor.mlflow.plot_bin_hours=0", "monitor.mlflow.plot_bin_hours"),
        ("monitor.confidence.max_drop=5", "monitor.confidence.max_drop"),
    ],
)
def test_bad_baseline_settings_are_refused_naming_the_key(overrides, override, key):
    with pytest.raises(BadInput) as err:
        monitored(compose([*overrides, override]), 1_767_225_600.0)
    assert key in str(err.value)
