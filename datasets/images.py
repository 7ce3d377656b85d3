"""Decoding PNG, JPEG and DICOM files into a model's uint8 input.

The service (uploads) and evaluation on a hospital's own data (manifests) both use this code,
so the pixels a model sees cannot differ between them. Only pixel values and the tags needed to
display them are read from DICOM; no tag is logged or returned. Volumes (:mod:`datasets.volumes`),
JSON arrays (:mod:`datasets.arrays`) and ECG waveforms (:mod:`datasets.waveforms`) share the
error type and result defined here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import ParamSpec, TypeVar

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import config as pydicom_config
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless


class ImageDecodeError(ValueError):
    """An input that cannot be used. ``status`` classifies the problem as HTTP does."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


# The same error for every kind of input (images, volumes, arrays, waveforms).
InputDecodeError = ImageDecodeError


logger = logging.getLogger("medscreen.decoders")
P = ParamSpec("P")
R = TypeVar("R")
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# A 6000 x 6000 picture (larger than any radiograph or mammogram): a small compressed file can
# declare a huge one, so the declared size is checked before any pixel is decoded.
MAX_IMAGE_PIXELS = 6000 * 6000
# The fewest pixels (voxels) along each axis of a picture (volume), for files and arrays alike.
MIN_SIDE = 2
# The least share of a picture that the centre crop to the model's aspect ratio may keep: a
# 4:3 ultrasound frame keeps 75% of itself for a square model, a 1024 x 256 DICOM sample 25%,
# a 10000 x 10 strip (a wrong export, or frames laid side by side) would keep 0.1% and be
# scored on that.
MIN_KEPT_FRACTION = 1 / 4
# The narrowest span of values, in steps of the file's own values, that a channel of a model
# input may have. The graph stretches each image to its own range, so a black frame with a
# little noise would be scored as a full-contrast picture; every MedMNIST image spans at least
# 44 grey levels.
MIN_GREY_LEVEL_SPAN = 16
# Pillow reads only the high byte of these PNG pixel layouts.
_DEEP_COLOUR_PNG_LAYOUTS = ("RGB;16B", "RGBA;16B", "LA;16B")
_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class DecodedImage:
    """A file reduced to what the model needs.

    Attributes:
        pixels: uint8 array of shape (C, H, W), or (C, D, H, W) for a volume, at the model's
            input size.
        source_format: ``png``, ``jpeg``, ``dicom``, ``nifti`` or ``array``.
        source_shape: Spatial shape before resizing: (H, W), or (D, H, W) for a volume.
    """

    pixels: np.ndarray
    source_format: str
    source_shape: tuple[int, ...]


# pydicom quotes a file's values in its warnings and log lines (``Invalid value for VR UI:
# '...'``), and a crafted file can put a patient's name in any value. Set once for the process:
# a warnings filter switched per parse (``catch_warnings``) is not thread-safe.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)  # its child loggers inherit it
# Pillow warns from 89 million pixels; every picture over MAX_IMAGE_PIXELS (36 million) is
# refused with a 413 anyway, so its warning would only repeat that on the service's stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_quiet_lock = threading.Lock()
_quiet_depth = 0
_validation_before: int | None = None


@contextlib.contextmanager
def quiet_dicom_parsing() -> Iterator[None]:
    """Switch pydicom's value validation off while an untrusted file is parsed.

    Pixel decoding does not need it, and it is what quotes a file's values. The setting is
    process-wide, so it is switched by the first parse to start and restored by the last to end:
    switching it per call would race between decoding threads.
    """
    global _quiet_depth, _validation_before
    with _quiet_lock:
        if _quiet_depth == 0:
            _validation_before = pydicom_config.settings.reading_validation_mode
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _validation_before is not None:
                pydicom_config.settings.reading_validation_mode = _validation_before
                _validation_before = None


