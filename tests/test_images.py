"""The shared decoder: every picture mode, and bad display settings, give an image or a 4xx."""

from __future__ import annotations

import io
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from datasets.images import ImageDecodeError, decode_image

GRADIENT = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
def test_png_modes_decode_to_the_model_input(mode: str):
    buffer = io.BytesIO()
    Image.fromarray(GRADIENT).convert(mode).save(buffer, format="PNG")
    for channels in (1, 3):
        decoded = decode_image(buffer.getvalue(), channels=channels, height=28, width=28)
        assert decoded.pixels.shape == (channels, 28, 28) and decoded.pixels.dtype == np.uint8
        assert decoded.source_shape == (48, 64)


def test_sixteen_bit_png_is_scaled_not_clipped():
    buffer = io.BytesIO()
    ramp = np.tile(np.linspace(1000, 51000, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), channels=1, height=28, width=28)
    # Min-max scaled to the full 8-bit range; a plain conversion would clip at 255.
    assert decoded.pixels.max() >= 250 and decoded.pixels.min() <= 5
    assert (np.diff(decoded.pixels[0, 14].astype(int)) >= 0).all()


def test_invalid_dicom_window_is_a_422(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_CT_small.dcm")
    dataset.WindowWidth, dataset.WindowCenter = 0, 10
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(ImageDecodeError, match="display settings") as failure:
        decode_image(buffer.getvalue(), channels=1, height=28, width=28)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


def test_monochrome1_is_inverted(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_MR_small.dcm")
    normal = decode_image(dataset_bytes(dataset), channels=1, height=28, width=28).pixels
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted = decode_image(dataset_bytes(dataset), channels=1, height=28, width=28).pixels
    np.testing.assert_array_equal(inverted, 255 - normal)


def dataset_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()
