"""Decoding pixel arrays sent as JSON (nested lists) into a model's uint8 input.

For integrators whose pipeline already holds pixels (for example a MedMNIST-style array) rather
than a file. The values must be the raw uint8 pixels 0-255 that the model was trained on, not
normalised or Hounsfield values: the service does not guess a scaling. A spatial size other than
the model's is resized exactly as an uploaded picture (2D) or NIfTI volume (3D) would be.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from http import HTTPStatus

import numpy as np

from datasets.images import (
    DecodedImage,
    ImageDecodeError,
    check_content,
    check_contrast,
    fit_picture,
    untrusted_input,
)
from datasets.volumes import resize_volume

MAX_ARRAY_ELEMENTS = 16 * 1024 * 1024
# numpy's limit on axes; deeper lists would otherwise be reported as ragged.
_MAX_ARRAY_AXES = 64
_PICTURE_CHANNELS = (1, 3)


def _error(message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY) -> ImageDecodeError:
    return ImageDecodeError(f"field 'array': {message}", status)


def _outer_shape(payload: list) -> tuple[int, ...]:
    """The shape the nested lists claim along their first elements (cheap; checked later)."""
    shape: list[int] = []
    node: object = payload
    while isinstance(node, list):
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    return tuple(shape)


def _json_type(value: object) -> str:
    names = {dict: "an object", str: "a string", bool: "a boolean", int: "a number"}
    return "null" if value is None else names.get(type(value), "a number")


def _location(index: tuple[int, ...]) -> str:
    return "array" + "".join(f"[{int(i)}]" for i in index)


def _first_boolean(payload: list, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Where a JSON ``true``/``false`` sits among numbers (numpy reads it as 1/0), if anywhere."""
    flat: list = payload
    for _ in range(len(shape) - 1):
        flat = list(itertools.chain.from_iterable(flat))
    if bool not in set(map(type, flat)):  # the common case, without a Python-level loop
        return None
    position = next(index for index, value in enumerate(flat) if isinstance(value, bool))
    return tuple(int(i) for i in np.unravel_index(position, shape))


