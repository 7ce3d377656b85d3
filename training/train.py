"""Training stage: recipe in, MLflow run with model weights, metrics and lineage out."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from monai.utils import set_determinism
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from datasets import ImageSplit
from datasets.manifest import ManifestSpec
from training.data import ScreeningDataModule
from training.evaluation import (
    calibrated_probabilities,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    is_positive,
    positive_scores,
    release_metrics,
)
from training.lit_models import ScreeningClassifier
from training.models import ScreeningNetwork, build_network, predict_logits
from training.plots import curves_figure, log_figures, reliability_figure, screening_figures
from training.recipe import OptimisationSection, Recipe
from training.run_card import log_run_card
from training.tracking import configure_tracking, ensure_experiment, provenance

WEIGHTS_ARTIFACT = "model/network_state_dict.pt"
RECIPE_ARTIFACT = "recipe.yaml"
OPERATING_POINT_ARTIFACT = "evaluation/operating_point.json"
LINEAGE_ARTIFACT = "data/lineage.json"


class EpochMetricsToMlflow(Callback):
    """Logs each epoch's losses and validation metric to the active MLflow run, step = epoch."""

    def __init__(self, names: tuple[str, ...] = ("train_loss", "val_loss", "val_auc")) -> None:
        super().__init__()
        self.names = names

    def on_train_epoch_end(self, trainer: pl.Trainer, _: pl.LightningModule) -> None:
        """Runs after the epoch's validation, so all metrics of the epoch are known."""
        metrics = {
            name: float(trainer.callback_metrics[name])
            for name in self.names
            if name in trainer.callback_metrics
        }
        mlflow.log_metrics(metrics, step=trainer.current_epoch)


class TrainingDivergedError(RuntimeError):
    """The training loss stopped being a finite number: nothing sound can be chosen from it."""


class StopOnNonFiniteLoss(Callback):
    """Stops at the first batch whose loss is NaN or infinite, naming what to change.

    Without it a diverged run trained every epoch on NaN and died in threshold selection with
    a traceback; the run is marked FAILED either way.
    """

    def __init__(self, learning_rate: float) -> None:
        super().__init__()
        self.learning_rate = learning_rate

    def on_train_batch_end(
        self, trainer: pl.Trainer, _: pl.LightningModule, outputs: object, __: object, batch: int
    ) -> None:
        """Check the batch's loss (Lightning hands it over as ``outputs["loss"]``)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise TrainingDivergedError(
                f"training diverged: the loss was {float(loss)} at epoch {trainer.current_epoch}, "
                f"batch {batch}; lower optimisation.learning_rate (now {self.learning_rate:g})"
            )


def build_trainer(
    optimisation: OptimisationSection, callbacks: list[Callback], *, show_progress: bool
) -> pl.Trainer:
    """A deterministic CPU trainer that logs through callbacks only (no Lightning logger)."""
    return pl.Trainer(
        max_epochs=optimisation.max_epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        callbacks=[*callbacks, StopOnNonFiniteLoss(optimisation.learning_rate)],
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        limit_train_batches=optimisation.limit_train_batches,
        num_sanity_val_steps=0,
    )


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced."""

    run_id: str
    threshold: float
    metrics: dict[str, float]


def _log_split(split: ImageSplit) -> None:
    dataset = mlflow.data.from_numpy(
        features=split.images,
        targets=split.labels,
        source=split.spec.url,
        name=f"{split.spec.name}-{split.split}",
        digest=split.fingerprint[:32],
    )
    mlflow.log_input(
        dataset,
        context={"train": "training", "val": "validation", "test": "testing"}[split.split],
        tags={"fingerprint_sha256": split.fingerprint, "rows": str(len(split))},
    )
    mlflow.set_tag(f"medscreen.data.{split.split}.fingerprint", split.fingerprint)


