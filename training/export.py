"""Export stage: a run's best weights to a checked ONNX model, its card and a registry version."""

from __future__ import annotations

import datetime
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from datasets import get_dataset_spec, load_split
from training.card import (
    CARD_FILENAME,
    CARD_MARKDOWN_FILENAME,
    ChangelogEntry,
    InputSpec,
    ModelCard,
    OnnxArtifact,
    OperatingPoint,
    Provenance,
    TensorSpec,
    TrainingData,
)
from training.evaluation import positive_scores
from training.models import ProbabilityModel, build_network, predict_probabilities
from training.recipe import Recipe
from training.tracking import configure_tracking, package_versions
from training.train import (
    LINEAGE_ARTIFACT,
    OPERATING_POINT_ARTIFACT,
    RECIPE_ARTIFACT,
    WEIGHTS_ARTIFACT,
    read_run_json,
)

ONNX_INPUT, ONNX_OUTPUT = "image", "probabilities"
REGISTRY_ARTIFACT_NAME = "onnx-model"


class ExportError(RuntimeError):
    """The model could not be exported or failed a check; nothing was registered."""


@dataclass(frozen=True)
class ExportResult:
    """A registered model version."""

    model_name: str
    version: str
    card: ModelCard


def export_onnx(network: torch.nn.Module, image_shape: tuple[int, ...], path: Path) -> None:
    """Write the probability graph (uint8 images in, dynamic batch) to ``path``."""
    example = torch.zeros((2, *image_shape), dtype=torch.uint8)
    # The exporter warns about every torchvision op it cannot register; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.onnx.export(
        ProbabilityModel(network).eval(),
        (example,),
        str(path),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def onnx_probabilities(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the exported graph with onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [
        session.run([ONNX_OUTPUT], {ONNX_INPUT: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_and_register(run_id: str, *, data_dir: Path | None = None) -> ExportResult:
    """Export a training run's model to ONNX, check it, and register a new version.

    The parity check runs onnxruntime and PyTorch on the run's own validation images (the
    fingerprint must match the one the run recorded). If probabilities differ by more than the
    recipe's tolerance, or any decision at the threshold differs, nothing is registered.

    Args:
        run_id: The MLflow run of ``medscreen train``.
        data_dir: Local directory with the dataset file (default: the recipe's).

    Returns:
        The registered model name, version and card.

    Raises:
        ExportError: naming the check that failed.
    """
    configure_tracking()
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise ExportError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}") from error
    recipe = Recipe.model_validate(
        yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{RECIPE_ARTIFACT}"))
    )
    operating_point = read_run_json(run_id, OPERATING_POINT_ARTIFACT)
    lineage = read_run_json(run_id, LINEAGE_ARTIFACT)
    spec = get_dataset_spec(recipe.data.dataset)

    network = build_network(recipe.model, spec.image_shape[0], len(spec.classes))
    with tempfile.TemporaryDirectory() as download_dir:
        weights = mlflow.artifacts.download_artifacts(
            f"runs:/{run_id}/{WEIGHTS_ARTIFACT}", dst_path=download_dir
        )
        network.load_state_dict(torch.load(weights, weights_only=True))
    network.eval()

    val = load_split(
        spec,
        "val",
        data_dir=data_dir or recipe.data.data_dir,
        max_samples=recipe.data.max_val_samples,
        seed=recipe.seed,
    )
    recorded = run.data.tags.get("medscreen.data.val.fingerprint")
    if recorded != val.fingerprint:
        raise ExportError(
            f"validation data fingerprint {val.fingerprint} differs from the run's {recorded}: "
            "parity must be checked on the data the run was validated on; nothing was registered"
        )

    threshold = float(operating_point["threshold"])
    with tempfile.TemporaryDirectory() as work_dir:
        onnx_path = Path(work_dir) / "model.onnx"
        export_onnx(network, spec.image_shape, onnx_path)
        onnx_model = onnx.load(str(onnx_path))
        try:
            onnx.checker.check_model(onnx_model, full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"ONNX checker failed: {error}; nothing was registered") from error

        torch_probabilities = predict_probabilities(network, val.images).numpy()
        runtime_probabilities = onnx_probabilities(onnx_path, val.images)
        difference = float(np.abs(torch_probabilities - runtime_probabilities).max())
        positive = spec.positive_classes
        torch_decisions = positive_scores(torch_probabilities, positive) >= threshold
        runtime_decisions = positive_scores(runtime_probabilities, positive) >= threshold
        differing = int((torch_decisions != runtime_decisions).sum())
        tolerance = recipe.registration.parity_tolerance
        if difference > tolerance or differing:
            raise ExportError(
                f"parity check failed on {len(val)} validation images: max abs difference "
                f"{difference:.3g} (tolerance {tolerance:g}), {differing} decisions differ at "
                f"threshold {threshold:.6f}; nothing was registered"
            )

        tags = run.data.tags
        card = ModelCard(
            model_name=recipe.registration.model_name,
            task=spec.task,
            intended_use=recipe.registration.intended_use,
            limitations=recipe.registration.limitations,
            classes=list(spec.classes),
            positive_finding=spec.positive_finding,
            positive_classes=list(spec.positive_classes),
            input=InputSpec(
                name=ONNX_INPUT,
                dtype="uint8",
                shape=["batch", *spec.image_shape],
                value_range=(0, 255),
                description=(
                    "Raw pixel values; scaling, normalisation and resizing to the network's "
                    f"{recipe.model.network_input_size} px happen inside the graph. Larger "
                    "images are resized to this shape by the service before inference."
                ),
                modality=spec.modality,
                channels="grayscale" if spec.image_shape[0] == 1 else "RGB",
                height=spec.image_shape[-2],
                width=spec.image_shape[-1],
            ),
            output=TensorSpec(
                name=ONNX_OUTPUT,
                dtype="float32",
                shape=["batch", len(spec.classes)],
                value_range=(0, 1),
                description=f"Softmax probability of each class, in order {list(spec.classes)}.",
            ),
            operating_point=OperatingPoint(
                threshold=threshold, sensitivity_target=operating_point["sensitivity_target"]
            ),
            metrics={
                key: float(value)
                for key, value in operating_point["metrics"].items()
                if key.startswith(("selected_val_", "test_"))
            },
            training_data=TrainingData(
                dataset=spec.name,
                url=spec.url,
                file_sha256=spec.sha256,
                licence=spec.licence,
                citation=spec.citation,
                split_fingerprints={
                    name: split["fingerprint_sha256"] for name, split in lineage["splits"].items()
                },
                split_rows={name: split["rows"] for name, split in lineage["splits"].items()},
            ),
            provenance=Provenance(
                run_id=run_id,
                experiment_id=run.info.experiment_id,
                recipe=recipe.name,
                git_commit=tags.get("medscreen.git_commit", "unknown"),
                git_dirty=tags.get("medscreen.git_dirty", "unknown"),
                seed=recipe.seed,
                versions=package_versions(tags),
            ),
            onnx=OnnxArtifact(
                sha256=_sha256(onnx_path),
                opset=max(entry.version for entry in onnx_model.opset_import if not entry.domain),
                parity_max_abs_difference=difference,
                parity_tolerance=tolerance,
                parity_cases=len(val),
                parity_decisions_identical=True,
            ),
            changelog=[
                ChangelogEntry(
                    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    change=f"Exported from run {run_id} (recipe {recipe.name}).",
                )
            ],
        )
        card_path = Path(work_dir) / CARD_FILENAME
        card_path.write_text(card.model_dump_json(indent=2))
        markdown_path = Path(work_dir) / CARD_MARKDOWN_FILENAME
        markdown_path.write_text(card.to_markdown())

        signature = ModelSignature(
            inputs=Schema(
                [MlflowTensorSpec(np.dtype(np.uint8), (-1, *spec.image_shape), ONNX_INPUT)]
            ),
            outputs=Schema(
                [MlflowTensorSpec(np.dtype(np.float32), (-1, len(spec.classes)), ONNX_OUTPUT)]
            ),
        )
        with mlflow.start_run(run_id=run_id):
            model_info = mlflow.onnx.log_model(
                onnx_model,
                name=REGISTRY_ARTIFACT_NAME,
                signature=signature,
                registered_model_name=card.model_name,
                onnx_execution_providers=["CPUExecutionProvider"],
                save_as_external_data=False,
                extra_files=[str(card_path), str(markdown_path)],
                metadata={"medscreen_card_schema": card.card_schema},
            )
            mlflow.log_artifact(str(card_path), "card")
            mlflow.log_artifact(str(markdown_path), "card")
            mlflow.log_metric("onnx_parity_max_abs_difference", difference)

    version = str(model_info.registered_model_version)
    for key, value in {
        "medscreen.threshold": f"{threshold:.6f}",
        "medscreen.sensitivity_target": str(operating_point["sensitivity_target"]),
        "medscreen.positive_finding": spec.positive_finding,
        "medscreen.card_schema": card.card_schema,
        "medscreen.onnx_sha256": card.onnx.sha256,
        "medscreen.run_id": run_id,
        "medscreen.data.train.fingerprint": card.training_data.split_fingerprints["train"],
    }.items():
        client.set_model_version_tag(card.model_name, version, key, value)
    client.update_model_version(
        card.model_name,
        version,
        description=(
            f"{spec.task}; threshold {threshold:.4f} for sensitivity >= "
            f"{operating_point['sensitivity_target']:g} (validation); test AUC "
            f"{card.metrics.get('test_auc', float('nan')):.4f}; run {run_id}"
        ),
    )
    return ExportResult(model_name=card.model_name, version=version, card=card)
