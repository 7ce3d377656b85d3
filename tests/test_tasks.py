"""Every shipped image task trains, evaluates and exports; runs repeat exactly."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from tests.conftest import PROJECT_ROOT, QUICK_RECIPE, TINY_TRAINING, TINY_VOLUME

pytestmark = pytest.mark.slow

RECIPES = PROJECT_ROOT / "training" / "recipes"
SMALL_NETWORK = TINY_VOLUME  # the same small DenseNet serves 2D and 3D tasks
# The recipe's own network family (breast-full's MONAI ResNet), made small.
SMALL_RESNET = [
    *TINY_VOLUME[2:],
    "model.network_params={layers: [1, 1, 1, 1], block_inplanes: [8, 16, 32, 64]}",
]
PLOTS = {
    "val_roc_pr.png",
    "test_roc_pr.png",
    "test_confusion_at_threshold.png",
    "test_reliability.png",
}


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


@pytest.mark.parametrize(
    ("recipe_name", "input_shape", "small_network"),
    [
        ("breast-full", [1, 28, 28], SMALL_RESNET),
        ("retina-full", [3, 28, 28], SMALL_NETWORK),
        ("vessel3d-full", [1, 28, 28, 28], SMALL_NETWORK),
    ],
)
def test_task_trains_evaluates_and_exports(
    medmnist_dir: Path, recipe_name: str, input_shape: list[int], small_network: list[str]
):
    from datasets import get_dataset_spec, load_split
    from training import export_and_register, load_recipe, train_recipe
    from training.export import onnx_probabilities

    recipe = load_recipe(
        RECIPES / f"{recipe_name}.yaml", [f"data.data_dir={medmnist_dir}", *small_network]
    )
    result = train_recipe(recipe, show_progress=False)
    client = _client()
    metrics = client.get_run(result.run_id).data.metrics
    for name in ("test_auc", "test_sensitivity", "test_specificity", "test_ppv", "test_npv"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["temperature"] > 0 and 0 <= metrics["test_ece"] <= 1
    plots = {Path(a.path).name for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == PLOTS

    exported = export_and_register(result.run_id)
    assert exported.card.input.shape == ["batch", *input_shape]
    assert "by each image's own minimum and maximum" in exported.card.input.description
    spec = get_dataset_spec(recipe.data.dataset)
    assert exported.card.positive_classes == list(spec.positive_classes)
    # The registered graph's positive-finding score reproduces the run's test AUC: the positive
    # classes (malignant = 0 for BreastMNIST, grades 2-4 for RetinaMNIST) are the right ones.
    test = load_split(spec, "test", data_dir=medmnist_dir, max_samples=120, seed=0)
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{exported.model_name}/{exported.version}")
    )
    probabilities = onnx_probabilities(model_dir / "model.onnx", test.images)
    scores = probabilities[:, list(spec.positive_classes)].sum(axis=1)
    truth = np.isin(test.labels, spec.positive_classes)
    # Near-tied scores of a one-epoch model may swap order between PyTorch and onnxruntime.
    assert roc_auc_score(truth, scores) == pytest.approx(metrics["test_auc"], abs=2e-3)
    # AUC alone cannot tell the classes apart in a two-class task (swapping them swaps both
    # scores and truth); sensitivity and specificity at the threshold can. Both are recomputed
    # for the catalogue's positive classes, allowing one case to sit on the threshold.
    threshold = exported.card.operating_point.threshold
    assert metrics["threshold"] == pytest.approx(threshold, abs=1e-6)
    flagged = scores >= threshold
    for name, cases, expected in (
        ("test_sensitivity", truth, flagged[truth].mean()),
        ("test_specificity", ~truth, (~flagged[~truth]).mean()),
    ):
        assert metrics[name] == pytest.approx(expected, abs=1.01 / cases.sum()), name
    if len(spec.classes) > 2:
        assert 0 <= metrics["test_multiclass_auc"] <= 1


def test_same_recipe_and_seed_give_the_same_metrics(trained_run, medmnist_dir: Path):
    from training import load_recipe, train_recipe

    _, first = trained_run
    again = train_recipe(
        load_recipe(QUICK_RECIPE, [f"data.data_dir={medmnist_dir}", *TINY_TRAINING]),
        show_progress=False,
    )
    assert again.run_id != first.run_id
    assert again.metrics == first.metrics
