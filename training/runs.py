"""A finished training run, as later stages (export, evaluation) need it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.tracking import MlflowClient

from datasets import ImageSplit, get_dataset_spec, load_split
from datasets.download import file_sha256, hide_passwords
from datasets.manifest import ManifestSpec, TaskSpec
from training.data import ManifestSplits, load_manifest_splits, manifest_spec
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
    spec: TaskSpec
    operating_point: dict
    lineage: dict
    data_dir: Path | None
    _manifest: ManifestSplits | None = field(default=None, init=False, repr=False)

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

        A manifest run's splits are rebuilt from its recipe and manifest (found in ``data_dir``
        by file name when given), after checking the manifest's SHA-256.

        Raises:
            RunError: if the data's fingerprint differs from the one the run recorded.
            DatasetError: if a manifest row can no longer be read.
        """
        if isinstance(self.spec, ManifestSpec):
            loaded = self._manifest_splits().splits[name]
        else:
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

    def _manifest_splits(self) -> ManifestSplits:
        """Read and split the run's manifest once, if it is byte for byte the one it used."""
        if self._manifest is not None:
            return self._manifest
        assert isinstance(self.spec, ManifestSpec) and self.recipe.data.manifest is not None
        recorded = self.recipe.data.manifest
        path = self.data_dir / recorded.name if self.data_dir else recorded
        try:
            digest = file_sha256(path)
        except OSError as error:
            raise RunError(
                f"cannot read the run's manifest {path} ({error.strerror or error}); "
                "give the folder that holds it as the data directory"
            ) from error
        if digest != self.spec.sha256:
            raise RunError(
                f"manifest {path} has SHA-256 {digest}, but the run recorded {self.spec.sha256}: "
                "checks must use exactly the data the run used"
            )
        splits = load_manifest_splits(self.recipe, self.spec, path)
        expected = self.lineage.get("manifest_content_sha256")
        if splits.content_fingerprint != expected:
            raise RunError(
                f"the images of manifest {path} changed since the run (content SHA-256 "
                f"{splits.content_fingerprint}, recorded {expected})"
            )
        self._manifest = splits
        return splits


def get_run(run_id: str) -> mlflow.entities.Run:
    """A run of the configured store.

    Raises:
        RunError: if the store has no such run, or could not be read (the two are told apart).
    """
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        store = hide_passwords(mlflow.get_tracking_uri())
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RunError(f"run {run_id!r} not found in {store}") from error
        reason = hide_passwords(str(error).splitlines()[0]) if str(error) else error.error_code
        raise RunError(f"run {run_id!r}: cannot read it from {store}: {reason}") from error


def read_run_recipe(run_id: str) -> dict:
    """The resolved recipe a training run logged.

    Raises:
        RunError: if the run does not exist, did not finish, or has no recipe (it is not a
            training run).
    """
    status = get_run(run_id).info.status
    if status != "FINISHED":
        # The recipe is logged first: a killed or failed run has it, but no model.
        raise RunError(
            f"run {run_id} is {status.lower()}, not finished: it has no model to use; "
            "train the recipe again"
        )
    try:
        tree = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{RECIPE_ARTIFACT}"))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise RunError(
            f"run {run_id} has no {RECIPE_ARTIFACT}: it is not a training run"
        ) from error
    if not isinstance(tree, dict):
        raise RunError(f"run {run_id}: {RECIPE_ARTIFACT} is not a recipe")
    return tree


def image_recipe_of_run(tree: dict) -> Recipe:
    """The image recipe a run logged, read as the run was trained.

    Runs logged before ``model.intensity_scaling`` existed scaled pixels by 255; the field's
    default for new recipes (each image's own range) would rebuild their graph differently.
    """
    model = tree.get("model")
    if isinstance(model, dict) and "intensity_scaling" not in model:
        tree = {**tree, "model": {**model, "intensity_scaling": "fixed"}}
    return Recipe.model_validate(tree)


def load_run_context(run_id: str, data_dir: Path | None = None) -> RunContext:
    """Read a training run's recipe, operating point and lineage from MLflow.

    Raises:
        RunError: if the tracking store has no such run.
    """
    configure_tracking()
    run = get_run(run_id)
    tree = read_run_recipe(run_id)
    if tree.get("kind", "image-screening") != "image-screening":
        raise RunError(
            f"run {run_id} is a {tree['kind']} run: this step takes image screening runs "
            "(ECG runs are evaluated with --records-dir and --records)"
        )
    recipe = image_recipe_of_run(tree)
    lineage = read_run_json(run_id, LINEAGE_ARTIFACT)
    if recipe.data.manifest is not None:
        # The task as trained, pinned to the manifest the run recorded (which may have moved).
        spec: TaskSpec = manifest_spec(recipe.data, lineage["manifest_sha256"])
    else:
        spec = get_dataset_spec(recipe.data.dataset or "")
    return RunContext(
        run=run,
        recipe=recipe,
        spec=spec,
        operating_point=read_run_json(run_id, OPERATING_POINT_ARTIFACT),
        lineage=lineage,
        data_dir=data_dir,
    )
