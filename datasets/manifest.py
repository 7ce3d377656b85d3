"""A hospital's own images: a CSV manifest of files and labels, with patients and sites.

Columns: ``path`` (relative to the manifest's folder, or absolute) and ``label`` (a class name
of the task, never an index) are required; ``patient_id`` and ``site`` are optional. Patient
IDs group a patient's images (splits, bootstrap); they are never logged, fingerprinted or
returned.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.catalogue import DatasetSpec
from datasets.errors import DatasetError
from datasets.images import ImageDecodeError, decode_image

REQUIRED_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class ManifestData:
    """The images of a manifest, fitted to a dataset's input shape.

    Attributes:
        spec: The catalogue entry whose classes and input shape the rows follow.
        source: The manifest file.
        images: uint8 array (N, C, H, W).
        labels: int64 class indices (N,).
        sites: Site of each row, or None when the manifest has no site column.
        patient_ids: Patient of each row, or None; for splitting only, never logged.
        fingerprint: SHA-256 over each file's SHA-256 and label, in row order.
    """

    spec: DatasetSpec
    source: Path
    images: np.ndarray
    labels: np.ndarray
    sites: np.ndarray | None
    patient_ids: np.ndarray | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)


def _label_index(text: str, spec: DatasetSpec) -> int | None:
    # Names only: a bare "1" means malignant in one hospital and benign in BreastMNIST.
    names = [name.lower() for name in spec.classes]
    lowered = text.strip().lower()
    return names.index(lowered) if lowered in names else None


def load_manifest(path: Path, spec: DatasetSpec) -> ManifestData:
    """Read and check every row of a manifest before any work starts.

    Raises:
        DatasetError: naming the manifest line and the file or field that is wrong.
    """
    if len(spec.image_shape) != 3:
        raise DatasetError(f"{path}: manifests of 3D datasets ({spec.name}) are not supported yet")
    try:
        with path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: cannot read manifest ({error})") from error
    if not rows:
        raise DatasetError(f"{path}: the manifest has no rows")
    missing = [column for column in REQUIRED_COLUMNS if column not in rows[0]]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    channels, height, width = spec.image_shape
    images, labels, digest = [], [], hashlib.sha256()
    for line, row in enumerate(rows, start=2):
        label = _label_index(row["label"] or "", spec)
        if label is None:
            raise DatasetError(
                f"{path}:{line}: label {row['label']!r} is not one of {list(spec.classes)}"
            )
        image_path = Path(row["path"] or "")
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        try:
            data = image_path.read_bytes()
        except OSError as error:
            raise DatasetError(
                f"{path}:{line}: {row['path']!r}: {error.strerror or 'cannot read'}"
            ) from error
        try:
            decoded = decode_image(data, channels=channels, height=height, width=width)
        except ImageDecodeError as error:
            raise DatasetError(f"{path}:{line}: {row['path']!r}: {error}") from error
        images.append(decoded.pixels)
        labels.append(label)
        digest.update(f"{hashlib.sha256(data).hexdigest()}:{label}\n".encode())

    def optional(column: str) -> np.ndarray | None:
        if column not in rows[0]:
            return None
        return np.array([(row[column] or "").strip() for row in rows])

    return ManifestData(
        spec=spec,
        source=path,
        images=np.stack(images),
        labels=np.array(labels, dtype=np.int64),
        sites=optional("site"),
        patient_ids=optional("patient_id"),
        fingerprint=digest.hexdigest(),
    )


def patient_disjoint_split(
    patient_ids: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Split row indices into train, val and test so that no patient is in two splits.

    Fractions are of patients, not rows.
    """
    from sklearn.model_selection import GroupShuffleSplit  # keeps the service's start-up light

    rows = np.arange(len(patient_ids))
    outer = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    rest, test = next(outer.split(rows, groups=patient_ids))
    inner = GroupShuffleSplit(
        n_splits=1, test_size=val_fraction / (1 - test_fraction), random_state=seed
    )
    train, val = next(inner.split(rest, groups=patient_ids[rest]))
    return {"train": np.sort(rest[train]), "val": np.sort(rest[val]), "test": np.sort(test)}
