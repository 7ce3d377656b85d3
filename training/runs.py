"""A finished training run, as later stages (export, evaluation) need it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.tracking import MlflowClient

from datasets import DatasetSpec, ImageSplit, get_dataset_spec, load_split
from training.models import ScreeningNetwork, build_network
from training.recipe import Recipe
from training.tracking import configure_tracking
from training.train import (
    LINEAGE_ARTIFACT,
    OPERATING_POINT_ARTIFACT,
    RECIPE_ARTIFACT,
    WEIGHTS_ARTIFACT,
    read_run_json,
)


class RunError(RuntimeError):
    """A run cannot be used: it does not exist, or its data no longer matches."""


@dataclass
class RunContext:
    """What export and evaluation need from a training run."""

    run: mlflow.entities.Run
    recipe: Recipe
    spec: DatasetSpec
    operating_point: dict
    lineage: dict
    data_dir: Path | None

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation (1 for runs before calibration)."""
        return float(self.operating_point.get("temperature", 1.0))

    @property
    def threshold(self) -> float:
        """Threshold chosen on validation."""
        return float(self.operating_point["threshold"])

    def network(self) -> ScreeningNetwork:
        """Rebuild the run's network with its best weights, in evaluation mode."""
        spec = self.spec
        network = build_network(self.recipe.model, spec.image_shape, len(spec.classes))
        with tempfile.TemporaryDirectory() as download_dir:
            weights = mlflow.artifacts.download_artifacts(
                f"runs:/{self.run.info.run_id}/{WEIGHTS_ARTIFACT}", dst_path=download_dir
            )
            network.load_state_dict(torch.load(weights, weights_only=True))
        return network.eval()

    def split(self, name: str) -> ImageSplit:
        """Load one of the run's splits, checking it is exactly the data the run used.

        Raises:
            RunError: if the data's fingerprint differs from the one the run recorded.
        """
        limits = {
            "train": self.recipe.data.max_train_samples,
            "val": self.recipe.data.max_val_samples,
            "test": self.recipe.data.max_test_samples,
        }
        loaded = load_split(
            self.spec,
            name,
            data_dir=self.data_dir or self.recipe.data.data_dir,
            max_samples=limits[name],
            seed=self.recipe.seed,
        )
        recorded = self.run.data.tags.get(f"medscreen.data.{name}.fingerprint")
        if recorded != loaded.fingerprint:
            raise RunError(
                f"{name} data fingerprint {loaded.fingerprint} differs from the run's {recorded}: "
                "checks must use exactly the data the run used"
            )
        return loaded


def read_run_recipe(run_id: str) -> dict:
    """The resolved recipe a training run logged.

    Raises:
        RunError: if the run has no recipe (it is not a training run).
    """
    try:
        tree = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{RECIPE_ARTIFACT}"))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise RunError(
            f"run {run_id} has no {RECIPE_ARTIFACT}: it is not a training run"
        ) from error
    if not isinstance(tree, dict):
        raise RunError(f"run {run_id}: {RECIPE_ARTIFACT} is not a recipe")
    return tree


def load_run_context(run_id: str, data_dir: Path | None = None) -> RunContext:
    """Read a training run's recipe, operating point and lineage from MLflow.

    Raises:
        RunError: if the tracking store has no such run.
    """
    configure_tracking()
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise RunError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}") from error
    tree = read_run_recipe(run_id)
    if tree.get("kind", "image-screening") != "image-screening":
        raise RunError(
            f"run {run_id} is a {tree['kind']} run: this step takes image screening runs "
            "(ECG runs are evaluated with --records-dir and --records)"
        )
    recipe = Recipe.model_validate(tree)
    return RunContext(
        run=run,
        recipe=recipe,
        spec=get_dataset_spec(recipe.data.dataset),
        operating_point=read_run_json(run_id, OPERATING_POINT_ARTIFACT),
        lineage=read_run_json(run_id, LINEAGE_ARTIFACT),
        data_dir=data_dir,
    )
