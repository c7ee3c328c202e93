"""The label check's measure on constructed labels and predictions: each kind of finding, the merge of the
base's and the candidate's findings, the ranking, the settings' validation and the gate report's section."""

from __future__ import annotations

import numpy as np
import pytest

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.evaluation.evaluator import Detections, GroundTruth
from detloop.evaluation.label_check import Settings, app_link, findings, ranked, sample_entry
from detloop.evaluation.metrics import iou_matrix
from detloop.evaluation.report import report_markdown

NAMES = {0: "title", 1: "date", 2: "stamp"}
S = Settings()  # the defaults of conf/gate/default.yaml: iou 0.5, low_conf 0.05, confident 0.5, miss_weight 0.5


@pytest.fixture(scope="module")
def cfg():
    return compose(["experiment=tiny"])


def gt(*objects) -> GroundTruth:
    """Labels as (class, x0, y0, x1, y1) pixel boxes."""
    rows = np.array(objects, dtype=float).reshape(-1, 5)
    return GroundTruth(rows[:, 1:], rows[:, 0])


def det(*predictions) -> Detections:
    """Predictions as (class, conf, x0, y0, x1, y1) pixel boxes."""
    rows = np.array(predictions, dtype=float).reshape(-1, 6)
    return Detections(rows[:, 2:], rows[:, 0], rows[:, 1])


def kinds(found: list[dict]) -> list[tuple]:
    return [(f["kind"], f["label"], f["weight"]) for f in found]


def test_labels_the_model_confirms_give_no_finding():
    labels = gt((0, 10, 10, 60, 30), (1, 100, 100, 140, 120))
    preds = det((0, 0.9, 11, 10, 61, 31), (1, 0.12, 100, 101, 140, 121), (2, 0.3, 0, 200, 30, 230))
    # a weakly supported label (0.12 >= low_conf) and an unsure prediction on no label (0.3 < confident) say nothing
    assert findings(labels, preds, NAMES, S) == []


def test_a_confident_prediction_of_another_class_on_a_label_is_a_wrong_class():
    labels = gt((0, 10, 10, 60, 30))
    preds = det((2, 0.9, 10, 10, 60, 30), (0, 0.2, 12, 10, 60, 30))
    (found,) = findings(labels, preds, NAMES, S)
    assert (found["kind"], found["label"], found["class"], found["predicted"]) == ("wrong_class", 0, "title", "stamp")
    assert found["weight"] == pytest.approx(0.7)  # the other class's confidence minus the label class's
    assert found["iou"] == pytest.approx(1.0) and found["pred_box"] == [10.0, 10.0, 60.0, 30.0]


def test_a_shifted_box_is_misplaced_and_its_object_is_not_also_a_missing_label():
    labels = gt((1, 40, 10, 90, 30))  # shifted 30 px right of the object the model finds
    preds = det((1, 0.85, 10, 10, 60, 30))
    (found,) = findings(labels, preds, NAMES, S)
    assert (found["kind"], found["weight"]) == ("misplaced", 0.85)
    assert 0 < found["iou"] < 0.5


def test_a_label_nothing_supports_is_unmatched_and_an_unlabelled_object_is_a_missing_label():
    labels = gt((0, 10, 10, 60, 30), (1, 200, 200, 240, 220))
    preds = det(
        (0, 0.9, 10, 10, 60, 30),
        (2, 0.8, 100, 100, 150, 140),  # on no label
        (0, 0.6, 102, 101, 150, 141),  # the same object in another class: one missing label, not two
        (1, 0.01, 200, 200, 240, 220),  # below low_conf: does not support the second label
    )
    assert kinds(findings(labels, preds, NAMES, S)) == [("unmatched", 1, 0.5), ("unlabelled", None, 0.8)]


def test_what_both_models_contradict_scores_fully_what_one_does_half():
    labels = gt((0, 10, 10, 60, 30), (1, 100, 100, 140, 120))
    base = det((2, 0.9, 10, 10, 60, 30))  # calls the title a stamp, misses the date
    candidate = det((2, 0.8, 10, 10, 60, 30), (1, 0.9, 100, 100, 140, 120))  # the date learned
    entry = sample_entry(
        "p1", "holdout", {"v1": findings(labels, base, NAMES, S), "v2": findings(labels, candidate, NAMES, S)}, S
    )
    wrong, miss = entry["findings"]
    assert (wrong["kind"], wrong["weight"]) == ("wrong_class", pytest.approx(0.85))  # (0.9 + 0.8) / 2
    assert wrong["by"] == {
        "v1": {"kind": "wrong_class", "predicted": "stamp", "conf": 0.9, "weight": 0.9},
        "v2": {"kind": "wrong_class", "predicted": "stamp", "conf": 0.8, "weight": 0.8},
    }
    assert (miss["kind"], miss["weight"], list(miss["by"])) == ("unmatched", 0.25, ["v1"])
    assert (entry["score"], entry["total"]) == (pytest.approx(0.85), pytest.approx(1.1))  # the strongest; the sum
    assert entry["reasons"][0] == "label 0 'title' looks like 'stamp' (v1 0.90, v2 0.80): likely wrong class"


