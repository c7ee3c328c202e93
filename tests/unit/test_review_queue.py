"""The review queue's ordering rules on plain arrays, the fingerprint's normalisation and the CLI's refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data import queue as q
from detloop.model.embed import unit_fingerprints

INBOX_IDS = ["report-00012", "report-00013", "report-00014", "report-00015"]  # the tiny demo inbox


@pytest.fixture(scope="module")
def rules() -> q.QueueRules:
    """The default rules (serving confidence 0.25, floor 0.05, band 0.2, every weight 1)."""
    return q.QueueRules.from_cfg(compose([]))


def box(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y1]


# --------------------------------------------------------------------------- uncertainty


def test_a_box_is_most_uncertain_at_the_serving_confidence_and_not_at_all_a_band_away(rules):
    u = q.box_uncertainty(np.array([0.25, 0.15, 0.35, 0.05, 0.45, 0.9, 0.0]), rules.serve_conf, rules.band)
    assert u == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_low_only_counts_boxes_below_the_threshold_that_no_served_box_covers(rules):
    boxes = np.array([box(0, 0, 0.2, 0.2), box(0.01, 0.0, 0.21, 0.2), box(0.6, 0.6, 0.8, 0.8)])
    conf = np.array([0.9, 0.1, 0.1])  # the second hides under the first (IoU 0.9); the third is alone
    assert q.low_only_share(boxes, conf, rules.serve_conf, rules.iou) == pytest.approx(1 / 3)
    assert q.low_only_share(boxes[1:], conf[1:], rules.serve_conf, rules.iou) == 1.0
    assert q.low_only_share(np.zeros((0, 4)), np.zeros(0), rules.serve_conf, rules.iou) == 0.0


def test_disagreement_matches_served_boxes_to_proposed_ones_by_class_and_iou(rules):
    proposed = (np.array([box(0, 0, 0.2, 0.2), box(0.5, 0.5, 0.7, 0.7)]), np.array([0, 3]))
    boxes = np.array([box(0, 0, 0.2, 0.2), box(0.5, 0.5, 0.7, 0.7), box(0.1, 0.8, 0.2, 0.9)])
    # given the model serves both proposed boxes with their classes, plus one low box
    assert q.disagreement(boxes, np.array([0, 3, 1]), np.array([0.9, 0.8, 0.1]), proposed, rules) == 0.0
    # when it calls the second one another class, one of two is matched
    assert q.disagreement(boxes, np.array([0, 2, 1]), np.array([0.9, 0.8, 0.1]), proposed, rules) == 0.5
    # when it serves nothing at all, nothing is matched; an empty page both agree on is no disagreement
    assert q.disagreement(boxes, np.array([0, 3, 1]), np.array([0.2, 0.1, 0.1]), proposed, rules) == 1.0
    assert q.disagreement(boxes, np.array([0, 3, 1]), np.array([0.2, 0.1, 0.1]), (np.zeros((0, 4)), []), rules) == 0


def test_each_box_is_matched_once():
    a = np.array([box(0, 0, 0.2, 0.2), box(0, 0, 0.2, 0.21)])
    assert q.matched_pairs(a, [0, 0], np.array([box(0, 0, 0.2, 0.2)]), [0], 0.5) == 1
    assert q.iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)


def test_uncertainty_reads_boxes_down_to_the_floor_and_weighs_its_parts(rules):
    boxes = np.array([box(0, 0, 0.2, 0.2), box(0.5, 0.5, 0.7, 0.7), box(0.1, 0.8, 0.2, 0.9)])
    cls, conf = np.array([0, 1, 2]), np.array([0.25, 0.15, 0.01])  # the last is under the floor 0.05: not read
    u = q.uncertainty(boxes, cls, conf, None, rules)
    assert (u.peak, u.mean, u.low_only, u.disagreement) == (1.0, 0.75, 0.5, None)
    assert (u.boxes, u.served) == (2, 1)
    assert u.value == pytest.approx((1.0 + 0.75 + 0.5) / 3)
    with_labels = q.uncertainty(boxes, cls, conf, (boxes[:1], np.array([0])), rules)
    assert with_labels.disagreement == 0.0 and with_labels.value == pytest.approx((1.0 + 0.75 + 0.5 + 0) / 4)
    # a part weighted 0 is left out of the mean
    only_peak = replace(rules, parts={"peak": 1.0, "mean": 0.0, "low_only": 0.0, "disagreement": 0.0})
    assert q.uncertainty(boxes, cls, conf, None, only_peak).value == 1.0


def test_proposed_yolo_labels_become_normalized_xyxy_boxes():
    boxes, cls = q.yolo_to_xyxy(np.array([[3, 0.5, 0.5, 0.2, 0.4]]))
    assert boxes == pytest.approx(np.array([[0.4, 0.3, 0.6, 0.7]])) and cls.tolist() == [3]


# --------------------------------------------------------------------------- novelty and near-duplicates


def test_novelty_is_half_at_the_anchors_own_spacing():
    assert q.novelty(0.0, 2.0, "train/a").value == 0.0
    assert q.novelty(2.0, 2.0, "train/a").value == 0.5
    far = q.novelty(18.0, 2.0, "train/a")
    assert far.value == pytest.approx(0.9) and far.ratio == 9.0


def test_anchor_spacing_is_the_median_nearest_neighbour_distance():
    points = np.array([[0.0], [1.0], [3.0], [6.0]])  # nearest neighbours at 1, 1, 2, 3
    assert q.anchor_spacing(points) == 1.5
    assert q.anchor_spacing(points[:1]) == 0.0
    assert q.anchor_spacing(np.arange(50.0).reshape(-1, 1), max_samples=10) > 1.0  # a subsample, spread wider


def test_nearest_euclidean_resolves_the_tiny_differences_of_an_untrained_model():
    # given embeddings of norm ~0.24 that differ in the fifth digit (as a 1-epoch model's do)
    rng = np.random.default_rng(0)
    anchor = (0.015 + rng.normal(0, 1e-5, (40, 256))).astype(np.float32)
    query = anchor[[7, 21]] + np.float32(2e-6)
    index, dist = q.nearest_euclidean(query, anchor)
    assert index.tolist() == [7, 21] and (dist > 0).all() and (dist < 1e-4).all()
    assert q.nearest_euclidean(query, np.zeros((0, 256)))[0].tolist() == [-1, -1]


def test_nearest_cosine_finds_the_most_similar_row():
    ref = np.eye(3)
    index, cos = q.nearest_cosine(np.array([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]), ref)
    assert index.tolist() == [2, 0] and cos == pytest.approx([0.8, 1.0])
    assert q.nearest_cosine(np.eye(2), np.zeros((0, 2)))[1].tolist() == [-np.inf, -np.inf]


def test_a_fingerprint_ignores_brightness_and_flat_channels():
    rng = np.random.default_rng(1)
    grids = rng.random((1, 4, 64))
    grids[0, 3] = 0.7  # a channel flat over the page says nothing about the layout
    brighter = grids * 1.5 + 0.2  # the same page, brighter: every channel scaled and shifted
    other = rng.random((1, 4, 64))
    fp = unit_fingerprints(np.concatenate([grids, brighter, other]))
    assert fp.shape == (3, 256) and np.linalg.norm(fp, axis=1) == pytest.approx([1, 1, 1], abs=1e-6)
    assert float(fp[0] @ fp[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(fp[0] @ fp[2]) < 0.5


# --------------------------------------------------------------------------- the order


def _entry(sample_id, arrival, u_value, n_value, reviewed, rules):
    u = q.Uncertainty(u_value, u_value, u_value, 0.0, None, 3, 1)
    n = q.Novelty(n_value, n_value, 1.0, "train/x")
    return q.entry(sample_id, arrival, u, n, reviewed, rules)


def test_near_duplicates_of_reviewed_images_go_last_whatever_their_score(rules):
    entries = [
        _entry("plain", 0, 0.2, 0.3, ("pool/report-1", 0.5), rules),
        _entry("copy", 1, 0.9, 0.9, ("pool/report-00001", 0.991), rules),  # the highest score, but a copy
        _entry("new", 2, 0.4, 0.9, None, rules),
        _entry("tie", 3, 0.2, 0.3, ("rejected/report-2", 0.1), rules),  # same score as "plain": arrival decides
    ]
    ordered = q.order(entries)
    assert [e.id for e in ordered] == ["new", "plain", "tie", "copy"]
    assert ordered[-1].duplicate == q.Duplicate("pool/report-00001", 0.991)
    assert ordered[-1].reason.startswith("near-duplicate of pool/report-00001 (cos 0.991); score 0.90")
    assert "novelty 0.90" in ordered[0].reason and "uncertainty 0.40" in ordered[0].reason
    item = ordered[-1].as_dict(4)
    assert item["rank"] == 4 and item["duplicate_of"] == {"id": "pool/report-00001", "cos": 0.991}
    json.dumps(item)  # JSON-ready


def test_the_score_is_the_weighted_mean_of_uncertainty_and_novelty(rules):
    u, n = q.Uncertainty(0.8, 0, 0, 0, None, 0, 0), q.Novelty(0.2, 0.2, 1.0, "train/x")
    assert q.score(u, n, rules) == pytest.approx(0.5)
    novelty_only = replace(rules, weights={"uncertainty": 0.0, "novelty": 2.0})
    assert q.score(u, n, novelty_only) == pytest.approx(0.2)


def test_bad_queue_settings_are_refused_naming_each_key():
    with pytest.raises(BadInput) as refused:
        q.QueueRules.from_cfg(compose(["inbox.queue.conf=0.3", "inbox.queue.band=0", "inbox.queue.weights.novelty=-1"]))
    text = refused.value.render()
    for key in ("inbox.queue.conf=0.3", "gate.new_samples.conf=0.25", "inbox.queue.band=0", "weights.novelty=-1"):
        assert key in text
    zero = ["inbox.queue.uncertainty.peak=0", "inbox.queue.uncertainty.mean=0"]
    zero += ["inbox.queue.uncertainty.low_only=0", "inbox.queue.uncertainty.disagreement=0"]
    with pytest.raises(BadInput, match="at least one weight"):
        q.QueueRules.from_cfg(compose(zero))


def test_a_saved_order_lists_waiting_reports_and_new_ones_last():
    ordered, unranked = q.saved_order(["c", "gone", "a"], ["a", "b", "c", "d"])
    assert ordered == ["c", "a", "b", "d"] and unranked == ["b", "d"]


# --------------------------------------------------------------------------- the commands


def test_review_accept_without_ids_lists_the_inbox_in_the_saved_queue_order(overrides, tmp_path, capsys):
    # given a saved queue that ranked three of the four waiting reports
    cfg = compose(overrides)
    saved = tmp_path / "build" / "review_queue" / "queue.json"
    saved.parent.mkdir(parents=True)
    items = [{"id": i, "rank": r, "reason": f"reason {r}"} for r, i in enumerate(INBOX_IDS[2::-1], start=1)]
    saved.write_text(json.dumps({"items": items}))
    assert str(cfg.inbox.queue.cache).startswith(str(tmp_path))
    # when the reviewer names no sample, then the inbox is listed in that order and nothing changes
    assert cli(["review", "accept", "--reviewer", "ana", *overrides]) == 2
    err = capsys.readouterr().err
    listed = [line.split()[1] for line in err.splitlines() if line.strip().split()[1:2] and "report-" in line]
    assert listed == ["report-00014", "report-00013", "report-00012", "report-00015"]
    assert "reason 1" in err and "1 not ranked yet: run detloop review queue" in err
    assert "no sample ids given" in err


def test_review_queue_takes_no_ids(overrides, capsys):
    assert cli(["review", "queue", "report-00012", *overrides]) == 2
    assert "review queue takes no sample ids" in capsys.readouterr().err
