"""A hospital's own images: a CSV manifest of files and labels, with patients and sites.

Columns: ``path`` (relative to the manifest's folder, or absolute) and ``label`` (a class name
of the task, never an index) are required; ``patient_id`` and ``site`` are optional. Patient
IDs group a patient's images (splits, bootstrap); they are never logged or fingerprinted, and
splits carry only anonymous group numbers.

PNG, JPEG and DICOM rows go through the service's decoder (:func:`decode_image`); NIfTI rows
(``.nii``, ``.nii.gz``) go through :func:`datasets.volumes.decode_volume`, for 3D tasks only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from datasets.catalogue import DatasetSpec, SplitName
from datasets.errors import DatasetError
from datasets.images import DecodedImage, ImageDecodeError, decode_image
from datasets.medmnist import ImageSplit, split_fingerprint

if TYPE_CHECKING:
    from collections.abc import Callable

REQUIRED_COLUMNS = ("path", "label")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def pixel_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of decoded pixels: the same image whatever file format or encoding held it."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def site_metric_name(site: str) -> str:
    """The site as it appears in metric names (MLflow allows letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", site)


@dataclass(frozen=True)
class ManifestSpec:
    """A manifest's task, in the shape of a catalogue entry, so later stages treat both alike.

    Attributes:
        name: Name of the data in lineage and model cards.
        title: Human title.
        task: The screening task, in words.
        modality: Imaging modality.
        url: ``file://`` URI of the manifest the run was trained on.
        filename: The manifest's file name.
        sha256: SHA-256 of the manifest file.
        licence: Terms the data is used under.
        citation: How to cite the data (may be empty).
        image_shape: Model input shape, (C, H, W) or (1, D, H, W).
        classes: Class names, in output order.
        positive_finding: What a positive call means.
        positive_classes: Indices of the classes that make up the finding.
        format: Always ``manifest-csv``.
    """

    name: str
    title: str
    task: str
    modality: str
    url: str
    filename: str
    sha256: str
    licence: str
    citation: str
    image_shape: tuple[int, ...]
    classes: tuple[str, ...]
    positive_finding: str
    positive_classes: tuple[int, ...]
    format: str = "manifest-csv"


TaskSpec = DatasetSpec | ManifestSpec


@dataclass(frozen=True)
class ManifestData:
    """The images of a manifest, fitted to a task's input shape.

    Attributes:
        spec: The task whose classes and input shape the rows follow.
        source: The manifest file.
        images: uint8 array (N, C, H, W), or (N, 1, D, H, W) for volumes.
        labels: int64 class indices (N,).
        sites: Site of each row, or None when the manifest has no site column.
        patient_ids: Patient of each row, or None; for splitting only, never logged.
        fingerprint: SHA-256 over each file's SHA-256 and label, in row order.
        file_sha256: SHA-256 of the manifest file itself, as read.
        lines: The manifest line of each row, for messages.
        file_digests: SHA-256 of each row's image file.
    """

    spec: TaskSpec
    source: Path
    images: np.ndarray
    labels: np.ndarray
    sites: np.ndarray | None
    patient_ids: np.ndarray | None
    fingerprint: str
    file_sha256: str
    lines: tuple[int, ...]
    file_digests: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def patient_groups(self) -> np.ndarray:
        """Anonymous patient number of each row; a row without a patient ID is its own patient."""
        ids = self.patient_ids if self.patient_ids is not None else np.full(len(self), "")
        # Prefixes keep a real ID such as "7" apart from row 7 without an ID.
        keys = [f"p:{pid}" if pid else f"r:{row}" for row, pid in enumerate(ids.tolist())]
        _, groups = np.unique(np.array(keys), return_inverse=True)
        return groups.astype(np.int64)


def _label_index(text: str, spec: TaskSpec) -> int | None:
    # Names only: a bare "1" means malignant in one hospital and benign in BreastMNIST.
    names = [name.lower() for name in spec.classes]
    lowered = text.strip().lower()
    return names.index(lowered) if lowered in names else None


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _volume_decoder() -> Callable[..., DecodedImage]:
    try:
        # Lazy: NIfTI support (nibabel) is only needed for 3D manifests.
        from datasets.volumes import decode_volume
    except ImportError as error:
        raise DatasetError(
            f"NIfTI volumes need datasets.volumes, which cannot be imported ({error})"
        ) from error
    return decode_volume


def _decode_row(data: bytes, name: str, spec: TaskSpec) -> DecodedImage:
    """Decode one row's file to the task's input shape.

    Raises:
        ImageDecodeError: if the file cannot be decoded, or does not suit the task's dimensions.
    """
    if len(spec.image_shape) == 4:
        if not _is_nifti_name(name):
            raise ImageDecodeError(
                f"{spec.name} takes 3D volumes: give a NIfTI file (.nii, .nii.gz)"
            )
        _, depth, height, width = spec.image_shape
        return _volume_decoder()(data, depth=depth, height=height, width=width)
    if _is_nifti_name(name):
        raise ImageDecodeError(
            f"a NIfTI volume cannot be the input of a 2D model ({spec.name} takes "
            f"{list(spec.image_shape)} images)"
        )
    channels, height, width = spec.image_shape
    return decode_image(data, channels=channels, height=height, width=width)


def _csv_records(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """Every non-blank CSV record with the line it starts on.

    Raises:
        DatasetError: naming the line of a record that is not valid CSV (strict quoting).
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return records
        except csv.Error as error:
            raise DatasetError(
                f"{path}:{start}: not valid CSV ({error}); close every quote on the line that "
                "opens it"
            ) from None
        if fields:
            records.append((start, fields))
        start = reader.line_num + 1


def load_manifest(path: Path, spec: TaskSpec) -> ManifestData:
    """Read and check every row of a manifest before any work starts.

    Args:
        path: The CSV manifest.
        spec: The task: class names and the model's input shape (2D, or 3D for NIfTI rows).

    Returns:
        Every row, decoded, with the manifest's own SHA-256.

    Raises:
        DatasetError: naming the manifest line and the file or field that is wrong.
    """
    try:
        raw = path.read_bytes()
        records = _csv_records(raw.decode("utf-8-sig"), path)
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, a NUL in the path
        raise DatasetError(f"{path}: cannot read manifest ({error})") from error
    if len(records) < 2:
        raise DatasetError(f"{path}: the manifest has no rows")
    (_, header), *lines = records
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise DatasetError(f"{path}: column(s) {', '.join(repeated)} given twice in the header")
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    rows: list[tuple[int, dict[str, str]]] = []
    for line, fields in lines:
        # A shifted row would file its values under the wrong columns (a patient's name under
        # "site"); the values are not quoted back, since they may identify a patient.
        if any("\n" in field or "\r" in field for field in fields):
            raise DatasetError(
                f"{path}:{line}: a quoted value runs on past the end of the line; close every "
                "quote on its own line"
            )
        if len(fields) != len(header):
            raise DatasetError(
                f"{path}:{line}: the row has {len(fields)} field(s) and the header "
                f"{len(header)}; give every column (empty if unknown), and put any value that "
                "holds a comma in double quotes"
            )
        rows.append((line, dict(zip(header, fields, strict=True))))
    images, labels, digests, digest = [], [], [], hashlib.sha256()
    first_line: dict[str, int] = {}
    first_pixels_line: dict[str, int] = {}
    for line, row in rows:
        label = _label_index(row["label"] or "", spec)
        if label is None:
            # Values are not quoted: a hospital's file names and labels can name a patient.
            raise DatasetError(f"{path}:{line}: the label is not one of {list(spec.classes)}")
        if not (row["path"] or "").strip():
            raise DatasetError(f"{path}:{line}: the path is empty; give the image's file")
        image_path = Path(row["path"] or "")
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        try:
            data = image_path.read_bytes()
        except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
            reason = getattr(error, "strerror", None) or str(error) or "cannot read"
            raise DatasetError(f"{path}:{line}: the image file: {reason}") from error
        file_digest = hashlib.sha256(data).hexdigest()
        earlier = first_line.setdefault(file_digest, line)
        if earlier != line:
            # Counted twice it would weigh double, and under two patients it would cross splits.
            raise DatasetError(
                f"{path}:{line}: the image file is the same as line {earlier}'s; list each "
                "image once"
            )
        try:
            decoded = _decode_row(data, image_path.name, spec)
        except (ImageDecodeError, ValueError) as error:
            raise DatasetError(f"{path}:{line}: the image file: {error}") from error
        # The same picture saved again (another compression, a new DICOM UID) has other bytes.
        earlier = first_pixels_line.setdefault(pixel_sha256(decoded.pixels), line)
        if earlier != line:
            raise DatasetError(
                f"{path}:{line}: the image has the same pixels as line {earlier}'s (a copy "
                "of the same image); list each image once"
            )
        images.append(decoded.pixels)
        labels.append(label)
        digests.append(file_digest)
        digest.update(f"{file_digest}:{label}\n".encode())

    def optional(column: str) -> np.ndarray | None:
        if column not in header:
            return None
        return np.array([(row[column] or "").strip() for _, row in rows])

    sites = optional("site")
    named: dict[str, tuple[str, int]] = {}
    for (line, _), site in zip(rows, [] if sites is None else sites.tolist(), strict=False):
        other, other_line = named.setdefault(site_metric_name(site), (site, line))
        if other != site:
            # Their per-site metrics would overwrite each other.
            raise DatasetError(
                f"{path}:{line}: site {site!r} and site {other!r} (line {other_line}) have the "
                f"same metric name {site_metric_name(site)!r}; rename one"
            )

    return ManifestData(
        spec=spec,
        source=path,
        images=np.stack(images),
        labels=np.array(labels, dtype=np.int64),
        sites=sites,
        patient_ids=optional("patient_id"),
        fingerprint=digest.hexdigest(),
        file_sha256=hashlib.sha256(raw).hexdigest(),
        lines=tuple(line for line, _ in rows),
        file_digests=tuple(digests),
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


def split_manifest(
    data: ManifestData, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[SplitName, ImageSplit]:
    """Split a manifest by patient into train, val and test, each with its fingerprint.

    Each split's fingerprint is the SHA-256 of the manifest file's SHA-256, the split name and
    its row indices (as for MedMNIST splits). Each split carries its sites and anonymous patient
    group numbers, never patient IDs.

    Raises:
        DatasetError: naming the file when a split would be empty or lack positive or negative
            rows (an image listed twice is refused when the manifest is read).
    """
    groups = data.patient_groups()
    patients = len(np.unique(groups))
    fractions = f"val_fraction={val_fraction:g}, test_fraction={test_fraction:g}"
    try:
        rows = patient_disjoint_split(
            groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    except ValueError as error:
        raise DatasetError(
            f"{data.source}: {patients} patients cannot be split with {fractions} ({error})"
        ) from error
    owner: dict[int, str] = {}
    for name, indices in rows.items():
        for row in indices:
            split = owner.setdefault(int(groups[row]), name)
            if split != name:  # a safeguard: patient_disjoint_split must make this impossible
                raise DatasetError(
                    f"{data.source}:{data.lines[row]}: this patient would be in both "
                    f"{split} and {name}"
                )
    spec = data.spec
    finding = np.isin(data.labels, spec.positive_classes)
    splits: dict[SplitName, ImageSplit] = {}
    for name, indices in rows.items():
        if len(indices) == 0:
            raise DatasetError(
                f"{data.source}: the {name} split would be empty ({patients} patients, {fractions})"
            )
        positives = int(finding[indices].sum())
        if positives in (0, len(indices)):
            missing = "positive" if positives == 0 else "negative"
            raise DatasetError(
                f"{data.source}: the {name} split would have no {missing} rows "
                f"({spec.positive_finding}) among its {len(indices)} rows; add patients or "
                "change the seed or fractions"
            )
        splits[name] = ImageSplit(
            spec=spec,
            split=name,
            images=np.ascontiguousarray(data.images[indices]),
            labels=data.labels[indices],
            indices=indices,
            source=data.source,
            fingerprint=split_fingerprint(data.file_sha256, name, indices),
            sites=None if data.sites is None else data.sites[indices],
            groups=groups[indices],
        )
    return splits
