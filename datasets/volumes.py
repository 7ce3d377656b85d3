"""Decoding NIfTI volumes (.nii, .nii.gz) into a 3D model's uint8 input.

Used by the service (uploads to 3D models) and by manifest evaluation, so a volume reaches the
model the same way in both. The volume is turned to the closest canonical (RAS+) orientation and
kept in nibabel's (and MONAI's) axis order, so the model's (depth, height, width) axes are the
left-to-Right, posterior-to-Anterior and inferior-to-Superior axes, in that order, whatever the
scanner's storage order. Only voxel values and the orientation are read; the header's free-text
fields (description, intent name) are never logged or returned.
"""

from __future__ import annotations

import zlib
from http import HTTPStatus

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from scipy import ndimage

from datasets.images import (
    DecodedImage,
    ImageDecodeError,
    check_contrast,
    check_upload_size,
    is_dicom,
    untrusted_input,
)

# A 512 x 512 x 512 CT; its float32 copy needs 512 MiB.
MAX_VOLUME_VOXELS = 512**3
# A gzip upload may not inflate beyond the largest volume (int16 voxels) plus its header.
MAX_INFLATED_BYTES = 2 * MAX_VOLUME_VOXELS + 64 * 1024
INTENSITY_WINDOW_PERCENTILES = (0.5, 99.5)
ACCEPTED_VOLUMES = "a NIfTI-1 or NIfTI-2 volume (.nii or .nii.gz)"

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI1_SINGLE, _NIFTI1_PAIR = b"n+1\x00", b"ni1\x00"
_NIFTI2_MAGIC_OFFSET = 4
_NIFTI2_SINGLE, _NIFTI2_PAIR = b"n+2\x00", b"ni2\x00"
_NIFTI2_HEADER_BYTES = 540