def _split_counts(split: ImageSplit) -> dict:
    """Rows, fingerprint and (for manifests) patient, positive and per-site counts of a split."""
    counts: dict = {"rows": len(split), "fingerprint_sha256": split.fingerprint}
    if split.groups is not None:
        counts["patients"] = len(np.unique(split.groups))
        counts["positives"] = int(is_positive(split.labels, split.spec.positive_classes).sum())
    if split.sites is not None:
        names, rows = np.unique(split.sites, return_counts=True)
        counts["sites"] = {str(name): int(count) for name, count in zip(names, rows, strict=True)}
    return counts


def _lineage(datamodule: ScreeningDataModule) -> dict:
    """What the run's data was, exactly: file checksums and split fingerprints, no patient IDs."""
    spec, recipe = datamodule.spec, datamodule.recipe
    lineage = {
        "dataset": spec.name,
        "url": spec.url,
        "file_sha256": spec.sha256,
        "licence": spec.licence,
        "citation": spec.citation,
        "classes": list(spec.classes),
        "positive_finding": spec.positive_finding,
        "positive_classes": list(spec.positive_classes),
        "splits": {name: _split_counts(split) for name, split in datamodule.splits.items()},
    }
    if datamodule.manifest is not None:
        lineage |= {
            "source": "manifest",
            "manifest_sha256": spec.sha256,
            "manifest_content_sha256": datamodule.manifest.content_fingerprint,
            "split_rule": "patient-disjoint (rows without patient_id are their own patient)",
            "patients": datamodule.manifest.patients,
            "val_fraction": recipe.data.val_fraction,
            "test_fraction": recipe.data.test_fraction,
            "split_seed": recipe.seed,
        }
    return lineage


def seeded_classifier(recipe: Recipe) -> tuple[ScreeningDataModule, ScreeningClassifier]:
    """Seed every generator, load the splits and build the untrained classifier of a recipe.

    Raises:
        DatasetError: naming the file (and manifest line) that is wrong.
    """
    set_determinism(seed=recipe.seed)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    datamodule = ScreeningDataModule(recipe)
    datamodule.setup()
    spec = datamodule.spec
    network = build_network(recipe.model, spec.image_shape, len(spec.classes))
    class_weights = (
        datamodule.class_weights() if recipe.optimisation.class_weighting == "balanced" else None
    )
    module = ScreeningClassifier(
        network, spec.positive_classes, recipe.optimisation, class_weights, seed=recipe.seed
    )
    return datamodule, module