def _to_uint8(payload: object) -> np.ndarray:
    """Nested lists of whole numbers 0-255 to a uint8 array, or a 4xx naming the problem."""
    if not isinstance(payload, list):
        raise _error(f"expected nested lists of numbers, got {_json_type(payload)}")
    claimed = _outer_shape(payload)
    if int(np.prod(claimed, dtype=np.float64)) > MAX_ARRAY_ELEMENTS:
        raise _error(
            f"{'x'.join(map(str, claimed))} values exceed the limit of {MAX_ARRAY_ELEMENTS}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if len(claimed) > _MAX_ARRAY_AXES:
        raise _error(
            f"the nested lists are at least {len(claimed)} deep; an image is (H, W) or (C, H, W) "
            "and a volume (D, H, W), optionally with leading axes of size 1"
        )
    try:
        values = np.array(payload)
    except ValueError as error:  # numpy: "inhomogeneous shape after N dimensions"
        raise _error(
            "the nested lists are ragged (rows of different lengths); send a rectangular array"
        ) from error
    except OverflowError as error:
        raise _error("a value is too large to be a pixel value") from error
    if values.size == 0:
        raise _error("the array is empty")
    if values.dtype.kind not in "iuf":
        what = {"U": "strings", "b": "booleans"}.get(
            values.dtype.kind, "values that are not numbers (null, objects or huge integers)"
        )
        raise _error(f"contains {what}; send numbers only")
    boolean = _first_boolean(payload, values.shape)
    if boolean is not None:
        raise _error(f"{_location(boolean)} is a boolean; send numbers only")
    if values.dtype.kind == "f":
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            raise _error(f"{_location(tuple(bad[0]))} is not a finite number (NaN or infinity)")
    out_of_range = (values < 0) | (values > 255) | (values != np.round(values))
    bad = np.argwhere(out_of_range)
    if len(bad):
        index = tuple(bad[0])
        raise _error(
            f"{_location(index)} is {values[index].item()!r}; the model expects raw uint8 pixel "
            "values, whole numbers 0-255 (not normalised to 0-1, not Hounsfield units)"
        )
    return values.astype(np.uint8)


def _squeeze_leading(values: np.ndarray, ndim: int) -> np.ndarray:
    """Drop leading axes of size 1 (a batch of one, a single channel) down to ``ndim`` axes."""
    while values.ndim > ndim and values.shape[0] == 1:
        values = values[0]
    return values


def _shape_error(values: np.ndarray, shape: tuple[int, ...], accepted: str) -> ImageDecodeError:
    return _error(
        f"shape {list(values.shape)} does not fit the model's input {list(shape)}; send {accepted}"
    )


@contextlib.contextmanager
def _as_field_error() -> Iterator[None]:
    """The rules uploads follow (size, crop, not blank), their messages naming the field."""
    try:
        yield
    except ImageDecodeError as error:
        raise _error(str(error), error.status) from None


def _picture(values: np.ndarray, shape: tuple[int, ...]) -> DecodedImage:
    channels, height, width = shape
    accepted = "(H, W) grayscale, or (C, H, W) with C = 1 or 3"
    values = _squeeze_leading(values, 3)
    if values.ndim == 3:
        if values.shape[0] not in _PICTURE_CHANNELS:
            raise _shape_error(values, shape, accepted)
        # (C, H, W) to the (H, W[, 3]) layout pictures are fitted from.
        values = values[0] if values.shape[0] == 1 else np.moveaxis(values, 0, -1)
    if values.ndim not in (2, 3):
        raise _shape_error(values, shape, accepted)
    with _as_field_error():
        check_content(values, 2)
        fitted = fit_picture(np.ascontiguousarray(values), channels, height, width)
        check_contrast(fitted, noun="image")
    return DecodedImage(
        pixels=fitted,
        source_format="array",
        source_shape=(int(values.shape[0]), int(values.shape[1])),
    )


def _volume(values: np.ndarray, shape: tuple[int, ...]) -> DecodedImage:
    channels, depth, height, width = shape
    accepted = "(D, H, W) or (1, D, H, W)"
    if channels != 1:
        raise _error(f"models with {channels}-channel volumes are not supported")
    values = _squeeze_leading(values, 3)
    if values.ndim != 3:
        raise _shape_error(values, shape, accepted)
    if min(values.shape) < 2:
        raise _error(f"shape {list(values.shape)} is a single slice, not a volume; send {accepted}")
    with _as_field_error():
        check_content(values, 3)
        fitted = resize_volume(values, depth, height, width)[None]
        check_contrast(fitted, noun="volume")
    return DecodedImage(
        pixels=fitted,
        source_format="array",
        source_shape=tuple(int(size) for size in values.shape),
    )


@untrusted_input("field 'array'")
def decode_array(payload: object, *, shape: tuple[int, ...]) -> DecodedImage:
    """Turn the JSON value of field ``array`` into the model's input.

    Leading axes of size 1 (a batch of one) are dropped. 2D models take (H, W) or (C, H, W)
    with C 1 or 3 (converted to the model's channels as an uploaded picture would be); 3D models
    take (D, H, W) or (1, D, H, W). Another spatial size is resized as uploads are: centre-crop and
    bicubic resize for pictures, trilinear zoom for volumes.

    Args:
        payload: The parsed JSON value: nested lists of whole numbers 0-255.
        shape: The model's per-item input shape, (C, H, W) or (C, D, H, W).

    Returns:
        uint8 pixels of shape ``shape``; ``source_format`` is ``array`` and ``source_shape`` the
        spatial shape sent.

    Raises:
        ImageDecodeError: 413 over :data:`MAX_ARRAY_ELEMENTS` values; 422 for anything else
            (not lists, ragged, non-numbers, NaN, values outside 0-255, a shape that cannot fit,
            fewer than 2 values along an axis, one value everywhere), as for uploads.
    """
    values = _to_uint8(payload)
    if len(shape) == 3:
        return _picture(values, shape)
    if len(shape) == 4:
        return _volume(values, shape)
    raise ValueError(f"model input shape {shape} is neither (C, H, W) nor (C, D, H, W)")
