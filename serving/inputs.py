"""Requests to model inputs: the shared decoders of the datasets package (no torch inside).

The service imports decoders only from here, so that it decodes exactly as training's manifest
evaluation does.
"""

from datasets.arrays import MAX_ARRAY_ELEMENTS, decode_array
from datasets.images import (
    MAX_UPLOAD_BYTES,
    DecodedImage,
    ImageDecodeError,
    InputDecodeError,
    decode_image,
    decode_memory_estimate,
    is_dicom,
)
from datasets.volumes import decode_volume, is_nifti
from datasets.waveforms import (
    EcgBeats,
    EcgSignal,
    beats_for_model,
    beats_memory_estimate,
    canonical_lead,
    dicom_ecg_memory_estimate,
    ecg_from_dicom,
    ecg_from_json,
)

__all__ = [
    "MAX_ARRAY_ELEMENTS",
    "MAX_UPLOAD_BYTES",
    "DecodedImage",
    "EcgBeats",
    "EcgSignal",
    "ImageDecodeError",
    "InputDecodeError",
    "beats_for_model",
    "beats_memory_estimate",
    "canonical_lead",
    "decode_array",
    "decode_image",
    "decode_memory_estimate",
    "decode_volume",
    "dicom_ecg_memory_estimate",
    "ecg_from_dicom",
    "ecg_from_json",
    "is_dicom",
    "is_nifti",
]
