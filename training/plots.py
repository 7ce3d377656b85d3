"""Evaluation figures logged as PNG artifacts: ROC and PR curves, confusion matrix, reliability."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are only written to files

import mlflow
import numpy as np
from matplotlib import pyplot
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay


def curves_figure(truth: np.ndarray, scores: np.ndarray, threshold: float, title: str) -> Figure:
    """ROC and precision-recall curves with the operating point marked."""
    figure, (roc_axis, pr_axis) = pyplot.subplots(1, 2, figsize=(10, 4.5))
    RocCurveDisplay.from_predictions(truth, scores, ax=roc_axis, name="model")
    PrecisionRecallDisplay.from_predictions(truth, scores, ax=pr_axis, name="model")
    decisions = scores >= threshold
    sensitivity = decisions[truth].mean()
    specificity = (~decisions[~truth]).mean()
    precision = truth[decisions].mean() if decisions.any() else 1.0
    roc_axis.plot(
        1 - specificity, sensitivity, "o", color="crimson", label=f"threshold {threshold:.3f}"
    )
    pr_axis.plot(sensitivity, precision, "o", color="crimson", label=f"threshold {threshold:.3f}")
    roc_axis.legend(loc="lower right")
    pr_axis.legend(loc="lower left")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_figure(
    truth: np.ndarray, predicted: np.ndarray, labels: list[str], title: str
) -> Figure:
    """Confusion matrix with counts (rows: truth)."""
    figure, axis = pyplot.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        truth,
        predicted,
        labels=list(range(len(labels))),
        display_labels=labels,
        ax=axis,
        colorbar=False,
    )
    axis.set_title(title)
    figure.tight_layout()
    return figure


def reliability_figure(
    truth: np.ndarray, before: np.ndarray, after: np.ndarray, title: str
) -> Figure:
    """Reliability diagram of the positive-finding probability before and after scaling."""
    figure, axis = pyplot.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for scores, name in ((before, "uncalibrated"), (after, "temperature-scaled")):
        observed, predicted = calibration_curve(truth, scores, n_bins=10, strategy="quantile")
        axis.plot(predicted, observed, "o-", label=name)
    axis.set_xlabel("predicted probability")
    axis.set_ylabel("observed frequency")
    axis.set_title(title)
    axis.legend(loc="upper left")
    figure.tight_layout()
    return figure


def screening_figures(
    prefix: str, truth: np.ndarray, scores: np.ndarray, threshold: float, finding: str, title: str
) -> dict[str, Figure]:
    """ROC/PR curves and the confusion matrix at the threshold, keyed by artifact path."""
    return {
        f"plots/{prefix}_roc_pr.png": curves_figure(
            truth, scores, threshold, f"{title}: {finding}"
        ),
        f"plots/{prefix}_confusion_at_threshold.png": confusion_figure(
            truth.astype(int),
            (scores >= threshold).astype(int),
            ["negative", finding],
            f"{title} at threshold {threshold:.3f}",
        ),
    }


def log_figures(figures: dict[str, Figure]) -> None:
    """Log each figure to the active MLflow run as a PNG, then free it."""
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
        pyplot.close(figure)
