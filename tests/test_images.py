"""The shared decoder: every picture mode, and bad display settings, give an image or a 4xx."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from functools import partial
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from datasets.images import ImageDecodeError, decode_image
from tests.conftest import grayscale_dicom

GRADIENT = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
INPUT_28 = {"channels": 1, "height": 28, "width": 28}


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


DICOM_DIR = "dicom"


def dicom_file(shared_datasets: Path, name: str) -> bytes:
    return (shared_datasets / DICOM_DIR / name).read_bytes()


def test_rle_lossless_decodes_to_the_same_pixels_as_uncompressed(shared_datasets: Path):
    rle = decode_image(dicom_file(shared_datasets, "pydicom_MR_small_RLE.dcm"), **INPUT_28)
    plain = decode_image(dicom_file(shared_datasets, "pydicom_MR_small.dcm"), **INPUT_28)
    assert rle.source_format == "dicom" and rle.source_shape == (64, 64)
    np.testing.assert_array_equal(rle.pixels, plain.pixels)


def test_jpeg2000_decodes_with_the_installed_decoder(shared_datasets: Path):
    # Pillow's wheels bundle OpenJPEG, and pydicom 3 decodes JPEG 2000 with Pillow.
    decoded = decode_image(dicom_file(shared_datasets, "pydicom_JPEG2000.dcm"), **INPUT_28)
    assert decoded.source_shape == (1024, 256) and decoded.pixels.std() > 0


@pytest.fixture
def no_jpeg2000_decoder() -> Iterator[None]:
    """JPEG 2000 as on an installation without a decoder plugin (Pillow built without it)."""
    decoder = get_decoder(JPEG2000)
    decoder.remove_plugin("pillow")
    try:
        yield
    finally:
        decoder.add_plugin("pillow", ("pydicom.pixels.decoders.pillow", "_decode_frame"))


def test_jpeg2000_without_a_decoder_is_a_415_naming_the_syntax(
    shared_datasets: Path, no_jpeg2000_decoder: None
):
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(dicom_file(shared_datasets, "pydicom_JPEG2000.dcm"), **INPUT_28)
    assert failure.value.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    message = str(failure.value)
    assert "1.2.840.10008.1.2.4.91" in message and "JPEG 2000" in message
    assert "uncompressed" in message


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        (JPEGLSLossless, "JPEG-LS Lossless"),  # needs pylibjpeg-libjpeg, gdcm or pyjpegls
        (UID("1.2.840.10008.1.2.4.100"), "MPEG2"),  # pydicom has no decoder at all
    ],
)
def test_transfer_syntax_without_decoder_is_a_415(shared_datasets: Path, syntax: UID, name: str):
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_JPEG2000.dcm")
    dataset.file_meta.TransferSyntaxUID = syntax
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(dataset_bytes(dataset), **INPUT_28)
    assert failure.value.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert str(syntax) in str(failure.value) and name in str(failure.value)


def test_waveform_dicom_is_a_422_pointing_to_the_monitor_route(shared_datasets: Path):
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(dicom_file(shared_datasets, "pydicom_waveform_ecg.dcm"), **INPUT_28)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "no pixel data" in str(failure.value)
    assert "POST /v1/monitor/dicom" in str(failure.value)


def test_a_dicom_without_pixels_shows_only_numbers_of_its_size(shared_datasets: Path):
    from pydicom.dataelem import DataElement

    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_CT_small.dcm")
    del dataset.PixelData
    with pytest.raises(ImageDecodeError, match="describes a 128 x 128 image but holds no pixel"):
        decode_image(dataset_bytes(dataset), **INPUT_28)
    # A crafted file can put a name anywhere; an error message reaches the prediction log.
    dataset[0x00280010] = DataElement(0x00280010, "LO", "DOE^JOHN MRN12345")
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(dataset_bytes(dataset), **INPUT_28)
    assert str(failure.value).startswith("the DICOM file describes an image but holds no pixel")
    assert "DOE" not in str(failure.value)


def test_a_dicom_file_cut_right_after_its_header_is_a_400(shared_datasets: Path):
    """pydicom reads it as an empty dataset, which looked like a structured report (422)."""
    from datasets.waveforms import ecg_from_dicom

    data = (shared_datasets / DICOM_DIR / "pydicom_CT_small.dcm").read_bytes()
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, pydicom.dcmread(io.BytesIO(data)).file_meta)
    for cut in (data[:132], data[:132] + meta.getvalue()):  # after "DICM"; after the meta group
        for decode in (partial(decode_image, **INPUT_28), ecg_from_dicom):
            with pytest.raises(ImageDecodeError) as failure:
                decode(cut)
            assert failure.value.status == HTTPStatus.BAD_REQUEST
            assert f"ends after its header ({len(cut)} bytes" in str(failure.value)


def test_truncated_pixel_data_is_a_422(shared_datasets: Path):
    with pytest.raises(ImageDecodeError, match="pixel data cannot be decoded") as failure:
        decode_image(dicom_file(shared_datasets, "pydicom_MR_truncated.dcm"), **INPUT_28)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


def test_patient_tags_never_reach_an_error_message(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "nih_chestxray14_dx_1024.dcm")
    identifiers = [str(dataset.PatientName), str(dataset.PatientID)]
    dataset.WindowWidth, dataset.WindowCenter = 0, 10
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(dataset_bytes(dataset), **INPUT_28)
    assert all(identifiers) and not any(value in str(failure.value) for value in identifiers)


def test_only_the_pixel_tags_of_an_upload_are_parsed(shared_datasets: Path):
    from datasets.images import _PIXEL_TAGS, read_dicom_dataset

    data = (shared_datasets / DICOM_DIR / "nih_chestxray14_dx_1024.dcm").read_bytes()
    assert "PatientID" in pydicom.dcmread(io.BytesIO(data))  # the file does carry them
    parsed = read_dicom_dataset(data, tags=list(_PIXEL_TAGS))
    assert "PixelData" in parsed and "Rows" in parsed
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(parsed.dir())


def _status_of(data: bytes) -> tuple[HTTPStatus, str]:
    with pytest.raises(ImageDecodeError) as failure:
        decode_image(data, **INPUT_28)
    return failure.value.status, str(failure.value)


def test_deflated_dicom_is_a_415_before_anything_is_inflated(shared_datasets: Path):
    # pydicom inflates a deflated file whole and without a limit: a few KB could become GBs.
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_MR_small.dcm")
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert "Deflated" in message and "uncompressed" in message


def test_compressed_dicom_declaring_a_huge_picture_is_a_413(shared_datasets: Path):
    # An 8 KB RLE file claiming 20000 x 20000 pixels: refused before pydicom allocates them.
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_MR_small_RLE.dcm")
    dataset.Rows = dataset.Columns = 20000
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert "400000000 pixels" in message


@pytest.mark.parametrize(
    ("tag", "value"),
    [("RescaleSlope", "1e308"), ("RescaleSlope", "nan"), ("RescaleIntercept", "inf")],
)
def test_dicom_rescale_giving_non_finite_pixels_is_a_422(shared_datasets: Path, tag: str, value):
    # Such pixels used to become an all-black picture that was scored.
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_CT_small.dcm")
    setattr(dataset, tag, value)
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "not finite" in message and "RescaleSlope" in message


def test_float_pixel_data_is_named_as_such(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_MR_small.dcm")
    del dataset.PixelData
    dataset.FloatPixelData = np.zeros(64 * 64, np.float32).tobytes()
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY and "float pixel data" in message


@pytest.mark.parametrize("photometric", ["YBR_RCT", "YBR_ICT"])
def test_colour_jpeg2000_dicom_decodes_to_rgb(photometric: str):
    # JPEG 2000 colour is stored as YBR_RCT (lossless) or YBR_ICT (lossy), as DICOM requires.
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[16:48, 16:48, 1] = 200, 150
    lossless = photometric == "YBR_RCT"
    codestream = io.BytesIO()
    Image.fromarray(rgb).save(
        codestream, format="JPEG2000", irreversible=not lossless, mct=1, no_jp2=True
    )
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless if lossless else JPEG2000
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Rows = dataset.Columns = 64
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, photometric
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = encapsulate([codestream.getvalue()])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    decoded = decode_image(buffer.getvalue(), channels=3, height=64, width=64)
    np.testing.assert_allclose(decoded.pixels[:, 32, 32], [200, 150, 0], atol=2)
    np.testing.assert_allclose(decoded.pixels[:, 4, 4], [200, 0, 0], atol=2)


def test_pictures_over_the_pixel_limit_are_a_413():
    big = io.BytesIO()
    Image.new("L", (7000, 7000)).save(big, format="PNG")  # 49 M pixels in a 50 KB file
    status, message = _status_of(big.getvalue())
    assert status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and "49000000 pixels" in message
    # Past Pillow's own bomb limit (2 x 89 M pixels) the header alone is refused.
    small = io.BytesIO()
    Image.new("L", (50000, 1)).save(small, format="PNG")
    header = bytearray(small.getvalue())
    header[20:24] = (50000).to_bytes(4, "big")  # IHDR height
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    status, message = _status_of(bytes(header))
    assert status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and "too large" in message


def test_multi_picture_jpeg_is_read_as_its_first_picture():
    first, second = Image.fromarray(GRADIENT), Image.fromarray(255 - GRADIENT)
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    decoded = decode_image(buffer.getvalue(), channels=1, height=48, width=64)
    assert decoded.source_format == "jpeg"
    assert np.abs(decoded.pixels[0].astype(int) - GRADIENT).mean() < 3


def test_a_window_that_blanks_the_picture_is_a_422(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_CT_small.dcm")
    dataset.WindowCenter, dataset.WindowWidth = -1e6, 10  # every pixel above the window
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert message == (
        "the DICOM display settings (WindowCenter and WindowWidth, or the VOI LUT) map every "
        "pixel to one value; check them"
    )
    # A rescale slope of 0, in a file with no window: the message names the slope.
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_CT_small.dcm")
    for name in ("WindowCenter", "WindowWidth"):
        if name in dataset:
            delattr(dataset, name)
    dataset.RescaleSlope = 0
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert message.startswith("the DICOM modality settings (RescaleSlope, or the modality LUT)")


def test_compressed_codestream_larger_than_declared_is_refused_before_decoding():
    # A 4000 x 4000 JPEG 2000 codestream in a file declaring 64 x 64: decoded, it would take
    # 32 MB here (gigabytes at 13000 x 13000, from a 2 MB upload), before any size check.
    codestream = io.BytesIO()
    Image.new("L", (4000, 4000)).save(codestream, format="JPEG2000", no_jp2=True)
    data = grayscale_dicom(64, 64, 8, encapsulate([codestream.getvalue()]), JPEG2000Lossless)
    status, message = _status_of(data)
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "holds a 4000 x 4000 image" in message and "Columns 64 and Rows 64" in message
    # The same codestream declared at its own size decodes: the check compares, nothing more.
    codestream = io.BytesIO()
    Image.fromarray(GRADIENT).save(codestream, format="JPEG2000", no_jp2=True)
    data = grayscale_dicom(48, 64, 8, encapsulate([codestream.getvalue()]), JPEG2000Lossless)
    assert decode_image(data, **INPUT_28).source_shape == (48, 64)


def test_one_bit_dicom_is_spread_over_the_grey_levels_as_png_is():
    mask = (np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8)
    packed = np.packbits(mask.ravel(), bitorder="little").tobytes()
    dicom = decode_image(
        grayscale_dicom(64, 64, 1, packed, ExplicitVRLittleEndian), refuse_blank=True, **INPUT_28
    )
    png = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(png, format="PNG")
    # Before, pydicom's 0 and 1 reached the model as they are, and the service refused the
    # picture as nearly blank.
    np.testing.assert_array_equal(dicom.pixels, decode_image(png.getvalue(), **INPUT_28).pixels)
    assert dicom.pixels.max() == 255
    # An identity rescale (slope 1, intercept 0) changes nothing: before, it made the mask a
    # picture of values 0 and 1, refused as nearly blank.
    dataset = pydicom.dcmread(
        io.BytesIO(grayscale_dicom(64, 64, 1, packed, ExplicitVRLittleEndian))
    )
    dataset.RescaleSlope, dataset.RescaleIntercept, dataset.RescaleType = 1, 0, "US"
    rescaled = decode_image(dataset_bytes(dataset), refuse_blank=True, **INPUT_28)
    np.testing.assert_array_equal(rescaled.pixels, dicom.pixels)


def test_sixteen_bit_picture_crushed_by_one_saturated_pixel_is_a_422():
    rows, columns = np.mgrid[0:256, 0:256]
    anatomy = ((rows + columns) * 1000 // 510).astype(np.uint16)  # 1,000 file steps
    for saturated in (False, True):
        picture = anatomy.copy()
        if saturated:
            picture[0, 0] = 65535  # the other pixels then share 4 of the 256 grey levels
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        if not saturated:
            decode_image(buffer.getvalue(), refuse_blank=True, **INPUT_28)
            continue
        with pytest.raises(ImageDecodeError, match="spans 4 of 256 grey levels") as failure:
            decode_image(buffer.getvalue(), refuse_blank=True, **INPUT_28)
        assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


def test_pixel_data_longer_than_one_frame_is_named(shared_datasets: Path):
    dataset = pydicom.dcmread(shared_datasets / DICOM_DIR / "pydicom_MR_small.dcm")
    dataset.PixelData = dataset.PixelData * 2
    status, message = _status_of(dataset_bytes(dataset))
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "more than one 64 x 64 frame" in message


def test_a_lut_on_few_stored_bits_keeps_its_own_output_range():
    # 7 stored bits through a VOI LUT whose output is 8-bit: the LUT's values are the picture,
    # not stored values to spread (spreading them saturated half the picture white).
    ramp = np.tile(np.arange(128, dtype=np.uint8), (100, 1))
    data = bytearray(grayscale_dicom(100, 128, 8, ramp.tobytes(), ExplicitVRLittleEndian))
    dataset = pydicom.dcmread(io.BytesIO(bytes(data)))
    dataset.BitsStored, dataset.HighBit = 7, 6
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [128, 0, 8]
    lut.LUTData = (np.arange(128, dtype=np.uint16) * 2).tobytes()
    lut["LUTData"].VR = "OW"
    dataset.VOILUTSequence = [lut]
    decoded = decode_image(dataset_bytes(dataset), channels=1, height=100, width=128)
    assert decoded.pixels[0, 50, [0, 32, 64, 127]].tolist() == [0, 64, 128, 254]


def test_pixel_data_of_as_many_frames_as_rows_is_not_read_as_colour():
    # 3 x 3 x 3 bytes in a 3 x 3 grayscale file: pydicom reads 3 frames, which look like one
    # 3 x 3 colour picture.
    data = grayscale_dicom(3, 3, 8, bytes(range(27)), ExplicitVRLittleEndian)
    status, message = _status_of(data)
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY and "more than one 3 x 3 frame" in message
