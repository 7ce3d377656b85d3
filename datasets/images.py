"""Decoding PNG, JPEG and DICOM files into a model's uint8 input.

The service (uploads) and evaluation on a hospital's own data (manifests) both use this code,
so the pixels a model sees cannot differ between them. Only pixel values and the tags needed to
display them are read from DICOM; no tag is logged or returned.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut


class ImageDecodeError(ValueError):
    """A file that cannot be used as an image. ``status`` classifies the problem as HTTP does."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


MAX_UPLOAD_BYTES = 32 * 1024 * 1024
_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class DecodedImage:
    """A file reduced to what the model needs.

    Attributes:
        pixels: uint8 array of shape (C, H, W) at the model's input size.
        source_format: ``png``, ``jpeg`` or ``dicom``.
        source_shape: Height and width before resizing.
    """

    pixels: np.ndarray
    source_format: str
    source_shape: tuple[int, int]


def _is_dicom(data: bytes) -> bool:
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric image to 0-255 (a flat image becomes all zeros)."""
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_dicom(data: bytes) -> np.ndarray:
    """Return the displayed grayscale or RGB pixels of a single-frame DICOM image."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as error:
        raise ImageDecodeError(f"unreadable DICOM file ({type(error).__name__})") from error
    if "PixelData" not in dataset:
        raise ImageDecodeError(
            "the DICOM file has no pixel data (is it a waveform or structured report?)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    try:
        pixels = dataset.pixel_array
    except NotImplementedError as error:
        raise ImageDecodeError(
            f"DICOM transfer syntax {getattr(syntax, 'name', syntax)} cannot be decoded here; "
            "send it uncompressed, RLE or baseline JPEG",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        ) from error
    except (ValueError, AttributeError, EOFError, RuntimeError) as error:
        raise ImageDecodeError(
            f"the DICOM pixel data cannot be decoded ({error})", HTTPStatus.UNPROCESSABLE_ENTITY
        ) from error
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError(
            "multi-frame DICOM is not accepted by this model; send one frame",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        try:
            displayed = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise ImageDecodeError(
                f"the DICOM display settings (modality or VOI LUT, window) are invalid ({error})",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            ) from error
        scaled = _scale_to_uint8(np.asarray(displayed))
        return 255 - scaled if photometric == "MONOCHROME1" else scaled
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        # pydicom's pixel_array already converts YBR colour to RGB.
        return _scale_to_uint8(np.asarray(pixels))
    raise ImageDecodeError(
        f"DICOM photometric interpretation {photometric} is not supported",
        HTTPStatus.UNPROCESSABLE_ENTITY,
    )


def _read_picture(data: bytes) -> tuple[np.ndarray, str]:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            image_format = (picture.format or "").lower()
            if image_format not in ("png", "jpeg"):
                raise ImageDecodeError(
                    f"{image_format or 'this'} images are not accepted; send PNG, JPEG or DICOM",
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                )
            picture.load()
            if picture.mode in ("I", "I;16", "I;16B", "F"):
                return _scale_to_uint8(np.asarray(picture)), image_format
            # Bilevel, palette and alpha modes become plain grayscale or RGB.
            grayscale = picture.mode in ("1", "L", "LA")
            return np.asarray(picture.convert("L" if grayscale else "RGB")), image_format
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(
            "the upload is not a PNG, JPEG or DICOM image", HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        ) from error
    except (OSError, SyntaxError) as error:
        raise ImageDecodeError(f"the image file is truncated or corrupt ({error})") from error


def _fit(pixels: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """Match channels, centre-crop to the target aspect ratio, resize; return (C, H, W)."""
    mode = "L" if channels == 1 else "RGB"
    if pixels.ndim == 2:
        picture = Image.fromarray(pixels, mode="L")
    elif pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        picture = Image.fromarray(pixels[..., :3], mode="RGB")
    elif pixels.ndim == 3 and pixels.shape[-1] == 2:  # grayscale + alpha
        picture = Image.fromarray(pixels[..., 0], mode="L")
    else:
        raise ImageDecodeError(f"image of shape {pixels.shape} is not a 2D picture")
    picture = picture.convert(mode)
    source_width, source_height = picture.size
    target_ratio = width / height
    if source_width / source_height > target_ratio:
        crop_width = round(source_height * target_ratio)
        left = (source_width - crop_width) // 2
        picture = picture.crop((left, 0, left + crop_width, source_height))
    else:
        crop_height = round(source_width / target_ratio)
        top = (source_height - crop_height) // 2
        picture = picture.crop((0, top, source_width, top + crop_height))
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if channels == 1 else np.moveaxis(array, -1, 0)


def decode_image(data: bytes, *, channels: int, height: int, width: int) -> DecodedImage:
    """Decode an upload and fit it to the model's input.

    Args:
        data: The uploaded bytes.
        channels: 1 (grayscale) or 3 (RGB).
        height: Model input height.
        width: Model input width.

    Returns:
        The decoded image.

    Raises:
        ImageDecodeError: with a message for the integrator and the HTTP status to answer with.
    """
    if not data:
        raise ImageDecodeError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageDecodeError(
            f"the upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if _is_dicom(data):
        pixels, source_format = _read_dicom(data), "dicom"
    else:
        pixels, source_format = _read_picture(data)
    if pixels.ndim < 2 or min(pixels.shape[:2]) < 1:
        raise ImageDecodeError("the image has no pixels", HTTPStatus.UNPROCESSABLE_ENTITY)
    return DecodedImage(
        pixels=_fit(pixels, channels, height, width),
        source_format=source_format,
        source_shape=(int(pixels.shape[0]), int(pixels.shape[1])),
    )
