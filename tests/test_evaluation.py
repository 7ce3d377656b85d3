"""Operating point and interval arithmetic on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation import (
    choose_threshold,
    expected_calibration_error,
    metric_intervals,
    operating_point_metrics,
    positive_scores,
    proportion_interval,
)


def test_threshold_reaches_the_target_with_best_specificity_and_a_margin():
    truth = np.array([0, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    # 75% sensitivity: call 0.6, 0.7, 0.9 positive; the threshold sits between 0.4 and 0.6.
    assert choose_threshold(truth, scores, 0.75) == pytest.approx(0.5)
    # 100% sensitivity needs 0.35 called positive: midway to 0.3.
    threshold = choose_threshold(truth, scores, 1.0)
    assert threshold == pytest.approx(0.325)
    metrics = operating_point_metrics(truth, scores, threshold)
    assert metrics.sensitivity == 1.0 and metrics.specificity == 0.75
    assert metrics.ppv == pytest.approx(4 / 5) and metrics.npv == 1.0


def test_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="positive and negative"):
        choose_threshold(np.ones(4, dtype=bool), np.linspace(0, 1, 4), 0.9)


def test_intervals_contain_the_estimate():
    rng = np.random.default_rng(1)
    truth = rng.random(400) < 0.5
    scores = np.clip(truth * 0.4 + rng.random(400) * 0.6, 0, 1)
    point = operating_point_metrics(truth, scores, 0.5)
    intervals = metric_intervals(truth, scores, 0.5, "test")
    for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        low, high = intervals[f"test_{name}_ci_low"], intervals[f"test_{name}_ci_high"]
        assert low < getattr(point, name) < high, name
    low, high = proportion_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)


def test_patient_bootstrap_is_wider_than_treating_images_as_independent():
    rng = np.random.default_rng(3)
    # 40 patients with 10 near-identical images each: 40 independent cases, not 400.
    patient_truth = rng.random(40) < 0.5
    patient_scores = np.clip(patient_truth * 0.3 + rng.random(40) * 0.7, 0, 1)
    truth = np.repeat(patient_truth, 10)
    scores = np.repeat(patient_scores, 10) + rng.normal(0, 1e-3, 400)
    groups = np.repeat(np.arange(40).astype(str), 10)
    independent = metric_intervals(truth, scores, 0.5, "t")
    clustered = metric_intervals(truth, scores, 0.5, "t", groups=groups)
    for name in ("auc", "sensitivity", "specificity"):
        width = clustered[f"t_{name}_ci_high"] - clustered[f"t_{name}_ci_low"]
        assert width > 1.8 * (independent[f"t_{name}_ci_high"] - independent[f"t_{name}_ci_low"])


def test_summed_positive_scores_stay_in_the_unit_interval():
    """A float32 sum of several classes can exceed 1; torchmetrics then took all for logits."""
    probabilities = np.array([[0.0, 0.0, 0.5000001, 0.25, 0.25]] + [[0.2] * 5] * 3, np.float32)
    assert probabilities[0, 2:].sum() > 1.0
    scores = positive_scores(probabilities, (2, 3, 4))
    assert scores.max() == 1.0
    truth = np.array([True, False, True, False])
    # Unclipped, the one score above 1 made the ECE a sigmoid of every score.
    assert expected_calibration_error(truth, scores) == pytest.approx(
        expected_calibration_error(truth, np.clip(probabilities[:, 2:].sum(1), 0, 1))
    )


def test_patient_bootstrap_says_how_many_resamples_it_used():
    # Only one patient of ten is positive: a third of resamples hold no positive at all.
    truth = np.repeat(np.arange(10) == 0, 3)
    scores = np.linspace(0, 1, 30)
    groups = np.repeat(np.arange(10).astype(str), 3)
    used = metric_intervals(truth, scores, 0.5, "t", groups=groups)["t_ci_resamples"]
    assert 500 < used < 1000
    assert "t_ci_resamples" not in metric_intervals(truth, scores, 0.5, "t")


def test_patient_bootstrap_says_how_many_resamples_each_predictive_value_rests_on():
    # Eight patients of three images; one image, of a negative patient, is called negative:
    # NPV is defined only in the resamples that draw that patient (about two in three).
    truth = np.repeat(np.arange(8) < 4, 3)
    scores = np.linspace(0.31, 1, 24)[::-1].copy()
    scores[-1] = 0.1
    groups = np.repeat(np.arange(8).astype(str), 3)
    flat = metric_intervals(truth, scores, 0.3, "t", groups=groups)
    used = flat["t_ci_resamples"]
    assert flat["t_ppv_ci_resamples"] == used  # every resample with both classes calls positives
    assert 0.5 * used < flat["t_npv_ci_resamples"] < 0.8 * used
    assert (flat["t_npv_ci_low"], flat["t_npv_ci_high"]) == (1.0, 1.0)  # one true negative call
