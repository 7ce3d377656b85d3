"""Evaluation stage: a trained model on data it has never seen, logged as a linked run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow

from datasets import DatasetError, ManifestData, load_manifest, pixel_sha256
from training.evaluation import is_positive, positive_scores, screening_report
from training.models import predict_probabilities
from training.plots import log_figures, screening_figures
from training.runs import RunContext, RunError, load_run_context
from training.tracking import provenance

logger = logging.getLogger(__name__)
OVERLAP_CHECK_TAG = "medscreen.overlap_check"


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation run and its headline metrics."""

    run_id: str
    evaluated_run_id: str
    metrics: dict[str, float]


def evaluate_manifest(run_id: str, manifest: Path) -> EvaluationResult:
    """Evaluate a training run's model on a hospital's manifest, at the run's own threshold.

    Every row is read and checked before anything is logged. The evaluation is a new MLflow run
    in the model's experiment, nested under the training run (``mlflow.parentRunId``) and tagged
    with it; per-site metrics are added when the manifest has a ``site`` column, and intervals
    resample patients when it has a ``patient_id`` column. Patient IDs are never logged.

    Args:
        run_id: The training run whose model is evaluated.
        manifest: CSV of ``path,label[,patient_id][,site]``.

    Returns:
        The evaluation run id and its metrics.

    Raises:
        DatasetError: naming the manifest line that is wrong, or the first row whose image the
            model was trained or selected on.
        RunError: if the training run does not exist.
    """
    context = load_run_context(run_id)
    spec = context.spec
    data = load_manifest(manifest, spec)
    overlap_check = _refuse_training_images(context, data)
    network = context.network()
    probabilities = predict_probabilities(network, data.images, context.temperature)
    truth = is_positive(data.labels, spec.positive_classes)
    scores = positive_scores(probabilities, spec.positive_classes)
    threshold = context.threshold
    if truth.all() or not truth.any():
        raise DatasetError(f"{manifest}: evaluation needs both positive and negative rows")
    # With patient IDs, intervals resample patients: a patient's images are not independent.
    groups = data.patient_groups() if data.patient_ids is not None else None
    metrics = screening_report(
        truth, scores, threshold, "eval", seed=context.recipe.seed, sites=data.sites, groups=groups
    )
    with mlflow.start_run(
        experiment_id=context.run.info.experiment_id,
        run_name=f"evaluate {context.recipe.name} on {manifest.name}",
        tags={
            "mlflow.parentRunId": run_id,
            "medscreen.evaluates_run_id": run_id,
            "medscreen.dataset": spec.name,
            "medscreen.manifest.fingerprint": data.fingerprint,
            OVERLAP_CHECK_TAG: overlap_check,
            **provenance(),
        },
    ) as run:
        mlflow.log_params(
            {
                "manifest": manifest.name,
                "rows": len(data),
                "sites": 0 if data.sites is None else len(set(data.sites.tolist())),
                "threshold": threshold,
                "temperature": context.temperature,
            }
        )
        dataset = mlflow.data.from_numpy(
            features=data.images,
            targets=data.labels,
            source=str(manifest.resolve()),
            name=f"manifest-{manifest.stem}",
            digest=data.fingerprint[:32],
        )
        mlflow.log_input(
            dataset,
            context="evaluation",
            tags={"fingerprint_sha256": data.fingerprint, "rows": str(len(data))},
        )
        mlflow.log_metrics(metrics)
        log_figures(
            screening_figures(
                "eval", truth, scores, threshold, spec.positive_finding, manifest.name
            )
        )
    return EvaluationResult(run_id=run.info.run_id, evaluated_run_id=run_id, metrics=metrics)


def _refuse_training_images(context: RunContext, data: ManifestData) -> str:
    """Refuse rows whose pixels the run trained or selected on (its train and val splits).

    Pixels, not files, are compared: a MedMNIST training image saved as a PNG is still caught.

    Returns:
        What was checked, for the evaluation run's tag.

    Raises:
        DatasetError: naming the first such row and how many there are.
    """
    try:
        seen = {
            pixel_sha256(image)
            for split in ("train", "val")
            for image in context.split(split).images
        }
    except (DatasetError, RunError, OSError) as error:
        # A region evaluating a shared model may not hold the data it was trained on.
        logger.warning("training data not readable here, overlap not checked: %s", error)
        return "not checked: the run's training data is not readable here"
    overlapping = [row for row, image in enumerate(data.images) if pixel_sha256(image) in seen]
    if overlapping:
        raise DatasetError(
            f"{data.source}:{data.lines[overlapping[0]]}: this image is in the training or "
            f"validation data of run {context.run.info.run_id} ({len(overlapping)} of "
            f"{len(data)} rows are); evaluate on images the model has never seen"
        )
    return "passed: no row is in the run's training or validation data"