def untrusted_input(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn any failure while parsing untrusted bytes into a client error (422).

    Parsers (Pillow, pydicom, nibabel, wfdb, json) raise many exception types on hostile or
    corrupt input; none of them is the service's fault. Only the exception's type is reported:
    its message may quote file content.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except ImageDecodeError:
                raise
            except MemoryError as error:
                raise ImageDecodeError(
                    f"{what} is too large to decode", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                ) from error
            except Exception as error:  # see the docstring: the input is at fault
                logger.warning("%s failed to parse: %s", what, type(error).__name__)
                raise ImageDecodeError(
                    f"{what} cannot be decoded ({type(error).__name__}); check that it is "
                    "complete and of the documented format",
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                ) from error

        return wrapper

    return decorate


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` starts like a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def check_upload_size(data: bytes) -> None:
    """Reject an empty upload (400) or one over :data:`MAX_UPLOAD_BYTES` (413).

    Raises:
        ImageDecodeError: if the upload is empty or too large.
    """
    if not data:
        raise ImageDecodeError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageDecodeError(
            f"the upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )


def _scale_to_uint8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-max scale any numeric image to 0-255 (a flat image becomes all zeros).

    Returns:
        The uint8 pixels, and the gain: 0-255 steps per step of the file's own values (1 for
        uint8 values, which are kept as they are).
    """
    if values.dtype == np.uint8:
        return values, 1.0
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(high - low):
        # NaN or infinity (for DICOM, from the rescale or window values) would be scored as black.
        raise ImageDecodeError(
            "the pixel values are not finite numbers (for DICOM, check RescaleSlope, "
            "RescaleIntercept, WindowCenter and WindowWidth)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8), 1.0
    gain = 255.0 / (high - low)
    # In place: a large 16-bit picture would otherwise hold several float64 copies at once.
    values -= low
    values *= gain
    return np.round(values, out=values).astype(np.uint8), gain


def read_dicom_dataset(data: bytes, *, tags: list[str] | None = None) -> pydicom.Dataset:
    """Parse DICOM bytes, keeping only ``tags`` (all when None) so that no other tag is read.

    Raises:
        ImageDecodeError: (400) if the bytes are not a readable DICOM file; (415) if they are
            deflated, which pydicom would inflate without a size limit.
    """
    try:
        with quiet_dicom_parsing():
            stream = io.BytesIO(data)
            read_preamble(stream, False)
            # The meta alone first (pydicom has no public reader of it for bytes).
            syntax = _read_file_meta_info(stream).get("TransferSyntaxUID")
            # pydicom reads a file cut right after its header as an empty dataset.
            header_only = stream.tell() >= len(data)
            if not header_only and syntax != DeflatedExplicitVRLittleEndian:
                return pydicom.dcmread(io.BytesIO(data), specific_tags=tags)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as error:
        raise ImageDecodeError(f"unreadable DICOM file ({type(error).__name__})") from error
    if header_only:
        raise ImageDecodeError(
            f"the DICOM file ends after its header ({len(data)} bytes, no data element): it is "
            "truncated or corrupt; send the whole file"
        )
    raise ImageDecodeError(
        f"DICOM transfer syntax {_shown_uid(syntax)} (Deflated Explicit VR Little Endian) is not "
        "accepted; re-send the file uncompressed (Explicit VR Little Endian)",
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    )


def _shown_uid(uid: str) -> str:
    """A UID for a message: a standard one as it is, any other quoted.

    Quoted text is masked in the prediction log (it is the file's, and a crafted file can put a
    patient's name in a UID); a standard UID is a public constant and tells the operator more.
    """
    uid = UID(uid)
    return str(uid) if uid.name != str(uid) else repr(str(uid))


def dicom_ends_early(data: bytes, syntax: str | None) -> bool:
    """Whether a DICOM file is cut short (or corrupt): its elements do not end where it ends.

    pydicom stops silently when a file ends inside an element, returning what it read so far;
    a file cut after its header then looks like one without pixel data. This walks the element
    headers (values are skipped, not read) and compares where the last element ends with the
    file's length.

    Args:
        data: The file, starting with its 128-byte preamble.
        syntax: Its transfer syntax UID; explicit VR little endian when None or not one.
    """
    implicit_vr, little_endian = False, True
    with contextlib.suppress(ValueError):  # not a transfer syntax: pydicom's default
        if syntax is not None:
            implicit_vr, little_endian = UID(syntax).is_implicit_VR, UID(syntax).is_little_endian
    stream = io.BytesIO(data)
    stream.seek(_DICOM_MAGIC_OFFSET + 4)
    end = stream.tell()
    try:
        with quiet_dicom_parsing():
            # The file meta (group 2, explicit VR little endian), then the dataset.
            meta = data_element_generator(
                stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2, defer_size=0
            )
            for _ in meta:
                end = stream.tell()
            end = stream.tell()  # at the first dataset element (pydicom rewinds to it)
            for _ in data_element_generator(stream, implicit_vr, little_endian, defer_size=0):
                end = stream.tell()
    except Exception:  # a header pydicom cannot follow: the file is corrupt
        return True
    # Past the end: an element's value was cut. Short of it: a cut header, unless the rest is
    # padding (trailing NUL bytes, which pydicom reads past as well).
    return end > len(data) or data[end:].strip(b"\0") != b""


# Everything pydicom needs to decode and display pixels; no other tag (no patient tag) is parsed.
_PIXEL_TAGS = (
    "SOPClassUID",
    "WaveformSequence",
    "Modality",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "VOILUTFunction",
    "WindowCenter",
    "WindowWidth",
    "PixelPaddingValue",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
)


def _check_decodable(syntax: UID | None) -> None:
    """Answer 415 for a transfer syntax this installation has no pixel decoder for."""
    if syntax is None:
        return  # pydicom then reports what is missing when decoding
    syntax = UID(syntax)
    name = syntax.name if syntax.name != str(syntax) else "unknown"
    shown = _shown_uid(syntax)
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageDecodeError(
            f"DICOM transfer syntax {shown} ({name}) cannot be decoded by this service; "
            "re-send the image uncompressed (Explicit VR Little Endian) or as RLE Lossless",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )


# DICOM values are converted lazily, so the whole decoder runs with validation off.
@quiet_dicom_parsing()
def _read_dicom(data: bytes) -> tuple[np.ndarray, float]:
    """Return the displayed pixels of a single-frame DICOM image and the gain of their stretch.

    The gain is in 0-255 steps per stored step (see :func:`_scale_to_uint8`).
    """
    dataset = read_dicom_dataset(data, tags=list(_PIXEL_TAGS))
    if "PixelData" not in dataset:
        if "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset:
            raise ImageDecodeError(
                "DICOM float pixel data (parametric maps) is not accepted; send an image with "
                "integer pixel data",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            )
        if dicom_ends_early(data, dataset.file_meta.get("TransferSyntaxUID")):
            raise ImageDecodeError(
                f"the DICOM file ends early ({len(data)} bytes, before its pixel data): it is "
                "truncated or corrupt; send the whole file"
            )
        if "Rows" in dataset and "Columns" in dataset:
            # An image whose pixels are missing: most likely cut between two elements. Only
            # numbers are shown: a crafted file can hold a patient's name in any element.
            rows, columns = dataset.get("Rows"), dataset.get("Columns")
            counts = all(type(value) is int for value in (rows, columns))
            image = f"a {rows} x {columns} image" if counts else "an image"
            raise ImageDecodeError(
                f"the DICOM file describes {image} but holds no pixel data: it is truncated or "
                "corrupt; send the whole file"
            )
        if "WaveformSequence" in dataset:
            raise ImageDecodeError(
                "the DICOM file has no pixel data: it is a waveform (such as an ECG); "
                "send ECG waveforms to POST /v1/monitor/dicom",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            )
        raise ImageDecodeError(
            "the DICOM file has no pixel data (is it a structured report or presentation "
            "state?); send a DICOM image",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError(
            "multi-frame DICOM is not accepted by this model; send one frame",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    _check_decodable(syntax)
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    _check_pixel_count(rows * columns, samples)
    if syntax is not None and UID(syntax).is_compressed and syntax != RLELossless:
        _check_codestream_size(dataset.PixelData, rows, columns)
    try:
        pixels = dataset.pixel_array
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(
            "the compressed DICOM image is too large to decode",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ) from error
    except (ValueError, AttributeError, EOFError, RuntimeError, NotImplementedError) as error:
        # Truncated or corrupt pixel data; pydicom's message says which (no tag values in it).
        raise ImageDecodeError(
            f"the DICOM pixel data cannot be decoded ({error})", HTTPStatus.UNPROCESSABLE_ENTITY
        ) from error
    if pixels.shape != ((rows, columns) if samples == 1 else (rows, columns, samples)):
        # pydicom reads pixel data longer than one frame as several frames.
        raise ImageDecodeError(
            f"the DICOM pixel data holds {pixels.size} values, more than one {rows} x {columns} "
            "frame, and the file declares no Number of Frames: it is corrupt; re-export it",
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
        displayed = np.asarray(displayed)
        bits_stored = int(dataset.get("BitsStored", 8) or 8)
        few_bits = pixels.dtype == np.uint8 and 1 <= bits_stored < 8
        if few_bits and (displayed is pixels or np.array_equal(displayed, pixels)):
            # Fewer bits than a byte (a 1-bit mask), with no LUT or window (those give their
            # own output range) or an identity one: spread over 0-255, as Pillow does for PNG;
            # a 1-bit picture would otherwise arrive as 0 and 1.
            full_scale = (1 << bits_stored) - 1
            levels = np.minimum(displayed, full_scale).astype(np.uint16)
            scaled, gain = (levels * 255 // full_scale).astype(np.uint8), 1.0
        else:
            scaled, _ = _scale_to_uint8(displayed)
            # The gain per stored step, not per displayed one: a rescale slope of 0.001 must not
            # make a real picture look nearly blank. (A window that clips pixels far outside it
            # understates the gain, and so errs towards accepting.)
            stored_span = float(pixels.max()) - float(pixels.min())
            scaled_span = int(scaled.max()) - int(scaled.min())
            gain = scaled_span / stored_span if stored_span > 0 and scaled_span > 0 else 1.0
        # All zeros after scaling means one displayed value: a window far outside the stored
        # values, which would otherwise be scored as a blank picture.
        if not scaled.any() and pixels.min() != pixels.max():
            if np.ptp(np.asarray(apply_modality_lut(pixels, dataset))) == 0:
                settings = "modality settings (RescaleSlope, or the modality LUT)"
            else:
                settings = "display settings (WindowCenter and WindowWidth, or the VOI LUT)"
            raise ImageDecodeError(
                f"the DICOM {settings} map every pixel to one value; check them",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            )
        return (255 - scaled if photometric == "MONOCHROME1" else scaled), gain
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        # pydicom's pixel_array already converts YBR colour (JPEG 2000's RCT and ICT too) to RGB.
        return _scale_to_uint8(np.asarray(pixels))
    raise ImageDecodeError(
        f"DICOM photometric interpretation {photometric!r} is not supported; send "
        "MONOCHROME1, MONOCHROME2, RGB or YBR",
        HTTPStatus.UNPROCESSABLE_ENTITY,
    )


def _check_codestream_size(pixel_data: bytes, rows: int, columns: int) -> None:
    """Refuse a JPEG or JPEG 2000 frame whose own size is not the one the DICOM header declares.

    The decoder makes an image of the codestream's size, not the header's: a small file
    declaring 64 x 64 can hold a 13000 x 13000 codestream, gigabytes once decoded. Pillow, this
    installation's only decoder of both, reads the codestream's header alone here.

    Raises:
        ImageDecodeError: 422 if the sizes differ or the frame's header is unreadable.
    """
    try:
        frame = next(generate_frames(pixel_data, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as codestream:
            width, height = codestream.size
    except (StopIteration, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(
            f"the DICOM compressed pixel data cannot be decoded ({type(error).__name__})",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        ) from error
    if (width, height) != (columns, rows):
        raise ImageDecodeError(
            f"the DICOM compressed pixel data holds a {width} x {height} image (width x height) "
            f"but the header declares Columns {columns} and Rows {rows}: the file is corrupt; "
            "re-export it",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def _check_pixel_count(pixels: int, samples: int) -> None:
    """Answer 413 for a picture whose declared size is over :data:`MAX_IMAGE_PIXELS`."""
    if pixels > MAX_IMAGE_PIXELS or pixels * samples > 3 * MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"the image declares {pixels} pixels; the limit is {MAX_IMAGE_PIXELS} "
            "(6000 x 6000): send it downsampled",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )


# Peak memory of :func:`decode_image` per declared value (pixel x sample), measured on 6000 x
# 6000 pictures (2026-12-01): a 16-bit DICOM with a rescale and a window 26.5 bytes (28.4 at
# 3000 x 3000), a 16-bit PNG 12.0, an 8-bit grey PNG 4.0, RGB JPEG and PNG 4.7.
_DICOM_DECODE_BYTES_PER_VALUE = 30
_DEEP_PICTURE_DECODE_BYTES_PER_VALUE = 12
_PICTURE_DECODE_BYTES_PER_VALUE = 5


def decode_memory_estimate(data: bytes) -> int:
    """Return about how many bytes :func:`decode_image` will hold at its peak for ``data``.

    Read from the declared size alone (a small compressed file can declare a large picture),
    without decoding a pixel.

    Returns:
        The estimate in bytes; 0 when the header is unreadable or declares more than
        :data:`MAX_IMAGE_PIXELS` (the decoder then refuses the file before decoding a pixel).
    """
    try:
        if is_dicom(data):
            with quiet_dicom_parsing():
                header = read_dicom_dataset(data, tags=["Rows", "Columns", "SamplesPerPixel"])
                pixels = int(header.get("Rows", 0) or 0) * int(header.get("Columns", 0) or 0)
                samples = int(header.get("SamplesPerPixel", 1) or 1)
            per_value = _DICOM_DECODE_BYTES_PER_VALUE
        else:
            with Image.open(io.BytesIO(data)) as header:
                pixels, samples = header.width * header.height, len(header.getbands())
                deep = header.mode in ("I", "I;16", "I;16B", "F")
            per_value = (
                _DEEP_PICTURE_DECODE_BYTES_PER_VALUE if deep else _PICTURE_DECODE_BYTES_PER_VALUE
            )
    except Exception:  # an unreadable header: the decoder reports what is wrong with the file
        return 0
    values = pixels * max(samples, 1)
    if pixels > MAX_IMAGE_PIXELS or values > 3 * MAX_IMAGE_PIXELS:
        return 0
    return values * per_value


def _read_picture(data: bytes) -> tuple[np.ndarray, str, float]:
    """Return a PNG's or JPEG's pixels, its format and the gain of any stretch to 0-255."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            image_format = (picture.format or "").lower()
            if image_format == "mpo":  # a multi-picture JPEG: its first picture is read
                image_format = "jpeg"
            if image_format not in ("png", "jpeg"):
                raise ImageDecodeError(
                    f"{image_format or 'this'} images are not accepted; send PNG, JPEG or DICOM",
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                )
            _check_pixel_count(picture.width * picture.height, 1)
            if any(
                getattr(tile, "args", None) in _DEEP_COLOUR_PNG_LAYOUTS for tile in picture.tile
            ):
                # Pillow keeps only their high byte: 12-bit content would arrive nearly black.
                raise ImageDecodeError(
                    "16-bit colour and 16-bit grey-with-alpha PNG images are not accepted; send "
                    "16-bit greyscale without alpha, or 8-bit",
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                )
            picture.load()
            # Cameras and phones store pictures sideways with an EXIF Orientation tag; the model
            # must see them upright, as a viewer shows them. First, before any pixel is used.
            ImageOps.exif_transpose(picture, in_place=True)
            if picture.mode in ("I", "I;16", "I;16B", "F"):
                pixels, gain = _scale_to_uint8(np.asarray(picture))
                return pixels, image_format, gain
            # Bilevel, palette and alpha modes become plain grayscale or RGB.
            grayscale = picture.mode in ("1", "L", "LA")
            return np.asarray(picture.convert("L" if grayscale else "RGB")), image_format, 1.0
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(
            f"the image is too large to decode ({error}); send it downsampled",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(
            "the upload is not a PNG, JPEG or DICOM image", HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        ) from error
    except (OSError, SyntaxError) as error:
        raise ImageDecodeError(f"the image file is truncated or corrupt ({error})") from error


def check_content(pixels: np.ndarray, spatial_axes: int = 2, *, refuse_blank: bool = True) -> None:
    """Refuse a picture or volume that is too small to be one, or blank, whatever its source.

    One rule for files and JSON arrays: at least :data:`MIN_SIDE` pixels (voxels) along each
    axis, and not one value everywhere. A blank image (an empty frame, a failed export, a
    window that hides everything) still gets a score, and often a confident one. A nearly blank
    one is refused by :func:`check_contrast`, on the model's input.

    Args:
        pixels: A decoded (H, W) or (H, W, C) picture, or (D, H, W) volume, before resizing.
        spatial_axes: 2 for a picture, 3 for a volume.
        refuse_blank: Whether a blank picture is refused too.

    Raises:
        ImageDecodeError: 422, saying which rule and what to send.
    """
    noun, unit = ("image", "pixel") if spatial_axes == 2 else ("volume", "voxel")
    shape = tuple(int(size) for size in pixels.shape[:spatial_axes])
    if len(shape) < spatial_axes or min(shape) < MIN_SIDE:
        raise ImageDecodeError(
            f"the {noun} is {' x '.join(map(str, shape))} {unit}s; send at least {MIN_SIDE} "
            f"{unit}s along each axis",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    axes = tuple(range(spatial_axes))
    # Per channel, so that a picture of one colour is blank too; no copy of the pixels is made.
    if refuse_blank and np.array_equal(pixels.min(axis=axes), pixels.max(axis=axes)):
        raise ImageDecodeError(
            f"the {noun} is blank: every {unit} has the same value; send the image itself, not "
            "an empty frame (check the export, or the DICOM window)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def check_contrast(model_input: np.ndarray, gain: float = 1.0, *, noun: str = "image") -> None:
    """Refuse a nearly blank model input: the graph would stretch its noise to full contrast.

    The graph scales each image by its own minimum and maximum, so what matters is the span of
    the model's input (resized, in the model's channels), per channel, counted in steps of the
    file's own values (``gain``: 0-255 steps per file step, for pixels the decoder stretched to
    0-255) or of the model's input, whichever are coarser. The whole span counts, not a trimmed
    one: a vessel mask or a small lesion on a dark background is a few bright pixels too.

    Raises:
        ImageDecodeError: 422 when the widest channel spans fewer than
            :data:`MIN_GREY_LEVEL_SPAN` steps.
    """
    axes = tuple(range(1, model_input.ndim))
    spans = model_input.max(axis=axes).astype(np.float64) - model_input.min(axis=axes)
    widest = float(spans.max())
    if gain < 1 and widest < MIN_GREY_LEVEL_SPAN:
        # A wide file range squeezed into 0-255 by a few extreme pixels (a saturated marker in a
        # 16-bit picture): the rest would reach the model as a handful of grey levels.
        raise ImageDecodeError(
            f"the {noun} is nearly blank at the model's input: scaled from its darkest to its "
            f"brightest pixel, it spans {math.floor(widest)} of 256 grey levels (at least "
            f"{MIN_GREY_LEVEL_SPAN} are needed); a few extreme pixels, such as a burned-in "
            "marker, set that range: send the image windowed for display, as 8-bit",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    steps = widest / gain
    if steps < MIN_GREY_LEVEL_SPAN:
        raise ImageDecodeError(
            f"the {noun} is nearly blank: its values span {math.floor(steps)} steps of the "
            f"file's values (at least {MIN_GREY_LEVEL_SPAN} are needed); send the image itself, "
            "not an empty or unexposed frame (check the export, or the DICOM window)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def fit_picture(pixels: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """Fit a 2D picture to a model's input, as every upload is fitted.

    Matches the channels, centre-crops to the target aspect ratio and resizes (bicubic). A
    picture whose crop would keep less than :data:`MIN_KEPT_FRACTION` of it is refused.

    Args:
        pixels: uint8 (H, W) grayscale, or (H, W, 2|3|4) grayscale+alpha, RGB or RGBA.
        channels: 1 (grayscale) or 3 (RGB).
        height: Model input height.
        width: Model input width.

    Returns:
        uint8 (channels, height, width).

    Raises:
        ImageDecodeError: if ``pixels`` is not a 2D picture (422 if its shape is too far from
            the model's).
    """
    mode = "L" if channels == 1 else "RGB"
    if pixels.ndim == 2:
        picture = Image.fromarray(pixels, mode="L")
    elif pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        picture = Image.fromarray(pixels[..., :3], mode="RGB")
    elif pixels.ndim == 3 and pixels.shape[-1] == 2:  # grayscale + alpha
        picture = Image.fromarray(pixels[..., 0], mode="L")
    else:
        raise ImageDecodeError(f"image of shape {pixels.shape} is not a 2D picture")
    source_height, source_width = pixels.shape[:2]
    target_ratio = width / height
    source_ratio = source_width / source_height
    kept = min(source_ratio, target_ratio) / max(source_ratio, target_ratio)
    if kept < MIN_KEPT_FRACTION:
        shown = math.floor(kept * 1000) / 10  # rounded down: 24.99% must not read as 25.0%
        raise ImageDecodeError(
            f"the image is {source_width} x {source_height} pixels (width x height); cropped to "
            f"the model's {width} x {height} input it would keep {shown:.1f}% of itself (at "
            f"least {MIN_KEPT_FRACTION:.0%} is needed); send the region to be screened, cropped "
            "closer to the model's shape",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    picture = picture.convert(mode)
    if source_ratio > target_ratio:
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


@untrusted_input("the upload")
def decode_image(
    data: bytes, *, channels: int, height: int, width: int, refuse_blank: bool = False
) -> DecodedImage:
    """Decode an upload and fit it to the model's input.

    Args:
        data: The uploaded bytes.
        channels: 1 (grayscale) or 3 (RGB).
        height: Model input height.
        width: Model input width.
        refuse_blank: Refuse a blank or nearly blank image (422), as the service does for every
            upload (see :func:`check_content` and :func:`check_contrast`). Off by default so
            that manifests (:mod:`datasets.manifest`), which share this decoder, keep their
            blank images; the 2-pixel minimum applies to both.

    Returns:
        The decoded image.

    Raises:
        ImageDecodeError: with a message for the integrator and the HTTP status to answer with.
    """
    check_upload_size(data)
    if is_dicom(data):
        (pixels, gain), source_format = _read_dicom(data), "dicom"
    else:
        pixels, source_format, gain = _read_picture(data)
    check_content(pixels, 2, refuse_blank=refuse_blank)
    model_input = fit_picture(pixels, channels, height, width)
    if refuse_blank:
        check_contrast(model_input, gain)
    return DecodedImage(
        pixels=model_input,
        source_format=source_format,
        source_shape=(int(pixels.shape[0]), int(pixels.shape[1])),
    )
