"""Raw medical datasets: the catalogue, checked downloads, and splits with lineage fingerprints."""

from datasets.catalogue import DatasetSpec, SplitName, get_dataset_spec, list_datasets
from datasets.download import download_file, fetch_dataset
from datasets.errors import DatasetError
from datasets.images import DecodedImage, ImageDecodeError, decode_image
from datasets.manifest import ManifestData, load_manifest, patient_disjoint_split
from datasets.medmnist import ImageSplit, load_split

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "DecodedImage",
    "ImageDecodeError",
    "ImageSplit",
    "ManifestData",
    "SplitName",
    "decode_image",
    "download_file",
    "fetch_dataset",
    "get_dataset_spec",
    "list_datasets",
    "load_manifest",
    "load_split",
    "patient_disjoint_split",
]
