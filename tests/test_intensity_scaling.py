"""Pixel scaling inside the graph: the same picture gives the same input however it was stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import QUICK_RECIPE, TINY_DENSENET
from training.models import build_network
from training.recipe import ModelSection
from training.runs import image_recipe_of_run


def _network(image_shape: tuple[int, ...], scaling: str) -> torch.nn.Module:
    torch.manual_seed(0)
    section = ModelSection(
        network="DenseNet", network_params=TINY_DENSENET, intensity_scaling=scaling
    )
    return build_network(section, image_shape, 2).eval()


def _logits(network: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network(torch.from_numpy(images)).numpy()


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 28, 28), (1, 16, 16, 16)])
def test_per_image_scaling_ignores_brightness_and_contrast(image_shape: tuple[int, ...]):
    rng = np.random.default_rng(0)
    dim = rng.integers(0, 121, size=(3, *image_shape), dtype=np.uint8)  # grey levels 0-120
    brighter = dim + np.uint8(60)  # 60-180: the same picture, shifted
    stretched = dim * np.uint8(2)  # 0-240: the same picture, twice the contrast
    per_image = _network(image_shape, "per_image")
    reference = _logits(per_image, dim)
    np.testing.assert_allclose(_logits(per_image, brighter), reference, atol=1e-5)
    np.testing.assert_allclose(_logits(per_image, stretched), reference, atol=1e-5)
    # Scaling by 255 sees three different pictures (what the per-image range corrects).
    fixed = _network(image_shape, "fixed")
    assert not np.allclose(_logits(fixed, stretched), _logits(fixed, dim), atol=1e-3)


def test_each_image_of_a_batch_is_scaled_by_its_own_range():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 101, size=(2, 1, 28, 28), dtype=np.uint8)
    network = _network((1, 28, 28), "per_image")
    alone = _logits(network, images[:1])
    images[1] = images[1] * 2 + 50  # another image's range must not change the first's input
    np.testing.assert_allclose(_logits(network, images)[:1], alone, atol=1e-5)


def test_runs_logged_before_the_setting_are_rebuilt_with_fixed_scaling():
    tree = yaml.safe_load(QUICK_RECIPE.read_text())
    assert "intensity_scaling" not in tree["model"]
    assert image_recipe_of_run(tree).model.intensity_scaling == "fixed"
    tree["model"]["intensity_scaling"] = "per_image"
    assert image_recipe_of_run(tree).model.intensity_scaling == "per_image"
    # A recipe read from a file, not a run, gets the per-image default.
    from training import load_recipe

    assert load_recipe(QUICK_RECIPE).model.intensity_scaling == "per_image"


@pytest.mark.slow
def test_a_run_logged_before_the_setting_is_rebuilt_as_it_was_trained(trained_run, tmp_path):
    """A copy of a real run whose recipe.yaml lacks the field is rebuilt dividing by 255."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.runs import load_run_context
    from training.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    finished = client.get_run(trained_run[1].run_id)
    artifacts = Path(
        mlflow.artifacts.download_artifacts(f"runs:/{finished.info.run_id}/", dst_path=tmp_path)
    )
    recipe_file = artifacts / "recipe.yaml"
    tree = yaml.safe_load(recipe_file.read_text())
    assert tree["model"].pop("intensity_scaling") == "per_image"
    recipe_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    old = client.create_run(finished.info.experiment_id)
    client.log_artifacts(old.info.run_id, str(artifacts))
    client.set_terminated(old.info.run_id, "FINISHED")

    rebuilt = load_run_context(old.info.run_id).network()
    assert rebuilt.per_image_scaling is False
    assert load_run_context(finished.info.run_id).network().per_image_scaling is True
