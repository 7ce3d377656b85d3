"""Reading MedMNIST splits and fingerprinting exactly what was read."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from datasets.catalogue import DatasetSpec, SplitName
from datasets.download import fetch_dataset, file_sha256
from datasets.errors import DatasetError

if TYPE_CHECKING:
    from datasets.manifest import ManifestSpec


@dataclass(frozen=True)
class ImageSplit:
    """One split of an image dataset, as loaded.

    Attributes:
        spec: The catalogue entry (or manifest task) it came from.
        split: ``train``, ``val`` or ``test``.
        images: uint8 array of shape (N, C, H, W) (2D) or (N, C, D, H, W) (3D).
        labels: int64 array of shape (N,).
        indices: Row indices into the official split, or into the manifest's rows.
        source: Path of the raw file (or manifest) the split was read from.
        fingerprint: SHA-256 over the raw file's SHA-256, the split name and the row indices.
        sites: Site of each row (manifests with a site column), else None.
        groups: Anonymous patient number of each row (manifests), else None: images of one
            patient are resampled together in bootstrap intervals.
    """

    spec: DatasetSpec | ManifestSpec
    split: SplitName
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    source: Path
    fingerprint: str
    sites: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def split_fingerprint(file_sha256_hex: str, split: str, indices: np.ndarray) -> str:
    """Return the lineage fingerprint of a split: the raw file, the split name and the rows used."""
    digest = hashlib.sha256()
    digest.update(f"{file_sha256_hex}:{split}:".encode())
    digest.update(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    return digest.hexdigest()


def load_split(
    spec: DatasetSpec,
    split: SplitName,
    *,
    data_dir: Path | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> ImageSplit:
    """Load one split of a MedMNIST dataset, optionally a stratified random subset.

    Args:
        spec: Catalogue entry of the dataset.
        split: Which official split to read.
        data_dir: A local directory holding the official file (else the cache or a download).
        max_samples: Keep at most this many rows, stratified by label (for quick runs and tests).
        seed: Seed of the subset draw.

    Returns:
        The loaded split with its fingerprint.

    Raises:
        DatasetError: if the file is missing, corrupt or lacks the split.
    """
    path = fetch_dataset(spec, data_dir=data_dir)
    try:
        with np.load(path) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"].reshape(-1).astype(np.int64)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: cannot read split {split!r} ({error})") from error
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: {split}_images is {images.dtype}, expected uint8")
    images = _channels_first(images, spec)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(spec.classes):
        raise DatasetError(f"{path}: {split}_labels holds a label outside {list(spec.classes)}")
    indices = np.arange(len(labels))
    if max_samples is not None and max_samples < len(labels):
        indices = _stratified_subset(labels, max_samples, seed)
        images, labels = images[indices], labels[indices]
    return ImageSplit(
        spec=spec,
        split=split,
        images=np.ascontiguousarray(images),
        labels=labels,
        indices=indices,
        source=path,
        fingerprint=split_fingerprint(file_sha256(path), split, indices),
    )


def _channels_first(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """MedMNIST stores grayscale as (N, H, W) and colour as (N, H, W, 3); return (N, C, ...)."""
    channels = spec.image_shape[0]
    if images.ndim == len(spec.image_shape):  # no channel axis in the file
        return images[:, None]
    if channels == 3 and images.shape[-1] == 3:
        return np.moveaxis(images, -1, 1)
    return images


def _stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        share = max(1, round(size * len(rows) / len(labels)))
        chosen.append(rng.choice(rows, size=min(share, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))
