"""The LightningDataModule: catalogue or manifest splits in, uint8 image batches out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data.utils import worker_init_fn
from monai.transforms import Compose, RandAffine, RandFlip
from torch.utils.data import DataLoader, Dataset

from datasets import DatasetError, ImageSplit, get_dataset_spec, load_manifest, load_split
from datasets.download import file_sha256
from datasets.manifest import ManifestSpec, TaskSpec, split_manifest
from training.recipe import AugmentationSection, DataSection, Recipe


def manifest_spec(data: DataSection, manifest_sha256: str) -> ManifestSpec:
    """The task of a manifest recipe, as a catalogue-like entry pinned to one manifest file."""
    task, manifest = data.manifest_task, data.manifest
    if task is None or manifest is None:
        raise ValueError("manifest_spec needs a recipe with data.manifest and data.manifest_task")
    return ManifestSpec(
        name=task.name,
        title=f"{task.name} (manifest {manifest.name})",
        task=task.task,
        modality=task.modality,
        url=manifest.as_uri(),
        filename=manifest.name,
        sha256=manifest_sha256,
        licence=task.licence,
        citation=task.citation,
        image_shape=tuple(task.image_shape),
        classes=tuple(task.classes),
        positive_finding=task.positive_finding,
        positive_classes=task.positive_indices(),
    )


def task_spec(recipe: Recipe) -> TaskSpec:
    """The recipe's catalogue entry, or its manifest's task pinned to the file as it is now.

    Raises:
        DatasetError: if the dataset is unknown or the manifest cannot be read.
    """
    data = recipe.data
    if data.manifest is None:
        return get_dataset_spec(data.dataset or "")
    try:
        digest = file_sha256(data.manifest)
    except OSError as error:
        raise DatasetError(
            f"{data.manifest}: cannot read manifest ({error.strerror or error})"
        ) from error
    return manifest_spec(data, digest)


@dataclass(frozen=True)
class ManifestSplits:
    """A manifest split by patient, with what lineage records of it.

    Attributes:
        splits: Train, val and test.
        content_fingerprint: SHA-256 over every row's file SHA-256 and label.
        patients: Number of distinct patients (rows without an ID count once each).
    """

    splits: dict[str, ImageSplit]
    content_fingerprint: str
    patients: int


def load_manifest_splits(
    recipe: Recipe, spec: ManifestSpec, path: Path | None = None
) -> ManifestSplits:
    """Read every row of a recipe's manifest and split it by patient, as the recipe says.

    Args:
        recipe: A manifest recipe.
        spec: Its task, pinned to the manifest's SHA-256.
        path: Where the manifest is now (default: the recipe's path).

    Raises:
        DatasetError: naming the manifest line, or the file, that is wrong.
    """
    path = path or recipe.data.manifest
    if path is None:
        raise ValueError("load_manifest_splits needs a manifest recipe")
    data = load_manifest(path, spec)
    if data.file_sha256 != spec.sha256:
        raise DatasetError(f"{path}: the manifest changed while it was being read")
    splits = split_manifest(
        data,
        val_fraction=recipe.data.val_fraction or 0.0,
        test_fraction=recipe.data.test_fraction or 0.0,
        seed=recipe.seed,
    )
    return ManifestSplits(
        splits=dict(splits),
        content_fingerprint=data.fingerprint,
        patients=len(np.unique(data.patient_groups())),
    )


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
            # Augment in float, then return to uint8: the model's input contract. Corners a
            # rotation or shift uncovers take the image's own minimum, not 0: the graph scales
            # each image by its range, and a black corner would change a training image's
            # scaling away from that of the same picture unaugmented.
            values = image.to(torch.float32)
            low = values.min()
            augmented = self.augment(values - low) + low
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
    """Train, validation and test splits of a catalogue dataset or manifest, as a recipe says.

    Raises:
        DatasetError: on construction, if the dataset is unknown or the manifest unreadable.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.spec = task_spec(recipe)
        self.splits: dict[str, ImageSplit] = {}
        self.manifest: ManifestSplits | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load (and verify) every split once; a manifest is read whole and split by patient.

        Raises:
            DatasetError: naming the file (and manifest line) that is wrong.
        """
        if self.splits:
            return
        if isinstance(self.spec, ManifestSpec):
            self.manifest = load_manifest_splits(self.recipe, self.spec)
            self.splits = self.manifest.splits
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
            # Each worker starts from a copy of the transforms' random state: MONAI reseeds it
            # from the worker's seed, which the seeded generator draws anew every epoch.
            worker_init_fn=worker_init_fn,
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
