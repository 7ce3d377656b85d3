"""Our one decoder against MONAI's readers: the same pixels wherever MONAI's readers are right.

Manifests and the service share `datasets.images` / `datasets.volumes` (the service may not
import MONAI). These tests show that this costs nothing where MONAI's readers apply: PNG, JPEG,
NIfTI and DICOM without a display window give MONAI's pixels. They also pin the one reason for
the deviation: MONAI's DICOM reader ignores the VOI window, so it would train on pixels that
differ from what a viewer, and our service, shows.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.transforms import LoadImage
from PIL import Image
from pydicom.pixels import apply_voi_lut

from datasets.images import decode_image
from datasets.volumes import decode_volume, intensities_to_uint8


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _monai(path: Path, reader: object) -> np.ndarray:
    return np.asarray(LoadImage(reader=reader, image_only=True)(str(path)))


@pytest.mark.parametrize(("mode", "image_format"), [("L", "PNG"), ("RGB", "PNG"), ("L", "JPEG")])
def test_pictures_decode_to_monai_pil_reader_pixels(tmp_path: Path, mode: str, image_format: str):
    rows, columns = np.mgrid[0:40, 0:52]
    gradient = ((rows * 5 + columns * 3) % 256).astype(np.uint8)
    picture = Image.fromarray(gradient).convert(mode)
    path = tmp_path / f"picture.{image_format.lower()}"
    picture.save(path, format=image_format)
    channels = 3 if mode == "RGB" else 1

    ours = decode_image(path.read_bytes(), channels=channels, height=40, width=52).pixels
    theirs = _monai(path, PILReader(reverse_indexing=False))

    expected = np.moveaxis(theirs, -1, 0) if channels == 3 else theirs[None]
    np.testing.assert_array_equal(ours, expected.astype(np.uint8))


def test_dicom_without_a_window_decodes_to_monai_pydicom_reader_pixels(shared_datasets: Path):
    dicom_dir = shared_datasets / "dicom"
    # CT: int16 with a rescale slope and intercept, no window; MONAI applies the rescale too.
    ct = dicom_dir / "pydicom_CT_small.dcm"
    ours = decode_image(ct.read_bytes(), channels=1, height=128, width=128).pixels[0]
    np.testing.assert_array_equal(ours, _min_max_uint8(_monai(ct, PydicomReader(swap_ij=False))))
    # Chest X-ray: 8-bit, no window; both keep the stored values.
    chest = dicom_dir / "nih_chestxray14_dx_1024.dcm"
    ours = decode_image(chest.read_bytes(), channels=1, height=1024, width=1024).pixels[0]
    np.testing.assert_array_equal(ours, _monai(chest, PydicomReader(swap_ij=False)))


def test_monai_pydicom_reader_ignores_the_voi_window(shared_datasets: Path):
    """Why manifests do not go through MONAI: a windowed image would not look as it is read.

    If this fails, MONAI now applies the VOI LUT and its reader can replace ours for manifests.
    """
    mr = shared_datasets / "dicom" / "pydicom_MR_small.dcm"
    dataset = pydicom.dcmread(mr)
    assert "WindowCenter" in dataset
    displayed = _min_max_uint8(apply_voi_lut(dataset.pixel_array, dataset))
    ours = decode_image(mr.read_bytes(), channels=1, height=64, width=64).pixels[0]
    theirs = _min_max_uint8(_monai(mr, PydicomReader(swap_ij=False)))
    np.testing.assert_array_equal(ours, displayed)
    assert not np.array_equal(theirs, displayed)


def test_nifti_decodes_to_monai_nibabel_reader_voxels(shared_datasets: Path, tmp_path: Path):
    anatomy = nib.load(shared_datasets / "nifti" / "someones_anatomy.nii.gz")
    data = np.asarray(anatomy.dataobj)
    # Stored left-right flipped (LAS), so that both readers must reorient to RAS.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    path = tmp_path / "anatomy_las.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1], anatomy.affine @ flip), path)
    assert nib.aff2axcodes(nib.load(path).affine)[0] == "L"

    theirs = _monai(path, NibabelReader(as_closest_canonical=True))
    ours = decode_volume(path.read_bytes(), depth=57, height=67, width=56).pixels[0]
    assert theirs.shape == ours.shape == (57, 67, 56)
    np.testing.assert_array_equal(ours, intensities_to_uint8(theirs.astype(np.float32)))
