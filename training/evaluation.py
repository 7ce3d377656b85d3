"""Screening metrics: the operating point is chosen on validation data, then applied to test."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from torchmetrics.functional.classification import binary_calibration_error

from datasets.manifest import site_metric_name


def positive_scores(probabilities: np.ndarray, positive_classes: tuple[int, ...]) -> np.ndarray:
    """Probability of the positive finding: the summed probability of its classes.

    Clipped to [0, 1]: a float32 sum can come out at 1.0000001, and metrics that take scores
    outside [0, 1] for logits (torchmetrics) would then transform every score.
    """
    return np.clip(probabilities[:, list(positive_classes)].sum(axis=1), 0.0, 1.0)


def is_positive(labels: np.ndarray, positive_classes: tuple[int, ...]) -> np.ndarray:
    """Binary ground truth of the positive finding."""
    return np.isin(labels, positive_classes)


def choose_threshold(truth: np.ndarray, scores: np.ndarray, sensitivity_target: float) -> float:
    """Return a threshold with the best specificity whose sensitivity reaches the target.

    A case is called positive when its score is at least the threshold. The threshold lies
    midway between the lowest score that must be called positive and the next lower score, so
    that float rounding (PyTorch against onnxruntime) cannot flip a validation decision.

    Args:
        truth: Binary ground truth of validation cases.
        scores: Positive-finding scores of the same cases.
        sensitivity_target: Minimum sensitivity, in (0, 1].

    Raises:
        ValueError: if the validation data holds no positive or no negative case.
    """
    if truth.all() or not truth.any():
        raise ValueError("choosing a threshold needs positive and negative validation cases")
    _, true_positive_rate, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    reaching = int(np.flatnonzero(true_positive_rate >= sensitivity_target)[0])
    lowest_positive = float(min(thresholds[reaching], 1.0))
    next_lower = float(thresholds[reaching + 1]) if reaching + 1 < len(thresholds) else 0.0
    return (lowest_positive + next_lower) / 2


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


def proportion_interval(
    successes: int, trials: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaN when there are no trials)."""
    if trials == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, trials).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def auc_interval(
    truth: np.ndarray,
    scores: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling cases with both classes kept."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
    aucs = np.empty(resamples)
    for index in range(resamples):
        rows = np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        )
        aucs[index] = roc_auc_score(truth[rows], scores[rows])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


def _counts(truth: np.ndarray, decisions: np.ndarray) -> tuple[int, int, int, int]:
    """True positives, false positives, false negatives, true negatives."""
    return (
        int((decisions & truth).sum()),
        int((decisions & ~truth).sum()),
        int((~decisions & truth).sum()),
        int((~decisions & ~truth).sum()),
    )


