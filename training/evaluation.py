"""Screening metrics: the operating point is chosen on validation data, then applied to test."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve


def positive_scores(probabilities: np.ndarray, positive_classes: tuple[int, ...]) -> np.ndarray:
    """Probability of the positive finding: the summed probability of its classes."""
    return probabilities[:, list(positive_classes)].sum(axis=1)


def is_positive(labels: np.ndarray, positive_classes: tuple[int, ...]) -> np.ndarray:
    """Binary ground truth of the positive finding."""
    return np.isin(labels, positive_classes)


def choose_threshold(truth: np.ndarray, scores: np.ndarray, sensitivity_target: float) -> float:
    """Return the highest threshold whose sensitivity reaches the target (best specificity).

    A case is called positive when its score is at least the threshold.

    Args:
        truth: Binary ground truth of validation cases.
        scores: Positive-finding scores of the same cases.
        sensitivity_target: Minimum sensitivity, in (0, 1].

    Raises:
        ValueError: if the validation data holds no positive or no negative case.
    """
    if truth.all() or not truth.any():
        raise ValueError("choosing a threshold needs positive and negative validation cases")
    _, true_positive_rate, thresholds = roc_curve(truth, scores)
    reaching = np.flatnonzero(true_positive_rate >= sensitivity_target)
    threshold = float(thresholds[reaching[0]])
    return min(threshold, 1.0)


@dataclass(frozen=True)
class OperatingPointMetrics:
    """Binary screening metrics at one threshold."""

    auc: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy_at_threshold: float
    cases: int
    positives: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Return the metrics keyed ``{prefix}_{name}``, as MLflow metrics."""
        return {f"{prefix}_{name}": float(value) for name, value in asdict(self).items()}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def operating_point_metrics(
    truth: np.ndarray, scores: np.ndarray, threshold: float
) -> OperatingPointMetrics:
    """Compute AUC and the confusion-matrix metrics at a threshold."""
    decisions = scores >= threshold
    tn, fp, fn, tp = confusion_matrix(truth, decisions, labels=[False, True]).ravel()
    return OperatingPointMetrics(
        auc=float(roc_auc_score(truth, scores)),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        accuracy_at_threshold=_ratio(tp + tn, len(truth)),
        cases=len(truth),
        positives=int(truth.sum()),
    )