def synthetic_pool(seed: int, n: int = 30) -> tuple[list[GroundTruth], dict[str, list[Detections]]]:
    """``n`` pages of 3-5 labelled objects; two models that find each object with a jittered box at
    conf 0.6-0.98 and miss 15 % of them independently, plus an unsure false positive now and then."""
    rng = np.random.default_rng(seed)
    pages, preds = [], {"v1": [], "v2": []}
    for _ in range(n):
        k = int(rng.integers(3, 6))
        xy = rng.uniform(0, 200, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 50, (k, 2))], axis=1)
        cls = rng.integers(0, 3, k)
        pages.append(GroundTruth(boxes, cls))
        for model in preds:
            seen = rng.random(k) > 0.15
            jitter = boxes[seen] + rng.normal(0, 1.5, (int(seen.sum()), 4))
            conf = rng.uniform(0.6, 0.98, int(seen.sum()))
            fp = rng.uniform(0, 200, (1, 2))
            preds[model].append(
                Detections(
                    np.concatenate([jitter, np.concatenate([fp, fp + 30], axis=1)]),
                    np.append(cls[seen], rng.integers(0, 3)),
                    np.append(conf, rng.uniform(0.0, 0.45)),
                )
            )
    return pages, preds


def found_by(pred: Detections, labels: GroundTruth, i: int) -> bool:
    return bool((iou_matrix(labels.boxes[[i]], pred.boxes) >= 0.5).any())


@pytest.mark.parametrize("seed", range(8))
def test_a_deliberately_wrong_label_is_ranked_first(cfg, seed):
    # given a pool whose labels two models mostly confirm (each misses 15 % of the objects on its own)
    pages, preds = synthetic_pool(seed)
    # and one label of page 7 given the wrong class by the reviewer
    wrong = pages[7].cls.copy()
    i = next(i for i in range(len(wrong)) if all(found_by(m, pages[7], i) for m in preds["v1"][7:8] + preds["v2"][7:8]))
    wrong[i] = (wrong[i] + 1) % 3
    pages[7] = GroundTruth(pages[7].boxes, wrong)
    # when the check ranks the pool
    entries = [
        sample_entry(f"page-{p:02d}", "train", {m: findings(g, preds[m][p], NAMES, S) for m in preds}, S)
        for p, g in enumerate(pages)
    ]
    result = ranked(cfg, entries, S, {"v1": "base, before training", "v2": "candidate"})
    # then the page with the wrong label comes first, for that label, as a likely wrong class
    top = result["flagged"][0]
    assert top["id"] == "page-07", [(e["id"], e["score"]) for e in result["flagged"][:3]]
    assert top["findings"][0]["kind"] == "wrong_class" and top["findings"][0]["label"] == i
    assert "likely wrong class" in top["reasons"][0]
    assert result["checked"] == 30 and len(result["flagged"]) <= S.top_n
    assert [e["score"] for e in result["flagged"]] == sorted((e["score"] for e in result["flagged"]), reverse=True)
    assert all(e["score"] >= S.min_score for e in result["flagged"])


def test_settings_name_the_bad_key():
    with pytest.raises(BadInput) as err:
        Settings(low_conf=0.6, confident=0.5)
    assert "gate.label_check.low_conf=0.6" in err.value.problems[0]
    with pytest.raises(BadInput, match="invalid settings"):
        Settings(top_n=0)


def test_the_app_link_names_the_pool_dataset_and_the_saved_view(cfg):
    link = app_link(cfg, "7")
    assert link["url"] == "http://127.0.0.1:5151/datasets/detloop-pool?view=label-check"
    assert link["command"] == "detloop inspect --set pool --view label-check --model 7 --no-evaluate --app"
    renamed = app_link(compose(["gate.label_check.view=Label Check", "fiftyone.app.port=6000"]))
    assert renamed["url"].endswith(":6000/datasets/detloop-pool?view=label-check")  # FiftyOne's slug of the name


def gate_record(cfg, gate2: str) -> dict:
    """A gate record with one flagged pool sample, Gate 2 decided ``gate2``."""
    anchor = {"map50": 0.9, "ap50": {"title": 0.9}}
    measured = {"anchor_test": anchor, "pool_holdout": {"objects": 0}, "pool_trained_on": {"objects": 0}}
    labels, preds = gt((0, 10, 10, 60, 30)), det((2, 0.9, 10, 10, 60, 30))
    entry = sample_entry("report-0007", "holdout", {"v2": findings(labels, preds, NAMES, S)}, S)
    return {
        "decision": gate2,
        "candidate": {"version": "2"},
        "production": {"version": "1"},
        "summary": "v2 vs v1\nGate 1 ...\nGate 2 ...",
        "gates": {"new_samples": {"decision": gate2}},
        "measured": {"candidate": measured, "reference": measured},
        "label_check": ranked(cfg, [entry], S, {"v2": "candidate"}),
    }


def test_the_gate_report_lists_the_flagged_samples_with_the_app_link_only_when_gate_2_fails(cfg):
    report = report_markdown(gate_record(cfg, "review"))
    assert "## Label check" in report
    assert (
        "| 1 | report-0007 | holdout | 0.90 | label 0 'title' looks like 'stamp' (v2 0.90): likely wrong class |"
        in report
    )
    assert "(http://127.0.0.1:5151/datasets/detloop-pool?view=label-check)" in report
    assert "`detloop inspect --set pool --view label-check --model 2 --no-evaluate --app`" in report
    assert "## Label check" not in report_markdown(gate_record(cfg, "pass"))
