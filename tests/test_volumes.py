"""NIfTI volumes to a 3D model's input: orientation, 4D, intensity window, corrupt files."""

from __future__ import annotations

import gzip
import struct
from http import HTTPStatus
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.images import ImageDecodeError
from datasets.volumes import decode_volume, is_nifti

VESSEL_INPUT = {"depth": 28, "height": 28, "width": 28}


@pytest.fixture(scope="module")
def nifti_dir(shared_datasets: Path) -> Path:
    return shared_datasets / "nifti"


@pytest.fixture(scope="module")
def anatomy(nifti_dir: Path) -> nib.Nifti1Image:
    return nib.load(nifti_dir / "someones_anatomy.nii.gz")


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compress: bool = False) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def test_3d_nii_gz_decodes_to_the_model_input(nifti_dir: Path):
    decoded = decode_volume((nifti_dir / "someones_anatomy.nii.gz").read_bytes(), **VESSEL_INPUT)
    assert decoded.pixels.shape == (1, 28, 28, 28) and decoded.pixels.dtype == np.uint8
    assert decoded.source_format == "nifti" and decoded.source_shape == (57, 67, 56)
    # The percentile window spans the full 8-bit range.
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_plain_nii_and_nii_gz_give_the_same_pixels(anatomy: nib.Nifti1Image):
    data = np.asarray(anatomy.dataobj)
    plain = decode_volume(nifti_bytes(data, anatomy.affine), **VESSEL_INPUT)
    packed = decode_volume(nifti_bytes(data, anatomy.affine, compress=True), **VESSEL_INPUT)
    np.testing.assert_array_equal(plain.pixels, packed.pixels)


def test_storage_orientation_does_not_change_the_model_input(anatomy: nib.Nifti1Image):
    data = np.asarray(anatomy.dataobj)
    # The same head stored left-to-right flipped (LAS), with the affine saying so.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    stored_las = nifti_bytes(data[::-1], anatomy.affine @ flip)
    assert nib.aff2axcodes(anatomy.affine @ flip)[0] == "L"
    ras = decode_volume(nifti_bytes(data, anatomy.affine), **VESSEL_INPUT)
    las = decode_volume(stored_las, **VESSEL_INPUT)
    np.testing.assert_array_equal(las.pixels, ras.pixels)


def test_robust_window_ignores_a_few_extreme_voxels(anatomy: nib.Nifti1Image):
    data = np.asarray(anatomy.dataobj).astype(np.float32)
    clean = decode_volume(nifti_bytes(data, anatomy.affine), **VESSEL_INPUT).pixels
    spiked = data.copy()
    spiked[0, 0, 0] = 1e6  # one metal-artefact voxel
    with_spike = decode_volume(nifti_bytes(spiked, anatomy.affine), **VESSEL_INPUT).pixels
    # Min-max scaling would leave the tissue near black; the window keeps its contrast.
    assert abs(float(with_spike.mean()) - float(clean.mean())) < 2


def test_sparse_mask_is_scaled_over_its_range(anatomy: nib.Nifti1Image):
    mask = np.zeros((40, 40, 40), dtype=np.uint8)
    mask[20, 20, 18:22] = 1  # far fewer than 0.5 % of the voxels
    decoded = decode_volume(nifti_bytes(mask, np.eye(4)), depth=40, height=40, width=40)
    assert decoded.pixels.max() == 255 and (decoded.pixels == 255).sum() == 4


def test_a_volume_blank_once_resized_is_a_422():
    mask = np.zeros((200, 200, 200), dtype=np.uint8)
    mask[100, 100, 100:103] = 1  # falls between the samples of a 28^3 grid
    with pytest.raises(ImageDecodeError, match="nearly blank") as failure:
        decode_volume(nifti_bytes(mask, np.eye(4)), **VESSEL_INPUT)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    # The same three voxels in a volume the model's size are kept.
    small = np.zeros((28, 28, 28), dtype=np.uint8)
    small[14, 14, 13:16] = 1
    assert decode_volume(nifti_bytes(small, np.eye(4)), **VESSEL_INPUT).pixels.max() == 255


def test_4d_time_series_is_a_422(nifti_dir: Path):
    with pytest.raises(ImageDecodeError, match="4D") as failure:
        decode_volume((nifti_dir / "example4d.nii.gz").read_bytes(), **VESSEL_INPUT)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "send one 3D volume" in str(failure.value)


