"""Raw medical datasets: the catalogue, checked downloads, and splits with lineage fingerprints.

Also the decoders of model inputs that training and serving share. Those for volumes, arrays
and ECG waveforms load on first use: nibabel, wfdb and scipy.signal take about a second to
import, which commands that never touch them should not pay.
"""

from importlib import import_module
from typing import Any

from datasets.catalogue import DatasetSpec, SplitName, get_dataset_spec, list_datasets
from datasets.download import download_file, fetch_dataset
from datasets.errors import DatasetError
from datasets.images import DecodedImage, ImageDecodeError, InputDecodeError, decode_image
from datasets.manifest import ManifestData, load_manifest, patient_disjoint_split, pixel_sha256
from datasets.medmnist import ImageSplit, load_split

_LAZY_EXPORTS = {
    "decode_array": "datasets.arrays",
    "decode_volume": "datasets.volumes",
    "is_nifti": "datasets.volumes",
    **dict.fromkeys(
        (
            "EcgBeats",
            "EcgSignal",
            "beats_for_model",
            "canonical_lead",
            "ecg_from_dicom",
            "ecg_from_json",
        ),
        "datasets.waveforms",
    ),
}

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "DecodedImage",
    "EcgBeats",
    "EcgSignal",
    "ImageDecodeError",
    "ImageSplit",
    "InputDecodeError",
    "ManifestData",
    "SplitName",
    "beats_for_model",
    "canonical_lead",
    "decode_array",
    "decode_image",
    "decode_volume",
    "download_file",
    "ecg_from_dicom",
    "ecg_from_json",
    "fetch_dataset",
    "get_dataset_spec",
    "is_nifti",
    "list_datasets",
    "load_manifest",
    "load_split",
    "patient_disjoint_split",
    "pixel_sha256",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'datasets' has no attribute {name!r}")
    return getattr(import_module(_LAZY_EXPORTS[name]), name)
