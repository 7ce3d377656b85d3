"""Training batches: augmentation draws per worker and epoch, and balanced class weights."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from tests.conftest import QUICK_RECIPE


def _augmented_batch_digests(medmnist_dir: Path, workers: int, epochs: int) -> list[list[str]]:
    from training import load_recipe
    from training.data import ScreeningDataModule

    recipe = load_recipe(
        QUICK_RECIPE,
        [
            f"data.data_dir={medmnist_dir}",
            "data.max_train_samples=32",
            "data.batch_size=4",
            f"data.num_workers={workers}",
        ],
    )
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    module = ScreeningDataModule(recipe)
    module.setup()
    train = module.splits["train"]
    # One image everywhere: a batch's pixels then show only the augmentation's random draws.
    module.splits["train"] = dataclasses.replace(
        train, images=np.repeat(train.images[:1], len(train), axis=0)
    )
    loader = module.train_dataloader()  # Lightning builds it once and reuses it every epoch
    return [
        [hashlib.sha256(images.numpy().tobytes()).hexdigest() for images, _ in loader]
        for _ in range(epochs)
    ]


def test_loader_workers_draw_their_own_augmentations_every_epoch(medmnist_dir: Path):
    epochs = _augmented_batch_digests(medmnist_dir, workers=2, epochs=2)
    every_batch = [digest for epoch in epochs for digest in epoch]
    assert len(set(every_batch)) == len(every_batch) == 16
    # Seeded: the same recipe draws the same augmentations again.
    assert _augmented_batch_digests(medmnist_dir, workers=2, epochs=2) == epochs


def test_augmentation_fills_uncovered_corners_with_the_image_minimum(medmnist_dir: Path):
    """The graph scales each image by its range: a black corner would change that range."""
    from datasets import get_dataset_spec, load_split
    from training.data import ImageSplitDataset, build_augmentation
    from training.recipe import AugmentationSection

    split = load_split(
        get_dataset_spec("pneumoniamnist"), "train", data_dir=medmnist_dir, max_samples=64
    )
    without_black = split.images.min(axis=(1, 2, 3)) > 10
    split = dataclasses.replace(
        split, images=split.images[without_black], labels=split.labels[without_black]
    )
    assert len(split) >= 16
    augment = build_augmentation(
        AugmentationSection(rotate_degrees=30, translate_pixels=4), spatial_dims=2, seed=0
    )
    dataset = ImageSplitDataset(split, augment)
    for index in range(len(split)):
        augmented, _ = dataset[index]
        original = split.images[index]
        assert not np.array_equal(augmented.numpy(), original)
        # Interpolation stays within the image's range; only rounding may cross it.
        assert int(augmented.min()) >= int(original.min()) - 1
        assert int(augmented.max()) <= int(original.max()) + 1
    # A shift pinned to 6 rows and 3 columns (each draw's [min, max]) uncovers the last 6 rows
    # and 3 columns whole: each must be the minimum, not an edge, a reflection or the mean.
    shift = build_augmentation(AugmentationSection(translate_pixels=4), spatial_dims=2, seed=0)
    (affine,) = shift.transforms
    affine.rand_affine_grid.translate_range = ((6, 6), (3, 3))
    shifted = ImageSplitDataset(split, shift)
    for index in range(len(split)):
        augmented = shifted[index][0].numpy()
        original = split.images[index]
        np.testing.assert_array_equal(augmented[:, :-6, :-3], original[:, 6:, 3:])
        assert (augmented[:, -6:, :] == original.min()).all(), index
        assert (augmented[:, :, -3:] == original.min()).all(), index


def test_balanced_class_weights_are_scikit_learns_for_the_training_split(medmnist_dir: Path):
    from sklearn.utils.class_weight import compute_class_weight

    from training import load_recipe
    from training.data import ScreeningDataModule

    recipe = load_recipe(
        QUICK_RECIPE.with_name("breast-full.yaml"), [f"data.data_dir={medmnist_dir}"]
    )
    module = ScreeningDataModule(recipe)
    module.setup()
    labels = module.splits["train"].labels
    weights = module.class_weights().numpy()
    expected = compute_class_weight("balanced", classes=np.arange(2), y=labels)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    # BreastMNIST's malignant class (0) is the rarer one, so it weighs more.
    assert np.bincount(labels)[0] < np.bincount(labels)[1] and weights[0] > weights[1]
