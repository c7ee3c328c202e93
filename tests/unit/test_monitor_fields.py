"""The detection rate per field counts only the images expected to show the field.

The guide's rule ("< 90 % for any field") read literally expects every field on every page, so a
receipt without a stamp counts as a missed stamp, and the demo's own serving drill alerted on every
run. Expectations are keyed by the image's sha256, which the prediction log records: an
expected-fields file (fields, or a page type), the labels of human-labelled folders (anchor, pool,
verified A/B set), else ``unlisted``.
"""

from __future__ import annotations

import json

import pytest
from tests.serving_helpers import DAY

from detloop.core.config import compose, resolve_path
from detloop.core.errors import BadInput
from detloop.data.demo import CLASSES
from detloop.data.manifest import read_manifest
from detloop.production import expected_fields, monitor, monitor_rules, predlog

UNTIL = 1_767_225_600.0  # 2026-01-01
WINDOW = monitor_rules.Window(UNTIL - 7 * DAY, UNTIL)


def serve(cfg, pages: list[tuple[str, list[str]]]) -> None:
    """One scored row per ``(sha256, detected classes)``, spread over the window's last day."""
    from detloop.production.predlog import Record, detection_fields, new_request_id

    records = []
    for i, (sha, found) in enumerate(pages):
        boxes = [
            {"class_id": CLASSES.index(c), "class_name": c, "confidence": 0.9, "xc": 0.5, "yc": 0.5, "w": 0.2, "h": 0.1}
            for c in found
        ]
        records.append(
            Record(
                ts=UNTIL - DAY + i * DAY / (len(pages) + 1),
                request_id=new_request_id(),
                endpoint="invocations",
                status=200,
                model_version="1",
                latency_ms=20.0,
                batch_size=1,
                image_sha256=sha,
                **detection_fields(boxes),
            )
        )
    store = predlog.open_log(cfg)
    store.write(records)
    store.close()


def monitored(cfg) -> dict:
    return monitor.run(cfg, WINDOW, to_mlflow=False)


def field_alerts(result: dict) -> dict[str, float]:
    return {
        a["metric"].split("/", 1)[1]: round(a["value"], 3) for a in result["alerts"] if a["kind"] == "detection_rate"
    }


@pytest.fixture
def base(registry_overrides, tmp_path) -> list[str]:
    return [*registry_overrides, f"serve.predlog=sqlite:///{tmp_path / 'predlog.db'}"]


def test_pages_not_expected_to_show_a_field_do_not_count_against_it(base, tmp_path):
    # given 60 receipts (no stamp on a receipt) and 40 forms with a stamp found on 38 of them
    receipts = [(f"{i:064x}", ["title", "date"]) for i in range(60)]
    forms = [(f"{100 + i:064x}", ["title", "date", "stamp"] if i >= 2 else ["title", "date"]) for i in range(40)]
    listed = tmp_path / "expected.jsonl"
    rows = [{"sha256": sha, "page_type": "receipt"} for sha, _ in receipts]
    rows += [{"sha256": sha, "page_type": "form"} for sha, _ in forms]
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        *base,
        "monitor.expected_classes=[title,date,stamp]",
        f"monitor.detection_rate.expected.file={listed}",
        "monitor.detection_rate.expected.page_types={receipt:[title,date],form:[title,date,stamp]}",
    ]
    cfg = compose(overrides)
    serve(cfg, receipts + forms)
    result = monitored(cfg)
    # then stamp is measured over the 40 forms only: 95 %, no alert
    assert result["expected_images"] == {"title": 100, "date": 100, "stamp": 40}
    assert result["detection_rate"]["stamp"] == pytest.approx(0.95) and field_alerts(result) == {}
    assert result["expectation_sources"] == {"file": 100, "labelled": 0, "unlisted": 0}
    # whereas the literal rule (no file: every page expects every field) calls it 38 %
    literal = monitored(compose([*base, "monitor.expected_classes=[title,date,stamp]"]))
    assert field_alerts(literal) == {"stamp": 0.38}
    # and a file row may list the fields itself; images the file does not list expect `unlisted`
    listed.write_text(json.dumps({"sha256": forms[0][0], "fields": ["title", "stamp"]}) + "\n")
    only_one = monitored(compose([*overrides, "monitor.detection_rate.expected.unlisted=[title]"]))
    assert only_one["expected_images"] == {"title": 100, "date": 0, "stamp": 1}
    assert only_one["expectation_sources"] == {"file": 1, "labelled": 0, "unlisted": 99}
    assert any(s.startswith("detection rate of date: 0 images expected to show it") for s in only_one["skipped"])


