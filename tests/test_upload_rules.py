"""Rules every upload and array follows, whatever its format, and what reaches logs and stderr."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import warnings
import zlib
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID

from datasets.arrays import decode_array
from datasets.images import ImageDecodeError, decode_image, dicom_ends_early
from tests.conftest import logged_refusal

INPUT_28 = {"channels": 1, "height": 28, "width": 28}
GRAY, VOLUME = (1, 28, 28), (1, 28, 28, 28)
# A transfer syntax UID with a patient's name in it: file text that must stay out of every log.
IDENTIFYING_UID = "1.2.840.99.DOE.JOHN"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _png(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def _dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # writing an invalid value on purpose warns
        warnings.simplefilter("ignore")
        dataset.save_as(buffer)
    return buffer.getvalue()


def _dicom(shared_datasets: Path, name: str) -> bytes:
    return (shared_datasets / "dicom" / name).read_bytes()


@pytest.fixture(scope="module")
def pneumonia(shared_datasets: Path) -> np.ndarray:
    with np.load(shared_datasets / "medmnist" / "pneumoniamnist.npz") as archive:
        return archive["test_images"][0]


def _constant_dicom(shared_datasets: Path) -> bytes:
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_MR_small.dcm")
    flat = np.full(dataset.pixel_array.shape, 300, dtype=dataset.pixel_array.dtype)
    dataset.PixelData = flat.tobytes()
    return _dicom_bytes(dataset)


def _refused(decode: object) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as failure:
        decode()  # type: ignore[operator]
    return failure.value


# -- 1. Blank and too-small images: one rule for files and arrays ----------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda _: _png(np.zeros((28, 28), np.uint8)), id="png-all-0"),
        pytest.param(lambda _: _png(np.full((28, 28), 255, np.uint8)), id="png-all-255"),
        pytest.param(lambda _: _png(np.full((40, 30), 51000, np.uint16)), id="png-flat-16-bit"),
        pytest.param(lambda _: _jpeg(np.full((32, 32, 3), (200, 90, 10), np.uint8)), id="jpeg-rgb"),
        pytest.param(_constant_dicom, id="dicom-constant"),
    ],
)
def test_a_blank_upload_is_a_422(shared_datasets: Path, make):
    data = make(shared_datasets)
    error = _refused(lambda: decode_image(data, **INPUT_28, refuse_blank=True))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "the image is blank: every pixel has the same value" in str(error)


@pytest.mark.parametrize(
    ("values", "shape", "message"),
    [
        (np.zeros((28, 28), int), GRAY, "the image is blank: every pixel has the same value"),
        (np.full((3, 28, 28), 7, int), (3, 28, 28), "the image is blank"),
        (np.full((28, 28, 28), 90, int), VOLUME, "the volume is blank: every voxel has the same"),
    ],
)
def test_a_blank_array_is_a_422_like_an_upload(values: np.ndarray, shape, message: str):
    error = _refused(lambda: decode_array(values.tolist(), shape=shape))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error).startswith("field 'array': ") and message in str(error)


def _near_black(span: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, span + 1, size=(size, size)).astype(np.uint8)


def _near_black_dicom(shared_datasets: Path, offset: int, **settings: float) -> bytes:
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_MR_small.dcm")
    noise = _near_black(7, 64).astype(dataset.pixel_array.dtype) + offset
    dataset.PixelData = noise.tobytes()
    for name, value in settings.items():
        setattr(dataset, name, value)
    return _dicom_bytes(dataset)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda _: _png(_near_black(3)), id="png-noise-0-3"),
        pytest.param(lambda _: _png(_near_black(7).astype(np.uint16) + 1000), id="png-16-bit"),
        pytest.param(lambda d: _near_black_dicom(d, 20), id="dicom"),
        pytest.param(lambda d: _near_black_dicom(d, 1000), id="dicom-12-bit"),
        pytest.param(
            lambda d: _near_black_dicom(d, 20, RescaleSlope=1, RescaleIntercept=0),
            id="dicom-rescaled",
        ),
        pytest.param(
            lambda d: _near_black_dicom(d, 20, WindowCenter=128, WindowWidth=256),
            id="dicom-windowed",
        ),
    ],
)
def test_a_nearly_blank_upload_is_a_422_in_every_form(shared_datasets: Path, make):
    # The graph scales each image by its own range: such noise would be scored at full contrast.
    data = make(shared_datasets)
    error = _refused(lambda: decode_image(data, **INPUT_28, refuse_blank=True))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    # Resizing averages some of the noise away: the model input spans fewer steps than the file.
    assert "the image is nearly blank: its values span " in str(error)
    assert "steps of the file's values (at least 16 are needed)" in str(error)


@pytest.mark.parametrize(
    ("values", "shape", "noun"),
    [
        (_near_black(10) + 100, GRAY, "image"),
        (
            np.stack([np.full((28, 28), 100), np.full((28, 28), 100), _near_black(3, 28) + 100]),
            (3, 28, 28),
            "image",
        ),
        (np.random.default_rng(1).integers(90, 96, size=(28, 28, 28)), VOLUME, "volume"),
    ],
    ids=["gray-100-110", "rgb-one-channel-0-3", "volume-90-95"],
)
def test_a_nearly_blank_array_is_a_422_like_an_upload(values: np.ndarray, shape, noun: str):
    error = _refused(lambda: decode_array(values.tolist(), shape=shape))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error).startswith("field 'array': ")
    assert f"the {noun} is nearly blank" in str(error)


def test_faint_real_pictures_and_rescaled_dicom_are_not_nearly_blank(shared_datasets: Path):
    faint = (_near_black(40) + 100).astype(np.uint8)
    assert decode_image(_png(faint), **INPUT_28, refuse_blank=True).pixels.shape == (1, 28, 28)
    assert decode_array(faint.tolist(), shape=GRAY).pixels.shape == (1, 28, 28)
    # A tiny rescale slope shrinks the displayed span, not the stored one.
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_CT_small.dcm")
    dataset.RescaleSlope, dataset.RescaleIntercept = 0.001, 0
    for name in ("WindowCenter", "WindowWidth"):
        if name in dataset:
            delattr(dataset, name)
    decoded = decode_image(_dicom_bytes(dataset), **INPUT_28, refuse_blank=True)
    assert decoded.pixels.shape == (1, 28, 28)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


@pytest.mark.parametrize("text_first", [False, True], ids=["ihdr-first", "text-chunk-first"])
@pytest.mark.parametrize(("colour_type", "samples"), [(2, 3), (4, 2), (6, 4)])
def test_a_deep_colour_png_is_refused_not_read_as_its_high_byte(
    colour_type: int, samples: int, text_first: bool
):
    # Pillow keeps the high byte of 16-bit colour: 12-bit content would arrive nearly black.
    side = 32
    rows = np.random.default_rng(0).integers(0, 4096, size=(side, side * samples)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = _png_chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([16, colour_type, 0, 0, 0]))
    text = _png_chunk(b"tEXt", b"Comment\x00test")
    chunks = [text, header] if text_first else [header, text]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _png_chunk(b"IDAT", zlib.compress(raw))
    data += _png_chunk(b"IEND", b"")
    error = _refused(lambda: decode_image(data, **INPUT_28, refuse_blank=True))
    assert error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert "16-bit colour and 16-bit grey-with-alpha PNG images are not accepted" in str(error)


def test_a_pale_colour_frame_is_nearly_blank_for_a_colour_model():
    # Channels at different constant levels are not contrast: each channel spans 3 levels.
    pink = np.stack(
        [_near_black(3) + 230, _near_black(3) + 180, _near_black(3) + 200], axis=-1
    ).astype(np.uint8)
    error = _refused(
        lambda: decode_image(_png(pink), channels=3, height=28, width=28, refuse_blank=True)
    )
    assert "nearly blank" in str(error)


def test_sparse_real_structures_are_not_nearly_blank(medmnist_dir: Path):
    # Vessel masks whose vessel is under 0.5% of the voxels, and a small lesion on black.
    volumes = np.load(medmnist_dir / "vesselmnist3d.npz")["train_images"]
    sparse = volumes[(volumes > 0).mean(axis=(1, 2, 3)) < 0.005][:5]
    assert len(sparse) == 5
    for volume in sparse:
        assert decode_array(volume.tolist(), shape=VOLUME).pixels.max() > 0
    lesion = np.zeros((512, 512), np.uint8)
    lesion[250:262, 250:262] = 200
    assert decode_image(_png(lesion), **INPUT_28, refuse_blank=True).pixels.max() > 0


def test_one_channel_differing_is_not_blank():
    rgb = np.full((3, 28, 28), 100, np.uint8)
    rgb[1, 5:10, 5:10] = 200
    assert decode_array(rgb.tolist(), shape=(3, 28, 28)).pixels.shape == (3, 28, 28)


def test_manifests_keep_blank_images_unless_asked(shared_datasets: Path):
    # decode_image is shared with manifest evaluation, which does not refuse blank images.
    decoded = decode_image(_png(np.zeros((28, 28), np.uint8)), **INPUT_28)
    assert decoded.pixels.shape == (1, 28, 28)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1)])
def test_fewer_than_two_pixels_along_an_axis_is_refused_for_uploads_and_arrays(size):
    height, width = size
    pixels = (np.arange(height * width).reshape(height, width) * 40).astype(np.uint8)
    for error in (
        _refused(lambda: decode_image(_png(pixels), **INPUT_28)),
        _refused(lambda: decode_array(pixels.tolist(), shape=GRAY)),
    ):
        assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
        assert (
            f"the image is {height} x {width} pixels; send at least 2 pixels along each axis"
            in (str(error))
        )


def test_two_by_two_pixels_are_accepted_from_both():
    pixels = np.array([[0, 80], [160, 240]], np.uint8)
    upload = decode_image(_png(pixels), **INPUT_28, refuse_blank=True)
    sent = decode_array(pixels.tolist(), shape=GRAY)
    assert upload.source_shape == sent.source_shape == (2, 2)
    np.testing.assert_array_equal(upload.pixels, sent.pixels)


def _gradient(height: int, width: int) -> np.ndarray:
    return (np.add.outer(np.arange(height), np.arange(width)) * 255 // (height + width)).astype(
        np.uint8
    )


@pytest.mark.parametrize(
    ("height", "width", "kept"),
    [
        (10, 10_000, "0.1%"),
        (10_000, 10, "0.1%"),
        (28, 113, "24.7%"),  # 24.78%, rounded down
        (113, 28, "24.7%"),
        (1000, 4001, "24.9%"),  # 24.994%: not "25.0%" beside "at least 25%"
    ],
)
def test_a_picture_whose_crop_would_keep_under_a_quarter_is_refused_from_both(
    height: int, width: int, kept: str
):
    pixels = _gradient(height, width)
    upload = _refused(lambda: decode_image(_png(pixels), **INPUT_28))
    array = _refused(lambda: decode_array(pixels.tolist(), shape=GRAY))
    assert str(array) == f"field 'array': {upload}"  # the array's errors name their field
    for error in (upload, array):
        assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
        assert f"the image is {width} x {height} pixels (width x height)" in str(error)
        assert f"would keep {kept} of itself (at least 25% is needed)" in str(error)


@pytest.mark.parametrize(("height", "width"), [(28, 112), (112, 28), (480, 640), (2500, 2000)])
def test_pictures_whose_crop_keeps_a_quarter_or_more_are_accepted(height: int, width: int):
    pixels = _gradient(height, width)
    decoded = decode_image(_png(pixels), **INPUT_28, refuse_blank=True)
    assert decoded.pixels.shape == GRAY


# -- 2. EXIF orientation ----------------------------------------------------------------------


@pytest.mark.parametrize("save", [_jpeg, _png], ids=["jpeg", "png"])
def test_exif_orientation_gives_the_upright_picture(pneumonia: np.ndarray, save):
    upright = np.ascontiguousarray(pneumonia[:, 3:23])  # 28 x 20: a turn changes the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored turned left, shown turned 90 degrees clockwise
    data = save(np.ascontiguousarray(np.rot90(upright)), exif=exif.tobytes())
    decoded = decode_image(data, channels=1, height=28, width=20)
    assert decoded.source_shape == (28, 20)
    difference = np.abs(decoded.pixels[0].astype(int) - upright.astype(int))
    assert difference.mean() < 3  # JPEG is lossy; PNG exact


# -- 3. File text stays out of the prediction log, logs and stderr ----------------------------


def _dicom_with_identifying_uid(shared_datasets: Path) -> bytes:
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_MR_small.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.file_meta.TransferSyntaxUID = UID(IDENTIFYING_UID)
        dataset.SOPClassUID = IDENTIFYING_UID
    return _dicom_bytes(dataset)


def test_an_unknown_transfer_syntax_is_quoted_and_masked_in_the_prediction_log(
    shared_datasets: Path, tmp_path: Path
):
    data = _dicom_with_identifying_uid(shared_datasets)
    error = _refused(lambda: decode_image(data, **INPUT_28))
    assert error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert f"'{IDENTIFYING_UID}' (unknown)" in str(error)  # the client sees what it sent
    line = logged_refusal(error, tmp_path, "/v1/screen")
    assert "DOE" not in line
    assert "DICOM transfer syntax '…' (unknown)" in json.loads(line)["error"]


def test_a_standard_transfer_syntax_is_named_unquoted(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_JPEG2000.dcm")
    dataset.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder
    error = _refused(lambda: decode_image(_dicom_bytes(dataset), **INPUT_28))
    assert "transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2" in str(error)


def test_pydicom_neither_warns_nor_logs_file_text_while_parsing(
    shared_datasets: Path, caplog: pytest.LogCaptureFixture
):
    data = _dicom_with_identifying_uid(shared_datasets)
    caplog.clear()  # what making the file logged
    before = (pydicom.config.settings.reading_validation_mode, logging.getLogger("pydicom").level)
    # The process's own filters (not "always"): a server has them, and they stay in force.
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        outcomes: list[object] = []

        def parse() -> None:
            try:
                decode_image(data, **INPUT_28)
                outcomes.append("decoded")
            except Exception as error:  # recorded: a failure in a thread only warns
                outcomes.append(error)

        threads = [threading.Thread(target=parse) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(outcomes) == 8
    assert all(
        isinstance(outcome, ImageDecodeError) and outcome.status == 415 for outcome in outcomes
    ), outcomes
    assert not [w for w in caught if "DOE" in str(w.message)]
    assert "DOE" not in caplog.text
    # Validation and pydicom's logger are back as they were once no file is being parsed.
    after = (pydicom.config.settings.reading_validation_mode, logging.getLogger("pydicom").level)
    assert after == before


def test_a_file_uid_is_not_written_to_stderr(shared_datasets: Path, tmp_path: Path):
    upload = tmp_path / "upload.dcm"
    upload.write_bytes(_dicom_with_identifying_uid(shared_datasets))
    # As in the server: default warning filters, and a handler on the root logger.
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from datasets.images import ImageDecodeError, decode_image\n"
        "try:\n"
        f"    decode_image(open({str(upload)!r}, 'rb').read(), channels=1, height=28, width=28)\n"
        "except ImageDecodeError as error:\n"
        "    print(error.status)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
    )
    assert completed.stdout.strip() == "415", completed.stderr
    assert "DOE" not in completed.stderr


# -- 5a. A DICOM file cut short says so ---------------------------------------------------------


def _pixel_data_offset(data: bytes) -> int:
    """Where the PixelData element starts (its value minus the explicit VR OW header)."""
    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False)
    return dataset.get_item("PixelData").value_tell - 12


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda data: data[:700], id="in-the-header"),
        pytest.param(
            lambda data: data[:132] + b"\x8f\x01garbage that is no element" * 20, id="garbage"
        ),
        pytest.param(lambda data: data[: _pixel_data_offset(data)], id="before-the-pixel-data"),
    ],
)
def test_a_dicom_cut_short_is_a_400_saying_so(shared_datasets: Path, cut):
    data = cut(_dicom(shared_datasets, "nih_chestxray14_dx_1024.dcm"))
    error = _refused(lambda: decode_image(data, **INPUT_28))
    assert error.status == HTTPStatus.BAD_REQUEST
    assert "truncated or corrupt" in str(error) and "structured report" not in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "nih_chestxray14_dx_1024.dcm",
        "pydicom_CT_small.dcm",
        "pydicom_JPEG2000.dcm",
        "pydicom_MR_small_RLE.dcm",
        "pydicom_waveform_ecg.dcm",
    ],
)
def test_complete_dicom_files_do_not_end_early(shared_datasets: Path, name: str):
    data = _dicom(shared_datasets, name)
    syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert not dicom_ends_early(data, syntax)
    assert not dicom_ends_early(data + b"\0\0", syntax)  # trailing padding is no cut
    assert dicom_ends_early(data + b"\x08\x00", syntax)  # a header begun and cut


def test_a_padded_waveform_is_still_named_a_waveform(shared_datasets: Path):
    data = _dicom(shared_datasets, "pydicom_waveform_ecg.dcm") + b"\0"  # padded to even length
    error = _refused(lambda: decode_image(data, **INPUT_28))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "it is a waveform" in str(error)