def _rates(truth: np.ndarray, decisions: np.ndarray) -> dict[str, float]:
    tp, fp, fn, tn = _counts(truth, decisions)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def _cluster_bootstrap(
    truth: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    groups: np.ndarray,
    *,
    resamples: int,
    seed: int,
    confidence: float,
) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Percentile intervals resampling whole groups (patients), not single images.

    Resamples that hold one class only are skipped, and PPV (NPV) is undefined in a resample
    with no positive (negative) call; how many resamples each interval rests on is returned
    with the intervals, so that a report can say so.
    """
    rng = np.random.default_rng(seed)
    names, members = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(members == index) for index in range(len(names))]
    samples: dict[str, list[float]] = {
        m: [] for m in ("auc", "sensitivity", "specificity", "ppv", "npv")
    }
    for _ in range(resamples):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(names), len(names))])
        sample_truth, sample_scores = truth[rows], scores[rows]
        if sample_truth.all() or not sample_truth.any():
            continue
        samples["auc"].append(roc_auc_score(sample_truth, sample_scores))
        for name, value in _rates(sample_truth, sample_scores >= threshold).items():
            if np.isfinite(value):
                samples[name].append(value)
    tail = (1 - confidence) / 2 * 100
    intervals = {
        name: tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
        if values
        else (float("nan"), float("nan"))
        for name, values in samples.items()
    }
    return intervals, {name: len(values) for name, values in samples.items()}


def metric_intervals(
    truth: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    prefix: str,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """95% intervals of AUC, sensitivity, specificity, PPV and NPV.

    Without ``groups``, cases are independent: AUC by stratified bootstrap, rates by Wilson.
    With ``groups`` (patient of each image), every interval comes from a bootstrap over
    patients, since images of one patient are not independent.

    Returns:
        ``{prefix}_{metric}_ci_low`` and ``..._ci_high`` for each metric; with ``groups`` also
        ``{prefix}_ci_resamples``, the resamples used of 1000 (those with both classes), and
        ``{prefix}_ppv_ci_resamples`` and ``{prefix}_npv_ci_resamples``, those of them with a
        positive and a negative call (where PPV and NPV are defined).
    """
    flat: dict[str, float] = {}
    if groups is not None:
        intervals, used = _cluster_bootstrap(
            truth, scores, threshold, groups, resamples=1000, seed=seed, confidence=0.95
        )
        flat[f"{prefix}_ci_resamples"] = float(used["auc"])
        for name in ("ppv", "npv"):
            flat[f"{prefix}_{name}_ci_resamples"] = float(used[name])
    else:
        tp, fp, fn, tn = _counts(truth, scores >= threshold)
        intervals = {
            "auc": auc_interval(truth, scores, seed=seed),
            "sensitivity": proportion_interval(tp, tp + fn),
            "specificity": proportion_interval(tn, tn + fp),
            "ppv": proportion_interval(tp, tp + fp),
            "npv": proportion_interval(tn, tn + fn),
        }
    for name, (low, high) in intervals.items():
        flat[f"{prefix}_{name}_ci_low"] = low
        flat[f"{prefix}_{name}_ci_high"] = high
    return flat


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the softmax temperature that minimises the negative log-likelihood (on validation)."""

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled = logits / np.exp(log_temperature)
        return float(-np.mean(log_softmax(scaled, axis=1)[np.arange(len(labels)), labels]))

    fitted = minimize_scalar(negative_log_likelihood, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(fitted.x))


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of temperature-scaled logits: what the exported graph returns."""
    return softmax(logits / temperature, axis=1)


def expected_calibration_error(truth: np.ndarray, scores: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width bins) of the positive-finding probability."""
    return float(
        binary_calibration_error(
            torch.as_tensor(scores, dtype=torch.float32),
            torch.as_tensor(truth, dtype=torch.long),
            n_bins=bins,
            norm="l1",
        )
    )


def screening_report(
    truth: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    prefix: str,
    *,
    seed: int = 0,
    sites: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """All screening metrics of one split: operating point, 95% intervals, calibration.

    With ``sites``, the same metrics are added per site as ``{prefix}_site_{site}_...``; with
    ``groups`` (patients), intervals resample patients.
    """
    report = {
        **operating_point_metrics(truth, scores, threshold).as_dict(prefix),
        **metric_intervals(truth, scores, threshold, prefix, seed=seed, groups=groups),
        f"{prefix}_ece": expected_calibration_error(truth, scores),
    }
    for site in [] if sites is None else sorted(set(sites.tolist())):
        rows = sites == site
        name = site_metric_name(str(site))
        if truth[rows].all() or not truth[rows].any():
            report[f"{prefix}_site_{name}_cases"] = float(rows.sum())
            continue  # AUC and intervals need both classes at the site
        report.update(
            screening_report(
                truth[rows],
                scores[rows],
                threshold,
                f"{prefix}_site_{name}",
                seed=seed,
                groups=None if groups is None else groups[rows],
            )
        )
    return report


def release_metrics(
    val_labels: np.ndarray,
    val_probabilities: np.ndarray,
    test_labels: np.ndarray,
    test_probabilities: np.ndarray,
    positive: tuple[int, ...],
    threshold: float,
    *,
    seed: int,
    sites: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics a release gate reads: validation at the threshold, then test once.

    The same for a training run and for an INT8 copy, so that a gate a recipe states means the
    same for both.
    """
    val_truth, test_truth = is_positive(val_labels, positive), is_positive(test_labels, positive)
    val_scores = positive_scores(val_probabilities, positive)
    test_scores = positive_scores(test_probabilities, positive)
    metrics = {
        **operating_point_metrics(val_truth, val_scores, threshold).as_dict("selected_val"),
        # Manifests: per-site metrics, and intervals that resample patients, not images.
        **screening_report(
            test_truth, test_scores, threshold, "test", seed=seed, sites=sites, groups=groups
        ),
        # Accuracy at the most probable class, as MedMNIST reports it; validation's is what
        # recipes are compared on, test's is reported once.
        "val_accuracy": float(np.mean(val_probabilities.argmax(axis=1) == val_labels)),
        "test_accuracy": float(np.mean(test_probabilities.argmax(axis=1) == test_labels)),
    }
    classes = test_probabilities.shape[1]
    if classes > 2:
        metrics["test_multiclass_auc"] = float(
            roc_auc_score(
                test_labels,
                test_probabilities,
                multi_class="ovr",
                average="macro",
                labels=list(range(classes)),
            )
        )
    return metrics