def test_served_demo_pages_expect_the_fields_their_labels_show(base, tiny_data):
    # given every page of the tiny demo anchor and pool served once by a model that finds exactly the
    # labelled fields, except stamps on every other stamped page
    overrides = [*base, f"paths.data={tiny_data}", "monitor.min_images=5"]
    cfg = compose(overrides)
    pages, truth = [], {}
    for key in ("anchor", "pool"):
        folder = resolve_path(cfg, key)
        for row in read_manifest(folder / "manifest.jsonl"):
            path = expected_fields.label_file(folder, row)
            ids = {int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()}
            truth[row["sha256"]] = sorted(CLASSES[i] for i in ids)
            pages.append(row["sha256"])
    stamped = [sha for sha in pages if "stamp" in truth[sha]]
    missed = set(stamped[::2])
    serve(cfg, [(sha, [c for c in truth[sha] if not (c == "stamp" and sha in missed)]) for sha in pages])
    result = monitored(cfg)
    # then each field is measured over the pages that show it: only the stamp misses alert
    assert result["expectation_sources"] == {"file": 0, "labelled": len(pages), "unlisted": 0}
    assert result["expected_images"] == {c: sum(c in truth[sha] for sha in pages) for c in CLASSES}
    assert field_alerts(result) == {"stamp": round(1 - len(missed) / len(stamped), 3)}
    # and a model that finds every labelled field raises no field alert, while the literal rule
    # (every field on every page) alerts on the fields some pages do not have
    store = predlog.open_log(cfg)
    with store.engine.begin() as conn:
        conn.execute(predlog.predictions.delete())
    store.close()
    serve(cfg, [(sha, truth[sha]) for sha in pages])
    assert field_alerts(monitored(cfg)) == {}
    literal = field_alerts(monitored(compose([*overrides, "monitor.detection_rate.expected.labelled=[]"])))
    absent = {c for c in CLASSES if sum(c in truth[sha] for sha in pages) < 0.9 * len(pages)}
    assert absent and set(literal) == absent


def test_bad_expectations_are_refused_naming_the_key_file_and_line(base, tmp_path):
    overrides = [*base, "monitor.expected_classes=[title,date]"]
    listed = tmp_path / "expected.jsonl"
    listed.write_text(
        json.dumps({"sha256": "a" * 64, "fields": ["title"]})
        + "\n"
        + json.dumps({"sha256": "b" * 64, "page_type": "letter"})
        + "\nnot json\n"
        + json.dumps({"sha256": "c" * 64, "fields": ["titel"]})
        + "\n"
    )
    with pytest.raises(BadInput) as err:
        monitored(compose([*overrides, f"monitor.detection_rate.expected.file={listed}"]))
    text = str(err.value)
    assert "monitor.detection_rate.expected.file: 3 bad row(s)" in text
    assert f"{listed}:2: page_type 'letter' is not in monitor.detection_rate.expected.page_types" in text
    assert f"{listed}:3: not valid JSON" in text and f"{listed}:4: unknown field(s) ['titel']" in text
    with pytest.raises(BadInput, match=r"monitor.detection_rate.expected.unlisted: unknown field\(s\) \['stamp'\]"):
        monitored(compose([*overrides, "monitor.detection_rate.expected.unlisted=[stamp]"]))
    with pytest.raises(BadInput, match="monitor.detection_rate.expected.file: .* does not exist"):
        monitored(compose([*overrides, f"monitor.detection_rate.expected.file={tmp_path / 'none.jsonl'}"]))
