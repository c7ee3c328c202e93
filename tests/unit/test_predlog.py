"""The prediction log: rows as the server writes them, concurrent writers, the configured location."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import sqlalchemy as sa
from tests.conftest import tiny_overrides

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.production import predlog


@pytest.fixture
def store(tmp_path):
    log_store = predlog.PredictionLog(f"sqlite:///{tmp_path / 'log' / 'predlog.db'}")
    yield log_store
    log_store.close()


def table(rows):
    return pd.DataFrame(rows, columns=["row", "class_id", "class_name", "confidence", "xc", "yc", "w", "h"])


def test_detection_fields_summarise_one_images_pyfunc_rows():
    # given the pyfunc output rows of one image: two titles and a date
    rows = table(
        [
            [0, 0, "title", 0.91234567, 0.5, 0.1, 0.4, 0.05],
            [0, 0, "title", 0.5, 0.5, 0.3, 0.4, 0.05],
            [0, 1, "date", 0.75, 0.8, 0.1, 0.1, 0.02],
        ]
    ).to_dict("records")
    fields = predlog.detection_fields(rows)
    # then the counts, the confidence sum, each class once and the rounded boxes are kept
    assert fields["n_detections"] == 3
    assert fields["confidence_sum"] == pytest.approx(0.91234567 + 0.5 + 0.75)
    assert fields["classes"] == "|title|date|"
    assert predlog.parse_detections(fields["detections"])[0] == [0, 0.9123, 0.5, 0.1, 0.4, 0.05]
    # and an image without detections
    assert predlog.detection_fields([]) == {"n_detections": 0, "confidence_sum": 0.0, "classes": "", "detections": "[]"}


def test_a_record_round_trips_and_class_matching_is_exact(store):
    dets = [{"class_id": 2, "class_name": "line_item", "confidence": 0.8, "xc": 0.5, "yc": 0.5, "w": 0.1, "h": 0.1}]
    store.write(
        [
            predlog.Record(
                ts=100.0,
                request_id="r1",
                endpoint="invocations",
                status=200,
                model_version="3",
                latency_ms=12.5,
                request_ms=12.5,
                batch_size=1,
                image_sha256="a" * 64,
                **predlog.detection_fields(dets),
            ),
            predlog.Record(
                ts=101.0,
                request_id="r2",
                endpoint="invocations",
                status=400,
                model_version="3",
                error="row 0: not a decodable image",
            ),
        ]
    )
    rows = store.rows()
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["classes"] == "|line_item|" and rows[1]["error"] == "row 0: not a decodable image"
    assert store.count(status=400) == 1 and store.rows(since=100.5) == [rows[1]]
    with store.engine.connect() as conn:

        def matches(name: str) -> int:
            query = sa.select(sa.func.count()).where(predlog.detected(name))
            return conn.execute(query.select_from(predlog.predictions)).scalar_one()

        # '_' is a LIKE wildcard: the condition escapes it, so only the exact class matches
        assert matches("line_item") == 1 and matches("line-item") == 0 and matches("line") == 0


def test_concurrent_writers_lose_no_rows(store):
    # given 8 threads writing 50 single-row transactions each (as 8 concurrent requests do)
    def writer(k: int) -> None:
        for i in range(50):
            store.write([predlog.Record(ts=float(i), request_id=f"{k}-{i}", endpoint="invocations", status=200)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then every row is there once, and a second connection (another process' view) sees them all
    assert store.count() == 400
    other = predlog.PredictionLog(store.uri)
    assert len({r["request_id"] for r in other.rows()}) == 400
    other.close()


def test_the_log_lives_under_build_by_default_or_at_the_configured_uri(tmp_path, monkeypatch):
    monkeypatch.delenv(predlog.ENV_URI, raising=False)
    cfg = compose(tiny_overrides(tmp_path))
    assert predlog.log_uri(cfg) == f"sqlite:///{tmp_path / 'build' / 'serve' / 'predlog.db'}"
    # the environment variable and the config key point elsewhere (any SQLAlchemy URI)
    monkeypatch.setenv(predlog.ENV_URI, f"sqlite:///{tmp_path / 'env.db'}")
    assert predlog.log_uri(compose(tiny_overrides(tmp_path))) == f"sqlite:///{tmp_path / 'env.db'}"
    cfg = compose([*tiny_overrides(tmp_path), f"serve.predlog=sqlite:///{tmp_path / 'key.db'}"])
    log_store = predlog.open_log(cfg)
    log_store.write([predlog.Record(ts=1.0, request_id="r", endpoint="invocations", status=200)])
    log_store.close()
    assert (tmp_path / "key.db").is_file()
    assert predlog.shown_uri("postgresql://u:secret@db/x") == "postgresql://u:***@db/x"


def test_a_malformed_uri_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="serve.predlog: 'not a uri' is not a SQLAlchemy database URI"):
        predlog.PredictionLog("not a uri")