def _inflate(data: bytes, limit: int) -> bytes:
    """Gunzip at most ``limit`` bytes, refusing more (a gzip bomb, or a volume too large).

    Raises:
        ImageDecodeError: 413 if the content is larger than ``limit``; 422 if it is corrupt or
            truncated.
    """
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        content = inflater.decompress(data, limit)
        # Output stopped at the limit: one more byte tells whether data, not just the trailer,
        # was left.
        if not inflater.eof and inflater.decompress(inflater.unconsumed_tail, 1):
            raise ImageDecodeError(
                f"the gzip-compressed volume inflates to more than {limit} bytes",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
    except zlib.error as error:
        raise ImageDecodeError(
            f"the .nii.gz file is corrupt ({error})", HTTPStatus.UNPROCESSABLE_ENTITY
        ) from error
    if not inflater.eof:
        raise ImageDecodeError(
            "the .nii.gz file is truncated (the gzip stream ends early)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    return content


def _header_kind(header: bytes) -> str | None:
    """``nifti1``/``nifti2`` (single file), ``pair`` (.hdr/.img header), or None."""
    if header[_NIFTI2_MAGIC_OFFSET : _NIFTI2_MAGIC_OFFSET + 4] == _NIFTI2_SINGLE:
        return "nifti2"
    if header[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4] == _NIFTI1_SINGLE:
        return "nifti1"
    pair_magic = (
        header[_NIFTI2_MAGIC_OFFSET : _NIFTI2_MAGIC_OFFSET + 4] == _NIFTI2_PAIR
        or header[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4] == _NIFTI1_PAIR
    )
    return "pair" if pair_magic else None


def is_nifti(data: bytes) -> bool:
    """Whether ``data`` is a NIfTI-1 or NIfTI-2 file, plain or gzip-compressed.

    A gzip stream counts only if its first bytes inflate to a NIfTI header, so other gzip files
    are not mistaken for volumes.
    """
    if data[:2] == _GZIP_MAGIC:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, _NIFTI2_HEADER_BYTES)
        except zlib.error:
            return False
        return _header_kind(head) is not None
    return _header_kind(data) is not None


def _load(data: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    """Parse a single-file NIfTI image from bytes (gzip already inflated)."""
    kind = _header_kind(data)
    if kind == "pair":
        raise ImageDecodeError(
            "this is the header of a NIfTI .hdr/.img pair, without the voxels; "
            "send a single-file .nii or .nii.gz volume",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if kind is None:
        raise ImageDecodeError(
            f"the upload is not {ACCEPTED_VOLUMES}; 3D models accept NIfTI uploads or the "
            "voxels as a JSON array",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    image_class = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    try:
        return image_class.from_bytes(data)
    except (HeaderDataError, ImageFileError, ValueError, OSError, EOFError) as error:
        raise ImageDecodeError(
            f"the NIfTI header is invalid ({error})", HTTPStatus.UNPROCESSABLE_ENTITY
        ) from error


def _check_voxel_data_present(image: nib.Nifti1Image | nib.Nifti2Image, size: int) -> None:
    """Refuse a file shorter than its header says, before nibabel allocates what it declares."""
    header = image.header
    # The voxels' offset in the file: nibabel's proxy keeps it (a parsed header says 0).
    needed = (
        int(image.dataobj.offset)
        + int(np.prod(header.get_data_shape(), dtype=np.float64))
        * np.dtype(header.get_data_dtype()).itemsize
    )
    if needed > size:
        raise ImageDecodeError(
            f"the NIfTI voxel data is truncated: the header describes {needed} bytes of file, "
            f"the file has {size}; send the whole file",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def _voxels(
    image: nib.Nifti1Image | nib.Nifti2Image, size: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 3D voxel values (float32, canonical orientation) and the shape as stored.

    ``size`` is the (inflated) file's length in bytes.
    """
    shape = tuple(int(size) for size in image.shape)
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOLUME_VOXELS:
        raise ImageDecodeError(
            f"the volume has {'x'.join(map(str, shape))} voxels; the limit is "
            f"{MAX_VOLUME_VOXELS} voxels",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if np.dtype(image.get_data_dtype()).kind not in "biuf":
        raise ImageDecodeError(
            f"NIfTI voxels of type {image.get_data_dtype()} (complex or RGB) are not supported; "
            "send one grayscale intensity per voxel",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if len(shape) < 3:
        raise ImageDecodeError(
            f"the NIfTI image is {len(shape)}D ({'x'.join(map(str, shape))}); send a 3D volume",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    # Trailing dimensions of size 1 (a 4D file holding one volume) carry nothing.
    spatial = shape[:3]
    if any(size != 1 for size in shape[3:]):
        raise ImageDecodeError(
            f"4D (time series) volumes are not supported ({'x'.join(map(str, shape))}); "
            "send one 3D volume",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if min(spatial) < 2:
        raise ImageDecodeError(
            f"the volume is a single slice ({'x'.join(map(str, spatial))}); send a 3D volume",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    _check_voxel_data_present(image, size)
    try:
        if len(shape) > 3:
            image = image.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
        canonical = nib.as_closest_canonical(image)
        values = canonical.get_fdata(dtype=np.float32)
    except (HeaderDataError, ValueError, OSError, EOFError, IndexError) as error:
        raise ImageDecodeError(
            f"the NIfTI voxel data is truncated or corrupt ({error})",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        ) from error
    return values, spatial


def intensities_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale intensities to 0-255 over a robust window (the 0.5th to 99.5th percentile).

    Outliers (metal, hot voxels) then do not squash the tissue contrast. A volume whose window is
    empty but which is not constant (a sparse mask) is scaled over its full range instead.
    ``values`` (float32) is overwritten: a 512^3 volume would otherwise be held twice.

    Raises:
        ImageDecodeError: 422 if the volume has no finite value or is constant.
    """
    # Few copies of the volume at once: a 512^3 float32 volume is 0.5 GB.
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ImageDecodeError(
            "the volume has no finite voxel value", HTTPStatus.UNPROCESSABLE_ENTITY
        )
    # overwrite_input reorders ``finite`` (a copy) in place; its minimum and maximum stay.
    low, high = (
        float(v) for v in np.percentile(finite, INTENSITY_WINDOW_PERCENTILES, overwrite_input=True)
    )
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    del finite
    if high <= low:
        raise ImageDecodeError(
            "the volume is constant (every voxel has the same value); send the image volume, "
            "not an empty one",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    # NaN voxels (outside the field of view) become the window's bottom, like background. In
    # place: ``values`` is the decoder's own copy.
    scaled = np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
    np.clip(scaled, low, high, out=scaled)
    # Halved first: ``scaled - low`` overflows float32 for a window as wide as float32's range
    # (-3e38 to 3e38), and the volume would arrive black. Halving is exact, so the window's
    # bottom still maps to 0 however narrow the window is.
    scaled *= np.float32(0.5)
    scaled -= np.float32(low / 2)
    scaled *= np.float32(510.0 / (high - low))
    np.clip(scaled, 0, 255, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def resize_volume(volume: np.ndarray, depth: int, height: int, width: int) -> np.ndarray:
    """Resize a uint8 (D, H, W) volume to the model's size with trilinear ``scipy.ndimage.zoom``.

    Each axis is stretched on its own: unlike 2D pictures nothing is cropped.
    """
    target = (depth, height, width)
    if volume.shape == target:
        return volume
    factors = [new / old for new, old in zip(target, volume.shape, strict=True)]
    resized = ndimage.zoom(volume.astype(np.float32), factors, order=1, output=np.float32)
    if resized.shape != target:  # never expected: zoom rounds each size to the nearest integer
        raise ImageDecodeError(
            f"cannot resize a {volume.shape} volume to {target}", HTTPStatus.UNPROCESSABLE_ENTITY
        )
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


@untrusted_input("the volume")
def decode_volume(data: bytes, *, depth: int, height: int, width: int) -> DecodedImage:
    """Decode a NIfTI upload and fit it to a 3D model's input.

    Steps: inflate .nii.gz, reorient to the closest canonical (RAS+) orientation, keep a 4D
    file's volume only if it holds one, scale intensities over the 0.5-99.5 percentile window,
    resize with trilinear interpolation.

    Args:
        data: The uploaded bytes (.nii or .nii.gz).
        depth: Model input size along the first (left-right) axis.
        height: Model input size along the second (posterior-anterior) axis.
        width: Model input size along the third (inferior-superior) axis.

    Returns:
        uint8 pixels of shape (1, depth, height, width); ``source_shape`` is the 3D shape as
        stored in the file.

    Raises:
        ImageDecodeError: 400 empty; 413 too large; 415 not NIfTI; 422 a NIfTI file that is
            corrupt, not 3D, constant, nearly blank once resized, or otherwise unusable.
    """
    check_upload_size(data)
    if data[:2] == _GZIP_MAGIC:
        data = _inflate(data, MAX_INFLATED_BYTES)
    elif is_dicom(data):
        raise ImageDecodeError(
            f"DICOM is not accepted for 3D models; send {ACCEPTED_VOLUMES}, converted from the "
            "DICOM series (for example with dcm2niix), or the voxels as a JSON array",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    values, stored_shape = _voxels(_load(data), len(data))
    volume = resize_volume(intensities_to_uint8(values), depth, height, width)
    # A few bright voxels can fall between the resized grid's samples: the model would score
    # an empty volume. JSON volumes get the same check.
    check_contrast(volume[None], noun="volume")
    return DecodedImage(pixels=volume[None], source_format="nifti", source_shape=stored_shape)
