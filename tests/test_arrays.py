"""Pixel arrays sent as JSON: the model's uint8 input, or a 4xx that says what is wrong."""

from __future__ import annotations

import functools
import io
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.arrays import MAX_ARRAY_ELEMENTS, decode_array
from datasets.images import ImageDecodeError, decode_image

GRAY, RGB, VOLUME = (1, 28, 28), (3, 28, 28), (1, 28, 28, 28)


@pytest.fixture(scope="module")
def vessel(shared_datasets: Path) -> np.ndarray:
    with np.load(shared_datasets / "medmnist" / "vesselmnist3d.npz") as archive:
        return archive["test_images"][0]


@pytest.fixture(scope="module")
def pneumonia(shared_datasets: Path) -> np.ndarray:
    with np.load(shared_datasets / "medmnist" / "pneumoniamnist.npz") as archive:
        return archive["test_images"][0]


@pytest.mark.parametrize("wrap", [lambda a: a, lambda a: a[None], lambda a: a[None, None]])
def test_medmnist_image_passes_through_unchanged(pneumonia: np.ndarray, wrap):
    decoded = decode_array(wrap(pneumonia).tolist(), shape=GRAY)
    assert decoded.source_format == "array" and decoded.source_shape == (28, 28)
    np.testing.assert_array_equal(decoded.pixels, pneumonia[None])


@pytest.mark.parametrize("wrap", [lambda a: a, lambda a: a[None], lambda a: a[None, None]])
def test_medmnist_volume_passes_through_unchanged(vessel: np.ndarray, wrap):
    decoded = decode_array(wrap(vessel).tolist(), shape=VOLUME)
    assert decoded.pixels.dtype == np.uint8 and decoded.source_shape == (28, 28, 28)
    np.testing.assert_array_equal(decoded.pixels, vessel[None])


def test_whole_floats_are_accepted(pneumonia: np.ndarray):
    decoded = decode_array(pneumonia.astype(float).tolist(), shape=GRAY)
    np.testing.assert_array_equal(decoded.pixels, pneumonia[None])


def test_other_picture_sizes_are_fitted_like_uploads():
    picture = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    for shape in (GRAY, RGB):
        upload = decode_image(buffer.getvalue(), channels=shape[0], height=28, width=28)
        sent = decode_array(picture.tolist(), shape=shape)
        assert sent.source_shape == (48, 64)
        np.testing.assert_array_equal(sent.pixels, upload.pixels)


def test_channel_first_rgb_is_accepted():
    ramp = np.arange(28 * 28).reshape(28, 28) % 100
    # Each channel a ramp at its own level: a picture of one colour would be refused as blank.
    rgb = np.stack([(ramp + value).astype(np.uint8) for value in (10, 120, 150)])
    np.testing.assert_array_equal(decode_array(rgb.tolist(), shape=RGB).pixels, rgb)
    assert decode_array(rgb.tolist(), shape=GRAY).pixels.shape == GRAY


def test_other_volume_sizes_are_zoomed(vessel: np.ndarray):
    decoded = decode_array(vessel[::2, ::2].tolist(), shape=VOLUME)
    assert decoded.pixels.shape == VOLUME and decoded.source_shape == (14, 14, 28)


@pytest.mark.parametrize(
    ("payload", "shape", "message"),
    [
        ([[0, 1], [2]], GRAY, "ragged"),
        (functools.reduce(lambda inner, _: [inner], range(70), [1, 2]), GRAY, "at least 71 deep"),
        ([[0, "1"], [2, 3]], GRAY, "strings"),
        ([[0, None], [2, 3]], GRAY, "not numbers"),
        ([[True, False], [False, True]], GRAY, "booleans"),
        ([[0, 1], [True, 3]], GRAY, r"array\[1\]\[0\] is a boolean; send numbers only"),
        ([[0.5, 1.0], [2.0, False]], GRAY, r"array\[1\]\[1\] is a boolean"),
        ([[0, float("nan")], [2, 3]], GRAY, r"array\[0\]\[1\] is not a finite number"),
        ([[0, 1], [2, 256]], GRAY, r"array\[1\]\[1\] is 256; the model expects raw uint8"),
        ([[0, 0.5], [1, 1]], GRAY, r"array\[0\]\[1\] is 0.5; .* 0-255"),
        ([[0, -1024], [1, 1]], GRAY, "not Hounsfield"),
        ({"pixels": [1, 2]}, GRAY, "expected nested lists of numbers, got an object"),
        ([], GRAY, "empty"),
        ([1, 2, 3], GRAY, r"shape \[3\] does not fit"),
        (np.zeros((2, 28, 28), int).tolist(), RGB, "C = 1 or 3"),
        (np.zeros((28, 28), int).tolist(), VOLUME, r"shape \[28, 28\] does not fit"),
        (np.zeros((1, 28, 28), int).tolist(), VOLUME, "single slice"),
    ],
)
def test_bad_arrays_are_422_naming_the_problem(payload: object, shape, message: str):
    with pytest.raises(ImageDecodeError, match=message) as failure:
        decode_array(payload, shape=shape)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(failure.value).startswith("field 'array'")


def test_too_many_values_is_a_413():
    side = round(MAX_ARRAY_ELEMENTS ** (1 / 3)) + 1
    row = [0] * side
    plane = [row] * side  # shared lists: the size is refused before numpy builds anything
    with pytest.raises(ImageDecodeError, match="exceed the limit") as failure:
        decode_array([plane] * side, shape=VOLUME)
    assert failure.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