def test_4d_file_with_one_volume_is_that_volume(nifti_dir: Path):
    series = nib.load(nifti_dir / "example4d.nii.gz")
    first = np.asarray(series.dataobj)[..., :1]
    one_frame = decode_volume(nifti_bytes(first, series.affine), **VESSEL_INPUT)
    as_3d = decode_volume(nifti_bytes(first[..., 0], series.affine), **VESSEL_INPUT)
    assert one_frame.source_shape == (128, 96, 24)
    np.testing.assert_array_equal(one_frame.pixels, as_3d.pixels)


def test_constant_volume_is_a_422():
    with pytest.raises(ImageDecodeError, match="constant") as failure:
        decode_volume(nifti_bytes(np.full((8, 8, 8), 7, np.int16), np.eye(4)), **VESSEL_INPUT)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda good: b"", HTTPStatus.BAD_REQUEST, "empty"),
        (lambda good: b"not a volume at all" * 40, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "NIfTI"),
        (lambda good: gzip.compress(b"a gzip file of text" * 40), 415, ".nii or .nii.gz"),
        (lambda good: good[: len(good) // 2], HTTPStatus.UNPROCESSABLE_ENTITY, "truncated"),
        (lambda good: gzip.decompress(good)[:400], 422, "the header describes"),
    ],
)
def test_bad_files_give_the_right_status(nifti_dir: Path, make, status, message: str):
    good = (nifti_dir / "someones_anatomy.nii.gz").read_bytes()
    with pytest.raises(ImageDecodeError, match=message) as failure:
        decode_volume(make(good), **VESSEL_INPUT)
    assert failure.value.status == status


def test_dicom_sent_to_a_3d_model_is_a_415(shared_datasets: Path):
    data = (shared_datasets / "dicom" / "pydicom_CT_small.dcm").read_bytes()
    with pytest.raises(ImageDecodeError, match="NIfTI") as failure:
        decode_volume(data, **VESSEL_INPUT)
    assert failure.value.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def test_is_nifti_recognises_nifti_only(nifti_dir: Path, shared_datasets: Path):
    packed = (nifti_dir / "someones_anatomy.nii.gz").read_bytes()
    assert is_nifti(packed) and is_nifti(gzip.decompress(packed))
    assert is_nifti(nib.Nifti2Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    assert not is_nifti(gzip.compress(b"x" * 1000))
    assert not is_nifti((shared_datasets / "dicom" / "pydicom_CT_small.dcm").read_bytes())
    assert not is_nifti(b"")


def test_nifti2_decodes_like_nifti1(anatomy: nib.Nifti1Image):
    data = np.asarray(anatomy.dataobj)
    nifti2 = nib.Nifti2Image(data, anatomy.affine).to_bytes()
    np.testing.assert_array_equal(
        decode_volume(nifti2, **VESSEL_INPUT).pixels,
        decode_volume(nifti_bytes(data, anatomy.affine), **VESSEL_INPUT).pixels,
    )


def test_header_declaring_more_voxels_than_the_file_holds_is_refused_before_reading():
    # A 33 KB file whose header says 512 x 512 x 512 float64: nibabel would first allocate the
    # gigabyte it declares.
    data = bytearray(nib.Nifti1Image(np.zeros((16, 16, 16)), np.eye(4)).to_bytes())
    data[40:56] = struct.pack("<8h", 3, 512, 512, 512, 1, 1, 1, 1)  # dim[0..7]
    with pytest.raises(ImageDecodeError, match="header describes 1073742176 bytes") as failure:
        decode_volume(bytes(data), **VESSEL_INPUT)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


def test_window_as_wide_as_float32_keeps_the_volume():
    # Finite float32 voxels at -3e38 and 3e38: the window's width overflows float32, and the
    # volume used to arrive all black.
    voxels = np.where(np.indices((16, 16, 16)).sum(0) > 22, 3e38, -3e38).astype(np.float32)
    decoded = decode_volume(nifti_bytes(voxels, np.eye(4)), **VESSEL_INPUT)
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_window_a_few_float32_steps_wide_keeps_its_bottom_black():
    # Two values one float32 step apart near 1e6: the background must stay at 0, not mid-grey.
    voxels = np.where(np.indices((16, 16, 16)).sum(0) > 22, 1e6 + 0.0625, 1e6).astype(np.float32)
    decoded = decode_volume(nifti_bytes(voxels, np.eye(4)), **VESSEL_INPUT)
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
