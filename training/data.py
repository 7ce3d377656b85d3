"""The LightningDataModule: catalogue splits in, uint8 image batches out."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from monai.transforms import Compose, RandAffine, RandFlip
from torch.utils.data import DataLoader, Dataset

from datasets import ImageSplit, get_dataset_spec, load_split
from training.recipe import AugmentationSection, Recipe


class ImageSplitDataset(Dataset):
    """Serves (uint8 image, label) pairs of one split, augmenting when asked."""

    def __init__(self, split: ImageSplit, augment: Compose | None = None) -> None:
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            # Augment in float, then return to uint8: the model's input contract.
            augmented = self.augment(image.to(torch.float32))
            image = torch.as_tensor(augmented).round().clamp(0, 255).to(torch.uint8)
        return image, self.labels[index]


def build_augmentation(
    section: AugmentationSection, spatial_dims: int, seed: int
) -> Compose | None:
    """Return the MONAI augmentation a recipe asks for, or None when it asks for none."""
    transforms = []
    if section.rotate_degrees or section.scale_fraction or section.translate_pixels:
        # 2D rotates in-plane; 3D rotates about each axis.
        rotations = 1 if spatial_dims == 2 else 3
        transforms.append(
            RandAffine(
                prob=1.0,
                rotate_range=(np.deg2rad(section.rotate_degrees),) * rotations,
                scale_range=(section.scale_fraction,) * spatial_dims,
                translate_range=(section.translate_pixels,) * spatial_dims,
                padding_mode="zeros",
            )
        )
    if section.horizontal_flip_probability:
        transforms.append(
            RandFlip(prob=section.horizontal_flip_probability, spatial_axis=spatial_dims - 1)
        )
    if not transforms:
        return None
    return Compose(transforms).set_random_state(seed=seed)


class ScreeningDataModule(pl.LightningDataModule):
    """Train, validation and test splits of a catalogue dataset, as a recipe describes them."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.spec = get_dataset_spec(recipe.data.dataset)
        self.splits: dict[str, ImageSplit] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load (and verify) every split once."""
        if self.splits:
            return
        data = self.recipe.data
        limits = {
            "train": data.max_train_samples,
            "val": data.max_val_samples,
            "test": data.max_test_samples,
        }
        for split, limit in limits.items():
            self.splits[split] = load_split(
                self.spec, split, data_dir=data.data_dir, max_samples=limit, seed=self.recipe.seed
            )

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency class weights of the training split ('balanced')."""
        counts = np.bincount(self.splits["train"].labels, minlength=len(self.spec.classes))
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)

    def _loader(self, split: str, shuffle: bool, augment: Compose | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return DataLoader(
            ImageSplitDataset(self.splits[split], augment),
            batch_size=self.recipe.data.batch_size,
            shuffle=shuffle,
            num_workers=self.recipe.data.num_workers,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        spatial_dims = len(self.spec.image_shape) - 1
        augment = build_augmentation(self.recipe.augmentation, spatial_dims, self.recipe.seed)
        return self._loader("train", shuffle=True, augment=augment)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in file order."""
        return self._loader("test", shuffle=False)