def train_recipe(recipe: Recipe, *, show_progress: bool = True) -> TrainingResult:
    """Train the recipe's network and record everything about the run in MLflow.

    The data (a catalogue dataset, or a manifest split by patient) is read and checked before
    any run is created. The checkpoint with the best validation AUC is kept; its threshold is
    chosen on validation data for the recipe's sensitivity target; test metrics are computed
    once, at the end (per site, with patient-level intervals, for manifests). A Markdown run card
    is logged as ``card/run_card.md``.

    Args:
        recipe: A validated recipe.
        show_progress: Show Lightning's progress bar.

    Returns:
        The run id, the chosen threshold and the logged summary metrics.

    Raises:
        DatasetError: naming the file (and manifest line) that is wrong, before any run exists.
    """
    configure_tracking()
    datamodule, module = seeded_classifier(recipe)
    spec, network = datamodule.spec, module.network

    experiment_id = ensure_experiment(recipe.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=recipe.name) as run:
        tags = provenance() | {
            "medscreen.recipe": recipe.name,
            "medscreen.dataset": spec.name,
            "medscreen.data.source": "manifest" if isinstance(spec, ManifestSpec) else "catalogue",
            "medscreen.model_name": recipe.registration.model_name,
            "medscreen.seed": str(recipe.seed),
        }
        if isinstance(spec, ManifestSpec):
            tags["medscreen.manifest.sha256"] = spec.sha256
        mlflow.set_tags(tags)
        mlflow.log_params(recipe.flat())
        mlflow.log_text(
            yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), RECIPE_ARTIFACT
        )
        for split in datamodule.splits.values():
            _log_split(split)
        lineage = _lineage(datamodule)
        mlflow.log_dict(lineage, LINEAGE_ARTIFACT)

        with tempfile.TemporaryDirectory() as checkpoint_dir:
            best_checkpoint = ModelCheckpoint(
                dirpath=checkpoint_dir, monitor="val_auc", mode="max", save_top_k=1
            )
            trainer = build_trainer(
                recipe.optimisation,
                [best_checkpoint, EpochMetricsToMlflow()],
                show_progress=show_progress,
            )
            trainer.fit(module, datamodule=datamodule)
            state = torch.load(best_checkpoint.best_model_path, weights_only=True)["state_dict"]
            module.load_state_dict(state)
        best_epoch = int(
            Path(best_checkpoint.best_model_path).stem.split("epoch=")[1].split("-")[0]
        )

        val, test = datamodule.splits["val"], datamodule.splits["test"]
        metrics, temperature, threshold = _evaluate(network, val, test, recipe)
        metrics["best_epoch"] = float(best_epoch)
        mlflow.log_metrics(metrics)
        operating_point = {
            "threshold": threshold,
            "sensitivity_target": recipe.evaluation.sensitivity_target,
            "temperature": temperature,
            "chosen_on": "val",
            "rule": "positive when the positive-finding probability >= threshold",
            "metrics": metrics,
        }
        mlflow.log_dict(operating_point, OPERATING_POINT_ARTIFACT)
        with tempfile.TemporaryDirectory() as weights_dir:
            weights_path = Path(weights_dir) / Path(WEIGHTS_ARTIFACT).name
            torch.save(network.state_dict(), weights_path)
            mlflow.log_artifact(str(weights_path), str(Path(WEIGHTS_ARTIFACT).parent))
        log_run_card(
            run_id=run.info.run_id,
            recipe=recipe,
            spec=spec,
            operating_point=operating_point,
            lineage=lineage,
            tags=tags,
        )
        return TrainingResult(run_id=run.info.run_id, threshold=threshold, metrics=metrics)


def _evaluate(
    network: ScreeningNetwork, val: ImageSplit, test: ImageSplit, recipe: Recipe
) -> tuple[dict[str, float], float, float]:
    """Calibrate and choose the threshold on validation, then report test once, with plots.

    Returns:
        The metrics, the fitted temperature and the threshold.
    """
    spec = val.spec
    positive = spec.positive_classes
    val_logits, test_logits = (
        predict_logits(network, val.images),
        predict_logits(network, test.images),
    )
    temperature = fit_temperature(val_logits, val.labels)
    val_probabilities = calibrated_probabilities(val_logits, temperature)
    test_probabilities = calibrated_probabilities(test_logits, temperature)
    val_truth, test_truth = is_positive(val.labels, positive), is_positive(test.labels, positive)
    val_scores = positive_scores(val_probabilities, positive)
    test_scores = positive_scores(test_probabilities, positive)
    threshold = choose_threshold(val_truth, val_scores, recipe.evaluation.sensitivity_target)
    uncalibrated = positive_scores(calibrated_probabilities(test_logits, 1.0), positive)
    metrics = {
        "threshold": threshold,
        "temperature": temperature,
        **release_metrics(
            val.labels,
            val_probabilities,
            test.labels,
            test_probabilities,
            positive,
            threshold,
            seed=recipe.seed,
            sites=test.sites,
            groups=test.groups,
        ),
        "test_ece_uncalibrated": expected_calibration_error(test_truth, uncalibrated),
    }
    finding = spec.positive_finding
    log_figures(
        {
            "plots/val_roc_pr.png": curves_figure(
                val_truth, val_scores, threshold, f"validation: {finding}"
            ),
            **screening_figures("test", test_truth, test_scores, threshold, finding, "test"),
            "plots/test_reliability.png": reliability_figure(
                test_truth, uncalibrated, test_scores, f"test calibration (T = {temperature:.2f})"
            ),
        }
    )
    return metrics, temperature, threshold


def read_run_json(run_id: str, artifact: str) -> dict:
    """Read a JSON artifact of a run."""
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}"))
